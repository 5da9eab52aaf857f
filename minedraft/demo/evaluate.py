"""Measure the demo pair: greedy speculative-decoding acceptance and forward timings.

    python -m minedraft.demo.evaluate --models models --k 4 --num-prompts 50 --max-new-tokens 64

Acceptance is an exact simulation of lossless greedy speculative decoding: the target's
greedy continuation ``y`` of each held-out ShareGPT first-turn prompt (rendered with
``render_chat``) is fixed; at position ``i`` the draft greedily proposes ``k`` tokens from
``prompt + y[:i]``, ``n`` = length of the prefix matching ``y[i:i+k]``, then
``accepted += n``, ``drafted += k_eff``, ``i += n + 1`` (the target's bonus token), where
``k_eff = min(k, len(y) - i)`` (no drafting past the end of the continuation).

Timings (``torch.set_num_threads(1)``, HF eager/sdpa, fp32 by default): one draft decode
step (1 new token) vs one target verify pass over ``k+1`` tokens, both on top of a KV
cache of ``--context`` tokens, at several batch sizes; median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TARGET_DIR = "demo-target"
DRAFT_DIR = "demo-draft"


def load_pair(models: Path, dtype: str = "float32"):
    """``(tokenizer, target, draft)`` from ``<models>/demo-target`` and ``<models>/demo-draft``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(models / TARGET_DIR)
    target = AutoModelForCausalLM.from_pretrained(models / TARGET_DIR, dtype=dt).eval()
    draft = AutoModelForCausalLM.from_pretrained(models / DRAFT_DIR, dtype=dt).eval()
    return tok, target, draft


def heldout_prompts(tokenizer, num_prompts: int, max_prompt_tokens: int = 512,
                    mostly_ascii: bool = False, source: str = "auto") -> list[str]:
    from . import data

    _, held = data.split(data.load_conversations(source=source))
    return data.first_turn_prompts(held, tokenizer=tokenizer, max_tokens=max_prompt_tokens,
                                   limit=num_prompts, mostly_ascii=mostly_ascii)


def _crop(cache, length: int) -> None:
    cur = cache.get_seq_length()
    if cur > length:
        cache.crop(length - cur)  # negative = drop that many (works in transformers 4.x and 5.x)


def greedy_continuation(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Target greedy decode with a KV cache; stops after emitting eos (eos included)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        cache = out.past_key_values
        y: list[int] = []
        nxt = int(out.logits[0, -1].argmax())
        while True:
            y.append(nxt)
            if nxt == eos_id or len(y) >= max_new_tokens:
                return y
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
            nxt = int(out.logits[0, -1].argmax())


def simulate(draft, prompt_ids: list[int], y: list[int], k: int) -> list[tuple[int, int]]:
    """Per-step ``(n_accepted, k_eff)`` for greedy drafting of ``k`` tokens against ``y``."""
    import torch

    seq = list(prompt_ids) + list(y)
    P = len(prompt_ids)
    steps: list[tuple[int, int]] = []
    cache = None
    i = 0
    with torch.no_grad():
        while i < len(y):
            ctx = P + i
            c = 0 if cache is None else cache.get_seq_length()
            if cache is not None and c >= ctx:
                _crop(cache, ctx - 1)
                c = ctx - 1
            out = draft(input_ids=torch.tensor([seq[c:ctx]]), past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            k_eff = min(k, len(y) - i)
            props = [int(out.logits[0, -1].argmax())]
            while len(props) < k_eff:
                out = draft(input_ids=torch.tensor([[props[-1]]]), past_key_values=cache,
                            use_cache=True)
                props.append(int(out.logits[0, -1].argmax()))
            n = 0
            while n < k_eff and props[n] == y[i + n]:
                n += 1
            steps.append((n, k_eff))
            # cache now holds ctx + props[:k_eff-1]; the first n of those are correct
            _crop(cache, ctx + min(n, k_eff - 1))
            i += n + 1
    return steps


def acceptance(tokenizer, target, draft, prompts: list[str], k: int, max_new_tokens: int,
               progress: bool = True) -> dict:
    from tqdm import tqdm

    from .data import render_chat

    eos_id = tokenizer.eos_token_id
    accepted = drafted = nsteps = ntok = 0
    per_prompt = []
    samples = []
    for p in tqdm(prompts, desc=f"acceptance k={k}", disable=not progress, leave=False):
        ids = tokenizer.encode(render_chat(p), add_special_tokens=False)
        y = greedy_continuation(target, ids, max_new_tokens, eos_id)
        steps = simulate(draft, ids, y, k)
        a = sum(n for n, _ in steps)
        d = sum(ke for _, ke in steps)
        accepted += a
        drafted += d
        nsteps += len(steps)
        ntok += len(y)
        if len(samples) < 3:
            samples.append({"prompt": p[:200], "continuation": tokenizer.decode(y)})
        per_prompt.append({"prompt_tokens": len(ids), "generated": len(y), "steps": len(steps),
                           "accepted": a, "drafted": d})
    return {
        "k": k,
        "num_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "generated_tokens": ntok,
        "target_steps": nsteps,
        "accepted": accepted,
        "drafted": drafted,
        "acceptance_rate": accepted / max(1, drafted),
        "mean_accepted": accepted / max(1, nsteps),
        "tokens_per_step": ntok / max(1, nsteps),
        "samples": samples,
        "per_prompt": per_prompt,
    }


def _time_forward(model, batch: int, context: int, new_tokens: int, repeats: int,
                  warmup: int = 3) -> float:
    """Median ms of a forward of ``new_tokens`` tokens on top of a ``context``-token cache."""
    import torch

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(batch * 1000 + new_tokens)
    ctx = torch.randint(0, V, (batch, context), generator=g)
    new = torch.randint(0, V, (batch, new_tokens), generator=g)
    times = []
    with torch.no_grad():
        cache = model(input_ids=ctx, use_cache=True).past_key_values
        for r in range(warmup + repeats):
            t0 = time.perf_counter()
            model(input_ids=new, past_key_values=cache, use_cache=True)
            dt = time.perf_counter() - t0
            _crop(cache, context)
            if r >= warmup:
                times.append(dt * 1000)
    return statistics.median(times)


def forward_timing(target, draft, k: int, batches=(1, 8, 32), context: int = 128,
           repeats: int = 15) -> dict:
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for b in batches:
            rows.append({
                "batch": b,
                "draft_step_ms": _time_forward(draft, b, context, 1, repeats),
                "target_verify_ms": _time_forward(target, b, context, k + 1, repeats),
            })
    finally:
        torch.set_num_threads(prev)
    return {"threads": 1, "context": context, "verify_tokens": k + 1, "repeats": repeats,
            "dtype": str(next(target.parameters()).dtype).replace("torch.", ""), "rows": rows}


def evaluate(models: Path, k: int = 4, num_prompts: int = 50, max_new_tokens: int = 64,
             timing: bool = True, dtype: str = "float32",
             max_prompt_tokens: int = 512, mostly_ascii: bool = False, source: str = "auto",
             batches=(1, 8, 32), context: int = 128, repeats: int = 15) -> dict:
    """Full evaluation; returns a JSON-able dict (``acceptance`` and optionally ``timing``)."""
    models = Path(models)
    tok, target, draft = load_pair(models, dtype)
    prompts = heldout_prompts(tok, num_prompts, max_prompt_tokens, mostly_ascii, source)
    res = {
        "models": str(models),
        "dtype": dtype,
        "prompt_filter": {"split": "held-out (2%, sha1 of id)", "max_prompt_tokens":
                          max_prompt_tokens, "mostly_ascii": mostly_ascii},
        "acceptance": acceptance(tok, target, draft, prompts, k, max_new_tokens),
    }
    if timing:
        res["timing"] = forward_timing(target, draft, k, batches, context, repeats)
    return res


def print_report(res: dict) -> None:
    a = res["acceptance"]
    print(f"\nGreedy acceptance, k={a['k']}, {a['num_prompts']} held-out prompts, "
          f"{a['generated_tokens']} target tokens (max {a['max_new_tokens']}/prompt):")
    print(f"  acceptance rate        {a['acceptance_rate']:.3f}  ({a['accepted']}/{a['drafted']})")
    print(f"  mean accepted / step   {a['mean_accepted']:.2f}")
    print(f"  tokens / target step   {a['tokens_per_step']:.2f}")
    t = res.get("timing")
    if t:
        print(f"\nForward time, 1 thread, {t['dtype']}, KV cache {t['context']} tokens, "
              f"median of {t['repeats']} (ms):")
        print(f"  {'batch':>5}  {'draft 1-tok step':>16}  {'target verify ' + str(t['verify_tokens']):>16}"
              f"  {'ratio':>6}")
        for r in t["rows"]:
            print(f"  {r['batch']:>5}  {r['draft_step_ms']:>16.2f}  {r['target_verify_ms']:>16.2f}"
                  f"  {r['target_verify_ms'] / r['draft_step_ms']:>6.2f}")
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minedraft.demo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--mostly-ascii", action="store_true",
                   help="only prompts that are >=95%% ASCII (what the models were trained on)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--source", default="auto", choices=["auto", "sharegpt", "stdlib"])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="threads for the acceptance run")
    p.add_argument("--json", type=Path, default=None,
                   help="write results here (default <models>/demo-eval.json)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate(args.models, k=args.k, num_prompts=args.num_prompts,
                   max_new_tokens=args.max_new_tokens, timing=not args.no_timing,
                   dtype=args.dtype, max_prompt_tokens=args.max_prompt_tokens,
                   mostly_ascii=args.mostly_ascii, source=args.source,
                   batches=tuple(int(b) for b in args.batches.split(",")),
                   context=args.context, repeats=args.repeats)
    print_report(res)
    out = args.json or (args.models / "demo-eval.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
