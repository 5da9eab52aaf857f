"""Our own batched forward for the Llama family (Llama, Mistral, Qwen2, Qwen3).

Why not call transformers' modules: serving needs one forward over many sequences of different lengths that
reads and writes a paged KV cache by position (so rollback is a rewind) and returns logits only where asked.
transformers stays the oracle in the tests; here it only parses configs and tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minedraft.runtime.attention import AttentionBatch, paged_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArch:
    """The few numbers that define a Llama-family decoder; parsed once from an HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position: int
    qk_norm: bool  # Qwen3 normalises q and k per head before RoPE
    sliding_window: int | None  # Mistral; None means full attention
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelArch":
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (Llama family uses silu)")
        window = None
        if model_type == "mistral":
            window = getattr(cfg, "sliding_window", None)
        elif getattr(cfg, "use_sliding_window", False):
            raise ValueError(f"{model_type} with use_sliding_window=True is not supported")
        heads = cfg.num_attention_heads
        eos = getattr(cfg, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position=cfg.max_position_embeddings,
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
        )


def rope_inv_freq(cfg, arch: ModelArch) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and cos/sin scale, delegating scaled variants (llama3, yarn, ...) to transformers
    so our numbers are the checkpoint's numbers by construction."""
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
        inv = 1.0 / (base ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
        return inv, 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic RoPE scaling changes with sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv.float(), float(scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, D]. The half-rotation layout HF checkpoints are stored in."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def fuse_projections(arch: ModelArch, w: dict[str, torch.Tensor]) -> None:
    """Concatenate q/k/v (and their biases) into one `qkv_proj` and gate/up into one `gate_up_proj` per layer, in
    place: one GEMM instead of three (two), i.e. fewer launches and one read of the activations. Only where it pays
    and numerics allow: on the CPU the reference oracle is transformers' separate projections, bit for bit."""
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
            for suffix in (".weight", ".bias"):
                if p + parts[0] + suffix in w:
                    w[p + fused + suffix] = torch.cat([w.pop(p + part + suffix) for part in parts])


def _fusable(arch: ModelArch) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    d = arch.head_dim
    return d >= 32 and d & (d - 1) == 0


class CausalLM:
    """Weights plus a forward over packed tokens. Holds no per-sequence state: the KV cache is passed in."""

    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor], inv_freq: torch.Tensor, rope_scale: float,
                 fuse: bool | None = None):
        self.arch = arch
        self.w = weights
        self.device = weights["model.embed_tokens.weight"].device
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.fused = self.device.type == "cuda" if fuse is None else fuse
        if self.fused:
            fuse_projections(arch, weights)
        # Fused Triton kernels for norms / RoPE / SiLU*mul (triton_fused.py): on CUDA when the head layout allows.
        self.fused_kernels = self.fused and self.device.type == "cuda" and _fusable(arch)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        positions = torch.arange(arch.max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * rope_scale).to(self.device, self.dtype)
        self.sin = (emb.sin() * rope_scale).to(self.device, self.dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _qkv(self, x: torch.Tensor, p: str):
        a = self.arch
        if self.fused:
            nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
            q, k, v = self._linear(x, p + "self_attn.qkv_proj").split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = (self._linear(x, p + "self_attn." + n) for n in ("q_proj", "k_proj", "v_proj"))
        return (q.reshape(-1, a.num_heads, a.head_dim), k.reshape(-1, a.num_kv_heads, a.head_dim),
                v.reshape(-1, a.num_kv_heads, a.head_dim))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, batch: AttentionBatch, kv: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [T] packed new tokens of all sequences; batch describes where they sit; kv: [layers, 2, slots, Hkv, D].
        Returns logits for the packed rows in `logit_rows` (all rows when None): skipping the lm_head on prompt
        positions nobody reads matters at real vocabulary sizes."""
        if self.fused_kernels:
            return self._forward_fused(tokens, batch, kv, logit_rows)
        return self._forward_eager(tokens, batch, kv, logit_rows)

    def _forward_fused(self, tokens, batch: AttentionBatch, kv, logit_rows):
        """The same layer as `_forward_eager` in ~10 kernels: GEMMs on merged weights, one epilogue kernel for q/k
        norm + RoPE + cache write, the residual add folded into the next RMSNorm."""
        from minedraft.runtime import triton_fused as tf

        a, w = self.arch, self.w
        h = w["model.embed_tokens.weight"][tokens]
        x = tf.rms_norm(h, w["model.layers.0.input_layernorm.weight"], a.rms_norm_eps)
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            qkv = self._linear(x, p + "self_attn.qkv_proj")
            q = tf.qkv_epilogue(qkv, batch.positions, batch.write_slots, self.cos, self.sin,
                                w.get(p + "self_attn.q_norm.weight"), w.get(p + "self_attn.k_norm.weight"),
                                a.rms_norm_eps, kv[i, 0], kv[i, 1], a.num_heads, a.num_kv_heads, a.head_dim)
            o = paged_attention(q, kv[i, 0], kv[i, 1], batch)
            o = self._linear(o.view(-1, a.num_heads * a.head_dim), p + "self_attn.o_proj")
            x, h = tf.rms_norm(o, w[p + "post_attention_layernorm.weight"], a.rms_norm_eps, residual=h)
            m = self._linear(tf.silu_mul(self._linear(x, p + "mlp.gate_up_proj")), p + "mlp.down_proj")
            last = i + 1 == a.num_layers
            norm = w["model.norm.weight"] if last else w[f"model.layers.{i + 1}.input_layernorm.weight"]
            x, h = tf.rms_norm(m, norm, a.rms_norm_eps, residual=h)
        if logit_rows is not None:
            x = x[logit_rows]
        return F.linear(x, self.lm_head).float()

    def _forward_eager(self, tokens, batch: AttentionBatch, kv, logit_rows):
        a = self.arch
        h = self.w["model.embed_tokens.weight"][tokens]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]
        for i in range(a.num_layers):
            p = f"model.layers.{i}."
            x = rms_norm(h, self.w[p + "input_layernorm.weight"], a.rms_norm_eps)
            q, k, v = self._qkv(x, p)
            if a.qk_norm:
                q = rms_norm(q, self.w[p + "self_attn.q_norm.weight"], a.rms_norm_eps)
                k = rms_norm(k, self.w[p + "self_attn.k_norm.weight"], a.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv[i, 0, batch.write_slots] = k
            kv[i, 1, batch.write_slots] = v
            o = paged_attention(q, kv[i, 0], kv[i, 1], batch)
            h = h + self._linear(o.reshape(-1, a.num_heads * a.head_dim), p + "self_attn.o_proj")
            x = rms_norm(h, self.w[p + "post_attention_layernorm.weight"], a.rms_norm_eps)
            if self.fused:
                gate, up = self._linear(x, p + "mlp.gate_up_proj").chunk(2, dim=-1)
            else:
                gate, up = self._linear(x, p + "mlp.gate_proj"), self._linear(x, p + "mlp.up_proj")
            h = h + self._linear(F.silu(gate) * up, p + "mlp.down_proj")
        if logit_rows is not None:
            h = h[logit_rows]
        h = rms_norm(h, self.w["model.norm.weight"], a.rms_norm_eps)
        return F.linear(h, self.lm_head).float()
