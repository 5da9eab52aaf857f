"""`minedraft import-gguf` against the models it came from.

For each family a tiny random HF model is written as a GGUF file the way llama.cpp's converter lays it out
(gguf_tiny.py), then imported. Checked: the imported weights equal the original ones and what transformers' own GGUF
tensor loading gives, our runtime's logits equal the original model's, the config states what the file states, and
the tokenizer, chat template and special tokens survive. Plus the pure pieces and the one-line errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minedraft.runtime.checkpoint import load_model, load_tokenizer
from minedraft.runtime.runner import Extend, ModelRunner
from minedraft.tools import gguf_import
from minedraft.tools.gguf_import import GGUFImportError, hf_tensor_name, import_gguf, llama3_rope, unpermute_rows

gguf = pytest.importorskip("gguf")

from gguf_tiny import CHAT_TEMPLATE, FAMILIES, VOCAB, llamacpp_permute, make_hf, rope_factors, write_gguf  # noqa: E402


@pytest.fixture(scope="module", params=FAMILIES)
def imported(request, tmp_path_factory):
    """(family, original HF model, GGUF path, imported checkpoint dir) in fp32."""
    family = request.param
    root = tmp_path_factory.mktemp(f"gguf-{family}")
    hf = make_hf(family)
    path = root / f"{family}.gguf"
    write_gguf(family, hf, path)
    out = import_gguf(path, root / "hf", dtype="fp32", progress=False, log=lambda *_: None)
    return family, hf, path, out


def logits_of(path, ids):
    runner = ModelRunner(load_model(path, dtype="float32"), 2048, block_size=8)
    return runner.step([Extend("a", 0, ids, all_logits=True)])[0]


def prompt(n: int = 30, seed: int = 0) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------- end to end


def test_weights_equal_the_original(imported):
    family, hf, _, out = imported
    ours = load_file(str(out / "model.safetensors"))
    original = hf.state_dict()
    expected_names = set(original) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert set(ours) == expected_names
    for name in expected_names:
        assert torch.equal(ours[name], original[name]), name


def test_runtime_logits_equal_the_original(imported):
    """30 tokens: past Mistral's 24-token window, and through every RoPE frequency band of the llama3 config."""
    _, hf, _, out = imported
    ids = prompt()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits_of(out, ids), ref, atol=1e-4, rtol=1e-4)


def test_config_states_what_the_file_states(imported):
    from transformers import AutoConfig

    family, hf, _, out = imported
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == family
    assert cfg.dtype == torch.float32 and cfg.architectures == [type(hf).__name__]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == getattr(hf.config, key), key
    h = hf.config
    assert cfg.head_dim == (getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads)
    assert cfg.rms_norm_eps == 1e-5  # not float32's 9.99999974e-06
    assert getattr(cfg, "sliding_window", None) == (24 if family == "mistral" else None)
    if family == "llama":  # the same inverse frequencies, from L = 8192 rather than the original 64
        assert cfg.rope_parameters["rope_type"] == "llama3"
        assert cfg.rope_parameters["factor"] == 8.0
    assert (out / "generation_config.json").is_file()


def test_tokenizer_and_chat_template_survive(imported):
    _, _, _, out = imported
    tok = load_tokenizer(out)
    ids = tok.encode("hello the world!", add_special_tokens=False)
    # 'he' and ' the' are merges; every other character is its own byte token (id = 2 + code - 0x20)
    assert ids == [98, 2 + ord("l") - 32, 2 + ord("l") - 32, 2 + ord("o") - 32, 99] + \
        [2 + ord(c) - 32 for c in " world!"]
    assert tok.decode(ids) == "hello the world!"
    assert (tok.bos_token, tok.eos_token) == ("<|bos|>", "<|eos|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|bos|>user: hi<|eos|>"
    assert tok.encode(text, add_special_tokens=False)[0] == 0  # the control token stays whole


def test_matches_transformers_gguf_tensor_loading(imported):
    """transformers' own GGUF tensor conversion (load_gguf_checkpoint: what from_pretrained(..., gguf_file=) runs for
    these architectures, minus its accelerate requirement) gives the same tensors. Its config reading has gaps the
    importer fills from the file itself: qwen3's attention.key_length is not read (the class default head_dim, 128,
    is used), llama3's rope_freqs are ignored (RoPE would be unscaled), and a Mistral file reads as Llama without
    its sliding window."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, _, path, out = imported
    with torch.device("meta"):  # the model transformers would build for this file (a Mistral file reads as Llama)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(str(out / "model.safetensors"))
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert torch.equal(theirs[name].float(), t), name


def test_bf16_import_rounds_once(tmp_path):
    hf = make_hf("qwen2")
    write_gguf("qwen2", hf, tmp_path / "m.gguf")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False, log=lambda *_: None)
    ours = load_file(str(out / "model.safetensors"))
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, hf.state_dict()[name].to(torch.bfloat16)), name
    model = load_model(out, dtype="auto")
    assert model.dtype == torch.float32  # auto on the CPU reads bf16 weights into fp32


def test_quantized_file_is_dequantized_exactly(tmp_path, monkeypatch):
    """Q8_0 weights on the permuted (llama) layout, dequantized a few rows at a time: the import equals gguf's own
    dequantization of each tensor, un-permuted; our runtime's logits equal transformers' on the imported checkpoint
    and stay near the unquantized model's."""
    monkeypatch.setattr(gguf_import, "CHUNK_ELEMENTS", 3 * 64)
    hf = make_hf("llama")
    path = tmp_path / "q8.gguf"
    write_gguf("llama", hf, path, qtype=gguf.GGMLQuantizationType.Q8_0)
    out = import_gguf(path, tmp_path / "hf", dtype="fp32", progress=False, log=lambda *_: None)
    ours = load_file(str(out / "model.safetensors"))
    reader = gguf.GGUFReader(path)
    cfg = hf.config
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        if ".attn_q." in t.name or ".attn_k." in t.name:
            want = unpermute_rows(want, cfg.num_attention_heads if ".attn_q." in t.name else cfg.num_key_value_heads)
        assert np.array_equal(ours[hf_tensor_name(t.name)].numpy(), want), t.name
    from transformers import AutoModelForCausalLM

    ids = prompt()
    with torch.no_grad():
        dequantized = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ref = dequantized(torch.tensor([ids])).logits[0]
        unquantized = hf(torch.tensor([ids])).logits[0]
    ours = logits_of(out, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert 0 < (ours - unquantized).abs().max() < 0.5


# ---------------------------------------------------------------------------------------------- pure pieces


def test_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.11.attn_k.bias") == "model.layers.11.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.0.attn_q_norm.weight") == "model.layers.0.self_attn.q_norm.weight"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    for bad in ("blk.0.ffn_gate_exps.weight", "token_embd.scale", "blk.x.attn_q.weight", "mm.0.weight"):
        with pytest.raises(GGUFImportError, match="unsupported tensor"):
            hf_tensor_name(bad)


@pytest.mark.parametrize("heads,head_dim,cols", [(4, 16, 8), (2, 32, 1), (3, 8, 0)])
def test_unpermute_undoes_llamacpp_permute(heads, head_dim, cols):
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)
    w = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    stored = llamacpp_permute(w, heads)
    assert not np.array_equal(stored, w)
    assert np.array_equal(unpermute_rows(stored, heads), w)
    # per head, the stored order is HF rows 0, d/2, 1, d/2 + 1, ...
    half = head_dim // 2
    first = [int(r) for r in (stored[:head_dim, 0] if cols else stored[:head_dim]) // max(cols, 1)]
    assert first[:4] == [0, half, 1, half + 1]


def test_llama3_rope_recovered_from_factors():
    """Llama 3.1's own numbers (theta 5e5, head_dim 128, factor 8, low 1, high 4, L 8192) come back exactly."""
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, rope_parameters=rope)
    assert llama3_rope(rope_factors(cfg), 500000.0, 128, 8192) == rope
    with pytest.raises(GGUFImportError, match="interpolated"):
        llama3_rope(np.array([1.0, 1.0, 8.0, 8.0]), 10000.0, 8, 8192)


def test_safetensors_header_is_aligned_and_complete():
    header, size = gguf_import.safetensors_header([("a", (2, 3)), ("b", (5,))], "BF16", 2)
    n = int.from_bytes(header[:8], "little")
    assert n == len(header) - 8 and len(header) % 8 == 0 and size == 22
    import json

    meta = json.loads(header[8:])
    assert meta["a"]["data_offsets"] == [0, 12] and meta["b"]["data_offsets"] == [12, 22]


def test_unsupported_architecture_and_type_are_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="unsupported GGUF architecture 'gpt2'"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False, log=lambda *_: None)
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "qwen2")
    w.add_head_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.int32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="token_embd.weight: tensor type I32"):
        import_gguf(tmp_path / "i32.gguf", tmp_path / "out", progress=False, log=lambda *_: None)
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="metadata 'qwen2.attention.head_count' missing"):
        import_gguf(tmp_path / "bare.gguf", tmp_path / "out", progress=False, log=lambda *_: None)
    (tmp_path / "junk.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(GGUFImportError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from minedraft.cli import main

    assert main(["import-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("import-gguf: ") and "missing.gguf" in err and "\n" not in err
