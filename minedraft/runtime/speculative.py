"""The two halves of a speculative step, as functions over a ModelRunner: `propose` (drafter) and `verify_batch`
(verifier). The services are thin wrappers around these; `speculative_generate` chains them in one process (the
gpt-fast shape) and is the reference the tests hold the distributed system to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.runtime.attention import HostPack
from minedraft.runtime.runner import Extend, ModelRunner
from minedraft.runtime.sampling import (SamplingParams, SparseProbs, VerifyResult, compact, logits_to_probs,
                                        sample_sparse, verify)

# A sampled draft is drawn from (and shipped as) its likeliest DRAFT_SUPPORT tokens: at a 152k vocabulary that cuts
# the draft probabilities that travel to the verifier from 607 KB to 8 KB per draft token (sampling.compact).
DRAFT_SUPPORT = 1024


@dataclass
class DraftRequest:
    seq_id: str
    start: int
    tokens: list[int]  # committed tokens the drafter has not cached yet (1, or 2 after a fully accepted draft)
    k: int  # drafts wanted; 0 = only cache `tokens` (prefill)
    params: SamplingParams
    generator: torch.Generator | None = None
    min_confidence: float = 0.0  # stop drafting once the running product of draft confidences would fall below it


@dataclass
class Draft:
    tokens: list[int]
    probs: SparseProbs | None  # [len(tokens), S]: the distribution q each draft was drawn from (sampled only)


def propose(runner: ModelRunner, reqs: list[DraftRequest], support: int = DRAFT_SUPPORT) -> list[Draft]:
    """Up to k autoregressive draft steps for a whole batch; sequences wanting fewer drafts drop out early.

    Confidence-stopped drafting (FlexDraft's rule): a sequence's j-th draft is made only while the running product of
    the confidences of drafts 1..j stays >= its `min_confidence` (the first draft is always made). A draft's
    confidence is the top probability of the distribution it is drawn from (the greedy token's own probability under
    the plain softmax), known before the draft is drawn: so whether position j is drafted never depends on the token
    drawn there, the draft length is a stopping time of the draft process, and verification stays exact (see
    tests/test_sampling.py).

    All-greedy batches run the whole loop on the device (`greedy_continue`: argmax fed back, one copy to the host);
    a batch with a sampled request drafts step by step, since each step's sample draws from a host generator."""
    items = [Extend(r.seq_id, r.start, r.tokens) for r in reqs]
    if not reqs:
        return []
    taus = [r.min_confidence for r in reqs]
    if all(r.params.greedy or r.k == 0 for r in reqs):
        return [Draft(toks, None) for toks in runner.greedy_continue(items, [r.k for r in reqs],
                                                                     taus if any(taus) else None)]
    drafts = [Draft([], [] if not r.params.greedy else None) for r in reqs]
    confidence = [1.0] * len(reqs)  # running product per sequence
    active = list(range(len(reqs)))
    depth = 0
    while items:
        out = runner.forward(items)
        logits = out.logits[[hi - 1 for _, hi in out.spans]] if len(out.spans) != len(out.logits) else out.logits
        rows = [i for i in active if reqs[i].k > depth]
        if not rows:
            break
        sel = [active.index(i) for i in rows]
        params = [reqs[i].params for i in rows]
        probs = logits_to_probs(logits[sel], params)
        if any(taus[i] for i in rows):
            top = torch.where(torch.tensor([p.greedy for p in params], device=probs.device),
                              logits[sel].float().softmax(-1).amax(-1), probs.amax(-1)).tolist()
            keep = [j for j, i in enumerate(rows) if depth == 0 or confidence[i] * top[j] >= taus[i]]
            for j in keep:
                confidence[rows[j]] *= top[j]
            rows, probs = [rows[j] for j in keep], probs[keep]
            params = [params[j] for j in keep]
            if not rows:
                break
        dist = compact(probs, support)
        toks = sample_sparse(dist, [reqs[i].generator for i in rows]).tolist()
        for j, i in enumerate(rows):
            drafts[i].tokens.append(toks[j])
            if drafts[i].probs is not None:
                drafts[i].probs.append(dist[j:j + 1])
        depth += 1
        # The last draft is not fed back: verification decides whether it (and the bonus) enters the cache.
        active = [i for i in rows if reqs[i].k > depth]
        items = [Extend(reqs[i].seq_id, reqs[i].start + len(reqs[i].tokens) + depth - 1, [drafts[i].tokens[-1]])
                 for i in active]
    for d in drafts:
        if d.probs is not None:
            d.probs = SparseProbs.cat(d.probs) if d.probs else None
    return drafts


@dataclass
class VerifyRequest:
    seq_id: str
    start: int
    tokens: list[int]  # committed tokens not cached yet (the last accepted one, or the whole prompt at prefill)
    drafts: list[int]
    draft_probs: SparseProbs | torch.Tensor | None  # [len(drafts), S] when sampled ([len(drafts), V] dense too)
    params: SamplingParams
    generator: torch.Generator | None = None


def verify_batch(runner: ModelRunner, reqs: list[VerifyRequest]) -> VerifyResult:
    """One target forward over every sequence's tail + drafts, then acceptance per sequence. A request with no
    drafts is a prefill (or plain autoregressive step): it yields one token sampled from the target.

    All-greedy batches read only the argmax of each row: one copy of [rows] token ids to the host, acceptance
    (longest matching prefix, then the target's own token) in plain Python."""
    out = runner.forward([Extend(r.seq_id, r.start, r.tokens + r.drafts, all_logits=bool(r.drafts)) for r in reqs])
    if all(r.params.greedy for r in reqs):
        best = out.argmax.tolist()
        accepted, tokens = [], []
        for r, (_, hi) in zip(reqs, out.spans):
            lo = hi - len(r.drafts) - 1  # the row that predicts the first draft (a re-prefill has more rows)
            n = 0
            while n < len(r.drafts) and r.drafts[n] == best[lo + n]:
                n += 1
            accepted.append(n)
            tokens.append(r.drafts[:n] + [best[lo + n]])
        return VerifyResult(torch.tensor(accepted, dtype=torch.long), tokens)
    B, K = len(reqs), max(len(r.drafts) for r in reqs)
    device = out.logits.device
    # Row index of every (sequence, draft position + 1): a sequence's last n+1 logits; padding repeats its last row.
    index = [[min(hi - len(r.drafts) - 1 + j, hi - 1) for j in range(K + 1)] for r, (_, hi) in zip(reqs, out.spans)]
    pack = HostPack()
    pack.add("index", index)
    pack.add("drafts", [r.drafts + [0] * (K - len(r.drafts)) for r in reqs])
    pack.add("lens", [len(r.drafts) for r in reqs])
    t = pack.to(device)
    target = out.logits[t["index"]]  # [B, K+1, V]
    draft_probs = None
    if any(not r.params.greedy for r in reqs):  # sampled rows need a q even with no drafts: zeros, never read
        given = {b: _sparse(r.draft_probs) for b, r in enumerate(reqs) if r.drafts and r.draft_probs is not None}
        width = max((q.width for q in given.values()), default=1)
        ids = torch.zeros(B, K, width, dtype=torch.long, device=device)
        probs = torch.zeros(B, K, width, device=device)
        for b, r in enumerate(reqs):
            if b in given:
                q = given[b].padded(width).to(device)
                ids[b, : len(r.drafts)], probs[b, : len(r.drafts)] = q.ids, q.probs
        draft_probs = SparseProbs(ids, probs)
    return verify(t["drafts"].long(), t["lens"].long(), target, draft_probs, [r.params for r in reqs],
                  [r.generator for r in reqs])


def _sparse(q: SparseProbs | torch.Tensor) -> SparseProbs:
    """A dense [n, V] distribution as the SparseProbs of its whole vocabulary (same values)."""
    if isinstance(q, SparseProbs):
        return q
    return SparseProbs(torch.arange(q.shape[-1], device=q.device).expand(q.shape), q.float())
