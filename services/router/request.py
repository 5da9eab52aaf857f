"""A client request as a lane sees it: the sequence's committed truth (Sequence), its sampling options, the queue its
tokens go out on, and the draft it is waiting to have verified (PendingDraft), if any.

What a request needs next follows from that state and nothing else: a request whose target cache is empty needs its
prompt prefilled, one with a pending draft needs verifying, any other needs drafting (`Request.phase`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from minedraft.runtime.sequence import Sequence
from minedraft.v1 import common_pb2

PREFILL, DRAFT, VERIFY = "prefill", "draft", "verify"  # what a running request needs next


class QueueFull(Exception):
    """No room for the request now (queue limit, or more KV than a service has): RESOURCE_EXHAUSTED."""


class Unavailable(Exception):
    """The router cannot take requests now (no verifier reachable, or it is draining): UNAVAILABLE, retry later."""


@dataclass(frozen=True)
class PendingDraft:
    """Drafts proposed for a sequence and not verified yet. For a sampled request, `probs` is the draft step's tensor
    of draft probabilities q (one buffer for the whole draft batch) and `probs_row` this sequence's first row in it."""

    tokens: list[int]
    probs: common_pb2.TensorRef | None = None
    probs_row: int = -1

    @property
    def buffer(self) -> str:
        """Name of the drafter buffer holding `probs` ('' when inline or greedy): released once verified."""
        if self.probs is None:
            return ""
        kind = self.probs.WhichOneof("payload")
        return self.probs.shm.name if kind == "shm" else self.probs.cuda_ipc.name if kind == "cuda_ipc" else ""


@dataclass(eq=False)
class Request:
    """A lane's view of one client request: its Sequence, its sampling options as the services get them, the queue
    its events go out on, its pending draft, and the draft made ahead of it (the drafts that follow if the pending
    one is accepted whole: `ahead`, with `ahead_cached`, what the drafter's cache then holds)."""

    seq: Sequence
    sampling: common_pb2.SamplingOptions
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("tokens", [ids]) | ("done", reason) | ("error", exc)
    cancelled: bool = False
    draft: PendingDraft | None = None
    ahead: PendingDraft | None = None
    ahead_cached: int = 0
    examined: int = 0  # drafts the verifier judged (accepted ones plus the first rejected one of each step)
    arrived: float = field(default_factory=time.monotonic)  # for the queue-time and latency metrics
    admitted: float | None = None  # when it first joined a batch (a request moved to another lane keeps it)

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id

    @property
    def phase(self) -> str:
        if self.draft is not None:
            return VERIFY
        return PREFILL if self.seq.target_cached == 0 else DRAFT

    def on_admitted(self) -> None:
        if self.admitted is None:
            self.admitted = time.monotonic()

    def cancel(self) -> None:
        """The client went away. The lane holding the request notices on its next iteration (a lane with requests
        never sleeps) and frees the request's KV on both services."""
        self.cancelled = True

    def drop_draft(self) -> PendingDraft | None:
        """Forget the pending draft (verified, or made useless by a fault); the caller frees what it points at."""
        draft, self.draft = self.draft, None
        return draft

    def drop_ahead(self) -> PendingDraft | None:
        ahead, self.ahead = self.ahead, None
        return ahead

    def drop_drafts(self) -> list[PendingDraft]:
        """Forget both the pending draft and the one made ahead of it; the caller frees what they point at."""
        return [d for d in (self.drop_draft(), self.drop_ahead()) if d is not None]

    def forget_caches(self) -> list[PendingDraft]:
        """Both services lost this sequence (it moves to another lane): it re-prefills from its tokens there."""
        self.seq.reset_cache("draft")
        self.seq.reset_cache("target")
        return self.drop_drafts()
