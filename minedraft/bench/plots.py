"""PNG figures (matplotlib, Agg backend: no display on the benchmark hosts).

timeline.png            drafter vs verifier busy intervals over ~20 steady-state ticks, psd above sd on one time
                        scale: in sd the two rows alternate, in psd they overlap; that picture is the point of PSD.
                        Light bars are whole calls as the router saw them, dark bars the services' compute inside.
throughput_vs_batch.png output tokens/s against the per-batch size for each mode, with the ideal psd line
                        (sd x (T_d + T_v) / max(T_d, T_v)) dashed.
ratio_vs_ideal.png      every sweep point's measured psd/sd ratio against its ideal bound, with y = x and y = 0.9x.
latency_vs_rate.png     mean and p99 end-to-end latency against the offered Poisson load, sd and psd: the serving
                        view, where sd's queue starts growing at a lower rate than psd's.
"""

from __future__ import annotations

import math
from pathlib import Path

from minedraft.bench import tracefile

COLORS = {"draft": ("#9ecae1", "#2171b5"), "verify": ("#fdae6b", "#d94801")}
MODE_COLORS = {"ar": "#636363", "sd": "#3182bd", "psd": "#e6550d", "hf-assisted": "#31a354"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timeline(traces: dict[str, tuple[str, int]], path: Path, n_ticks: int = 20, title: str = "") -> Path | None:
    """traces: mode -> (trace file, byte offsets where the measured window begins and ends)."""
    panels = []
    for mode, (file, offset, end) in traces.items():
        if Path(file).exists():
            ticks = tracefile.window(tracefile.read(file, offset, end), n_ticks)
            if ticks:
                panels.append((mode, ticks))
    if not panels:
        return None
    plt = _plt()
    spans = [(t[-1].t + t[-1].dur - t[0].t) * 1e3 for _, t in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.9 * len(panels) + 0.8), squeeze=False)
    for ax, (mode, ticks) in zip(axes[:, 0], panels):
        origin = ticks[0].t
        for row, kind in enumerate(("verify", "draft")):
            light, dark = COLORS[kind]
            calls = [iv for t in ticks for iv in t.busy(kind)]
            ax.broken_barh([((s - origin) * 1e3, (e - s) * 1e3) for s, _, e in calls], (row + 0.15, 0.7),
                           facecolors=light, edgecolor="none")
            ax.broken_barh([((c - origin) * 1e3, (e - c) * 1e3) for _, c, e in calls], (row + 0.3, 0.4),
                           facecolors=dark, edgecolor="none")
        for t in ticks:
            ax.axvline((t.t - origin) * 1e3, color="#bbbbbb", lw=0.5, zorder=0)
        ax.set_yticks([0.5, 1.5], ["verifier", "drafter"])
        ax.set_xlim(0, max(spans))
        mean_tick = sum(t.dur for t in ticks) / len(ticks) * 1e3
        ax.set_title(f"{mode}: {len(ticks)} ticks, mean tick {mean_tick:.1f} ms "
                     f"(verified batch {ticks[len(ticks) // 2].verify_batch})", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("ms (light: call outstanding at the router; dark: service compute)")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(plt, fig, path)


def throughput_vs_batch(rows: list[dict], path: Path, ideal: dict[int, float] | None = None,
                        hf_tps: float | None = None, title: str = "") -> Path | None:
    """rows: headline dicts (mode, batch, tps); ideal: batch -> ideal psd/sd bound."""
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in ("ar", "sd", "psd"):
        pts = sorted((r["batch"], r["tps"]) for r in rows if r["mode"] == mode and not math.isnan(r["tps"]))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode, color=MODE_COLORS[mode])
    if ideal:
        sd = {r["batch"]: r["tps"] for r in rows if r["mode"] == "sd"}
        pts = sorted((b, sd[b] * ideal[b]) for b in ideal if b in sd)
        if pts:
            ax.plot(*zip(*pts), ls="--", color=MODE_COLORS["psd"], alpha=0.6, label="psd ideal (sd x bound)")
    if hf_tps:
        ax.axhline(hf_tps, color=MODE_COLORS["hf-assisted"], ls=":", label="HF assisted (batch 1)")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("sequences per in-flight batch (psd keeps two)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "throughput vs batch size", fontsize=10)
    return _save(plt, fig, path)


def ratio_vs_ideal(points: list[dict], path: Path) -> Path | None:
    """points: {label, psd_over_sd, ideal_bound}."""
    pts = [p for p in points if not (math.isnan(p["psd_over_sd"]) or math.isnan(p["ideal_bound"]))]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    hi = max(2.0, max(max(p["psd_over_sd"], p["ideal_bound"]) for p in pts) * 1.05)
    ax.plot([1, hi], [1, hi], color="#777777", lw=1, label="measured = ideal")
    ax.plot([1, hi], [0.9, 0.9 * hi], color="#777777", lw=1, ls=":", label="90% of ideal")
    for p in pts:
        ax.scatter(p["ideal_bound"], p["psd_over_sd"], color=MODE_COLORS["psd"])
        ax.annotate(p["label"], (p["ideal_bound"], p["psd_over_sd"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("ideal bound (T_d + T_v) / max(T_d, T_v), isolated stage timings")
    ax.set_ylabel("measured psd/sd throughput")
    ax.set_xlim(0.9, hi)
    ax.set_ylim(min(0.5, min(p["psd_over_sd"] for p in pts) * 0.95), hi)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def latency_vs_rate(rates: list[tuple[float, dict]], path: Path) -> Path | None:
    """rates: (offered req/s, {mode: headline}) per rate-sweep point."""
    if not rates:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for mode in ("sd", "psd"):
        pts = sorted((r, p[mode]) for r, p in rates if mode in p)
        if not pts:
            continue
        xs = [r for r, _ in pts]
        ax.plot(xs, [h["e2e_mean"] / 1e3 for _, h in pts], marker="o", color=MODE_COLORS[mode], label=f"{mode} mean")
        ax.plot(xs, [h["e2e_p99"] / 1e3 for _, h in pts], marker="^", ls="--", color=MODE_COLORS[mode],
                label=f"{mode} p99")
    ax.set_xlabel("offered load (Poisson arrivals, requests/s)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("latency vs load, same arrival times for both modes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
