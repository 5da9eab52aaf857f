"""Loading a local Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer files).

transformers parses the config and tokenizer (so every family quirk it knows is honoured); safetensors reads the
weights straight into our dict of tensors. Nothing is fetched from a hub: the path must exist locally.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from minedraft.runtime.model import CausalLM, ModelArch, rope_inv_freq

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """'auto' = float32 on CPU (half-precision matmuls are slow there and cost accuracy), the checkpoint's own
    half type on GPU."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def load_hf_config(path: str | Path):
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face checkpoint directory)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def vocab_digest(tokenizer) -> str:
    """A fingerprint of the token -> id mapping: draft, target and the router's tokenizer must agree on it, or token
    ids would mean different things to each (checked at start-up)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(repr(vocab).encode()).hexdigest()


def _read_safetensors(path: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                weights[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
    return weights


def _check_weights(arch: ModelArch, weights: dict[str, torch.Tensor], path: Path) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        required += [p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                                                 "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        if arch.qk_norm:
            required += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    if not arch.tie_word_embeddings:
        required.append("lm_head.weight")
    missing = [n for n in required if n not in weights]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str = "auto") -> CausalLM:
    path = Path(path)
    device = torch.device(device)
    cfg = load_hf_config(path)
    arch = ModelArch.from_hf_config(cfg)
    ckpt_dtype = getattr(cfg, "dtype", None)
    if isinstance(ckpt_dtype, str):
        ckpt_dtype = _DTYPES.get(ckpt_dtype)
    weights = _read_safetensors(path, device, resolve_dtype(dtype, device, ckpt_dtype))
    _check_weights(arch, weights, path)
    inv_freq, scale = rope_inv_freq(cfg, arch)
    model = CausalLM(arch, weights, inv_freq, scale)
    n_params = sum(t.numel() for t in weights.values())
    log.info("loaded %s (%s, %.1fM params, %s on %s)", path.name, arch.model_type, n_params / 1e6, model.dtype, device)
    return model
