"""`minedraft import-gguf FILE.gguf OUT_DIR`: a Llama-family GGUF file -> a Hugging Face checkpoint directory.

Why: GGUF is llama.cpp's one-file format: metadata (the config and the tokenizer, under llama.cpp's key names) and
tensors, usually block-quantized (Q4_K, Q6_K, Q8_0, ...: a few bits per weight plus a scale per block of 32-256).
Our runtime reads HF directories (config.json, tokenizer files, *.safetensors in a float dtype) and runs float
matmuls, and some checkpoints are published only as GGUF (the real pair in shared/design/real-models.md comes from
the package registry that way). So every tensor is dequantized once, offline, to bf16 or fp32. The result is the
quantized model exactly (not the fp16 model it was made from): the rounding happened at quantization; fp32 adds no
error and bf16 one rounding per weight.

How a GGUF differs from an HF checkpoint, apart from quantization:
- names: token_embd -> model.embed_tokens, blk.N.attn_q -> model.layers.N.self_attn.q_proj, ... (hf_tensor_name);
- q/k rows: llama.cpp's converter permutes the rows of attn_q / attn_k of llama-arch files (Llama and Mistral; Mistral
  is converted as arch "llama") from HF's rotate-half RoPE layout, where row r of a head pairs with row r + d/2, to
  the interleaved one its kernel uses, where rows 2r and 2r+1 pair. unpermute_rows undoes it. qwen2 and qwen3 files
  keep HF's layout;
- dimensions are listed innermost first; the gguf reader already hands out numpy arrays in HF's (rows, cols) order;
- the config: transformers' GGUF key table (the one AutoConfig.from_pretrained(dir, gguf_file=...) applies) maps
  the metadata to config fields but misses a few things, which config_overrides takes from the file itself: qwen3's
  head_dim (attention.key_length is not read, so the class default, 128, would be used), Mistral (a llama-arch file;
  transformers reads it as Llama) and its sliding window (absent in the file = full attention, as llama.cpp runs
  it; MistralConfig would default to 4096), llama3 RoPE scaling (stored as a `rope_freqs` tensor of per-frequency
  factors, not as metadata; transformers ignores it), and epsilons stored as float32 (1e-6 reads back as
  9.99999997e-07). The config is then checked against every tensor's shape and the file's RoPE frequencies, so a
  wrong field fails here, not at serving time. The tokenizer is transformers' own from the file
  (AutoTokenizer.from_pretrained(dir, gguf_file=...)).

Memory: the reader memory-maps the file, and model.safetensors is written as we go (its header first: every size is
known from the tensor table), dequantizing a chunk of rows at a time. The peak is a chunk plus one q/k matrix, not
the model (a 1.78B-param model imports in well under 2 GB of RAM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")  # values of general.architecture (Mistral files say "llama")
PERMUTED_ARCHS = ("llama",)  # whose attn_q / attn_k rows llama.cpp permutes
DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "fp32": ("F32", 4, "float32")}  # flag: safetensors name, bytes, torch
CHUNK_ELEMENTS = 1 << 24  # values dequantized at a time (64 MB as fp32)
WEIGHTS_FILE = "model.safetensors"

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE factors: read into the config, not a weight


class GGUFImportError(ValueError):
    """A file this importer cannot turn into a checkpoint; the message says why, in one line."""


@dataclass(frozen=True)
class TensorPlan:
    """One weight to write: where it comes from, its HF name and (rows, cols) shape, and how to fix its rows."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: int  # gguf.GGMLQuantizationType
    unpermute_heads: int = 0  # > 0: undo llama.cpp's q/k permutation over this many heads


# ---------------------------------------------------------------------------------------------- pure pieces


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.bias' -> 'model.layers.3.self_attn.q_proj.bias'; a tensor outside a Llama-family decoder is an
    error naming it."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix in ("weight", "bias"):
        if base in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[base]}.{suffix}"
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
            return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise GGUFImportError(f"unsupported tensor {gguf_name!r} (not part of a Llama-family decoder)")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (weights or biases). Per head of d rows, the file stores HF rows
    (0, d/2, 1, d/2+1, ...) in that order; this puts them back to (0, 1, ..., d-1)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFImportError(f"cannot un-permute {rows} rows over {n_heads} heads (not a multiple of 2 x heads)")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def float32_decimal(value: float | None) -> float | None:
    """The shortest decimal that reads back as the same float32: GGUF stores 1e-6 as 9.99999997e-07."""
    return None if value is None else float(str(np.float32(value)))


def safetensors_header(entries: list[tuple[str, tuple[int, ...]]], dtype: str, itemsize: int) -> tuple[bytes, int]:
    """The safetensors prefix (8-byte little-endian length + JSON) for tensors laid out back to back in this order,
    and the size of the data that must follow it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        end = offset + math.prod(shape) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw, offset


def llama3_rope(factors: np.ndarray, theta: float, head_dim: int, original_context: int) -> dict:
    """Recover transformers' llama3 rope parameters from the per-frequency factors llama.cpp stores.

    llama3 divides each inverse frequency by 1 (short wavelengths), by `factor` (long ones), or in between by
    1 / ((1 - s) / factor + s) with s = (L / wavelength - low) / (high - low). So factor is the largest factor and
    s is linear in 1 / wavelength over the in-between frequencies: a line fit gives low and high (for the stated L;
    only their ratios to L matter). The caller checks that the result reproduces the factors."""
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original_context * inv_freq / (2 * math.pi)  # L / wavelength
    between = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if between.sum() < 2:
        raise GGUFImportError(f"{ROPE_FREQS}: llama3 RoPE scaling needs >= 2 interpolated frequencies to recover, "
                              f"found {int(between.sum())}")
    s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(x[between], s, 1)
    low = -intercept / slope
    high = low + 1 / slope
    return {"rope_type": "llama3", "rope_theta": theta, "factor": float(f"{factor:.6g}"),
            "low_freq_factor": float(f"{low:.6g}"), "high_freq_factor": float(f"{high:.6g}"),
            "original_max_position_embeddings": int(original_context)}


def rope_parameters(meta: dict, head_dim: int, factors: np.ndarray | None) -> dict:
    """transformers' rope_parameters for this file: default, linear, or llama3 (from the rope_freqs tensor)."""
    arch = meta["general.architecture"]
    theta = float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if factors is not None and not np.allclose(factors, 1.0):
        # only low/L and high/L matter: Llama 3's L (8192) unless the file states one
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
        return llama3_rope(factors, theta, head_dim, original)
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta,
                "factor": float32_decimal(meta[f"{arch}.rope.scaling.factor"])}
    raise GGUFImportError(f"unsupported RoPE scaling {scaling!r} (supported: none, linear, llama3 rope_freqs)")


def model_type_of(meta: dict) -> str:
    """The HF model_type. llama.cpp converts Mistral as arch "llama"; it is HF's Mistral (Llama plus a sliding
    window) when the file names it so or states a window."""
    arch = meta["general.architecture"]
    if arch == "llama" and ("mistral" in str(meta.get("general.name", "")).lower()
                            or f"{arch}.attention.sliding_window" in meta):
        return "mistral"
    return arch


def config_overrides(meta: dict, shapes: dict[str, tuple[int, ...]], rope_factors: np.ndarray | None) -> dict:
    """Config fields taken from the file itself, where transformers' GGUF config reading misses or rounds them."""
    arch = meta["general.architecture"]
    n_heads = int(required(meta, f"{arch}.attention.head_count"))
    q_rows = shapes["model.layers.0.self_attn.q_proj.weight"][0]
    head_dim = meta.get(f"{arch}.attention.key_length") or q_rows // n_heads
    out = {
        "head_dim": int(head_dim),
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "rms_norm_eps": float32_decimal(required(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope_parameters(meta, int(head_dim), rope_factors),
    }
    if model_type_of(meta) == "mistral":  # absent = full attention, as llama.cpp runs it (MistralConfig: 4096)
        out["sliding_window"] = meta.get(f"{arch}.attention.sliding_window")
    return out


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The HF tensor shapes a config implies (biases only checked where present)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
                   p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (h, q), p + "self_attn.q_norm.weight": (d,),
                   p + "self_attn.k_norm.weight": (d,), p + "mlp.gate_proj.weight": (inter, h),
                   p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter)}
    return shapes


def check_shapes(cfg, plans: list[TensorPlan]) -> None:
    expected = expected_shapes(cfg)
    for p in plans:
        want = expected.get(p.hf_name)
        if want is None:
            raise GGUFImportError(f"{p.gguf_name}: no such tensor in a {cfg.num_hidden_layers}-layer {cfg.model_type}")
        if tuple(p.shape) != want:
            raise GGUFImportError(f"{p.gguf_name}: shape {p.shape} but the config implies {want}")


# ---------------------------------------------------------------------------------------------- reading the file


def read_metadata(reader) -> dict:
    """The scalar and string fields (arrays such as the vocabulary are left to transformers' tokenizer reading)."""
    from gguf import GGUFValueType

    return {k: f.contents() for k, f in reader.fields.items() if f.types and f.types[0] != GGUFValueType.ARRAY}


def open_gguf(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise GGUFImportError(f"{path}: not a readable GGUF file ({exc})") from exc


def required(meta: dict, key: str):
    if key not in meta:
        raise GGUFImportError(f"metadata {key!r} missing (needed to rebuild the config)")
    return meta[key]


def check_architecture(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")
    return arch


@lru_cache(maxsize=None)
def dequantizable(qtype: int) -> bool:
    """Whether the installed gguf package can dequantize this type (probed on one zero block)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(qtype)
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        return True
    except (NotImplementedError, ValueError, TypeError):
        return False


def plan_tensors(reader, meta: dict) -> list[TensorPlan]:
    """Every weight to write, in file order, with unknown names and types refused before anything is written."""
    from gguf import GGMLQuantizationType

    arch = meta["general.architecture"]
    n_heads = int(required(meta, f"{arch}.attention.head_count"))
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    plans = []
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        hf_name = hf_tensor_name(t.name)
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if not dequantizable(qtype):
            raise GGUFImportError(f"{t.name}: tensor type {qtype.name} cannot be dequantized (gguf package)")
        heads = 0
        if arch in PERMUTED_ARCHS:
            heads = n_heads if ".attn_q." in t.name else n_kv_heads if ".attn_k." in t.name else 0
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        plans.append(TensorPlan(t.name, hf_name, shape, int(qtype), heads))
    return plans


def rope_factors(reader) -> np.ndarray | None:
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            return np.asarray(dequantize_rows(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
    return None


def dequantize_rows(data: np.ndarray, qtype: int) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(data, qtype)


def dequantized_chunks(data: np.ndarray, plan: TensorPlan, chunk_elements: int | None = None
                       ) -> Iterator[np.ndarray]:
    """The tensor as float32, a chunk of rows at a time (whole when its rows must be un-permuted)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    if plan.unpermute_heads or len(plan.shape) == 1:
        w = _checked(dequantize_rows(data, plan.qtype), plan.shape, plan)
        yield unpermute_rows(w, plan.unpermute_heads) if plan.unpermute_heads else w
        return
    rows, cols = plan.shape[0], math.prod(plan.shape[1:])
    step = max(1, chunk_elements // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        yield _checked(dequantize_rows(data[r:r + n], plan.qtype), (n, *plan.shape[1:]), plan)


def _checked(w: np.ndarray, shape: tuple[int, ...], plan: TensorPlan) -> np.ndarray:
    if tuple(w.shape) != tuple(shape):
        raise GGUFImportError(f"{plan.gguf_name}: dequantized to shape {tuple(w.shape)}, expected {tuple(shape)}")
    return w


def to_bytes(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> a contiguous array holding them in the output dtype (bf16: round to nearest even)."""
    import torch

    w = np.require(w, dtype=np.float32, requirements=["C", "W"])
    if dtype == "F32":
        return w
    return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()


# ---------------------------------------------------------------------------------------------- writing


def write_safetensors(path: Path, reader, plans: list[TensorPlan], dtype_flag: str, progress: bool = True) -> int:
    """Stream every planned tensor into `path` (via a .partial file renamed at the end); returns bytes written."""
    from tqdm import tqdm

    dtype, itemsize, _ = DTYPES[dtype_flag]
    header, data_size = safetensors_header([(p.hf_name, p.shape) for p in plans], dtype, itemsize)
    tensors = {t.name: t for t in reader.tensors}
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(header)
        for p in tqdm(plans, desc=f"dequantizing to {dtype_flag}", unit="tensor", disable=not progress):
            for chunk in dequantized_chunks(tensors[p.gguf_name].data, p):
                f.write(to_bytes(chunk, dtype))
        written = f.tell()
    if written != len(header) + data_size:
        tmp.unlink()
        raise GGUFImportError(f"{path}: wrote {written} bytes, expected {len(header) + data_size}")
    os.replace(tmp, path)
    return written


def transformers_fields(meta: dict) -> dict:
    """Config fields from the metadata through transformers' own GGUF key table (what AutoConfig.from_pretrained(
    dir, gguf_file=...) applies; that call re-parses the whole file in Python, ~30 s for a 150k vocabulary, so the
    table is applied to the metadata already read). rope_theta is left to rope_parameters."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = meta["general.architecture"]
    fields = {}
    for section in (arch, "tokenizer"):
        for key, name in GGUF_CONFIG_MAPPING[section].items():
            if name is not None and name != "rope_theta" and f"{section}.{key}" in meta:
                fields[name] = meta[f"{section}.{key}"]
    return fields


def build_config(meta: dict, plans: list[TensorPlan], factors: np.ndarray | None, dtype_flag: str):
    """The transformers config: its GGUF key table, corrected by config_overrides, checked against the tensor shapes
    and against the RoPE frequencies the file implies."""
    from transformers import AutoConfig

    shapes = {p.hf_name: p.shape for p in plans}
    fields = transformers_fields(meta) | config_overrides(meta, shapes, factors)
    cfg = AutoConfig.for_model(model_type_of(meta), **fields)
    cfg.dtype = DTYPES[dtype_flag][2]
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    check_shapes(cfg, plans)
    _check_rope(cfg, factors)
    return cfg


def _check_rope(cfg, factors: np.ndarray | None) -> None:
    """The inverse frequencies our runtime will compute from this config must be the ones the file implies."""
    import torch

    from minedraft.runtime.model import ModelArch, rope_inv_freq

    arch = ModelArch.from_hf_config(cfg)
    ours, _ = rope_inv_freq(cfg, arch)
    theta = cfg.rope_parameters["rope_theta"]
    base = 1.0 / theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float64) / arch.head_dim)
    want = base / torch.as_tensor(factors, dtype=torch.float64) if factors is not None else base
    if cfg.rope_parameters["rope_type"] == "linear":
        want = base / cfg.rope_parameters["factor"]
    if not torch.allclose(ours.double(), want, rtol=1e-4, atol=0):
        raise GGUFImportError(f"RoPE parameters {cfg.rope_parameters} do not reproduce the file's frequencies")


def generation_config(cfg, meta: dict):
    """bos/eos/pad from the config, plus the end-of-turn token when the file names a different one."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(cfg)
    eos = [cfg.eos_token_id] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id or [])
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot not in eos:
        gen.eos_token_id = eos + [int(eot)]
    return gen if gen.eos_token_id is not None or gen.bos_token_id is not None else None


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bf16", progress: bool = True,
                log=print) -> Path:
    """Write an HF checkpoint directory for `gguf_path` into `out_dir`. The weights file is written last and
    atomically, so its presence means the import finished."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise GGUFImportError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    t0 = time.monotonic()
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    arch = check_architecture(meta)
    plans = plan_tensors(reader, meta)
    factors = rope_factors(reader)
    cfg = build_config(meta, plans, factors, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    n_params = sum(math.prod(p.shape) for p in plans)
    log(f"{gguf_path.name}: {meta.get('general.name', '?')} ({arch} -> {cfg.model_type}, {cfg.num_hidden_layers} "
        f"layers, {n_params / 1e6:.0f}M params, {len(plans)} tensors) -> {out_dir} as {dtype}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    cfg.save_pretrained(out_dir)
    gen = generation_config(cfg, meta)
    if gen is not None:
        gen.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    size = write_safetensors(out_dir / WEIGHTS_FILE, reader, plans, dtype, progress)
    log(f"wrote {out_dir / WEIGHTS_FILE} ({size / 1e9:.2f} GB) in {time.monotonic() - t0:.0f}s")
    return out_dir


# ---------------------------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("import-gguf", help="convert a Llama-family GGUF file into an HF checkpoint directory",
                              description="Dequantizes every tensor of a GGUF file (llama, qwen2, qwen3; Mistral "
                              "files are llama) and writes config.json, generation_config.json, tokenizer files and "
                              "model.safetensors into OUT_DIR, which `minedraft up --target/--draft` then serves.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="checkpoint directory to write (created if missing)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the written weights")
    p.set_defaults(fn=_run)
    return p


def _run(args) -> int:
    try:
        import_gguf(args.gguf, args.out_dir, args.dtype)
    except (GGUFImportError, FileNotFoundError) as exc:
        print(f"import-gguf: {exc}", file=sys.stderr)
        return 1
    return 0
