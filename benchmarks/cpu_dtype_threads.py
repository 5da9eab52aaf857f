"""Which weight dtype and how many torch threads per model service, on this CPU: T_draft (k draft forwards) and
T_verify (one target forward over k+1 tokens per sequence) of a model pair, for float32 / bfloat16 weights and 1 / 2
threads, at a few batch sizes. In process, one configuration after another, nothing else running.

    PYTHONPATH=. python benchmarks/cpu_dtype_threads.py --target T --draft D --out benchmarks/results/X/dtype_threads.json

bf16 halves the bytes read per token; whether the CPU's bf16 matmuls make that a gain is what this measures
(torch reports the CPU capability it dispatches to: AVX2 machines have no native bf16 dot product).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from minedraft.bench.stages import _model, time_stages

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--target", required=True)
p.add_argument("--draft", required=True)
p.add_argument("--batches", default="1,8")
p.add_argument("--dtypes", default="float32,bfloat16")
p.add_argument("--threads", default="1,2")
p.add_argument("--context", type=int, default=256)
p.add_argument("--ks", default="4", help="draft lengths; k=0 times a plain decode step (ar)")
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--out", default="")
a = p.parse_args()
rows = []
for dtype in a.dtypes.split(","):
    for threads in map(int, a.threads.split(",")):
        for b in map(int, a.batches.split(",")):
            for k in map(int, a.ks.split(",")):
                t = time_stages(a.target, a.draft, k, b, a.context, repeats=a.repeats, warmup=1, threads=threads,
                                dtype=dtype)
                rows.append({"dtype": dtype, "threads": threads, "batch": b, "k": k,
                             "draft_ms": round(t.draft_ms, 1), "verify_ms": round(t.verify_ms, 1)})
                print(json.dumps(rows[-1]), flush=True)
    _model.cache_clear()
out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine(),
       "torch": torch.__version__, "ks": a.ks, "context": a.context, "rows": rows}
if a.out:
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
