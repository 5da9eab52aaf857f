"""A client request as the router's engine sees it: the sequence bookkeeping, the sampling options, the queue its
tokens go out on, and which step it needs next."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from minedraft.runtime.sequence import Sequence
from minedraft.v1 import common_pb2

PREFILL, DRAFT, VERIFY = "prefill", "draft", "verify"  # what a running sequence needs next


class QueueFull(Exception):
    pass


@dataclass
class Request:
    seq: Sequence
    sampling: common_pb2.SamplingOptions
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("tokens", [ids]) | ("done", reason) | ("error", exc)
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    phase: str = PREFILL
    cancelled: bool = False
    probs_ref: common_pb2.TensorRef | None = None  # where this sequence's draft probabilities live (sampled only)
    probs_buffer: str = ""
    lane: object = None  # the Engine this request is pinned to (set by the Router)

    @property
    def seq_id(self) -> str:
        return self.seq.seq_id


def buffer_name(ref: common_pb2.TensorRef) -> str:
    kind = ref.WhichOneof("payload")
    return ref.shm.name if kind == "shm" else ref.cuda_ipc.name if kind == "cuda_ipc" else ""
