"""Turning a results dict into files: results.json (everything, machine-readable), results.md (the tables a person
reads: modes, ratios, stage timings, sweeps, target verdicts) and the PNG plots.

Why markdown next to JSON: the reference runs are committed to the repository and read on GitHub; the JSON keeps
every per-request number so anything in the tables can be recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from minedraft.bench import plots, targets

log = logging.getLogger(__name__)


def machine() -> dict:
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_at_report": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(), "git_commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _clean(x):
    """JSON without NaN/Infinity (not valid JSON): they become null."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f(x, spec=".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _mode_rows(res: dict) -> list[list[str]]:
    rows = []
    for mode, h in res.get("main_headline", {}).items():
        rows.append([mode, _f(h["tps"]), _f(h["e2e_mean"], ".0f"), _f(h["e2e_p50"], ".0f"), _f(h["e2e_p99"], ".0f"),
                     _f(h["ttft_mean"], ".0f"), _f(h["ttft_p99"], ".0f"), _f(h["tpot_mean"], ".2f"),
                     _f(h["acceptance"], ".3f"), _f(h["accepted_per_step"], ".2f"), _f(h["drafter_busy"], ".2f"),
                     _f(h["verifier_busy"], ".2f"), _f(h["step_ms"], ".1f"), _f(h["router_ms"], ".2f"),
                     _f(h["grpc_ms"], ".2f"), _f(100 * h["overhead_frac"], ".1f"),
                     f"{_f(h.get('router_cpu_frac', math.nan), '.2f')} / {_f(h.get('client_cpu_frac', math.nan), '.2f')}"
                     f" / {_f(h.get('other_cpu_frac', math.nan), '.2f')}",
                     str(h["failed"])])
    hf = res.get("hf_assisted")
    if hf:
        rows.append([f"hf-assisted ({hf['requests']} req, {hf['threads']} thr)", _f(hf["output_tps"]),
                     _f(hf["generate_ms"]["mean"], ".0f") + "*", _f(hf["generate_ms"]["p50"], ".0f") + "*",
                     _f(hf["generate_ms"]["p99"], ".0f") + "*", _f(hf["ttft_ms"]["mean"], ".0f") + "*",
                     _f(hf["ttft_ms"]["p99"], ".0f") + "*", _f(hf["tpot_ms"]["mean"], ".2f")] + ["-"] * 10)
    return rows


def _phase_row(label: str, h: dict) -> list[str]:
    parts = [h.get("prefill_frac", math.nan), h.get("full_batch_frac", math.nan), h.get("partial_frac", math.nan)]
    return [label, *(_f(p, ".2f") for p in parts), _f(1 - sum(parts), ".2f")]


def _shared_gpu_note(device: str) -> str:
    """`--device` names one device for both services: on a GPU host that means they share it, which the issue allows
    but which bounds the overlap (both stages' kernels contend for the same SMs), so the report says so."""
    if not str(device).startswith("cuda"):
        return ""
    return (" (drafter and verifier share this one GPU: their kernels contend for it, so psd's overlap is bounded by "
            "the GPU as well as by the two stages)")


def markdown(res: dict, command: str = "", notes: str = "") -> str:
    m, wl, c = res["machine"], res["workload"], res["comparison"]
    cfg = res["config"]
    out = ["# minedraft bench results", ""]
    if command:
        out += ["```", command, "```", ""]
    out += [f"- machine: {m['cpu']}, {m['cpu_count']} CPU cores (affinity {m['affinity']}), GPU: {m['gpu']}; "
            f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; commit {m['git_commit']}; "
            f"{m['date']}; load average before / after: {res.get('loadavg_at_start')} / {m['loadavg_at_report']}",
            f"- models: target `{cfg['target']}`, draft(s) {', '.join(f'`{d}`' for d in cfg['drafts'])}; "
            f"device {cfg['device']}{_shared_gpu_note(cfg['device'])}; k={cfg['k']}, batch={cfg['batch']} per "
            "in-flight batch; "
            f"{cfg['runs']} measured run(s) per point after a warm-up round",
            f"- workload: {wl['spec']}; prompt tokens mean {_f(wl['prompt_tokens_mean'])} "
            f"(min {wl['prompt_tokens_min']}, max {wl['prompt_tokens_max']}), {wl['distinct_prompts']} distinct; "
            f"concurrency cap {cfg['concurrency'] or 'none'}", ""]
    out += ["## Modes on the same workload", ""]
    out += _table(["mode", "tok/s", "E2E mean ms", "E2E p50", "E2E p99", "TTFT mean", "TTFT p99", "TPOT ms",
                   "accept", "acc/step", "drafter busy", "verifier busy", "step ms", "router ms", "gRPC ms",
                   "overhead %", "router / client / other CPU", "failed"], _mode_rows(res))
    out += ["", "router / client / other CPU: cores' worth of CPU used during the run by the router process, by the "
                "benchmark client, and by processes outside the benchmark (anything above ~0.1 disturbs the numbers: "
                "the machine has 2 cores and the pinned drafter and verifier need both)."]
    if res.get("hf_assisted"):
        out += ["", "\\* HF assisted: per-request generate time, requests served one after another (no queueing "
                    "counted), so only its tok/s compares with the servers."]
    out += ["", "## Ratios", ""]
    cols = [("psd/sd tok/s", "psd_over_sd"), ("psd/ar tok/s", "psd_over_ar"), ("sd/ar tok/s", "sd_over_ar"),
            ("ideal bound", "ideal_bound"), ("fraction of ideal", "fraction_of_ideal"),
            ("gain fraction", "gain_fraction"), ("steady step sd/psd", "step_sd_over_psd"),
            ("its fraction of ideal", "step_fraction_of_ideal"), ("in-service bound", "service_bound"),
            ("T_d ms", "draft_ms"), ("T_v ms", "verify_ms"),
            ("E2E psd/sd", "e2e_psd_over_sd"), ("E2E psd/ar", "e2e_psd_over_ar"), ("psd/HF tok/s", "psd_over_hf")]
    if "sd2b" in res.get("main_headline", {}):
        cols += [("psd/sd2b tok/s", "psd_over_sd2b"), ("E2E psd/sd2b", "e2e_psd_over_sd2b")]
    out += _table([h for h, _ in cols], [[_f(c.get(k, math.nan), ".2f") for _, k in cols]])
    out += ["", "gain fraction = (psd/sd - 1) / (ideal - 1): the share of the possible overlap gain realised. "
                "steady step sd/psd = mean sd tick / mean psd tick over decode ticks verifying a full batch, no prompt prefill in them (both modes "
                "verify one batch per tick, so this is the per-step speedup the bound describes, without ramp-up, "
                "prefill and drain). in-service bound: (T_d + T_v) / max(T_d, T_v) from the draft and verify "
                "compute the services reported during the sd run (full-batch decode ticks). T_d, T_v: isolated "
                "stage timings at the main point (below)."]
    out += ["", "### Where each run's time went", ""]
    out += _table(["mode", "prefill ticks", "full-batch decode", "part-empty decode (ramp-up, drain)", "rest"],
                  [_phase_row(m, h) for m, h in res.get("main_headline", {}).items()])
    out += ["", "Shares of the measured wall time, from the router's trace. The bound describes full-batch decode "
                "only; prefill and the drain cost psd and sd about the same absolute time, so the larger their share, "
                "the further the whole-run ratio falls below the steady-state one. rest: time with no tick running "
                "(client and stream latency, the lane between ticks)."]
    out += ["", f"## Isolated stage timings (context: {res['stage_context']}; 1 torch thread, median)", ""]
    out += _table(["draft", "k", "batch", "context mean/max", "T_draft ms", "T_verify ms", "T_d/T_v", "ideal bound"],
                  [[Path(s["draft_dir"]).name, str(s["k"]), str(s["batch"]),
                    f"{s['context']}/{s.get('context_max', s['context'])}", _f(s["draft_ms"], ".2f"),
                    _f(s["verify_ms"], ".2f"), _f(s["draft_over_verify"], ".2f"), _f(s["ideal_bound"], ".3f")]
                   for s in res["stages"]])
    if res.get("sweeps"):
        out += ["", "## Sweeps (sd and psd side by side at each point)", ""]
        rows = []
        for s in res["sweeps"]:
            p, sc = s["points"], s["comparison"]
            sd, psd = p.get("sd", {}), p.get("psd", {})
            rows.append([s["param"], str(s["value"]), str(s["k"]), str(s["batch"]), Path(s["draft"]).name,
                         f"{s['n']} x {s['output_len']}" if s.get("output_len") else str(s["n"]),
                         _f(s["stage"]["draft_ms"], ".1f"), _f(s["stage"]["verify_ms"], ".1f"),
                         _f(sd.get("tps", math.nan)), _f(psd.get("tps", math.nan)), _f(sc["psd_over_sd"], ".2f"),
                         # Under an offered load below capacity both modes deliver the load: no bound applies.
                         *(["-"] * 3 if s["param"] == "rate" else [
                             _f(sc["ideal_bound"], ".2f"), _f(sc["fraction_of_ideal"], ".2f"),
                             _f(sc["gain_fraction"], ".2f")]), _f(sc.get("step_sd_over_psd", math.nan), ".2f"),
                         _f(sc.get("service_bound", math.nan), ".2f"),
                         _f(sc["e2e_psd_over_sd"], ".2f"),
                         _f(psd.get("acceptance", math.nan), ".2f"), _f(psd.get("drafter_busy", math.nan), ".2f"),
                         _f(psd.get("verifier_busy", math.nan), ".2f"),
                         _f(100 * psd.get("overhead_frac", math.nan), ".1f"),
                         " / ".join(_phase_row("", psd)[1:4]),
                         f"{_f(sd.get('other_cpu_frac', math.nan), '.2f')} / "
                         f"{_f(psd.get('other_cpu_frac', math.nan), '.2f')}"])
        out += _table(["sweep", "value", "k", "batch", "draft", "requests (x tokens)", "T_d ms", "T_v ms", "sd tok/s",
                       "psd tok/s", "psd/sd", "ideal", "fraction", "gain fraction", "steady step sd/psd", "in-service bound",
                       "E2E psd/sd", "accept",
                       "psd drafter busy", "psd verifier busy", "psd overhead %",
                       "psd time: prefill / full / part-empty", "other CPU sd / psd"], rows)
    out += ["", "## Targets", ""]
    out += _table(["target", "aim", "measured", "met", "why (numbers)"],
                  [[t["target"], t["aim"], t["measured"], {True: "yes", False: "**no**", None: "-"}[t["met"]],
                    t["why"]] for t in res["targets"]])
    out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res.get("plots", [])]
    if notes:
        out += ["", "## Notes", "", notes.strip()]
    return "\n".join(out) + "\n"


def make_plots(res: dict, out: Path) -> list[str]:
    made = []
    modes = res.get("modes", {})
    traces = {m: (modes[m]["trace_file"], modes[m]["per_run"][0]["trace_offset"], modes[m]["per_run"][0]["trace_end"])
              for m in ("psd", "sd") if m in modes and modes[m]["per_run"]}
    if plots.timeline(traces, out / "timeline.png", title=f"k={res['config']['k']}, batch={res['config']['batch']}"):
        made.append("timeline.png")
    rows = [s["points"][m] for s in res.get("sweeps", []) if s["param"] == "batch" for m in s["points"]]
    ideal = {s["batch"]: s["stage"]["ideal_bound"] for s in res.get("sweeps", []) if s["param"] == "batch"}
    if not rows:
        rows = list(res.get("main_headline", {}).values())
        ideal = {res["config"]["batch"]: res["comparison"]["ideal_bound"]}
    hf = res.get("hf_assisted")
    if plots.throughput_vs_batch(rows, out / "throughput_vs_batch.png", ideal, hf["output_tps"] if hf else None):
        made.append("throughput_vs_batch.png")
    pts = [{"label": f"{s['param']}={s['value']}", **s["comparison"]} for s in res.get("sweeps", [])
           if s["param"] != "rate"]
    if plots.ratio_vs_ideal(pts, out / "ratio_vs_ideal.png"):
        made.append("ratio_vs_ideal.png")
    rates = [(s["value"], s["points"]) for s in res.get("sweeps", []) if s["param"] == "rate"]
    if plots.latency_vs_rate(rates, out / "latency_vs_rate.png"):
        made.append("latency_vs_rate.png")
    return made


def write(res: dict, out: Path, command: str = "", notes: str = "") -> dict:
    res["machine"] = machine()
    res["command"] = command
    res["targets"] = targets.evaluate(res)
    # The measurements are saved before anything that could fail on them: a run takes tens of minutes.
    (out / "results.json").write_text(json.dumps(_clean(res), indent=1) + "\n")
    try:
        res["plots"] = make_plots(res, out)
    except Exception as exc:  # noqa: BLE001 - a broken figure must not cost the tables
        log.warning("plots failed: %s", exc, exc_info=True)
        res["plots"] = []
    (out / "results.json").write_text(json.dumps(_clean(res), indent=1) + "\n")
    md = markdown(res, command, notes)
    (out / "results.md").write_text(md)
    return {"json": out / "results.json", "md": out / "results.md", "plots": res["plots"], "markdown": md}
