"""Per-step timing of the two services as seen by the router: start/end of every draft and verify call relative to
its tick, and each tick's duration and batch sizes. Written as JSON lines when a trace file is configured (or kept in
memory for tests); the benchmark (minedraft/bench/tracefile.py) turns it into the drafter-vs-verifier timeline that
shows the overlap, and into the router and gRPC overhead per tick."""

from __future__ import annotations

import json
import time


class Trace:
    """A lane's step log: one record per service call and per tick."""

    def __init__(self, path: str = "", keep: bool = False):
        self._file = open(path, "a", buffering=1) if path else None
        self.records: list[dict] | None = [] if keep else None  # in memory, for tests
        self._origin = time.perf_counter()
        self._cpu = time.process_time()

    def step(self, kind: str, replica: str, tick: int, start_s: float, end_s: float, size: int, compute_ms: float,
             prefill: int = 0, drafted: list[int] | None = None, accepted: list[int] | None = None):
        """One call; `prefill` counts its sequences that the service starts from position 0 (whole prompt). A verify
        also lists, per sequence, the drafts it checked and how many it accepted (acceptance per position)."""
        record = {"kind": kind, "replica": replica, "tick": tick, "start": start_s, "end": end_s, "size": size,
                  "compute_ms": round(compute_ms, 3), "prefill": prefill}
        if drafted is not None and any(drafted):
            record["drafted"], record["accepted"] = drafted, accepted
        self._emit(record)

    def tick(self, tick: int, t0: float, t1: float, size_s: int, size_o: int, choice: str = "",
             predicted: float = 0.0, explored: bool = False, ahead: tuple[int, int] = (0, 0)) -> None:
        """One tick; `choice` is the schedule it ran (e.g. psd/k=4), `predicted` the controller's tokens/s for it.
        `router_cpu_ms` is the CPU the router process spent (all its threads and lanes) since the previous tick: on a
        host whose cores the model services share, it is time taken from them. `ahead`: of the drafts this tick made
        ahead (draft-ahead), how many were used and how many discarded (`ahead_hits`, `ahead_misses`, when any)."""
        cpu, self._cpu = self._cpu, time.process_time()
        record = {"kind": "tick", "tick": tick, "t": t0 - self._origin, "dur": t1 - t0, "verify_batch": size_s,
                  "draft_batch": size_o, "choice": choice, "predicted_tok_s": round(predicted, 1),
                  "explored": explored, "router_cpu_ms": round(1e3 * (self._cpu - cpu), 2)}
        if any(ahead):
            record["ahead_hits"], record["ahead_misses"] = ahead
        self._emit(record)

    def _emit(self, record: dict) -> None:
        if self.records is not None:
            self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
