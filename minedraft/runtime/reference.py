"""In-process generation loops: target-only autoregressive decoding and standard speculative decoding.

No servers, no overlap: the plainest correct use of the runtime. Tests hold the distributed system to these, and
these to transformers' `generate`.
"""

from __future__ import annotations

from minedraft.runtime.runner import ModelRunner
from minedraft.runtime.sampling import SamplingParams
from minedraft.runtime.sequence import Sequence
from minedraft.runtime.speculative import Draft, DraftRequest, VerifyRequest, propose, verify_batch

NO_DRAFT = Draft([], None)


def make_sequences(prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                   max_new_tokens: int | list[int], max_len: int, eos_ids=(), ignore_eos: bool = False) -> list[Sequence]:
    n = len(prompts)
    params = params if isinstance(params, list) else [params] * n
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * n
    return [Sequence(f"seq-{i}", list(p), params[i], budgets[i], max_len, frozenset(eos_ids), ignore_eos)
            for i, p in enumerate(prompts)]


def _verify(target: ModelRunner, seqs: list[Sequence], drafts: list[Draft], gens: dict) -> None:
    reqs = [VerifyRequest(s.seq_id, *s.verify_input(), d.tokens, d.probs, s.params, gens[s.seq_id])
            for s, d in zip(seqs, drafts)]
    res = verify_batch(target, reqs)
    for s, d, n, toks in zip(seqs, drafts, res.num_accepted.tolist(), res.tokens):
        s.on_verified(len(d.tokens), n, toks)


def generate(target: ModelRunner, seqs: list[Sequence], draft: ModelRunner | None = None, k: int = 4,
             min_confidence: float = 0.0) -> list[Sequence]:
    """Decode every sequence to completion, all in one batch. With `draft`, standard SD (draft then verify; drafts
    stopped by confidence with `min_confidence`); without, target-only. Frees the KV of every sequence before
    returning."""
    tgens = {s.seq_id: s.params.make_generator(salt=0) for s in seqs}
    dgens = {s.seq_id: s.params.make_generator(salt=1) for s in seqs}
    try:
        _verify(target, seqs, [NO_DRAFT] * len(seqs), tgens)  # prefill: the first token comes from the target alone
        while live := [s for s in seqs if not s.finished]:
            drafts = [NO_DRAFT] * len(live)
            if draft is not None:
                reqs = [DraftRequest(s.seq_id, *s.draft_input(), s.draft_len(k), s.params, dgens[s.seq_id],
                                     min_confidence) for s in live]
                drafts = propose(draft, reqs)
                for s, d in zip(live, drafts):
                    s.on_drafted(len(d.tokens))
            _verify(target, live, drafts, tgens)
    finally:
        for s in seqs:
            target.release(s.seq_id)
            if draft is not None:
                draft.release(s.seq_id)
    return seqs
