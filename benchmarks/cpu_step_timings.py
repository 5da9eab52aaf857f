"""CPU step timings of the demo pair: T_draft (propose k) and T_verify (k+1 tokens per sequence) at a few batch sizes,
one torch thread, in process. Used to check that a runtime change does not slow the CPU path: run it once with the
old package first on PYTHONPATH and once with the new one, back to back, on an otherwise idle machine.

    PYTHONPATH=.before:. python benchmarks/cpu_step_timings.py --label before
    PYTHONPATH=. python benchmarks/cpu_step_timings.py --label after
"""

from __future__ import annotations

import argparse
import json

import minedraft
from minedraft.bench.stages import time_stages

p = argparse.ArgumentParser()
p.add_argument("--label", default="")
p.add_argument("--target", default="models/demo-target")
p.add_argument("--draft", default="models/demo-draft")
p.add_argument("--batches", default="1,16,32")
p.add_argument("--context", type=int, default=200)
p.add_argument("-k", type=int, default=4)
p.add_argument("--repeats", type=int, default=15)
a = p.parse_args()
rows = []
for b in map(int, a.batches.split(",")):
    t = time_stages(a.target, a.draft, a.k, b, a.context, repeats=a.repeats, warmup=3)
    rows.append({"batch": b, "draft_ms": round(t.draft_ms, 3), "verify_ms": round(t.verify_ms, 3)})
    print(json.dumps({"label": a.label, "package": minedraft.__file__, "k": a.k, "context": a.context, **rows[-1]}),
          flush=True)
