"""What the cost model gets wrong, learnt from measured ticks: predicted / measured tick time, per choice and batch
size.

The cost model (costs.py) predicts each step from its shape; what it cannot see (the router's and the client's own CPU
on shared cores, both services computing at once, a schedule's extra calls) shows up as a ratio between the time a
tick was predicted to take and what it took. The ratio is kept per (schedule, k), because how a tick grows with k is
what the model gets most wrong on shared cores, and per batch-size bucket (1, 2-3, 4-7, ... 64+ requests), because
the error grows with the batch: on the demo pair, sd's ratio was 1.13-1.24 on the last ticks of a drained wave (one
or two requests) and 0.9 at 32, and applied at 32 the small-batch ratio made auto switch psd to sd there. A choice
not measured in its bucket borrows: its schedule's nearest measured k in the bucket, else the schedule's ratio in
the bucket, else the same from the nearest bucket that has one, capped at 1: a ratio learnt at another batch size may
say a choice is slower than its model there, never faster (sd's ticks on a draining wave, 9 to 1 requests, were 1.45x
faster than predicted; borrowed at 16 that made auto run sd/k=5 for 14 ticks of 30-50 ms where psd's took 15, 12%
of a 128-request run, until its own ratio at 16 was measured).
Pure: no servers (tests/test_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Protocol

import numpy as np


class Choice(Hashable, Protocol):
    """What a correction is kept for: policy.Choice."""

    schedule: str
    k: int


BUCKETS = 7  # 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64+ running requests


def bucket(n: int) -> int:
    return min(max(int(n), 1).bit_length() - 1, BUCKETS - 1)


def nearest_first(n: int) -> tuple[int, ...]:
    """Every bucket, n's first, then by distance from it (the smaller first at equal distance)."""
    return _NEAREST[bucket(n)]


_NEAREST = [tuple(sorted(range(BUCKETS), key=lambda b, b0=b0: (abs(b - b0), b))) for b0 in range(BUCKETS)]


@dataclass
class Measured:
    """A correction learnt from measured ticks: the median of the first `1 / weight` ratios (one slow tick must not
    rule a choice out), then a running mean with that weight (the machine drifts)."""

    weight: float = 0.05
    value: float = 1.0
    ratios: list[float] = field(default_factory=list)  # the first 1 / weight ratios; how many says how well measured

    @property
    def samples(self) -> int:
        return len(self.ratios)

    def update(self, ratio: float) -> None:
        if len(self.ratios) < 1.0 / self.weight:
            self.ratios.append(ratio)
            self.value = float(np.median(self.ratios))
        else:
            self.value += self.weight * (ratio - self.value)


class Corrections:
    """The ratios of one lane. A choice's own ratio counts once it has `min_own` samples. Kept by (schedule, bucket),
    then k: borrowing a neighbouring k looks at a schedule's few k in one bucket, not at every ratio learnt (a score
    of every choice asks for 33 of them, on every tick whose batch changed size)."""

    def __init__(self, weight: float = 0.05, min_own: int = 3):
        self.weight, self.min_own = weight, min_own
        self._k: dict[tuple[str, int], dict[int, Measured]] = {}  # (schedule, bucket) -> k -> its own ratio
        self._schedule: dict[tuple[str, int], Measured] = {}  # (schedule, bucket) -> over all its k

    def update(self, choice: Choice, n: int, ratio: float) -> None:
        key = (choice.schedule, bucket(n))
        self._schedule.setdefault(key, Measured(self.weight)).update(ratio)
        self._k.setdefault(key, {}).setdefault(choice.k, Measured(self.weight)).update(ratio)

    def samples(self, choice: Choice, n: int) -> int:
        own = self._k.get((choice.schedule, bucket(n)), {}).get(choice.k)
        return own.samples if own is not None else 0

    def schedule_samples(self, schedule: str, n: int) -> int:
        m = self._schedule.get((schedule, bucket(n)))
        return m.samples if m is not None else 0

    def measured(self, choice: Choice, n: int) -> bool:
        return self.samples(choice, n) >= self.min_own

    def of(self, c: Choice, n: int) -> float:
        """Predicted / measured tick time of `c` with n running requests (the module says how it borrows)."""
        home = bucket(n)
        for b in nearest_first(n):
            found = self._lookup(c, b)
            if found is not None:
                return found if b == home else min(found, 1.0)
        return 1.0

    def _lookup(self, c: Choice, b: int) -> float | None:
        ks = self._k.get((c.schedule, b), {})
        own = ks.get(c.k)
        if own is not None and own.samples >= self.min_own:
            return own.value
        near = [(abs(k - c.k), m.value) for k, m in ks.items() if m.samples >= self.min_own]
        if near:
            d = min(dist for dist, _ in near)
            return float(np.mean([v for dist, v in near if dist == d]))
        sched = self._schedule.get((c.schedule, b))
        return sched.value if sched is not None and sched.samples else None

    def by_schedule(self, schedules: tuple[str, ...], n: int) -> dict[str, float]:
        """Each schedule's ratio in n's bucket, or the nearest bucket's (what the lane's log shows)."""
        out = {}
        for s in schedules:
            found = [m.value for b in nearest_first(n) if (m := self._schedule.get((s, b))) is not None and m.samples]
            out[s] = found[0] if found else 1.0
        return out
