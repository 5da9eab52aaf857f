"""Tiny random-init checkpoints of each supported family, written to disk in HF format, for oracle tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def make_config(family: str, vocab_size: int = 97):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1, initializer_range=0.15)
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**common, sliding_window=24, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    raise ValueError(family)


def make_checkpoint(family: str, out: Path, seed: int = 0):
    """Write a random-init checkpoint and return the HF model (float32, eval mode) as the oracle."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_config(family)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    model.save_pretrained(out)
    return model


def make_noisy_copy(model, out: Path, noise: float, seed: int = 1):
    """A 'draft' that agrees with the target often but not always: the target's weights plus Gaussian noise.
    Gives oracle tests both accepted and rejected drafts."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp(min=1e-3))
    draft.save_pretrained(out)
    return draft
