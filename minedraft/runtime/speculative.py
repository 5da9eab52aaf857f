"""The two halves of a speculative step, as functions over a ModelRunner: `propose` (drafter) and `verify_batch`
(verifier). The services are thin wrappers around these; `speculative_generate` chains them in one process (the
gpt-fast shape) and is the reference the tests hold the distributed system to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.runtime.runner import Extend, ModelRunner
from minedraft.runtime.sampling import SamplingParams, VerifyResult, logits_to_probs, sample, verify


@dataclass
class DraftRequest:
    seq_id: str
    start: int
    tokens: list[int]  # committed tokens the drafter has not cached yet (1, or 2 after a fully accepted draft)
    k: int  # drafts wanted; 0 = only cache `tokens` (prefill)
    params: SamplingParams
    generator: torch.Generator | None = None


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None  # [len(tokens), V] draft distribution q, only for sampled requests


def propose(runner: ModelRunner, reqs: list[DraftRequest]) -> list[Draft]:
    """k autoregressive draft steps for a whole batch; sequences wanting fewer drafts drop out early."""
    drafts = [Draft([], [] if not r.params.greedy else None) for r in reqs]
    items = [Extend(r.seq_id, r.start, r.tokens) for r in reqs]
    active = list(range(len(reqs)))
    depth = 0
    while items:
        logits = torch.cat(runner.step(items))
        rows = [i for i in active if reqs[i].k > depth]
        if not rows:
            break
        sel = [active.index(i) for i in rows]
        params = [reqs[i].params for i in rows]
        probs = logits_to_probs(logits[sel], params)
        toks = sample(probs, [reqs[i].generator for i in rows]).tolist()
        for j, i in enumerate(rows):
            drafts[i].tokens.append(toks[j])
            if drafts[i].probs is not None:
                drafts[i].probs.append(probs[j])
        depth += 1
        # The last draft is not fed back: verification decides whether it (and the bonus) enters the cache.
        active = [i for i in rows if reqs[i].k > depth]
        items = [Extend(reqs[i].seq_id, reqs[i].start + len(reqs[i].tokens) + depth - 1, [drafts[i].tokens[-1]])
                 for i in active]
    for d in drafts:
        if d.probs is not None:
            d.probs = torch.stack(d.probs) if d.probs else None
    return drafts


@dataclass
class VerifyRequest:
    seq_id: str
    start: int
    tokens: list[int]  # committed tokens not cached yet (the last accepted one, or the whole prompt at prefill)
    drafts: list[int]
    draft_probs: torch.Tensor | None  # [len(drafts), V] when sampled
    params: SamplingParams
    generator: torch.Generator | None = None


def verify_batch(runner: ModelRunner, reqs: list[VerifyRequest]) -> VerifyResult:
    """One target forward over every sequence's tail + drafts, then acceptance per sequence. A request with no
    drafts is a prefill (or plain autoregressive step): it yields one token sampled from the target."""
    logits = runner.step([Extend(r.seq_id, r.start, r.tokens + r.drafts, all_logits=bool(r.drafts)) for r in reqs])
    B, K = len(reqs), max(len(r.drafts) for r in reqs)
    V = logits[0].shape[-1]
    device = logits[0].device
    target = torch.zeros(B, K + 1, V, device=device)
    draft_tokens = torch.zeros(B, K, dtype=torch.long, device=device)
    # Sampled rows need a q even with no drafts (prefill): a [B, 0, V] placeholder, never read.
    sampled = any(not r.params.greedy for r in reqs)
    draft_probs = torch.zeros(B, K, V, device=device) if sampled else None
    for b, (r, lg) in enumerate(zip(reqs, logits)):
        n = len(r.drafts)
        target[b, : n + 1] = lg[-(n + 1):]
        if n:
            draft_tokens[b, :n] = torch.tensor(r.drafts, device=device)
            if draft_probs is not None and r.draft_probs is not None:
                draft_probs[b, :n] = r.draft_probs
    lens = torch.tensor([len(r.drafts) for r in reqs], dtype=torch.long, device=device)
    return verify(draft_tokens, lens, target, draft_probs, [r.params for r in reqs], [r.generator for r in reqs])
