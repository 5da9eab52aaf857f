"""One benchmark point: start a cluster in one mode (ar | sd | psd) with given k and per-batch size, warm it up, run
the workload `runs` times, and stop it; return client metrics, service busy fractions and router trace analysis for
the measured window only.

Why a fresh cluster per point: the services pin one core each and keep KV caches; a fresh start makes each point
independent of the previous one. The warm-up round is the workload's first 2*batch requests cut to 16 output
tokens (it exercises every code path and batch shape without doubling the run time). The measured window is marked
by the trace file's size before the run and by GetModelInfo busy_seconds read before and after it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from minedraft.bench import client, metrics, tracefile
from minedraft.bench.workload import BenchRequest, subset


@dataclass
class PointSpec:
    mode: str
    target: str
    draft: str
    k: int = 4
    batch: int = 16
    device: str = "cpu"
    concurrency: int = 0
    warmup: bool = True
    runs: int = 1
    label: str = ""
    router_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.label or f"{self.mode}-k{self.k}-b{self.batch}-{Path(self.draft).name}"


def _router_args(spec: PointSpec, trace: Path, n: int) -> list[str]:
    return ["--num-speculative-tokens", str(spec.k), "--max-batch-size", str(spec.batch),
            "--trace-file", str(trace), "--max-queue", str(max(256, n)), *spec.router_args]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), to see who uses the 2 cores: on this machine the router and
    the benchmark client compete with the two pinned services."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat): with our processes' own CPU subtracted, what is left
    over a run is load from other processes on the machine, which disturbs the numbers (reported as 'other CPU')."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _cpu_snapshot(cluster) -> dict[str, float | None]:
    snap = {role: cpu_seconds(p.pid) for role, p in cluster.procs.items()}
    snap["client"] = time.process_time()
    snap["machine"] = machine_busy_seconds()
    return snap


def run_point(spec: PointSpec, requests: list[BenchRequest], out_dir: Path, progress: bool = True) -> dict:
    from minedraft.launcher import Cluster

    trace = out_dir / "traces" / f"{spec.name}.jsonl"
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)
    logs = out_dir / "logs" / spec.name
    cluster = Cluster(mode=spec.mode, target=spec.target, draft=spec.draft, device=spec.device,
                      router_args=_router_args(spec, trace, len(requests)), log_dir=str(logs))
    cluster.start(timeout_s=300)
    runs = []
    try:
        d_addr = f"127.0.0.1:{cluster.drafter_port}" if spec.mode != "ar" else None
        v_addr = f"127.0.0.1:{cluster.verifier_port}"
        if spec.warmup:
            client.run_workload(cluster.address, subset(requests, 2 * spec.batch, 16), spec.concurrency,
                                desc=f"{spec.name} warm-up" if progress else "")
        for i in range(spec.runs):
            offset = trace.stat().st_size if trace.exists() else 0
            busy0 = (client.busy_seconds(d_addr, "drafter") if d_addr else None, client.busy_seconds(v_addr, "verifier"))
            cpu0 = _cpu_snapshot(cluster)
            results, wall = client.run_workload(cluster.address, requests, spec.concurrency,
                                                desc=f"{spec.name} run {i + 1}/{spec.runs}" if progress else "")
            cpu1 = _cpu_snapshot(cluster)
            busy1 = (client.busy_seconds(d_addr, "drafter") if d_addr else None, client.busy_seconds(v_addr, "verifier"))
            m = metrics.summarize(results, wall)
            m["drafter_busy"] = metrics.busy_fraction(busy0[0], busy1[0], wall)
            m["verifier_busy"] = metrics.busy_fraction(busy0[1], busy1[1], wall)
            end = trace.stat().st_size if trace.exists() else 0
            ticks = tracefile.read(trace, offset, end) if trace.exists() else []
            m["trace"] = tracefile.summarize(ticks)
            m["trace_full_batch"] = tracefile.summarize(ticks, batch_filter=spec.batch)
            # CPU share of each process over the run (1.0 = one core all the time); the machine has os.cpu_count().
            m["cpu_frac"] = {r: (cpu1[r] - cpu0[r]) / wall for r in cpu0 if cpu0[r] is not None and cpu1[r] is not None}
            if "machine" in m["cpu_frac"]:
                ours = sum(v for r, v in m["cpu_frac"].items() if r != "machine")
                m["cpu_frac"]["other"] = max(0.0, m["cpu_frac"].pop("machine") - ours)
            m["router_cpu_ms_per_tick"] = 1e3 * (cpu1["router"] - cpu0["router"]) / len(ticks) if ticks and \
                cpu0.get("router") is not None else math.nan
            m["trace_offset"], m["trace_end"] = offset, end
            # Share of the run spent in ticks that verify a full batch (the steady state the ideal bound describes);
            # the rest is ramp-up, prefill, and the drain where a batch runs part-empty or alone.
            m["phase_frac"] = {k: v / wall for k, v in tracefile.phases(ticks, spec.batch).items()}
            m["full_batch_time_frac"] = m["phase_frac"]["full"]
            runs.append(m)
            if i == 0:
                per_request = [r.as_dict() for r in results]
    finally:
        codes = cluster.stop()
    merged = metrics.merge_runs(runs) if runs else {}
    return {"mode": spec.mode, "name": spec.name, "k": spec.k, "batch": spec.batch, "draft": spec.draft,
            "concurrency": spec.concurrency, "trace_file": str(trace), "logs": str(logs), "exit_codes": codes,
            "metrics": merged, "per_run": runs, "requests": per_request if runs else []}


def headline(point: dict) -> dict:
    """The few numbers the tables print, flattened (nan where a mode has no such number)."""
    m = point["metrics"]
    t = m.get("trace_full_batch") if m.get("trace_full_batch", {}).get("ticks") else m.get("trace", {})
    return {"mode": point["mode"], "k": point["k"], "batch": point["batch"], "draft": Path(point["draft"]).name,
            "tps": m.get("output_tps", math.nan), "e2e_mean": m["e2e_ms"]["mean"], "e2e_p50": m["e2e_ms"]["p50"],
            "e2e_p99": m["e2e_ms"]["p99"], "ttft_mean": m["ttft_ms"]["mean"], "ttft_p99": m["ttft_ms"]["p99"],
            "tpot_mean": m["tpot_ms"]["mean"], "acceptance": m.get("acceptance_rate", math.nan),
            "accepted_per_step": m.get("mean_accepted_per_step", math.nan),
            "drafter_busy": m.get("drafter_busy", math.nan), "verifier_busy": m.get("verifier_busy", math.nan),
            "step_ms": t.get("step_ms", math.nan), "draft_compute_ms": t.get("draft_compute_ms", math.nan),
            "verify_compute_ms": t.get("verify_compute_ms", math.nan), "router_ms": t.get("router_overhead_ms", math.nan),
            "grpc_ms": t.get("grpc_overhead_ms", math.nan), "overhead_frac": t.get("overhead_frac", math.nan),
            "full_batch_frac": m.get("full_batch_time_frac", math.nan),
            "prefill_frac": m.get("phase_frac", {}).get("prefill", math.nan),
            "partial_frac": m.get("phase_frac", {}).get("partial", math.nan),
            "router_cpu_frac": m.get("cpu_frac", {}).get("router", math.nan),
            "client_cpu_frac": m.get("cpu_frac", {}).get("client", math.nan),
            "other_cpu_frac": m.get("cpu_frac", {}).get("other", math.nan),
            "router_cpu_ms_per_tick": m.get("router_cpu_ms_per_tick", math.nan),
            "failed": int(m.get("failed", 0))}
