"""The whole benchmark as one plan: isolated stage timings first (no cluster running, so they are clean), then the
modes back to back on the same workload (ar, sd, psd, then HF assisted on a subset), then the sweeps, where every
point runs sd and psd side by side and is set next to its ideal bound.

Why one plan: every mode and sweep point must see the same token ids and the same machine state, and the report
needs them all in one results.json to compute ratios. Sweep points identical to a main-mode point reuse its run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from minedraft.bench import metrics, stages, workload
from minedraft.bench.runs import PointSpec, headline, run_point

SWEEPABLE = ("k", "batch", "rate")  # rate: Poisson arrivals (req/s) at the main k and batch, for latency vs load


@dataclass
class SuiteConfig:
    target: str
    drafts: list[str]
    out: Path
    spec: workload.WorkloadSpec = field(default_factory=workload.WorkloadSpec)
    modes: list[str] = field(default_factory=lambda: ["ar", "sd", "psd", "hf"])
    k: int = 4
    batch: int = 16
    device: str = "cpu"
    concurrency: int = 0
    runs: int = 1
    warmup: bool = True
    sweeps: dict[str, list[int]] = field(default_factory=dict)
    sweep_modes: list[str] = field(default_factory=lambda: ["sd", "psd"])
    sweep_requests: int | None = None  # default: the main workload's size, at least 2 x batch
    sweep_output_len: int | None = None  # cap on sweep points' output lengths (default: the workload's own)
    sweep_waves: int | None = None  # if set, a sweep point runs waves x (2 x batch) requests, overriding sweep_requests
    hf_requests: int | None = None  # default: all requests
    hf_threads: int = 1
    stage_context: int | None = None  # default: mean prompt + half the mean output
    stage_repeats: int = 15
    resume: bool = False  # reuse points already saved under out/points/ (a long run that stopped half-way)
    progress: bool = True


def _sweep_requests(cfg: SuiteConfig, batch: int) -> int:
    """A sweep point needs at least 2 x batch requests, or psd's second batch would stay empty. With `sweep_waves`
    the count scales with the batch, so every point spends the same share of its run in ramp-up and drain (an
    offline run's last requests finish in a part-empty batch, whatever the mode)."""
    if cfg.sweep_waves:
        return cfg.sweep_waves * 2 * batch
    return max(cfg.sweep_requests or cfg.spec.num_requests, 2 * batch)


def plan_sweeps(cfg: SuiteConfig) -> list[dict]:
    """Sweep points as {param, value, draft, k, batch, n}; a second and further --draft make a 'draft' sweep."""
    out = []
    for param, values in cfg.sweeps.items():
        for v in values:
            k = v if param == "k" else cfg.k
            b = v if param == "batch" else cfg.batch
            out.append({"param": param, "value": v, "draft": cfg.drafts[0], "k": k, "batch": b,
                        "n": _sweep_requests(cfg, b), "output_len": cfg.sweep_output_len,
                        "rate": v if param == "rate" else None})
    if len(cfg.drafts) > 1:
        for d in cfg.drafts:
            out.append({"param": "draft", "value": Path(d).name, "draft": d, "k": cfg.k, "batch": cfg.batch,
                        "n": _sweep_requests(cfg, cfg.batch), "output_len": cfg.sweep_output_len, "rate": None})
    return out


def run_suite(cfg: SuiteConfig, log=print) -> dict:
    from minedraft.runtime.checkpoint import load_tokenizer

    import os

    cfg.out.mkdir(parents=True, exist_ok=True)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    if load_at_start[0] > 0.5:
        log(f"warning: load average {load_at_start} before starting: something else is using the CPU, "
            "so the numbers will be disturbed")
    sweeps = plan_sweeps(cfg)
    n_max = max([cfg.spec.num_requests] + [p["n"] for p in sweeps])
    all_requests = workload.build(replace(cfg.spec, num_requests=n_max), load_tokenizer(cfg.target))
    main_requests = all_requests[:cfg.spec.num_requests]
    wl = workload.stats(main_requests)
    log(f"workload: {cfg.spec.describe()}: {wl}")

    def requests_for(n: int, output_len: int | None, rate: float | None = None) -> list[workload.BenchRequest]:
        """The first n requests, outputs capped at output_len, and re-timed as Poisson arrivals at `rate` if given
        (same seed, so sd and psd see the same arrival times)."""
        arrivals = workload.poisson_arrivals(n, rate, cfg.spec.seed) if rate else [r.arrival_s for r in all_requests]
        return [replace(r, output_len=min(r.output_len, output_len or r.output_len), arrival_s=arrivals[i])
                for i, r in enumerate(all_requests[:n])]

    # Per-sequence contexts like the workload's mid-decode ones (prompt + half the output), unless one is given; a
    # sweep with shorter outputs gets its own, so each bound is timed at the contexts its runs decode at.
    def context_for(output_len: int | None) -> int | list[int]:
        return cfg.stage_context or [len(r.prompt_ids) + r.output_len // 2 for r in requests_for(n_max, output_len)]

    sweep_ctx = cfg.sweep_output_len if context_for(cfg.sweep_output_len) != context_for(None) else None
    stage_points = [(cfg.drafts[0], cfg.k, cfg.batch, None)] + [(p["draft"], p["k"], p["batch"], sweep_ctx)
                                                                for p in sweeps]
    log(f"stage timings for {len(set(stage_points))} (draft, k, batch, context) points ...")
    stage_of = {}
    for out_len in dict.fromkeys(o for *_, o in stage_points):
        grid = [(d, k, b) for d, k, b, o in stage_points if o == out_len]
        timings = stages.time_grid(cfg.target, grid, context_for(out_len), progress=cfg.progress,
                                   repeats=cfg.stage_repeats, device=cfg.device)
        stage_of.update({(*key, out_len): t.as_dict() for key, t in timings.items()})

    def spec_for(mode: str, draft: str, k: int, batch: int) -> PointSpec:
        return PointSpec(mode, cfg.target, draft, k=k, batch=batch, device=cfg.device,
                         concurrency=cfg.concurrency, warmup=cfg.warmup, runs=cfg.runs)

    done: dict[tuple, dict] = {}  # (mode, draft, k, batch, n, output cap, rate) -> point: identical ones run once

    def point(mode: str, draft: str, k: int, batch: int, n: int, output_len: int | None = None,
              rate: float | None = None) -> dict:
        key = (mode, draft, k, batch, n, output_len, rate)
        if key not in done:
            log(f"running {mode} k={k} batch={batch} draft={Path(draft).name} on {n} requests"
                f"{f' (outputs capped at {output_len})' if output_len else ''}"
                f"{f', Poisson {rate:g} req/s' if rate else ''} ...")
            spec = spec_for(mode, draft, k, batch)
            if (n, output_len, rate) != (cfg.spec.num_requests, None, None):  # own trace and log names
                spec.label = (f"{spec.name}-n{n}" + (f"-out{output_len}" if output_len else "")
                              + (f"-rate{rate:g}" if rate else ""))
            saved = cfg.out / "points" / f"{spec.name}.json"
            if cfg.resume and saved.is_file():
                log(f"  reusing {saved}")
                done[key] = json.loads(saved.read_text())
            else:
                done[key] = run_point(spec, requests_for(n, output_len, rate), cfg.out, cfg.progress)
                saved.parent.mkdir(parents=True, exist_ok=True)  # a checkpoint: the whole run takes tens of minutes
                saved.write_text(json.dumps(done[key], default=str))
            h = headline(done[key])
            log(f"  {h['tps']:.1f} tok/s, e2e mean {h['e2e_mean']:.0f} ms, acceptance {h['acceptance']:.2f}, "
                f"failed {h['failed']}")
        return done[key]

    main = {}
    for mode in [m for m in cfg.modes if m in ("ar", "sd", "sd2b", "psd")]:
        if mode == "sd2b":  # sd with psd's number of requests in flight (2 x batch) in its one batch
            main[mode] = {**point("sd", cfg.drafts[0], cfg.k, 2 * cfg.batch, cfg.spec.num_requests), "mode": "sd2b"}
        else:
            main[mode] = point(mode, cfg.drafts[0], cfg.k, cfg.batch, cfg.spec.num_requests)
    hf = None
    if "hf" in cfg.modes:
        from minedraft.bench import hf_assisted

        sub = workload.subset(main_requests, cfg.hf_requests or len(main_requests))
        log(f"HF assisted generation on {len(sub)} of {len(main_requests)} requests, one at a time, "
            f"{cfg.hf_threads} torch thread(s) ...")
        hf = hf_assisted.run(cfg.target, cfg.drafts[0], sub, cfg.k, cfg.hf_threads, cfg.device, cfg.progress)

    main_stage = stage_of[(cfg.drafts[0], cfg.k, cfg.batch, None)]
    comparison = _compare(main, main_stage, hf)

    sweep_rows = []
    for p in sweeps:
        pts = {m: point(m, p["draft"], p["k"], p["batch"], p["n"], p["output_len"], p["rate"])
               for m in cfg.sweep_modes}
        st = stage_of[(p["draft"], p["k"], p["batch"], sweep_ctx)]
        sweep_rows.append({**p, "stage": st, "points": {m: headline(v) for m, v in pts.items()},
                           "names": {m: v["name"] for m, v in pts.items()},
                           "comparison": _compare(pts, st, None)})
    return {"config": _config_dict(cfg), "loadavg_at_start": load_at_start, "workload": {**wl, "spec": cfg.spec.describe()},
            "stage_context": cfg.stage_context or "workload (prompt + output/2 per sequence)",
            "stages": list(stage_of.values()), "main_stage": main_stage,
            "modes": main, "main_headline": {m: headline(v) for m, v in main.items()},
            "hf_assisted": hf, "comparison": comparison, "sweeps": sweep_rows}


def _compare(points: dict, stage: dict, hf: dict | None) -> dict:
    h = {m: headline(v) for m, v in points.items()}
    get = lambda m, key: h[m][key] if m in h else math.nan  # noqa: E731
    out = metrics.psd_comparison(get("psd", "tps"), get("sd", "tps"), stage["ideal_bound"])
    # Steady state: both modes verify one full batch per tick, so the tick-time ratio is the per-step speedup that
    # the ideal bound describes, free of ramp-up, prefill and drain.
    out["step_sd_over_psd"] = metrics.ratio(get("sd", "step_ms"), get("psd", "step_ms"))
    out["step_fraction_of_ideal"] = metrics.ratio(out["step_sd_over_psd"], stage["ideal_bound"])
    # The same bound from the services' own compute times in the sd run (real batch mix and context growth, which
    # the isolated timing only approximates).
    d, v = get("sd", "draft_compute_ms"), get("sd", "verify_compute_ms")
    out["service_bound"] = (d + v) / max(d, v) if d > 0 and v > 0 else math.nan
    out["step_fraction_of_service_bound"] = metrics.ratio(out["step_sd_over_psd"], out["service_bound"])
    out.update(psd_over_ar=metrics.ratio(get("psd", "tps"), get("ar", "tps")),
               sd_over_ar=metrics.ratio(get("sd", "tps"), get("ar", "tps")),
               e2e_psd_over_sd=metrics.ratio(get("psd", "e2e_mean"), get("sd", "e2e_mean")),
               e2e_psd_over_ar=metrics.ratio(get("psd", "e2e_mean"), get("ar", "e2e_mean")),
               psd_over_sd2b=metrics.ratio(get("psd", "tps"), get("sd2b", "tps")),
               e2e_psd_over_sd2b=metrics.ratio(get("psd", "e2e_mean"), get("sd2b", "e2e_mean")),
               draft_ms=stage["draft_ms"], verify_ms=stage["verify_ms"])
    if hf:
        out["psd_over_hf"] = metrics.ratio(get("psd", "tps"), hf["output_tps"])
        out["sd_over_hf"] = metrics.ratio(get("sd", "tps"), hf["output_tps"])
    return out


def _config_dict(cfg: SuiteConfig) -> dict:
    from dataclasses import asdict

    d = {k: v for k, v in asdict(cfg).items() if k != "spec"}
    d["out"] = str(cfg.out)
    d["workload"] = asdict(cfg.spec)
    d["workload"]["rate"] = None if math.isinf(cfg.spec.rate) else cfg.spec.rate
    return d
