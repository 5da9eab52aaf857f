"""Does greedy speculative decoding stay token-identical to target-only decoding when both models run in bfloat16?

In float32 the oracle tests hold the system to transformers token for token. In bf16 every op rounds, and the target
scores k + 1 tokens in one forward where target-only decoding scores one: if the kernels' reduction order depends on
the number of rows, a logit can differ in its last bit and flip an argmax that was a near tie. This runs, in process
(runtime/reference.py), target-only decoding one sequence at a time, target-only in one batch, and standard SD at
several k, all in the same dtype, and counts the sequences whose tokens differ from the one-at-a-time decoding, and
where they first do.

    PYTHONPATH=. python benchmarks/cpu_bf16_greedy.py --target T --draft D --out benchmarks/results/X/bf16_greedy.json
"""

from __future__ import annotations

import argparse
import json

import torch

from minedraft.bench.stages import _model
from minedraft.runtime.checkpoint import load_tokenizer
from minedraft.runtime.reference import generate, make_sequences
from minedraft.runtime.runner import ModelRunner
from minedraft.runtime.sampling import SamplingParams

PROMPTS = ["def is_palindrome(s: str) -> bool:\n", "import numpy as np\n\ndef softmax(x):\n",
           "Explain in two sentences why the sky is blue.", "# Sorting algorithms, from simplest to fastest:\n# 1.",
           "Write a haiku about autumn rain.", "class Stack:\n    def __init__(self):\n",
           "What are the three branches of the US government?", "SELECT name, COUNT(*) FROM users"]

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--target", required=True)
p.add_argument("--draft", required=True)
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--ks", default="1,2,4")
p.add_argument("--new-tokens", type=int, default=48)
p.add_argument("--out", default="")
a = p.parse_args()
torch.set_num_threads(2)
tok = load_tokenizer(a.target)
prompts = [tok.encode(t) for t in PROMPTS]
target, draft = _model(a.target, "cpu", a.dtype), _model(a.draft, "cpu", a.dtype)
cap = 8192
tr, dr = ModelRunner(target, cap), ModelRunner(draft, cap)
greedy = SamplingParams()
run = lambda ps, d=None, k=0: [s.output for s in generate(tr, make_sequences(ps, greedy, a.new_tokens, 4096,  # noqa
                                                                         ignore_eos=True), d, k)]
alone = [run([pr])[0] for pr in prompts]


def compare(outs):
    diff = [next((j for j, (x, y) in enumerate(zip(o, r)) if x != y), None) for o, r in zip(outs, alone)]
    return {"differ": sum(d is not None for d in diff), "first_diff_at": diff}


rows = {"ar batched": compare(run(prompts))}
print("ar batched", rows["ar batched"], flush=True)
for k in map(int, a.ks.split(",")):
    rows[f"sd/k={k}"] = compare(run(prompts, dr, k))
    print(f"sd/k={k}", rows[f"sd/k={k}"], flush=True)
out = {"dtype": a.dtype, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
       "sequences": len(prompts), "new_tokens": a.new_tokens, "against": "ar, one sequence at a time", "rows": rows}
if a.out:
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
