"""Per-step wall times of the in-process SD loop (reference.generate's steps, unrolled), to see where an SD step's
time goes beyond T_draft + T_verify: each propose and verify is synchronized and timed, and the number of captured
CUDA graphs is printed after each step.

    PYTHONPATH=. python benchmarks/gpu/step_trace.py                  # H100: qwen3-8b + qwen3-0.6b, batch 32
    PYTHONPATH=. python benchmarks/gpu/step_trace.py --dry-run        # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.gpu.dial import dial_pair
from benchmarks.gpu.shapes import build_random_model
from minedraft.runtime.reference import NO_DRAFT, _verify, make_sequences
from minedraft.runtime.runner import ModelRunner
from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.speculative import DraftRequest, propose

p = argparse.ArgumentParser()
p.add_argument("--dry-run", action="store_true")
p.add_argument("--steps", type=int, default=12)
a = p.parse_args()
dev = "cpu" if a.dry_run else "cuda"
names = ("tiny-target", "tiny-draft") if a.dry_run else ("qwen3-8b", "qwen3-0.6b")
batch, ctx, k = (4, 40, 4) if a.dry_run else (32, 1024, 4)
dtype = torch.float32 if a.dry_run else torch.bfloat16
t_m, d_m = dial_pair(build_random_model(names[0], dev, dtype), build_random_model(names[1], dev, dtype), 0.8)
opts = {} if a.dry_run else {"attention": "triton", "cuda_graphs": True}
tr, dr = ModelRunner(t_m, batch * (ctx + 300), **opts), ModelRunner(d_m, batch * (ctx + 300), **opts)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(1, t_m.arch.vocab_size, (ctx,), generator=g).tolist() for _ in range(batch)]
seqs = make_sequences(prompts, SamplingParams(), 200, 4096, ignore_eos=True)
gens = {s.seq_id: None for s in seqs}
_verify(tr, seqs, [NO_DRAFT] * len(seqs), gens)
for step in range(a.steps):
    sync()
    t0 = time.perf_counter()
    reqs = [DraftRequest(s.seq_id, *s.draft_input(), s.draft_len(k), s.params, None) for s in seqs]
    qd = max(len(r.tokens) for r in reqs)
    drafts = propose(dr, reqs)
    for s, d in zip(seqs, drafts):
        s.on_drafted(len(d.tokens))
    sync()
    t1 = time.perf_counter()
    _verify(tr, seqs, drafts, gens)
    sync()
    t2 = time.perf_counter()
    ng = lambda r: len(r.graphs.graphs) if r.graphs is not None else 0  # noqa: E731
    print(f"step {step}: draft {1e3 * (t1 - t0):8.2f} ms (first q {qd}) verify {1e3 * (t2 - t1):8.2f} ms; graphs "
          f"target {ng(tr)} draft {ng(dr)}", flush=True)
