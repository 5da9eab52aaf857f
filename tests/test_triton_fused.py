"""The fused GPU layer (triton_fused.py: RMSNorm + residual, q/k norm + RoPE + KV write, SiLU*mul), checked on the
CPU under the Triton interpreter against the unfused forward, for every supported family (qk-norm, qkv bias, llama3
RoPE scaling, sliding window), in fp32 (tight) and bf16 (the rounding steps mirror torch's)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from hf_tiny import FAMILIES, make_checkpoint  # noqa: E402
from minedraft.runtime.checkpoint import load_model  # noqa: E402
from minedraft.runtime.model import fuse_projections  # noqa: E402
from minedraft.runtime.runner import Extend, ModelRunner  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0" else "cpu"


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"fused-{request.param}")
    make_checkpoint(request.param, path)
    return path


def _logits(path, fused: bool, dtype: str, attention: str):
    model = load_model(path, DEVICE, dtype)
    if fused:
        fuse_projections(model.arch, model.w)
        model.fused, model.fused_kernels = True, True
    runner = ModelRunner(model, 2048, block_size=8, attention=attention)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (13, 3, 30)]
    first = runner.step([Extend(f"s{i}", 0, p, all_logits=True) for i, p in enumerate(prompts)])
    steps = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (5, 1, 4)]
    # A rollback too: the third sequence rewinds 6 positions before appending.
    starts = [len(prompts[0]), len(prompts[1]), len(prompts[2]) - 6]
    second = runner.step([Extend(f"s{i}", s, t, all_logits=True) for i, (s, t) in enumerate(zip(starts, steps))])
    return torch.cat(first + second)


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_fused_layer_matches_unfused_fp32(checkpoint, attention):
    ref = _logits(checkpoint, False, "float32", "sdpa")
    got = _logits(checkpoint, True, "float32", attention)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_fused_layer_close_to_unfused_bf16(checkpoint):
    """bf16 rounds at every stored intermediate, so fused and unfused differ by a few ulps here and there. The bound:
    the fused bf16 forward strays from fp32 no more than the unfused bf16 forward does (x2; the interpreter emulates
    bf16 casts in numpy, which need not round exactly as the GPU does)."""
    exact = _logits(checkpoint, False, "float32", "sdpa")
    ref = _logits(checkpoint, False, "bfloat16", "sdpa")
    got = _logits(checkpoint, True, "bfloat16", "sdpa")
    assert (got - exact).abs().max().item() <= 2 * (ref - exact).abs().max().item() + 1e-2
    assert (got.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.9
