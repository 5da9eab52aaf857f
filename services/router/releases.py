"""What a lane still owes its model services: sequences to free, drafter buffers consumed, buffers to discard.

Releases ride on the next step to each service (a free piggyback), or go out on their own when the lane is idle
(`Lane.flush_releases`). A fault on one service makes what is owed to it moot: its caches and buffers died with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minedraft.v1 import common_pb2, model_service_pb2 as pb


@dataclass
class PendingReleases:
    """Owed to the verifier (sequences, discards) and to the drafter (sequences, buffers); taken by the next step."""

    verifier_seqs: list[str] = field(default_factory=list)  # sequences to free on the verifier
    drafter_seqs: list[str] = field(default_factory=list)  # sequences to free on the drafter
    drafter_buffers: list[str] = field(default_factory=list)  # drafter buffers the verifier has read
    discards: list[common_pb2.TensorRef] = field(default_factory=list)  # buffers of a lost drafter, for the verifier

    def __bool__(self) -> bool:
        return bool(self.verifier_seqs or self.drafter_seqs or self.drafter_buffers or self.discards)

    @property
    def for_drafter(self) -> bool:
        return bool(self.drafter_seqs or self.drafter_buffers)

    def take_verifier(self) -> tuple[pb.Release, list[common_pb2.TensorRef]]:
        """What the next verifier step carries: (sequences to free, buffers to discard)."""
        release, discards = pb.Release(seq_ids=self.verifier_seqs), self.discards
        self.verifier_seqs, self.discards = [], []
        return release, discards

    def take_drafter(self) -> pb.Release:
        release = pb.Release(seq_ids=self.drafter_seqs, buffers=self.drafter_buffers)
        self.drafter_seqs, self.drafter_buffers = [], []
        return release

    def give_back_verifier(self, release: pb.Release, discards: list[common_pb2.TensorRef]) -> None:
        """A flush that did not get through (shutdown cancelled it): owed again, first."""
        self.verifier_seqs[:0] = list(release.seq_ids)
        self.discards[:0] = discards

    def give_back_drafter(self, release: pb.Release) -> None:
        self.drafter_seqs[:0] = list(release.seq_ids)
        self.drafter_buffers[:0] = list(release.buffers)

    def drafter_lost(self) -> None:
        self.drafter_seqs, self.drafter_buffers = [], []

    def verifier_lost(self) -> None:
        self.verifier_seqs = []
