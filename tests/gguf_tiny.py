"""Tiny random-init HF models written as GGUF files the way llama.cpp's converter writes them, for import tests.

Layout as in llama.cpp's convert_hf_to_gguf: llama-arch names, q/k rows permuted for llama and Mistral (which it
converts as arch "llama"), no output.weight when the embedding is tied, llama3 RoPE as a rope_freqs tensor of
per-frequency factors, and a byte-level BPE vocabulary in the tokenizer.ggml.* keys.
"""

from __future__ import annotations

import numpy as np
import torch

import gguf
from hf_tiny import make_config

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 100  # 2 control tokens + 95 printable ASCII bytes + 3 merges
LAYER_NAMES = {  # HF leaf -> llama.cpp leaf, as its converter names them
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"


def tiny_config(family: str):
    cfg = make_config(family, vocab_size=VOCAB)
    if family == "llama":
        # llama3 scaling with two interpolated frequencies out of eight, so the importer can recover it
        cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 16.0, "original_max_position_embeddings": 64}
    return cfg


def gguf_name(hf_name: str) -> str:
    globals_ = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base, _, suffix = hf_name.rpartition(".")
    if base in globals_:
        return f"{globals_[base]}.{suffix}"
    _, _, layer, leaf = base.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[leaf]}.{suffix}"


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of llama-arch models: per head, the rows of the two RoPE halves
    (r and d/2 + r) become adjacent."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_factors(cfg) -> np.ndarray:
    """llama3 scaling as llama.cpp stores it: the factor dividing each default inverse frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta = cfg.head_dim, cfg.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    return (default / scaled).numpy().astype(np.float32)


def add_tokenizer(w) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    tokens = ["<|bos|>", "<|eos|>"] + [spell[b] for b in range(0x20, 0x7F)] + ["Ġt", "he", "Ġthe"]
    assert len(tokens) == VOCAB
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (VOCAB - 2))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_chat_template(CHAT_TEMPLATE)


def write_gguf(family: str, hf, path, qtype=None) -> None:
    """`hf` as llama.cpp would write it. qtype: None = F32 throughout; else 2-D weights in that quantized type."""
    cfg = hf.config
    arch = "llama" if family in ("llama", "mistral") else family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("Mistral Tiny" if family == "mistral" else f"{family} tiny")  # transformers spots Mistral by name
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if family == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if family == "mistral":
        w.add_sliding_window(cfg.sliding_window)
    add_tokenizer(w)
    if cfg.rope_parameters["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", rope_factors(cfg))
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied model
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            a = llamacpp_permute(a, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        if qtype is not None and a.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_hf(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32,
                                            attn_implementation="eager").eval()
