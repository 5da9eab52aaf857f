"""Reading the router's step trace (JSON lines, services/router/trace.py) into per-tick timelines.

Why: the trace is the only place the overlap is visible. Per tick the router logs its duration and, per service call,
start/end relative to the tick start and the compute time the service itself measured. From that we get:

  busy intervals  absolute [start, end] of every draft/verify call (what the timeline plot draws), and the part of
                  each call spent computing, placed at the call's end (the service answers right after computing);
  router overhead tick duration minus the time covered by at least one outstanding call (scheduling, bookkeeping,
                  building protobufs in the router's event loop);
  gRPC overhead   time covered by calls minus time covered by service compute (serialization, loopback transport,
                  the services' own request handling);
so that tick = critical compute + gRPC overhead + router overhead, for sd (calls in sequence) and psd (calls
overlapped) alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Call:
    kind: str  # draft | verify
    start: float  # seconds from the tick start
    end: float
    size: int
    compute_s: float
    prefill: int = 0  # sequences this call started from position 0 (a whole prompt on that service)

    @property
    def compute_start(self) -> float:
        return max(self.start, self.end - self.compute_s)


@dataclass
class Tick:
    tick: int
    t: float  # seconds from the router's trace origin
    dur: float
    verify_batch: int
    draft_batch: int
    calls: list[Call] = field(default_factory=list)

    @property
    def prefills(self) -> bool:
        """Does any call of this tick prefill a prompt? Such ticks are many times longer than a decode step."""
        return any(c.prefill for c in self.calls)

    def covered(self, compute: bool = False) -> float:
        """Length of the union of call intervals (or of their compute parts) within the tick."""
        spans = sorted((c.compute_start if compute else c.start, c.end) for c in self.calls)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return min(total, self.dur)

    @property
    def router_overhead(self) -> float:
        return max(0.0, self.dur - self.covered())

    @property
    def grpc_overhead(self) -> float:
        return max(0.0, self.covered() - self.covered(compute=True))

    def busy(self, kind: str) -> list[tuple[float, float, float]]:
        """(absolute start, absolute compute start, absolute end) of this tick's calls of one kind."""
        return [(self.t + c.start, self.t + c.compute_start, self.t + c.end) for c in self.calls if c.kind == kind]


def parse(lines) -> list[Tick]:
    """Ticks with their calls. Calls are logged before their tick record; a call belongs to the tick with its number."""
    pending: dict[int, list[Call]] = {}
    ticks: list[Tick] = []
    for line in lines:
        line = line.strip() if isinstance(line, str) else line
        if not line:
            continue
        rec = json.loads(line) if isinstance(line, str) else line
        if rec["kind"] == "tick":
            ticks.append(Tick(rec["tick"], rec["t"], rec["dur"], rec.get("verify_batch", 0), rec.get("draft_batch", 0),
                              pending.pop(rec["tick"], [])))
        elif rec["kind"] in ("draft", "verify"):
            pending.setdefault(rec["tick"], []).append(Call(rec["kind"], rec["start"], rec["end"], rec.get("size", 0),
                                                            rec.get("compute_ms", 0.0) / 1e3, rec.get("prefill", 0)))
    return ticks


def read(path: str | Path, offset: int = 0, end: int | None = None) -> list[Tick]:
    """Ticks written between byte `offset` and byte `end` (the file's sizes when the measured window began and
    ended; the router appends every run of a point to one file)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read() if end is None else f.read(max(0, end - offset))
    return parse(data.decode().splitlines())


def summarize(ticks: list[Tick], batch_filter: int | None = None) -> dict:
    """Per-step means (ms) and overhead shares. With `batch_filter`, only decode ticks whose verified batch has that
    many sequences count (the steady state at a given load): ticks that prefill a prompt on either service are left
    out, since one of them lasts as long as tens of decode steps and would swamp the mean."""
    sel = [t for t in ticks if batch_filter is None or (t.verify_batch == batch_filter and not t.prefills)]
    if not sel:
        return {"ticks": 0}
    n = len(sel)
    dur = sum(t.dur for t in sel)
    router = sum(t.router_overhead for t in sel)
    grpc_ = sum(t.grpc_overhead for t in sel)

    def mean_ms(kind: str, attr: str) -> float:
        vals = [getattr(c, attr) if attr != "dur" else c.end - c.start for t in sel for c in t.calls if c.kind == kind]
        return 1e3 * sum(vals) / len(vals) if vals else 0.0

    # Time between one tick's end and the next one's start: the lane loop's reap/admit work (or idling, under
    # light online load, hence the median).
    gaps = sorted(b.t - (a.t + a.dur) for a, b in zip(ticks, ticks[1:]))
    gap = gaps[len(gaps) // 2] if gaps else 0.0
    return {"ticks": n, "step_ms": 1e3 * dur / n, "between_ticks_ms_median": 1e3 * gap, "router_overhead_ms": 1e3 * router / n,
            "grpc_overhead_ms": 1e3 * grpc_ / n, "router_overhead_frac": router / dur, "grpc_overhead_frac": grpc_ / dur,
            "overhead_frac": (router + grpc_) / dur,
            "draft_call_ms": mean_ms("draft", "dur"), "draft_compute_ms": 1e3 * _mean_compute(sel, "draft"),
            "verify_call_ms": mean_ms("verify", "dur"), "verify_compute_ms": 1e3 * _mean_compute(sel, "verify"),
            "mean_verify_batch": sum(t.verify_batch for t in sel) / n}


def phases(ticks: list[Tick], batch: int) -> dict:
    """Seconds of ticks by what they did: `prefill` (a prompt written on either service), `full` (decode with a
    full verified batch: the steady state the ideal bound describes) and `partial` (decode with a part-empty batch:
    ramp-up and the drain, where an offline run's last requests finish). The same absolute prefill and drain time
    dilutes psd's steady-state gain over sd, so this is where a run's psd/sd ratio falls short of its bound."""
    out = {"prefill": 0.0, "full": 0.0, "partial": 0.0}
    for t in ticks:
        out["prefill" if t.prefills else "full" if t.verify_batch >= batch else "partial"] += t.dur
    return out


def _mean_compute(ticks: list[Tick], kind: str) -> float:
    vals = [c.compute_s for t in ticks for c in t.calls if c.kind == kind]
    return sum(vals) / len(vals) if vals else 0.0


def window(ticks: list[Tick], n: int = 20) -> list[Tick]:
    """n consecutive steady-state ticks: among windows, the one whose smallest verified batch is largest (full
    batches, not the ramp-up or the drain), then whose longest tick is shortest (no prefill spike), then the one
    nearest the middle of the run."""
    if len(ticks) <= n:
        return ticks
    mid = (len(ticks) - n) / 2

    def key(i: int):
        w = ticks[i:i + n]
        return (-min(t.verify_batch for t in w), round(max(t.dur for t in w), 3), abs(i - mid))

    best = min(range(len(ticks) - n + 1), key=key)
    return ticks[best:best + n]
