"""Pure metric arithmetic over client-side request results: no I/O, no processes, so it is unit-tested directly.

Definitions (the README in benchmarks/ repeats them):
  throughput      output tokens of successful requests / wall time of the run (first send to last completion);
  E2E latency     last token received - request sent, per request (mean, p50, p99); makespan/requests is also
                  reported, named as such, because the reference PSD code called that "latency";
  TTFT            first token received - request sent;
  TPOT            (last token - first token) / (tokens - 1), per request, then averaged;
  acceptance      accepted drafts / drafted tokens, summed over requests;
  accepted length accepted drafts per decode verify step (verify steps minus the prefill step), and tokens emitted
                  per verify step (prefill included), the tau of the PSD notes.
"""

from __future__ import annotations

import math


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolation percentile (numpy's default), p in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    v = sorted(values)
    pos = (len(v) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def dist(values: list[float], scale: float = 1e3) -> dict:
    """mean/p50/p99 (milliseconds by default)."""
    return {"mean": mean(values) * scale, "p50": percentile(values, 50) * scale, "p99": percentile(values, 99) * scale}


def ratio(a: float, b: float) -> float:
    """a / b, nan when either is missing or b is zero (so a missing baseline shows as n/a, not as a crash)."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def summarize(results, wall_s: float) -> dict:
    """Metrics of one measured run from its RequestResults (see client.py)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    drafted, accepted = sum(r.drafted for r in ok), sum(r.accepted for r in ok)
    steps = sum(r.verify_steps for r in ok)
    decode_steps = sum(max(r.verify_steps - 1, 0) for r in ok)
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s, "output_tokens": tokens,
        "output_tps": tokens / wall_s if wall_s > 0 else math.nan,
        "request_rate": len(ok) / wall_s if wall_s > 0 else math.nan,
        "e2e_ms": dist([r.e2e_s for r in ok]),
        "ttft_ms": dist([r.ttft_s for r in ok]),
        "tpot_ms": dist(tpots),
        "queue_ms_mean": mean([r.queue_s for r in ok]) * 1e3,
        "makespan_per_request_ms": wall_s / len(ok) * 1e3 if ok else math.nan,
        "drafted": drafted, "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else math.nan,
        "mean_accepted_per_step": accepted / decode_steps if decode_steps and drafted else math.nan,
        "tokens_per_verify_step": tokens / steps if steps else math.nan,
        "verify_steps": steps,
    }


def merge_runs(runs: list[dict]) -> dict:
    """Several measured runs of one mode: the mean of every numeric field (nested dicts too), the run count, and the
    spread of throughput (so a reader sees whether one run is representative)."""
    if len(runs) == 1:
        return {**runs[0], "runs": 1}

    def avg(vals):
        if isinstance(vals[0], dict):  # keys of every run: a run with no full-batch tick has a shorter summary
            keys = dict.fromkeys(k for v in vals for k in v)
            return {k: avg([v[k] for v in vals if k in v]) for k in keys}
        if isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            return mean([float(v) for v in vals])
        return vals[0]

    out = avg(runs)
    tps = [r["output_tps"] for r in runs]
    out.update(runs=len(runs), output_tps_min=min(tps), output_tps_max=max(tps))
    return out


def busy_fraction(before: float | None, after: float | None, wall_s: float) -> float:
    """Share of the measured window a model service spent computing (GetModelInfo busy_seconds delta / wall)."""
    if before is None or after is None or wall_s <= 0:
        return math.nan
    return (after - before) / wall_s


def psd_comparison(psd_tps: float, sd_tps: float, ideal: float | None) -> dict:
    """Measured psd/sd throughput ratio next to the ideal bound and the fraction of the bound's *gain* achieved.

    fraction_of_ideal = measured / ideal (the issue's definition). gain_fraction = (measured - 1) / (ideal - 1) is
    also given because with bounds near 1 the plain fraction looks good even when no overlap gain was realised."""
    r = ratio(psd_tps, sd_tps)
    out = {"psd_over_sd": r, "ideal_bound": ideal if ideal is not None else math.nan}
    out["fraction_of_ideal"] = ratio(r, ideal) if ideal else math.nan
    out["gain_fraction"] = (r - 1) / (ideal - 1) if ideal and ideal > 1 + 1e-9 and not math.isnan(r) else math.nan
    return out
