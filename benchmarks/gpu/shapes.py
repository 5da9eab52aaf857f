"""Real model shapes as plain dicts -> ModelArch, and random-init CausalLMs built directly on a device.

No transformers config and no hub: the numbers below are the published configs of each model, typed in. Random
weights are faithful for time (every GEMM, every KV byte is the real size), not for acceptance (see dial.py).
Only `ModelArch` and `CausalLM` are imported from minedraft, both of which exist in every version of the package.
"""

from __future__ import annotations

import torch

from minedraft.runtime.model import CausalLM, ModelArch

# name -> the fields of ModelArch plus `rope_theta` (default RoPE: Llama 3.x's llama3 scaling is not reproduced;
# it changes the cos/sin values, not the cost).
SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
                     num_kv_heads=8, head_dim=128, intermediate_size=12288, rms_norm_eps=1e-6, max_position=40960,
                     qk_norm=True, sliding_window=None, tie_word_embeddings=False, eos_token_ids=(151645, 151643),
                     rope_theta=1e6),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
                       num_kv_heads=8, head_dim=128, intermediate_size=3072, rms_norm_eps=1e-6, max_position=40960,
                       qk_norm=True, sliding_window=None, tie_word_embeddings=True, eos_token_ids=(151645, 151643),
                       rope_theta=1e6),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5,
                         max_position=131072, qk_norm=False, sliding_window=None, tie_word_embeddings=False,
                         eos_token_ids=(128001, 128008, 128009), rope_theta=5e5),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                         num_kv_heads=8, head_dim=64, intermediate_size=8192, rms_norm_eps=1e-5,
                         max_position=131072, qk_norm=False, sliding_window=None, tie_word_embeddings=True,
                         eos_token_ids=(128001, 128008, 128009), rope_theta=5e5),
    # CPU dry runs: same families and code paths (qk_norm / not, tied / untied, GQA, head_dim 128 / 64), tiny sizes.
    "tiny-target": dict(model_type="qwen3", vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=128, intermediate_size=512, rms_norm_eps=1e-6, max_position=4096,
                        qk_norm=True, sliding_window=None, tie_word_embeddings=False, eos_token_ids=(1,),
                        rope_theta=1e6),
    "tiny-draft": dict(model_type="qwen3", vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=64, intermediate_size=256, rms_norm_eps=1e-6, max_position=4096,
                       qk_norm=True, sliding_window=None, tie_word_embeddings=True, eos_token_ids=(1,),
                       rope_theta=1e6),
    "tiny-llama-target": dict(model_type="llama", vocab_size=1000, hidden_size=256, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=128, intermediate_size=512, rms_norm_eps=1e-5,
                              max_position=4096, qk_norm=False, sliding_window=None, tie_word_embeddings=False,
                              eos_token_ids=(1,), rope_theta=5e5),
    "tiny-llama-draft": dict(model_type="llama", vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=64, intermediate_size=256, rms_norm_eps=1e-5,
                             max_position=4096, qk_norm=False, sliding_window=None, tie_word_embeddings=True,
                             eos_token_ids=(1,), rope_theta=5e5),
}

# --dry-run stands each real model in with a tiny one of the same family and role.
TINY = {"qwen3-8b": "tiny-target", "qwen3-0.6b": "tiny-draft", "llama-3.1-8b": "tiny-llama-target",
        "llama-3.2-1b": "tiny-llama-draft"}


def arch_of(name: str) -> ModelArch:
    d = dict(SHAPES[name])
    d.pop("rope_theta")
    return ModelArch(**d)


def weight_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint of this arch holds, by its HF name (what CausalLM reads)."""
    a = arch
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab_size, a.hidden_size),
                                     "model.norm.weight": (a.hidden_size,)}
    if not a.tie_word_embeddings:
        s["lm_head.weight"] = (a.vocab_size, a.hidden_size)
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (a.hidden_size,)
        s[p + "post_attention_layernorm.weight"] = (a.hidden_size,)
        s[p + "self_attn.q_proj.weight"] = (q, a.hidden_size)
        s[p + "self_attn.k_proj.weight"] = (kv, a.hidden_size)
        s[p + "self_attn.v_proj.weight"] = (kv, a.hidden_size)
        s[p + "self_attn.o_proj.weight"] = (a.hidden_size, q)
        s[p + "mlp.gate_proj.weight"] = (a.intermediate_size, a.hidden_size)
        s[p + "mlp.up_proj.weight"] = (a.intermediate_size, a.hidden_size)
        s[p + "mlp.down_proj.weight"] = (a.hidden_size, a.intermediate_size)
        if a.qk_norm:
            s[p + "self_attn.q_norm.weight"] = (a.head_dim,)
            s[p + "self_attn.k_norm.weight"] = (a.head_dim,)
    return s


def _elsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def weight_bytes(arch: ModelArch, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """total: every weight once (a tied lm_head counted once). per_forward: what one forward must read from memory at
    least: everything but an untied embedding table (only T rows of it are gathered); a tied table is read whole as the
    lm_head. The weight-read floor of one forward is per_forward / bandwidth."""
    total = 0
    for shape in weight_shapes(arch).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    el = _elsize(dtype)
    embed = arch.vocab_size * arch.hidden_size
    per_forward = total - (0 if arch.tie_word_embeddings else embed)
    return {"params": total, "total": total * el, "per_forward": per_forward * el}


def kv_bytes_per_token(arch: ModelArch, dtype: torch.dtype = torch.bfloat16) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * _elsize(dtype)


def build_random_model(name: str, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> CausalLM:
    """A CausalLM of `name`'s shape, weights drawn on the device itself (no host copy): normal(0, 0.02) for matrices,
    ones for norms. Deterministic for a given (name, device, dtype, seed)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    arch = arch_of(name)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    weights = {}
    for wname, shape in weight_shapes(arch).items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if len(shape) == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        weights[wname] = t
    theta = SHAPES[name]["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
    return CausalLM(arch, weights, inv_freq, 1.0)


if __name__ == "__main__":  # print the table of shapes and their byte counts
    for n in SHAPES:
        a = arch_of(n)
        wb = weight_bytes(a)
        print(f"{n:18s} params {wb['params'] / 1e9:6.3f} B  bf16 total {wb['total'] / 1e9:6.2f} GB  "
              f"read/forward {wb['per_forward'] / 1e9:6.2f} GB  kv/token {kv_bytes_per_token(a) / 1024:6.1f} KiB")
