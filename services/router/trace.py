"""Per-step timing of the two services as seen by the router: start/end of every draft and verify call relative to
its tick, plus running totals. Written as JSON lines when a trace file is configured; the benchmark turns it into the
drafter-vs-verifier timeline that shows the overlap."""

from __future__ import annotations

import json
import time


class Trace:
    def __init__(self, path: str = "", keep: bool = False):
        self._file = open(path, "a", buffering=1) if path else None
        self.records: list[dict] | None = [] if keep else None  # in memory, for tests
        self._origin = time.perf_counter()
        self.busy = {"draft": 0.0, "verify": 0.0}  # seconds with a call outstanding
        self.compute = {"draft": 0.0, "verify": 0.0}  # seconds the services report computing
        self.tick_s = 0.0
        self.ticks = 0

    def reset(self) -> None:
        self.busy = {"draft": 0.0, "verify": 0.0}
        self.compute = {"draft": 0.0, "verify": 0.0}
        self.tick_s, self.ticks = 0.0, 0

    def step(self, kind: str, replica: str, tick: int, start_s: float, end_s: float, size: int, compute_ms: float,
             prefill: int = 0):
        """One call; `prefill` counts its sequences that the service starts from position 0 (whole prompt)."""
        self.busy[kind] += end_s - start_s
        self.compute[kind] += compute_ms / 1e3
        self._emit({"kind": kind, "replica": replica, "tick": tick, "start": start_s, "end": end_s, "size": size,
                    "compute_ms": round(compute_ms, 3), "prefill": prefill})

    def tick(self, tick: int, t0: float, t1: float, size_s: int, size_o: int) -> None:
        self.tick_s += t1 - t0
        self.ticks += 1
        self._emit({"kind": "tick", "tick": tick, "t": t0 - self._origin, "dur": t1 - t0, "verify_batch": size_s,
                    "draft_batch": size_o})

    def _emit(self, record: dict) -> None:
        if self.records is not None:
            self.records.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")

    def summary(self) -> dict:
        wall = max(self.tick_s, 1e-9)
        return {"ticks": self.ticks, "tick_s": self.tick_s,
                "drafter_busy_fraction": self.compute["draft"] / wall,
                "verifier_busy_fraction": self.compute["verify"] / wall,
                "draft_call_s": self.busy["draft"], "verify_call_s": self.busy["verify"],
                "draft_compute_s": self.compute["draft"], "verify_compute_s": self.compute["verify"]}

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
