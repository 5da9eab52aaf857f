"""How often would draft-ahead's drafts hit if the drafter guessed several verification outcomes (Saguaro)?

Why: a draft made ahead is used only where the outcome it assumed happens. Today that is one outcome: all k drafts
accepted and the target's next token equal to the drafter's top token (~53% at k = 4 on the demo pair). Guessing more
outcomes, a rejection at position j with the drafter's second-likeliest token there in place of the draft, or a
second guess of the bonus token, raises the hit rate, at the price of drafting a branch per guess in the same
forwards. This measures the first half exactly and offline (greedy, no servers): the target's greedy continuation of
held-out ShareGPT prompts is fixed, and at each speculative step the rank, in the drafter's distribution, of the
token the target put at the rejected position (or at the bonus position) says whether a guess among the drafter's
top B tokens would have hit. The cost half is the drafter's batched step time (a batch of 1 + guesses rows for k + 1
forwards), measured with the model runner on one thread.

    python benchmarks/draft_ahead_outcomes.py --out benchmarks/results/draft-ahead-outcomes

Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from minedraft.demo.data import render_chat
from minedraft.demo.evaluate import heldout_prompts, load_pair
from minedraft.runtime.checkpoint import load_model
from minedraft.runtime.runner import Extend, ModelRunner

ROOT = Path(__file__).resolve().parent.parent


def ranks(tokenizer, target, draft, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """Per prompt: for each token of the target's greedy continuation, its rank in the drafter's distribution given
    the tokens before it (0 = the drafter's top token)."""
    out = []
    for p in prompts:
        ids = tokenizer.encode(render_chat(p), add_special_tokens=False)
        with torch.no_grad():
            seq = target.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False)[0]
            logits = draft(input_ids=seq[None]).logits[0, len(ids) - 1:-1].float()
        y = seq[len(ids):]
        out.append((logits > logits.gather(1, y[:, None])).sum(1).tolist())
    return out


def hit_rates(all_ranks: list[list[int]], k: int, guesses: int) -> dict:
    """Replay greedy speculative decoding with k drafts over each continuation: the share of steps whose outcome a
    draft made ahead would have matched, guessing the drafter's top `guesses` tokens at every outcome position (the
    first rejected position, or the bonus position when all k are accepted), and guessing them at the bonus only."""
    steps = every = bonus_only = 0
    for r in all_ranks:
        i = 0
        while i + k < len(r):
            n = 0
            while n < k and r[i + n] == 0:
                n += 1
            steps += 1
            every += r[i + n] < guesses
            bonus_only += n == k and r[i + n] < guesses
            i += n + 1
    return {"k": k, "guesses": guesses, "steps": steps, "hit_every_position": round(every / steps, 3),
            "hit_bonus_only": round(bonus_only / steps, 3)}


def drafter_ms(model_dir: Path, batch: int, forwards: int, context: int = 150, repeats: int = 30) -> float:
    """Median ms of one greedy draft call of `forwards` forwards over `batch` sequences, one thread."""
    runner = ModelRunner(load_model(model_dir, "cpu", "auto"), 65536, 16)
    for b in range(batch):
        runner.step([Extend(f"s{b}", 0, list(range(1, context + 1)))])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner.greedy_continue([Extend(f"s{b}", context, [5]) for b in range(batch)], [forwards] * batch)
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer, target, draft = load_pair(Path(args.models))
    all_ranks = ranks(tokenizer, target, draft, heldout_prompts(tokenizer, args.num_prompts, 256), args.new_tokens)
    rates = [hit_rates(all_ranks, k, g) for k in (2, 3, 4, 5, 6) for g in (1, 2, 3)]
    cost = {b: round(drafter_ms(Path(args.models) / "demo-draft", b, 5), 2) for b in (1, 2, 4, 6)}
    flat = [x for r in all_ranks for x in r]
    top = {str(b): round(sum(x == b for x in flat) / len(flat), 3) for b in range(4)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rank_shares": top, "hit_rates": rates,
                                                   "drafter_ms_5_forwards_by_batch": cost}, indent=1) + "\n")
    md = ["# Draft-ahead hit rate with guesses of several outcomes (demo pair, greedy)", "",
          f"`python benchmarks/draft_ahead_outcomes.py --out {args.out}` ({args.num_prompts} held-out prompts, "
          f"{args.new_tokens} tokens each).", "",
          "Share of the target's tokens at each rank in the drafter's distribution: " +
          ", ".join(f"rank {b}: {v}" for b, v in top.items()), "",
          "| k | guesses per outcome | steps | hit, guessing at every outcome position | hit, guessing the bonus only |",
          "|---|---|---|---|---|"]
    md += [f"| {r['k']} | {r['guesses']} | {r['steps']} | {r['hit_every_position']} | {r['hit_bonus_only']} |"
           for r in rates]
    md += ["", "Drafter, one greedy call of 5 forwards (k = 4 ahead), ms by batch (1 + branches), one thread: " +
           ", ".join(f"{b}: {v}" for b, v in cost.items())]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
