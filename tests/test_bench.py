"""`minedraft bench`: the pure parts (percentiles, ratios, ideal bound, Poisson arrivals, trace parsing, targets)
unit-tested on synthetic data, plus one small real run of the command (4 requests x 8 tokens, sd and psd)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minedraft.bench import metrics, targets, tracefile, workload
from minedraft.bench.cli import parse_sweeps
from minedraft.bench.client import RequestResult
from minedraft.bench.stages import ideal_bound
from minedraft.config import DEMO_DRAFT, DEMO_TARGET, REPO_ROOT

TARGET = os.environ.get("MINEDRAFT_TEST_TARGET", DEMO_TARGET)
DRAFT = os.environ.get("MINEDRAFT_TEST_DRAFT", DEMO_DRAFT)


# ---- metrics ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0, 1, 37.5, 50, 90, 99, 100])
def test_percentile_matches_numpy(p):
    vals = list(np.random.default_rng(3).exponential(size=101))
    assert metrics.percentile(vals, p) == pytest.approx(float(np.percentile(vals, p)))
    assert metrics.percentile([4.0], p) == 4.0


def test_percentile_edges():
    assert math.isnan(metrics.percentile([], 50))
    with pytest.raises(ValueError):
        metrics.percentile([1.0], 101)


def test_ratio_and_busy_fraction():
    assert metrics.ratio(3.0, 2.0) == 1.5
    assert math.isnan(metrics.ratio(1.0, 0.0)) and math.isnan(metrics.ratio(math.nan, 1.0))
    assert metrics.busy_fraction(10.0, 12.5, 5.0) == 0.5
    assert math.isnan(metrics.busy_fraction(None, 1.0, 5.0))


def test_ideal_bound():
    assert ideal_bound(10, 10) == 2.0
    assert ideal_bound(5, 15) == pytest.approx(20 / 15)
    assert ideal_bound(30, 10) == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        ideal_bound(0, 0)


def test_psd_comparison_fractions():
    c = metrics.psd_comparison(psd_tps=150.0, sd_tps=100.0, ideal=2.0)
    assert c["psd_over_sd"] == 1.5 and c["fraction_of_ideal"] == 0.75 and c["gain_fraction"] == 0.5
    assert math.isnan(metrics.psd_comparison(150.0, 100.0, 1.0)["gain_fraction"])


def _result(i, sent, first, end, tokens, drafted=0, accepted=0, steps=0, error=""):
    return RequestResult(i, 10, tokens, 0.0, sent, first, end, tokens, drafted, accepted, steps, error)


def test_summarize_requests():
    rs = [_result(0, 0.0, 0.1, 1.1, 11, drafted=40, accepted=30, steps=11),
          _result(1, 0.5, 0.7, 2.7, 21, drafted=80, accepted=40, steps=21),
          _result(2, 0.0, None, None, 0, error="UNAVAILABLE: gone")]
    m = metrics.summarize(rs, wall_s=3.0)
    assert m["failed"] == 1 and m["errors"] == ["UNAVAILABLE: gone"]
    assert m["output_tokens"] == 32 and m["output_tps"] == pytest.approx(32 / 3)
    assert m["e2e_ms"]["mean"] == pytest.approx(1650.0)
    assert m["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)  # 1.0 s / 10 and 2.0 s / 20
    assert m["acceptance_rate"] == pytest.approx(70 / 120)
    assert m["mean_accepted_per_step"] == pytest.approx(70 / 30)  # decode steps exclude the prefill step
    ar = metrics.summarize([_result(0, 0.0, 0.1, 1.0, 5, steps=5)], 1.0)
    assert math.isnan(ar["acceptance_rate"]) and math.isnan(ar["mean_accepted_per_step"])


def test_merge_runs_means_and_spread():
    a = {"output_tps": 100.0, "e2e_ms": {"mean": 10.0}, "errors": []}
    b = {"output_tps": 200.0, "e2e_ms": {"mean": 30.0}, "errors": []}
    m = metrics.merge_runs([a, b])
    assert m["output_tps"] == 150.0 and m["e2e_ms"]["mean"] == 20.0
    assert (m["runs"], m["output_tps_min"], m["output_tps_max"]) == (2, 100.0, 200.0)


# ---- workload -----------------------------------------------------------------------------------------------------
def test_merge_runs_tolerates_missing_keys():
    # One run of a point may have no full-batch tick at all (light online load), so its summary is shorter.
    runs = [{"output_tps": 10.0, "trace_full_batch": {"ticks": 3, "step_ms": 5.0}},
            {"output_tps": 20.0, "trace_full_batch": {"ticks": 0}}]
    out = metrics.merge_runs(runs)
    assert out["trace_full_batch"] == {"ticks": 1.5, "step_ms": 5.0} and out["output_tps"] == 15.0


def test_poisson_arrivals_deterministic():
    a = workload.poisson_arrivals(500, rate=4.0, seed=7)
    assert a == workload.poisson_arrivals(500, rate=4.0, seed=7)
    assert a != workload.poisson_arrivals(500, rate=4.0, seed=8)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert a[-1] / 499 == pytest.approx(0.25, rel=0.15)  # mean gap 1/rate
    assert workload.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    assert workload.poisson_arrivals(0, 2.0) == []


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]


def test_build_workload_filters_and_lengths():
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "q" * (5 * i + 1)},
                                               {"from": "gpt", "value": "a" * (3 * i + 2)}]} for i in range(20)]
    spec = workload.WorkloadSpec(num_requests=6, output_len=None, max_output_len=20, min_prompt_tokens=40,
                                 max_prompt_tokens=90, rate=2.0, split="all", seed=1)
    reqs = workload.build(spec, _Tok(), convs)
    assert len(reqs) == 6
    assert all(40 <= len(r.prompt_ids) <= 90 for r in reqs)
    assert all(1 <= r.output_len <= 20 for r in reqs) and reqs[-1].output_len == 20
    assert [r.arrival_s for r in reqs] == workload.poisson_arrivals(6, 2.0, 1)
    many = workload.build(workload.WorkloadSpec(num_requests=50, split="all"), _Tok(), convs)
    assert workload.stats(many)["distinct_prompts"] == 20  # reused round-robin
    sub = workload.subset(reqs, 2, max_output=4)
    assert [(r.output_len, r.arrival_s) for r in sub] == [(4, 0.0), (4, 0.0)]


# ---- trace --------------------------------------------------------------------------------------------------------
def _trace_lines():
    recs = [  # tick 0: sd-like (draft then verify); tick 1: psd-like (overlapped)
        {"kind": "draft", "tick": 0, "start": 0.001, "end": 0.011, "size": 4, "compute_ms": 8.0},
        {"kind": "verify", "tick": 0, "start": 0.012, "end": 0.032, "size": 4, "compute_ms": 18.0},
        {"kind": "tick", "tick": 0, "t": 1.0, "dur": 0.034, "verify_batch": 4, "draft_batch": 0},
        {"kind": "verify", "tick": 1, "start": 0.001, "end": 0.021, "size": 4, "compute_ms": 19.0},
        {"kind": "draft", "tick": 1, "start": 0.001, "end": 0.015, "size": 4, "compute_ms": 12.0},
        {"kind": "tick", "tick": 1, "t": 1.035, "dur": 0.022, "verify_batch": 4, "draft_batch": 4},
    ]
    return [json.dumps(r) for r in recs]


def test_trace_parsing_and_overheads():
    t0, t1 = tracefile.parse(_trace_lines())
    assert [c.kind for c in t0.calls] == ["draft", "verify"] and len(t1.calls) == 2
    assert t0.covered() == pytest.approx(0.030)  # 10 ms + 20 ms, sequential
    assert t0.router_overhead == pytest.approx(0.004)
    assert t0.grpc_overhead == pytest.approx(0.030 - 0.026)  # compute 8 + 18 ms
    assert t1.covered() == pytest.approx(0.020)  # overlapped: the union is the longer call
    assert t1.router_overhead == pytest.approx(0.002)
    assert t1.grpc_overhead == pytest.approx(0.001)  # compute covers [0.002, 0.021]
    busy = t1.busy("draft")
    assert busy[0] == pytest.approx((1.036, 1.038, 1.050))
    s = tracefile.summarize([t0, t1])
    assert s["ticks"] == 2 and s["step_ms"] == pytest.approx(28.0)
    assert s["overhead_frac"] == pytest.approx((0.004 + 0.004 + 0.002 + 0.001) / 0.056)
    assert s["between_ticks_ms_median"] == pytest.approx(1.0)
    assert tracefile.summarize([t0, t1], batch_filter=16) == {"ticks": 0}


def test_trace_read_offset_and_window(tmp_path):
    f = tmp_path / "t.jsonl"
    lines = _trace_lines()
    f.write_text("\n".join(lines[:3]) + "\n")
    offset = f.stat().st_size
    with f.open("a") as fh:
        fh.write("\n".join(lines[3:]) + "\n")
    assert [t.tick for t in tracefile.read(f)] == [0, 1]
    assert [t.tick for t in tracefile.read(f, offset)] == [1]
    assert [t.tick for t in tracefile.read(f, 0, offset)] == [0]
    ticks = [tracefile.Tick(i, i * 0.01, 0.5 if i in (3, 30) else 0.01, 4, 4) for i in range(40)]
    win = tracefile.window(ticks, 20)
    assert len(win) == 20 and all(t.dur < 0.1 for t in win)
    ticks += [tracefile.Tick(i, i * 0.01, 0.001, 1, 0) for i in range(40, 80)]  # a drain of tiny fast ticks
    win = tracefile.window(ticks, 20)
    assert all(t.verify_batch == 4 and t.dur < 0.1 for t in win)


def test_trace_phases():
    prefill = tracefile.Call("verify", 0.0, 0.3, 5, 0.29, prefill=1)
    ticks = [tracefile.Tick(0, 0.0, 0.3, 4, 4, [prefill]),  # a prompt written: prefill, whatever the batch
             tracefile.Tick(1, 0.3, 0.05, 4, 4), tracefile.Tick(2, 0.35, 0.05, 4, 3),
             tracefile.Tick(3, 0.4, 0.02, 2, 1)]  # part-empty batches: the drain
    got = tracefile.phases(ticks, batch=4)
    assert got == pytest.approx({"prefill": 0.3, "full": 0.1, "partial": 0.02})


# ---- cli and targets ----------------------------------------------------------------------------------------------
def test_parse_sweeps():
    assert parse_sweeps(["k=1,2,4,8", "batch=1,32"]) == {"k": [1, 2, 4, 8], "batch": [1, 32]}
    assert parse_sweeps(["rate=0.5,4"]) == {"rate": [0.5, 4.0]}
    for bad in ("temperature=1", "k", "k=0", "k=1.5", "rate=0", "rate=x"):
        with pytest.raises(Exception):
            parse_sweeps([bad])


def test_plan_sweeps_request_counts():
    from minedraft.bench.suite import SuiteConfig, plan_sweeps

    cfg = SuiteConfig(target="t", drafts=["d1", "d2"], out=Path("x"), sweeps={"k": [2], "batch": [1, 32]})
    pts = plan_sweeps(cfg)
    assert [(p["param"], p["k"], p["batch"], p["n"]) for p in pts] == [
        ("k", 2, 16, 32), ("batch", 4, 1, 32), ("batch", 4, 32, 64), ("draft", 4, 16, 32), ("draft", 4, 16, 32)]
    cfg.sweep_waves, cfg.sweep_output_len = 4, 128  # n scales with the batch; outputs capped
    pts = plan_sweeps(cfg)
    assert [p["n"] for p in pts] == [128, 8, 256, 128, 128] and {p["output_len"] for p in pts} == {128}
    cfg.sweeps = {"rate": [2.0]}  # online load at the main k and batch
    (p, *_) = plan_sweeps(cfg)
    assert (p["k"], p["batch"], p["rate"], p["n"]) == (4, 16, 2.0, 128)


def _headline(mode, tps, e2e, batch=16, overhead=0.03):
    return {"mode": mode, "batch": batch, "tps": tps, "e2e_mean": e2e, "ttft_mean": 1.0, "tpot_mean": 1.0,
            "step_ms": 10.0, "drafter_busy": 0.5, "verifier_busy": 0.9, "overhead_frac": overhead,
            "router_ms": 0.1, "grpc_ms": 0.2, "acceptance": 0.5}


def test_targets_verdicts():
    stage = {"draft_ms": 10.0, "verify_ms": 10.0, "ideal_bound": 2.0, "k": 4, "batch": 16}
    res = {"main_headline": {"sd": _headline("sd", 100.0, 1000.0), "psd": _headline("psd", 190.0, 600.0)},
           "main_stage": stage, "workload": {"requests": 32}, "config": {"concurrency": 0},
           "comparison": {**metrics.psd_comparison(190.0, 100.0, 2.0), "e2e_psd_over_sd": 0.6, "psd_over_hf": 5.0},
           "hf_assisted": {"output_tps": 38.0}, "sweeps": []}
    v = {t["target"].split()[0] + str(i): t["met"] for i, t in enumerate(targets.evaluate(res))}
    assert list(v.values()) == [True, True, True, True, True]
    res["comparison"]["e2e_psd_over_sd"] = 0.9
    res["main_headline"]["psd"]["overhead_frac"] = 0.08
    got = targets.evaluate(res)
    assert [t["met"] for t in got] == [True, True, False, False, True]
    assert "TTFT" in got[2]["why"]
    # A rate sweep adds one latency row per load and stays out of the throughput targets.
    rate_point = {"param": "rate", "value": 4.0, "n": 64, "stage": stage,
                  "points": {"sd": _headline("sd", 50.0, 2000.0), "psd": _headline("psd", 50.0, 1200.0)},
                  "comparison": {**metrics.psd_comparison(50.0, 50.0, 2.0), "e2e_psd_over_sd": 0.6}}
    for h in rate_point["points"].values():
        h["e2e_p99"] = 2 * h["e2e_mean"]
    res["sweeps"] = [rate_point]
    got = targets.evaluate(res)
    assert [t["met"] for t in got] == [True, True, False, True, False, True]
    assert "4 req/s" in got[3]["target"] and "(main k=4 b=16)" in got[1]["measured"]


# ---- one real run -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (Path(TARGET) / "config.json").is_file() or not (Path(DRAFT) / "config.json").is_file(),
                    reason="demo models not present")
def test_bench_command_smoke(tmp_path):
    """`minedraft bench` end to end with real processes: 4 requests x 8 tokens, sd and psd (~30 s on 2 cores)."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "minedraft.cli", "bench", "--target", TARGET, "--draft", DRAFT, "-n", "4",
           "--output-len", "8", "--max-batch-size", "2", "--modes", "sd,psd", "--stage-repeats", "2",
           "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for mode in ("sd", "psd"):
        m = res["modes"][mode]["metrics"]
        assert m["failed"] == 0 and m["output_tokens"] == 32 and m["output_tps"] > 0
        assert m["drafted"] > 0 and 0 <= m["acceptance_rate"] <= 1
        assert 0 < m["verifier_busy"] <= 1.05 and m["trace"]["ticks"] > 0
        assert res["modes"][mode]["exit_codes"] == {"router": 0, "drafter": 0, "verifier": 0}
    assert res["comparison"]["ideal_bound"] > 1 and res["comparison"]["psd_over_sd"] > 0
    assert (out / "results.md").read_text().startswith("# minedraft bench results")
    assert (out / "timeline.png").stat().st_size > 0 and (out / "throughput_vs_batch.png").stat().st_size > 0


def test_confirm_reruns_auto_and_the_two_best_and_scores_their_median():
    from minedraft.bench.adaptive import confirm

    def run(name, tps, mode="sd"):
        return {"name": name, "mode": mode, "k": 1, "output_tps": tps, "e2e_ms": {"mean": 1e3 / tps}}

    runs = [run("ar", 10.0, "ar"), run("sd/k=1", 30.0), run("sd/k=2", 20.0), run("sd/k=4", 5.0),
            run("auto", 25.0, "auto")]
    later = {"auto": [26.0, 40.0], "sd/k=1": [18.0, 19.0], "sd/k=2": [21.0, 22.0], "sd/k=4": [6.0, 7.0]}
    calls = []

    def again(name, mode, k, tag):
        calls.append((name, tag))
        return run(name, later[name][len([c for c in calls if c[0] == name]) - 1], mode)

    confirm(runs, 2, lambda r: -r["output_tps"], ["sd/k=4"], again, "c4", lambda msg: None)
    # interleaved: each repeat runs every chosen configuration once
    assert calls == [("auto", "c4-rep2"), ("sd/k=1", "c4-rep2"), ("sd/k=2", "c4-rep2"), ("sd/k=4", "c4-rep2"),
                     ("auto", "c4-rep3"), ("sd/k=1", "c4-rep3"), ("sd/k=2", "c4-rep3"), ("sd/k=4", "c4-rep3")]
    by = {r["name"]: r for r in runs}
    assert by["sd/k=1"]["output_tps"] == 19.0 and by["auto"]["output_tps"] == 26.0  # medians: one lucky run is out
    assert [m["output_tps"] for m in by["sd/k=1"]["repeats"]] == [30.0, 18.0, 19.0]
    assert by["ar"]["output_tps"] == 10.0 and "repeats" not in by["ar"]


def test_combined_summary_holds_every_runs_points_tagged_by_folder(tmp_path):
    from minedraft.bench.adaptive import write_combined_summary

    for run, rows in {"demo": [{"pair": "demo pair", "value": 1}, {"pair": "demo pair", "value": 2}],
                      "real-code": [{"pair": "real pair", "value": 4}]}.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "summary.json").write_text(json.dumps(rows))
    (tmp_path / "notes").mkdir()  # a folder without a summary is not a run
    out = write_combined_summary(tmp_path)
    assert json.loads(out.read_text()) == [{"run": "demo", "pair": "demo pair", "value": 1},
                                           {"run": "demo", "pair": "demo pair", "value": 2},
                                           {"run": "real-code", "pair": "real pair", "value": 4}]
    write_combined_summary(tmp_path)  # rebuilding does not read its own output back
    assert len(json.loads(out.read_text())) == 3


def test_read_trace_counts_drafts_made_ahead_and_the_report_shows_their_use(tmp_path):
    """The bench reads draft-ahead's outcomes from the router's tick records, and the report's "auto chose" says
    what share of the drafts made ahead auto could use (draft-ahead's latency gain rests on it)."""
    from minedraft.bench.adaptive import _chose, read_trace
    from services.router.trace import Trace

    path = tmp_path / "t.jsonl"
    trace = Trace(str(path))
    trace.step("verify", "v", 0, 0.0, 0.01, 1, 5.0, drafted=[4], accepted=[4])
    trace.tick(0, 0.0, 0.01, 1, 0, "ahead/k=4", 100.0, ahead=(1, 0))
    trace.step("verify", "v", 1, 0.0, 0.01, 2, 5.0, drafted=[4, 4], accepted=[1, 0])
    trace.tick(1, 0.01, 0.03, 2, 0, "ahead/k=4", 100.0, ahead=(1, 2))
    trace.step("verify", "v", 2, 0.0, 0.01, 2, 5.0, drafted=[0, 0], accepted=[0, 0])  # no drafts: not recorded
    trace.tick(2, 0.03, 0.04, 2, 0, "sd/k=4", 100.0)
    trace.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert "ahead_hits" not in lines[-1]  # only ticks that drafted ahead carry the fields
    got = read_trace(path, 0)
    assert (got["ahead_hits"], got["ahead_misses"]) == (2, 2)
    assert got["by_running"] == {"1": {"ticks": 1, "s": 0.01, "tokens": 5},
                                 "2": {"ticks": 2, "s": 0.03, "tokens": 3 + 2}}
    assert _chose(got) == "ahead/k=4 67%, sd/k=4 33%; drafts made ahead used: 50% of 4"
    assert _chose({"choices": {"psd/k=4": 1.0}, "ahead_hits": 0, "ahead_misses": 0}) == "psd/k=4 100%"


def test_only_keeps_ar_and_auto_and_refuses_a_name_it_does_not_run():
    from minedraft.bench.adaptive import configs, select_configs

    cfgs = configs([4, 8], [])
    assert [c[0] for c in select_configs(cfgs, "sd/k=8")] == ["ar", "sd/k=8", "auto"]
    with pytest.raises(ValueError, match="ahead/k=4"):  # pinned draft-ahead runs only with --extra-modes ahead
        select_configs(cfgs, "sd/k=8,ahead/k=4")
    assert "ahead/k=4" in [c[0] for c in select_configs(configs([4], ["ahead"]), "ahead/k=4")]


def test_a_rate_point_without_sd_is_reported_not_a_crash(tmp_path):
    """`--only psd/k=6` leaves sd out of a rate sweep: the summary says so ("-", null) instead of failing after the
    runs (it did: max() of no sd runs)."""
    from minedraft.bench.adaptive import write_summary

    def run(name, mode, e2e_s):
        return {"name": name, "mode": mode, "k": 0 if mode == "ar" else 6, "output_tps": 100.0 / e2e_s,
                "e2e_ms": {"mean": 1e3 * e2e_s}, "choices": {name: 1.0}}

    results = {"pair": "demo pair", "command": "minedraft bench-adaptive ...", "target": "t", "draft": "d",
               "prompts": "sharegpt", "output_len": 64, "ks": [6], "batch_sweep": [],
               "rate_sweep": [{"rate": 6.0, "runs": [run("ar", "ar", 0.7), run("psd/k=6", "psd", 0.32),
                                                     run("auto", "auto", 0.3)]}]}
    write_summary(results, tmp_path)
    (point,) = json.loads((tmp_path / "summary.json").read_text())
    assert point["sd_e2e_s"] is None and point["best_fixed"] == "psd/k=6" and point["auto_e2e_s"] == 0.3
    assert "| 6 | 0.30 | - | - | psd/k=6 | 0.32 | 0.94 |" in (tmp_path / "results.md").read_text()


def test_a_rate_run_whose_requests_failed_is_not_the_best(tmp_path):
    """The rate sweep's best fixed configuration by mean E2E skips runs with failed requests (as the throughput
    sweep's does): a run that lost requests can have a short mean over the ones that finished."""
    from minedraft.bench.adaptive import write_summary

    def run(name, mode, e2e_s, failed=0):
        return {"name": name, "mode": mode, "k": 0 if mode == "ar" else 4, "output_tps": 100.0 / e2e_s,
                "e2e_ms": {"mean": 1e3 * e2e_s}, "choices": {name: 1.0}, "failed": failed}

    results = {"pair": "demo pair", "command": "minedraft bench-adaptive ...", "target": "t", "draft": "d",
               "prompts": "sharegpt", "output_len": 64, "ks": [4], "batch_sweep": [],
               "rate_sweep": [{"rate": 2.0, "runs": [run("ar", "ar", 0.7), run("sd/k=4", "sd", 0.4),
                                                     run("psd/k=4", "psd", 0.2, failed=3),
                                                     run("auto", "auto", 0.3)]}]}
    write_summary(results, tmp_path)
    (point,) = json.loads((tmp_path / "summary.json").read_text())
    assert point["best_fixed"] == "sd/k=4" and point["best_fixed_e2e_s"] == 0.4
