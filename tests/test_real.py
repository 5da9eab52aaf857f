"""The real pair end to end: Qwen2.5 Coder 1.5B Instruct (target) and 0.5B Instruct (draft), dequantized from their
GGUF files by `minedraft fetch-real-pair` (shared/design/real-models.md). Marker `real`, outside the default suite:

    minedraft fetch-real-pair && python -m pytest -m real tests/test_real.py -q

Skipped when the imported pair is absent (looked up in $MINEDRAFT_CACHE or ~/.cache/minedraft, or named by
MINEDRAFT_REAL_TARGET / MINEDRAFT_REAL_DRAFT). What it holds: greedy output of the running system (router + drafter
+ verifier processes) in each of ar, sd and psd is token for token transformers' `generate(do_sample=False)` on the
target, for code and chat prompts of different lengths submitted at once; a seeded sampled request is reproducible.

dtype: the services run `--dtype auto`, which is float32 on the CPU (runtime/checkpoint.py: resolve_dtype; the bf16
checkpoint is upcast at load, exactly), so the oracle runs the same bf16 weights in float32 too, and both services
get `--dtype float32` explicitly so the two cannot drift apart. Budgets stay small (2-core CPU: ~0.4 s a token).
"""

from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from minedraft.tools.fetch_models import DRAFT, TARGET, default_cache
from minedraft.v1 import common_pb2, generate_pb2 as gpb, generate_pb2_grpc


def real_pair() -> tuple[Path, Path]:
    target = Path(os.environ.get("MINEDRAFT_REAL_TARGET") or default_cache() / TARGET.name)
    draft = Path(os.environ.get("MINEDRAFT_REAL_DRAFT") or default_cache() / DRAFT.name)
    return target, draft


def _missing() -> str:
    imported = lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file()  # noqa: E731
    return ", ".join(str(p) for p in real_pair() if not imported(p))


REAL_TARGET, REAL_DRAFT = real_pair()
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(bool(_missing()), reason=f"real pair not imported ({_missing()}); run "
                                 "`minedraft fetch-real-pair` or set MINEDRAFT_REAL_TARGET / MINEDRAFT_REAL_DRAFT")]

DTYPE = "float32"  # what --dtype auto resolves to on the CPU
SERVICE_ARGS = ["--dtype", DTYPE, "--kv-cache-tokens", "4096"]  # 4096 tokens of KV: ~0.23 GB for the target
CLUSTERS = [dict(mode=m, target=str(REAL_TARGET), draft=str(REAL_DRAFT), timeout_s=600,
                 router_args=["--max-batch-size", "4", "--num-speculative-tokens", "3"],
                 drafter_args=SERVICE_ARGS, verifier_args=SERVICE_ARGS) for m in ("ar", "sd", "psd", "ahead", "auto")]

CODE = ('def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same forwards and backwards, '
        'ignoring case and non-alphanumeric characters."""\n')
SHORT_CODE = "import numpy as np\n\ndef softmax(x):\n"
CHAT = [{"role": "user", "content": "Write a Python one-liner that counts the vowels in a string."}]
TEXT = "# Sorting algorithms, from simplest to fastest:\n# 1."
BUDGETS = [16, 12, 24, 20]


@pytest.fixture(scope="session")
def real_tokenizer():
    from minedraft.runtime.checkpoint import load_tokenizer

    return load_tokenizer(REAL_TARGET)


@pytest.fixture(scope="session")
def prompts(real_tokenizer) -> list[str]:
    chat = real_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    return [CODE, SHORT_CODE, chat, TEXT]


@pytest.fixture(scope="session")
def reference(prompts, real_tokenizer) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one at a time: no padding), EOS honoured as the server
    honours it (the imported generation_config's eos). Computed once, before any cluster starts, then freed."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # no services are running yet
    try:
        hf = AutoModelForCausalLM.from_pretrained(REAL_TARGET, dtype=torch.float32).eval()
        out = []
        for text, n in zip(prompts, BUDGETS):
            ids = real_tokenizer.encode(text, add_special_tokens=False)
            with torch.no_grad():
                gen = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  pad_token_id=real_tokenizer.pad_token_id)
            out.append(gen[0, len(ids):].tolist())
        del hf
        gc.collect()
    finally:
        torch.set_num_threads(threads)
    return out


def stub_for(cluster):
    return generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))


def test_draft_and_target_share_a_vocabulary(real_tokenizer):
    from minedraft.runtime.checkpoint import load_tokenizer, vocab_digest

    draft = load_tokenizer(REAL_DRAFT)
    assert len(real_tokenizer) == len(draft) and vocab_digest(real_tokenizer) == vocab_digest(draft)


def test_greedy_equals_transformers_generate(cluster, prompts, reference, real_tokenizer):
    stub = stub_for(cluster)

    def one(i):
        return stub.Generate(gpb.GenerateRequest(prompt=prompts[i], max_new_tokens=BUDGETS[i]), timeout=600)

    with ThreadPoolExecutor(len(prompts)) as pool:  # all at once, so they share batches
        results = list(pool.map(one, range(len(prompts))))
    for i, r in enumerate(results):
        assert r.usage.prompt_tokens == len(real_tokenizer.encode(prompts[i], add_special_tokens=False))
        assert list(r.token_ids) == reference[i], f"prompt {i} differs in {cluster.mode}: " \
            f"{real_tokenizer.decode(list(r.token_ids))!r} vs {real_tokenizer.decode(reference[i])!r}"
    if cluster.mode not in ("ar", "auto"):  # auto may rightly decode target-only here (fp32 on a CPU)
        drafted = sum(r.speculation.drafted_tokens for r in results)
        accepted = sum(r.speculation.accepted_tokens for r in results)
        assert drafted > 0 and accepted > 0, "the real draft should get some drafts accepted"


def test_seeded_sampling_is_reproducible(cluster, prompts):
    if cluster.mode != "psd":
        pytest.skip("one sampled request suffices; psd is the mode under test")
    opts = common_pb2.SamplingOptions(temperature=0.8, top_p=0.95, top_k=50, seed=7)
    req = gpb.GenerateRequest(prompt=prompts[2], max_new_tokens=16, sampling=opts, ignore_eos=True)
    stub = stub_for(cluster)
    a, b = stub.Generate(req, timeout=600), stub.Generate(req, timeout=600)
    assert len(a.token_ids) == 16 and list(a.token_ids) == list(b.token_ids)
