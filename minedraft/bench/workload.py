"""The benchmark workload: which prompts, how many output tokens, and when each request arrives.

Why this shape: it follows the reference PSD evaluation (ShareGPT first human turn as the prompt, a fixed output
length with EOS ignored, everything submitted at once), rendered in the chat format the demo models were trained on
and tokenized with the target's tokenizer, so every mode sees exactly the same token ids. Prompts come from the
held-out split by default (the demo pair never trained on them, so acceptance is not flattered). Online load is a
Poisson process at `rate` requests/s drawn from a seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass


@dataclass
class BenchRequest:
    index: int
    prompt_ids: list[int]
    output_len: int  # max_new_tokens, sent with ignore_eos=True so exactly this many tokens come back
    arrival_s: float  # offset from the start of the run at which the client submits it

    def summary(self) -> dict:
        d = asdict(self)
        d["prompt_tokens"] = len(d.pop("prompt_ids"))
        return d


@dataclass
class WorkloadSpec:
    num_requests: int = 32
    output_len: int | None = 128  # None: the dataset's answer length (first gpt turn), capped at max_output_len
    max_output_len: int = 256
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = 512
    rate: float = math.inf  # requests/s; inf = offline (all at t=0)
    split: str = "heldout"  # heldout | train | all
    seed: int = 0

    def describe(self) -> str:
        out = f"{self.output_len} tokens" if self.output_len else f"dataset length (cap {self.max_output_len})"
        load = "offline (all at t=0)" if math.isinf(self.rate) else f"Poisson {self.rate:g} req/s (seed {self.seed})"
        prompt = f"{self.min_prompt_tokens or 1}..{self.max_prompt_tokens or 'any'} prompt tokens"
        return f"{self.num_requests} ShareGPT first turns ({self.split} split, {prompt}), output {out}, {load}"


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets of n requests: all 0 when offline (rate inf or <= 0), else cumulative exponential gaps
    with mean 1/rate, starting with the first request at t=0. Deterministic for a given seed."""
    if n <= 0:
        return []
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, [0.0]
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def _encode(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids) if hasattr(enc, "ids") else list(enc)


def _answer(conversation: dict) -> str:
    turns = conversation["conversations"]
    return turns[1]["value"] if len(turns) > 1 and turns[1]["from"].lower() not in ("human", "user") else ""


def build(spec: WorkloadSpec, tokenizer, conversations: list[dict] | None = None) -> list[BenchRequest]:
    """Tokenized requests for `spec`. Prompts are reused round-robin when the split has fewer matching prompts than
    requests (the report says how many were distinct)."""
    from minedraft.demo import data

    if conversations is None:
        conversations = data.load_conversations()
    if spec.split != "all":
        train, held = data.split(conversations)
        conversations = held if spec.split == "heldout" else train
    pairs: list[tuple[list[int], int]] = []
    seen: set[str] = set()
    for c in conversations:
        prompt = data.first_turn(c)
        if prompt is None or prompt in seen:
            continue
        ids = _encode(tokenizer, data.render_chat(prompt))
        if spec.min_prompt_tokens is not None and len(ids) < spec.min_prompt_tokens:
            continue
        if spec.max_prompt_tokens is not None and len(ids) > spec.max_prompt_tokens:
            continue
        if spec.output_len:
            out_len = spec.output_len
        else:  # the length of the dataset's own answer, at least 1 token, capped
            answer = _answer(c)
            out_len = max(1, min(len(_encode(tokenizer, answer)) if answer else 1, spec.max_output_len))
        seen.add(prompt)
        pairs.append((ids, out_len))
        if len(pairs) >= spec.num_requests:
            break
    if not pairs:
        raise ValueError(f"no prompt matches {spec.describe()}")
    arrivals = poisson_arrivals(spec.num_requests, spec.rate, spec.seed)
    return [BenchRequest(i, list(pairs[i % len(pairs)][0]), pairs[i % len(pairs)][1], arrivals[i])
            for i in range(spec.num_requests)]


def stats(requests: list[BenchRequest]) -> dict:
    """What the report prints about the workload."""
    p = [len(r.prompt_ids) for r in requests]
    o = [r.output_len for r in requests]
    return {"requests": len(requests), "distinct_prompts": len({tuple(r.prompt_ids) for r in requests}),
            "prompt_tokens_mean": sum(p) / len(p), "prompt_tokens_min": min(p), "prompt_tokens_max": max(p),
            "output_tokens_total": sum(o), "output_tokens_mean": sum(o) / len(o),
            "last_arrival_s": max(r.arrival_s for r in requests)}


def subset(requests: list[BenchRequest], n: int, max_output: int | None = None) -> list[BenchRequest]:
    """The first n requests, all arriving at t=0, optionally with a shorter output (warm-up rounds)."""
    return [BenchRequest(r.index, r.prompt_ids, min(r.output_len, max_output or r.output_len), 0.0)
            for r in requests[:n]]
