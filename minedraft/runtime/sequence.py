"""Per-request bookkeeping for speculative decoding, kept by whoever drives the model services (the router, or the
in-process reference loop).

The driver holds the truth: prompt, accepted tokens and how many leading tokens each model's KV cache holds
correctly. Every request to a model service is then 'write tokens[cached:] (plus drafts) at position cached', which
makes rollback, the drafter's catch-up after a fully accepted draft, and re-prefill on another replica after a fault
the same operation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minedraft.runtime.sampling import SamplingParams


@dataclass
class Sequence:
    """One request's committed tokens and how many of them each model's cache holds; the starts of every step
    follow from it."""

    seq_id: str
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    max_len: int  # context limit (the smaller of the two models')
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)  # prompt + accepted output
    draft_cached: int = 0  # leading `tokens` the drafter's KV holds
    target_cached: int = 0  # leading `tokens` the verifier's KV holds
    drafted: int = 0
    accepted: int = 0
    drafts: int = 0  # verify steps that checked drafts (mean acceptance length = 1 + accepted / drafts)
    verify_steps: int = 0
    finish_reason: str | None = None

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def draft_len(self, k: int) -> int:
        """Drafts worth proposing now: accepted drafts plus the target's own token must fit both the output budget and
        the context, so a verification never produces tokens we would throw away."""
        room = min(self.max_new_tokens - len(self.output), self.max_len - len(self.tokens)) - 1
        return max(0, min(k, room))

    def draft_input(self) -> tuple[int, list[int]]:
        return self.draft_cached, self.tokens[self.draft_cached:]

    def on_drafted(self, num_drafts: int) -> None:
        """The drafter fed every committed token and all drafts but the last one into its cache; counting those drafts
        as cached is right as long as they get accepted, which on_verified settles. (The drafts themselves are held by
        whoever drives the services until they are verified.)"""
        self.draft_cached = len(self.tokens) + max(num_drafts - 1, 0)

    def verify_input(self) -> tuple[int, list[int]]:
        """Where the verifier resumes and the committed tokens it has not cached; `drafts` go after them."""
        return self.target_cached, self.tokens[self.target_cached:]

    def on_verified(self, num_drafts: int, num_accepted: int, new_tokens: list[int]) -> list[int]:
        """Commit the verifier's output for `num_drafts` drafts (accepted drafts + one target token); return what is
        emitted to the client, cut at EOS / max_new_tokens / context."""
        old = len(self.tokens)
        self.drafted += num_drafts
        self.accepted += num_accepted
        self.drafts += int(num_drafts > 0)
        self.verify_steps += 1
        self.target_cached = old + num_accepted
        self.draft_cached = min(self.draft_cached, old + num_accepted)
        emitted = []
        for t in new_tokens:
            self.tokens.append(t)
            emitted.append(t)
            if not self.ignore_eos and t in self.eos_ids:
                self.finish_reason = "stop"
            elif len(self.output) >= self.max_new_tokens or len(self.tokens) >= self.max_len:
                self.finish_reason = "length"
            if self.finished:
                break
        return emitted

    def reset_cache(self, which: str) -> None:
        """A model service lost its KV for this sequence (replica died or changed): re-prefill from scratch."""
        if which == "draft":
            self.draft_cached = 0
        else:
            self.target_cached = 0
