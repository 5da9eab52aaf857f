"""The CUDA-graph step layout, checked on the CPU: `GraphedForward(capture=False)` runs the padded layout a graph
would replay (B bucketed sequence slots x q rows, scratch writes for padding, the on-device greedy draft loop) eagerly,
with the Triton kernel under its interpreter. Greedy AR and SD through it must equal the SDPA path token for token,
and leave no KV block behind; on a GPU the same code is captured (tests/test_gpu.py)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402

pytest.importorskip("triton")

from minedraft.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402
from minedraft.runtime.checkpoint import load_model  # noqa: E402
from minedraft.runtime.cuda_graphs import GraphedForward  # noqa: E402
from minedraft.runtime.reference import generate, make_sequences  # noqa: E402
from minedraft.runtime.runner import ModelRunner  # noqa: E402
from minedraft.runtime.sampling import SamplingParams  # noqa: E402

PROMPTS = [[5, 17, 250, 31, 9, 77, 12], [300, 2, 41], list(range(40, 75))]
BUDGETS = [10, 6, 9]


def runners(padded: bool):
    out = []
    for path in (DEMO_TARGET, DEMO_DRAFT):
        model = load_model(path)
        r = ModelRunner(model, 2048, attention="triton" if padded else "sdpa")
        if padded:
            r.graphs = GraphedForward(model, r.cache, capture=False)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def reference():
    target, draft = runners(padded=False)
    ar = generate(target, make_sequences(PROMPTS, SamplingParams(), BUDGETS, 512, ignore_eos=True))
    return [s.output for s in ar]


@pytest.mark.parametrize("k", [0, 3])
def test_padded_layout_greedy_matches_sdpa(reference, k):
    target, draft = runners(padded=True)
    seqs = make_sequences(PROMPTS, SamplingParams(), BUDGETS, 512, ignore_eos=True)
    out = generate(target, seqs, draft=draft if k else None, k=k or 4)
    assert [s.output for s in out] == reference
    if k:
        assert sum(s.drafted for s in out) > 0
        assert draft.graphs.graphs, "the draft loop should have used the padded decode layout"
    assert target.cache.used_blocks == 0 and draft.cache.used_blocks == 0
    assert target.graphs.graphs and all(key[0] >= 1 for key in target.graphs.graphs)


def test_padded_layout_seeded_sampling_matches_sdpa():
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 3)]
    outs = []
    for padded in (False, True):
        target, draft = runners(padded)
        seqs = generate(target, make_sequences(PROMPTS, params, BUDGETS, 512, ignore_eos=True), draft=draft, k=3)
        outs.append([s.output for s in seqs])
    assert outs[0] == outs[1]
