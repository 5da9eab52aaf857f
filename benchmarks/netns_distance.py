"""The cost of distance: psd vs sd vs ar throughput when the router is 0, 1 or 10 ms (RTT) from the model services.

Why: on one host a tick is the services' compute plus ~1 ms of gRPC and router time; across hosts every tick also
pays a round trip, on both calls. This measures how much each schedule loses, and what the router's own levers
(larger k, the auto controller, whose cost model sees each call's overhead, distance included) win back, and sets
the measurements against a model of pipelining (sending a step before the previous answer has landed).

Set-up: drafter, verifier and router on three hosts (network namespaces, tests/netns.py), the router dialling each
service through the harness's fault proxy, which adds the RTT as a delay line (this kernel has no netem); the
services are loaded once and the router is replaced per configuration. `direct` is the router dialling the services
across the switch without the proxy (what the proxy itself costs). The workload is minedraft bench's (ShareGPT
held-out first turns, fixed output length, everything submitted at once), replayed by its asyncio client.

    sudo .venv/bin/python benchmarks/netns_distance.py --out benchmarks/results/netns

Writes summary.json and results.md under --out (router traces and logs go to a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import netns  # noqa: E402
from minedraft.bench import client, metrics, tracefile  # noqa: E402
from minedraft.bench.workload import WorkloadSpec, build, stats, subset  # noqa: E402
from minedraft.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402


def calibrate(rtts_ms: list[float], n: int = 200) -> dict:
    """Median round trip of a 1-byte ping-pong through a Relay like the fault proxy (router host -> harness ->
    verifier host and back, echo by a thread of ours), per nominal RTT, next to the same without the relay. Done
    with the services idle: under load the delay line's threads wait for a core too (see the trace's figures)."""
    out = {}
    with netns.Network(["r", "h", "v"]) as net:
        with netns.in_netns(net.ns("v")):
            srv = socket.socket()
        srv.bind((net.addresses["v"], 7000))
        srv.listen(4)

        def echo():
            c, _ = srv.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while d := c.recv(64):
                c.sendall(d)
            c.close()

        relay = netns.Relay("calibrate", (net.addresses["h"], 7000), (net.addresses["v"], 7000),
                            listen_ns=net.ns("h"), upstream_ns=net.ns("h"))

        def ping(via: bool) -> list[float]:
            threading.Thread(target=echo, daemon=True).start()
            with netns.in_netns(net.ns("r")):
                c = socket.socket()
            c.settimeout(5)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect((net.addresses["h" if via else "v"], 7000))
            samples = {}
            for rtt in ([None] if not via else rtts_ms):
                if via:
                    relay.set_rtt(rtt / 1e3)
                vals = []
                for _ in range(n):
                    t = time.perf_counter()
                    c.sendall(b"x")
                    c.recv(8)
                    vals.append(time.perf_counter() - t)
                samples["direct" if rtt is None else f"{rtt:g}"] = round(statistics.median(vals) * 1e3, 3)
            c.close()
            return samples

        out.update(ping(False))
        out.update(ping(True))
        relay.close()
        srv.close()
    return out


def run_config(cluster, label: str, mode: str, router_args: list[str], requests, runs: int, trace_dir: Path,
               batch: int, via_proxy: bool) -> dict:
    trace = trace_dir / f"{label}.jsonl"
    trace.unlink(missing_ok=True)
    cluster.replace_router(mode, [*router_args, "--trace-file", str(trace)], via_proxy=via_proxy)
    d_addr, v_addr = cluster.service_address("drafter"), cluster.service_address("verifier")
    client.run_workload(cluster.address, subset(requests, 2 * batch, 16))  # warm-up: every shape once
    per_run = []
    for _ in range(runs):
        offset = trace.stat().st_size if trace.exists() else 0
        busy0 = (client.busy_seconds(d_addr, "drafter"), client.busy_seconds(v_addr, "verifier"))
        cpu0 = time.process_time()
        results, wall = client.run_workload(cluster.address, requests)
        cpu1 = time.process_time()
        busy1 = (client.busy_seconds(d_addr, "drafter"), client.busy_seconds(v_addr, "verifier"))
        m = metrics.summarize(results, wall)
        m["drafter_busy"] = metrics.busy_fraction(busy0[0], busy1[0], wall)
        m["verifier_busy"] = metrics.busy_fraction(busy0[1], busy1[1], wall)
        m["harness_cpu"] = (cpu1 - cpu0) / wall  # the client and the proxy's threads: they share the 2 cores too
        ticks = tracefile.read(trace, offset, trace.stat().st_size) if trace.exists() else []
        m["trace"] = tracefile.summarize(ticks)
        m["trace_full_batch"] = tracefile.summarize(ticks, batch_filter=batch)
        m["choices"] = _choices(trace, offset)
        per_run.append(m)
    merged = metrics.merge_runs(per_run)
    merged["choices"] = per_run[-1]["choices"]
    return {"label": label, "mode": mode, "router_args": router_args, "metrics": merged,
            "tps_runs": [r["output_tps"] for r in per_run]}


def _choices(trace: Path, offset: int) -> dict:
    """What the lane ran, by share of ticks (auto picks per tick)."""
    counts: dict[str, int] = {}
    with open(trace, "rb") as f:
        f.seek(offset)
        for line in f.read().decode().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "tick":
                counts[rec.get("choice") or "?"] = counts.get(rec.get("choice") or "?", 0) + 1
    total = sum(counts.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def pipelining_model(t: dict, tps: float) -> dict:
    """What keeping more steps in flight would give, from one psd configuration's measured per-tick figures.

    psd today runs in lockstep: a tick sends verify(S) and draft(O) together and waits for both, so a tick costs
    max(T_v, T_d) + R + rho (R: what a call costs beyond the service's compute, the round trip included; rho: the
    router's own time), and every sequence is stepped (drafted, then verified) once per two ticks:
        cycle_now = 2 (max(T_v, T_d) + R + rho).
    The data dependencies allow more: split the same sequences into B batches in rotation and send each call as
    soon as its input exists (a batch's verify as soon as its draft is back, while another batch's verify is still
    on the wire). A batch's draft and verify are still two calls in series, each paying R + rho, and the services
    serve the B batches back to back, so, with a forward's cost about linear in its batch (true of these tiny models
    on the CPU; a fixed per-forward cost makes B > 2 dearer):
        cycle_B = max(2 (T_v + T_d) / B + 2 (R + rho), 2 T_v, 2 T_d).
    B = 2 (psd, next verify sent early) gains only where T_v and T_d differ; a larger B hides R until the services
    are the bound, but never below 2 (R + rho): each step of a sequence is a draft and a verify in series."""
    tv, td = t.get("verify_compute_ms", math.nan), t.get("draft_compute_ms", math.nan)
    step = t.get("step_ms", math.nan)
    rho = t.get("router_overhead_ms", math.nan)
    r = max(step - max(tv, td) - rho, 0.0)
    now = 2 * step
    out = {"T_v_ms": tv, "T_d_ms": td, "step_ms": step, "call_overhead_ms": r, "router_ms": rho, "cycle_now_ms": now,
           "tps_now": tps}
    for b in (2, 3, 4, 8):
        cycle = max(2 * (tv + td) / b + 2 * (r + rho), 2 * tv, 2 * td)
        out[f"cycle_B{b}_ms"] = cycle
        out[f"tps_B{b}"] = tps * now / cycle if cycle else math.nan
    out["compute_bound_tps"] = tps * now / (2 * max(tv, td)) if max(tv, td) > 0 else math.nan
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "netns"))
    ap.add_argument("--rtts", default="0,1,10", help="added RTT in ms, comma separated")
    ap.add_argument("--modes", default="psd,sd,ar")
    ap.add_argument("--extras", default="auto,psd-k8", help="router levers measured at each RTT too ('' = none)")
    ap.add_argument("--no-direct", action="store_true", help="skip the configurations without the proxy")
    ap.add_argument("-n", "--requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args(argv)
    why = netns.unavailable()
    if why:
        raise SystemExit(f"cannot run: {why}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rtts = [float(x) for x in args.rtts.split(",")]
    from minedraft.runtime.checkpoint import load_tokenizer

    spec = WorkloadSpec(num_requests=args.requests, output_len=args.output_len)
    requests = build(spec, load_tokenizer(DEMO_TARGET))
    t_start = time.time()
    calibration = calibrate(rtts)
    print("proxy calibration (ms):", calibration, flush=True)
    base = ["--num-speculative-tokens", str(args.k), "--max-batch-size", str(args.batch), "--max-queue",
            str(max(256, args.requests))]
    configs = []  # (label, mode, router_args, rtt_ms or None = direct)
    if not args.no_direct:
        configs += [(f"{m}-direct", m, base, None) for m in args.modes.split(",")]
    extras = [e for e in args.extras.split(",") if e]
    for rtt in rtts:
        for m in args.modes.split(",") + extras:
            mode, args_ = m, base
            if m == "psd-k8":
                mode, args_ = "psd", ["--num-speculative-tokens", "8", *base[2:]]
            elif m == "auto":
                args_ = ["--max-speculative-tokens", "8", *base[2:]]
            configs.append((f"{m}-rtt{rtt:g}", mode, args_, rtt))
    results = []
    with tempfile.TemporaryDirectory(prefix="netns-bench-") as tmp:
        cluster = netns.NetnsCluster(log_dir=f"{tmp}/logs", mode="ar", via_proxy=True, target=DEMO_TARGET,
                                     draft=DEMO_DRAFT, router_args=base)
        with cluster:
            for label, mode, router_args, rtt in configs:
                for p in cluster.proxies.values():
                    p.set_rtt((rtt or 0) / 1e3)
                t0 = time.time()
                r = run_config(cluster, label, mode, router_args, requests, args.runs, Path(tmp), args.batch,
                               via_proxy=rtt is not None)
                r["rtt_ms"] = rtt
                results.append(r)
                m = r["metrics"]
                print(f"{label:>16}: {m['output_tps']:7.1f} tok/s (runs {', '.join(f'{x:.0f}' for x in r['tps_runs'])})"
                      f"  step {m['trace'].get('step_ms', math.nan):.1f} ms  verifier busy {m['verifier_busy']:.2f}"
                      f"  drafter busy {m['drafter_busy']:.2f}  failed {m['failed']}  ({time.time() - t0:.0f} s)",
                      flush=True)
    summary = {"command": "sudo .venv/bin/python benchmarks/netns_distance.py " + " ".join(argv or sys.argv[1:]),
               "workload": spec.describe(), "workload_stats": stats(requests), "k": args.k, "batch": args.batch,
               "runs": args.runs, "calibration_ms": calibration, "results": results,
               "wall_s": round(time.time() - t_start)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (out / "results.md").write_text(report(summary))
    print(f"wrote {out}/results.md and summary.json in {summary['wall_s']} s")


def report(s: dict) -> str:
    res = {r["label"]: r for r in s["results"]}
    rtts = sorted({r["rtt_ms"] for r in s["results"] if r["rtt_ms"] is not None})
    modes = list(dict.fromkeys(r["label"].rsplit("-", 1)[0] for r in s["results"]
                               if r["rtt_ms"] is not None))
    tps = lambda label: res[label]["metrics"]["output_tps"] if label in res else math.nan  # noqa: E731
    lines = ["# The cost of distance (router <-> model services on separate hosts)", "",
             f"Command: `{s['command']}`", "",
             f"Workload: {s['workload']}; k={s['k']}, {s['batch']} sequences per batch, {s['runs']} measured runs per "
             "configuration (mean; each run's figure in summary.json). Demo pair on the CPU, drafter and verifier "
             "pinned to one core each of 2, router and harness (client + proxy threads) unpinned on the same 2 "
             "cores.", "",
             "Proxy calibration (1-byte ping-pong, services idle, ms): " +
             ", ".join(f"{k}: {v}" for k, v in s["calibration_ms"].items()), "",
             "## Throughput (output tok/s)", "",
             "| schedule | direct (no proxy) | " + " | ".join(f"+{r:g} ms RTT" for r in rtts) + " |",
             "|---|---|" + "---|" * len(rtts)]
    for m in modes:
        row = [f"{tps(f'{m}-direct'):.0f}" if f"{m}-direct" in res else "-"]
        base = tps(f"{m}-rtt{rtts[0]:g}")
        for r in rtts:
            v = tps(f"{m}-rtt{r:g}")
            row.append(f"{v:.0f}" + (f" ({v / base:.0%})" if r != rtts[0] else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Ratios at each RTT: " + "; ".join(
        f"+{r:g} ms: psd/sd {tps(f'psd-rtt{r:g}') / tps(f'sd-rtt{r:g}'):.2f}, psd/ar "
        f"{tps(f'psd-rtt{r:g}') / tps(f'ar-rtt{r:g}'):.2f}" for r in rtts if f"psd-rtt{r:g}" in res), ""]
    lines += ["## Where a tick goes (steady state, full batches; ms)", "",
              "| config | tok/s | step | verify compute | draft compute | call overhead (RTT + gRPC) | router | "
              "verifier busy | drafter busy | harness CPU | auto's choices |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["results"]:
        m = r["metrics"]
        t = m["trace_full_batch"] if m["trace_full_batch"].get("ticks") else m["trace"]
        calls = t.get("grpc_overhead_ms", math.nan)
        ch = ", ".join(f"{k} {v:.0%}" for k, v in list(m.get("choices", {}).items())[:3]) if r["mode"] == "auto" else ""
        lines.append(f"| {r['label']} | {m['output_tps']:.0f} | {t.get('step_ms', math.nan):.1f} | "
                     f"{t.get('verify_compute_ms', math.nan):.1f} | {t.get('draft_compute_ms', math.nan):.1f} | "
                     f"{calls:.1f} | {t.get('router_overhead_ms', math.nan):.1f} | {m['verifier_busy']:.2f} | "
                     f"{m['drafter_busy']:.2f} | {m['harness_cpu']:.2f} | {ch} |")
    lines += ["", "## Pipelining: a model from the measured psd ticks", "",
              "Each sequence is stepped (drafted, then verified) once per cycle; today's psd cycle is two lockstep "
              "ticks. B batches in rotation, each call sent as soon as its input exists (pipelining_model in the "
              "script says how): predicted tok/s, scaled from the measured figure by cycle_now / cycle_B.", "",
              "| RTT | tick now (ms) | T_v | T_d | call overhead | router | tok/s now | B=2 | B=3 | B=4 | B=8 | "
              "compute bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rtts:
        label = f"psd-rtt{r:g}"
        if label not in res:
            continue
        m = res[label]["metrics"]
        t = m["trace_full_batch"] if m["trace_full_batch"].get("ticks") else m["trace"]
        p = pipelining_model(t, m["output_tps"])
        lines.append(f"| +{r:g} ms | {p['step_ms']:.1f} | {p['T_v_ms']:.1f} | {p['T_d_ms']:.1f} | "
                     f"{p['call_overhead_ms']:.1f} | {p['router_ms']:.1f} | {p['tps_now']:.0f} | "
                     + " | ".join(f"{p[f'tps_B{b}']:.0f}" for b in (2, 3, 4, 8)) +
                     f" | {p['compute_bound_tps']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
