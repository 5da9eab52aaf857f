"""Shared pieces of the GPU evidence scripts: environment record, runner variants (feature-detected), timing,
profiler launch/sync counts, sync-debug warnings, the results file and its markdown.

Only names that exist in every version of minedraft are imported (ModelRunner, Extend, ...); new runner options
(`attention`, `cuda_graphs`) are passed only when ModelRunner's signature has them, and what was in effect is recorded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---- logging and the clock -------------------------------------------------------------------------------------

class Clock:
    """Elapsed time since start, and a budget: work not started before the budget runs out is recorded as skipped."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.log_path: Path | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, reserve_s: float = 0.0) -> float:
        return self.budget_s - reserve_s - self.elapsed()

    def log(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(line + "\n")


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def free_memory(device) -> None:
    import gc

    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- runner variants -------------------------------------------------------------------------------------------

def runner_options() -> dict:
    """Which of the new ModelRunner keyword options this minedraft has."""
    from minedraft.runtime.runner import ModelRunner

    params = inspect.signature(ModelRunner).parameters
    return {"signature": str(inspect.signature(ModelRunner)), "attention": "attention" in params,
            "cuda_graphs": "cuda_graphs" in params}


def parse_variants(spec: str) -> list[tuple[str, str]]:
    """'triton:on,sdpa:off' -> [('triton', 'on'), ('sdpa', 'off')]; attention auto|sdpa|triton, graphs on|off."""
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        att, _, graphs = part.partition(":")
        graphs = graphs or "off"
        if graphs not in ("on", "off"):
            raise ValueError(f"variant {part!r}: graphs must be on or off")
        out.append((att, graphs))
    return out


def effective_variants(requested: list[tuple[str, str]]) -> list[dict]:
    """Map requested (attention, graphs) pairs to the kwargs this ModelRunner accepts; drop duplicates (with the old
    runner every request collapses to the one default variant)."""
    opts = runner_options()
    seen, out = set(), []
    for att, graphs in requested:
        kw = {}
        if opts["attention"]:
            kw["attention"] = att
        if opts["cuda_graphs"]:
            kw["cuda_graphs"] = graphs == "on"
        key = tuple(sorted(kw.items()))
        if key in seen:
            continue
        seen.add(key)
        label = (kw.get("attention", "default") + "/" +
                 ("graphs" if kw.get("cuda_graphs") else "eager" if "cuda_graphs" in kw else "default"))
        out.append({"label": label, "kwargs": kw, "requested": f"{att}:{graphs}"})
    return out


def make_runner(model, max_cached_tokens: int, kwargs: dict):
    from minedraft.runtime.runner import ModelRunner

    return ModelRunner(model, max_cached_tokens, **kwargs)


def runner_info(runner) -> dict:
    """The runner's own view of its options: simple attributes as values, objects by type name (graphs: None or a
    GraphedForward, ...)."""
    info = {}
    for k, v in vars(runner).items():
        if k.startswith("__"):
            continue
        if v is None or isinstance(v, (str, bool, int, float)):
            info[k] = v
        else:
            info[k] = type(v).__name__
    return info


def in_effect(info: dict) -> str | None:
    """attention/graphs as the built runner reports them (e.g. 'auto/graphs' asked on a CPU is 'sdpa/eager')."""
    parts = []
    if "attention" in info:
        parts.append(str(info["attention"]))
    for k in ("graphs", "cuda_graphs"):
        if k in info:
            parts.append("graphs" if info[k] not in (None, False) else "eager")
            break
    return "/".join(parts) or None  # the old runner has neither option


def blocks_tokens(lengths, block_size: int = 16, slack_blocks: int = 4) -> int:
    """Cache capacity (tokens) for sequences of these final lengths, whole blocks each, plus slack."""
    return sum(block_size * -(-n // block_size) for n in lengths) + slack_blocks * block_size


# ---- timing ----------------------------------------------------------------------------------------------------

def time_fn(fn, device, warmup: int, repeats: int) -> dict:
    """Median of `repeats` calls after `warmup`. On CUDA: events around the call (GPU timeline, includes any gaps
    while the host prepares) and host wall time between synchronizes; on CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    sync(device)
    ev, wall = [], []
    for _ in range(repeats):
        if is_cuda(device):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t) * 1e3)
            ev.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            wall.append((time.perf_counter() - t) * 1e3)
    main = ev if ev else wall
    return {"median_ms": statistics.median(main), "min_ms": min(main), "max_ms": max(main),
            "wall_median_ms": statistics.median(wall), "repeats": repeats, "warmup": warmup,
            "timer": "cuda_event" if ev else "perf_counter"}


def measure_bandwidth(device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Device-to-device copy of a large buffer; bandwidth counts read + write (2 x bytes per copy)."""
    if nbytes is None:
        nbytes = (1 << 30) if is_cuda(device) else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    gbps = 2 * nbytes / (t["median_ms"] / 1e3) / 1e9
    return {"bytes": nbytes, "copy_ms": t["median_ms"], "GB_per_s": gbps, "counts": "read+write"}


# ---- profiler counts -------------------------------------------------------------------------------------------

LAUNCH_PREFIXES = ("cudaLaunchKernel", "__cudaLaunchKernel", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                   "cuLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch")
SYNC_PREFIXES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
                 "cuCtxSynchronize", "cuEventSynchronize")


def classify_runtime(name: str) -> str | None:
    """'launch', 'graph_launch', 'sync' or None for a CUDA runtime/driver API event name (suffixes like _v7000
    allowed)."""
    if name.startswith(("cudaGraphLaunch", "cuGraphLaunch")):
        return "graph_launch"
    if name.startswith(LAUNCH_PREFIXES):
        return "launch"
    if name.startswith(SYNC_PREFIXES):
        return "sync"
    if name.startswith(("cudaMemcpy", "cuMemcpy")) and "Async" not in name:
        return "sync"  # synchronous memcpy
    return None


def _is_runtime_name(name: str) -> bool:
    return (name.startswith("cuda") and len(name) > 4 and name[4].isupper()) or \
        (name.startswith("cu") and len(name) > 2 and name[2].isupper()) or name.startswith("__cuda")


def profile_counts(fn, device) -> dict:
    """Run fn once under torch.profiler (CPU + CUDA activities) and count, inside a record_function region around the
    call, the CPU-side CUDA runtime/driver events: kernel launches (incl. graph launches) and host syncs; plus GPU
    kernels executed (device events, memcpy/memset excluded) in the whole profile."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    sync(device)
    with profile(activities=acts) as prof:
        with record_function("__measured__"):
            fn()
    return count_events(list(prof.events()))


def count_events(events) -> dict:
    """The counting half of profile_counts, over FunctionEvent-like objects (name, device_type, time_range)."""
    region = [e for e in events if e.name == "__measured__" and str(e.device_type).endswith("CPU")]
    lo, hi = (region[0].time_range.start, region[0].time_range.end) if region else (-math.inf, math.inf)
    names: dict[str, int] = {}
    counts = {"launches": 0, "graph_launches": 0, "syncs": 0}
    # Over the whole profile, region or not: a cross-check of the time filter (includes the profiler's own exit sync).
    whole = {"launches": 0, "graph_launches": 0, "syncs": 0}
    whole_names: dict[str, int] = {}
    gpu_kernels = gpu_mem = 0
    for e in events:
        dev = str(e.device_type)
        if dev.endswith("CUDA"):
            n = e.name.lower()
            if e.name == "__measured__":
                continue
            if any(p in n for p in ("memcpy", "memset")):
                gpu_mem += 1
            else:
                gpu_kernels += 1
            continue
        if not _is_runtime_name(e.name):
            continue
        kind = classify_runtime(e.name)
        whole_names[e.name] = whole_names.get(e.name, 0) + 1
        if kind in ("launch", "graph_launch"):
            whole["launches"] += 1
            whole["graph_launches"] += kind == "graph_launch"
        elif kind == "sync":
            whole["syncs"] += 1
        if not (lo <= e.time_range.start and e.time_range.end <= hi):
            continue
        names[e.name] = names.get(e.name, 0) + 1
        if kind == "launch":
            counts["launches"] += 1
        elif kind == "graph_launch":
            counts["launches"] += 1
            counts["graph_launches"] += 1
        elif kind == "sync":
            counts["syncs"] += 1
    filtered = bool(region)
    if counts["launches"] == 0 and whole["launches"] > 0:
        # Runtime events outside the region's time range although the call launched work: the clocks of the CPU ops
        # and the CUPTI events disagree. Fall back to the whole profile (over by the profiler's exit sync).
        counts, names, filtered = dict(whole), whole_names, False
    return {**counts, "gpu_kernels": gpu_kernels, "gpu_memcpy_memset": gpu_mem, "runtime_events": names,
            "whole_profile": whole, "region_filtered": filtered}


def sync_warnings(fn, device) -> int | None:
    """Calls that torch.cuda.set_sync_debug_mode('warn') flags during one fn() (None off CUDA)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# ---- environment -----------------------------------------------------------------------------------------------

def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return None


def environment(device) -> dict:
    import minedraft

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": None, "transformers": _version("transformers"),
           "numpy": _version("numpy"), "device": str(device),
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "PYTHONPATH": os.environ.get("PYTHONPATH"), "minedraft_path": str(Path(minedraft.__file__).parent),
           "runner_options": runner_options(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable: {type(e).__name__}"
    rt = Path(minedraft.__file__).parent / "runtime"
    env["runtime_sources"] = {p.name: hashlib.sha1(p.read_bytes()).hexdigest()[:10] for p in sorted(rt.glob("*.py"))}
    try:
        env["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         timeout=5, cwd=HERE).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_head"] = None
    if is_cuda(device):
        p = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}",
                   gpu_memory_GiB=round(p.total_memory / 2**30, 1), gpu_sms=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(),
                   sdp_flags={n: getattr(torch.backends.cuda, n)() for n in
                              ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled",
                               "cudnn_sdp_enabled") if hasattr(torch.backends.cuda, n)})
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,"
                                "power.limit,mig.mode.current", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=10)
            env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()[:200]
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {type(e).__name__}"
    return env


def _sdpa_inputs(device, dtype, qlen, heads, kv_heads, head_dim, batch, context):
    """The call our SDPA attention path makes: q [B,H,Q,D], k/v [B,Hkv,L,D] gathered and padded to the longest
    sequence, bool mask [B,1,Q,L] (causal by position, ragged lengths), enable_gqa=True."""
    g = torch.Generator(device="cpu").manual_seed(qlen)
    L = context + qlen
    q = torch.randn(batch, heads, qlen, head_dim, generator=g).to(device, dtype)
    k = torch.randn(batch, kv_heads, L, head_dim, generator=g).to(device, dtype)
    v = torch.randn(batch, kv_heads, L, head_dim, generator=g).to(device, dtype)
    lens = torch.randint(context // 2, context + 1, (batch,), generator=g)
    qpos = lens[:, None] + torch.arange(qlen)[None, :]
    mask = (torch.arange(L)[None, None, :] <= qpos[:, :, None])[:, None].to(device)
    return q, k, v, mask


def sdpa_probe(device, dtype, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, batch: int = 8,
               context: int = 1024) -> dict:
    """Which SDPA backends accept our attention call at a decode (Q=1) and a verify (Q=5) shape: each backend alone
    via torch.nn.attention.sdpa_kernel (timed when it runs; when it refuses, the error and torch's warnings saying
    why), and the unrestricted call. No profiler here (see sdpa_probe_kernels)."""
    import torch.nn.functional as F

    out: dict = {"shape": dict(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, context=context,
                               dtype=str(dtype))}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        return {**out, "error": f"torch.nn.attention unavailable: {e}"}
    backends = [n for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                if hasattr(SDPBackend, n)]
    for qlen in (1, 5):
        q, k, v, mask = _sdpa_inputs(device, dtype, qlen, heads, kv_heads, head_dim, batch, context)

        def call():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        res: dict = {}
        for name in backends + ["default"]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if name == "default":
                        t = time_fn(call, device, warmup=1, repeats=5)
                    else:
                        with sdpa_kernel([getattr(SDPBackend, name)]):
                            t = time_fn(call, device, warmup=1, repeats=5)
                    res[name] = {"ok": True, "ms": round(t["median_ms"], 4)}
                except Exception as e:  # noqa: BLE001
                    msg = str(e).strip()
                    res[name] = {"ok": False, "error": msg.splitlines()[0][:240] if msg else type(e).__name__}
            why = [str(w.message).strip().replace("\n", " ")[:200] for w in caught]
            if why:
                res[name]["warnings"] = why[:6]
        out[f"q{qlen}"] = res
    return out


def sdpa_probe_kernels(probe: dict, device, dtype) -> None:
    """Add, to a sdpa_probe result, the GPU kernels the unrestricted call launches (torch.profiler) and the backend
    they name: which one torch actually picks for our call."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    if not is_cuda(device) or "shape" not in probe:
        return
    sh = probe["shape"]
    for qlen in (1, 5):
        q, k, v, mask = _sdpa_inputs(device, dtype, qlen, sh["heads"], sh["kv_heads"], sh["head_dim"], sh["batch"],
                                     sh["context"])
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            torch.cuda.synchronize()
        kern = sorted({e.name for e in prof.events() if str(e.device_type).endswith("CUDA")})
        d = probe.setdefault(f"q{qlen}", {}).setdefault("default", {})
        d["kernels"] = [n[:120] for n in kern][:12]
        low = " ".join(kern).lower()
        d["backend_guess"] = ("cudnn" if "cudnn" in low else "flash" if "flash" in low else
                              "efficient" if ("fmha" in low or "mem_eff" in low or "cutlass" in low) else
                              "math (matmul + softmax)" if kern else "unknown")


# ---- results ---------------------------------------------------------------------------------------------------

def fmt(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}"
    return str(x)


class Results:
    """results.json + results.md in `out`, rewritten after every unit so a timeout still leaves numbers."""

    def __init__(self, out: str | Path, meta: dict):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "env": {}, "bandwidth": None, "sdpa_probe": None, "dial_self_test": None,
                     "stages": [], "variant_errors": [], "e2e": [], "skipped": [], "checks": {}}

    def save(self) -> None:
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        (self.out / "results.md").write_text(render_markdown(self.data))


def _runtime_name_totals(stages: list[dict]) -> dict[str, int]:
    tot: dict[str, int] = {}
    for r in stages:
        for n, c in (r.get("profile") or {}).get("runtime_events", {}).items():
            tot[n] = tot.get(n, 0) + c
    return dict(sorted(tot.items(), key=lambda kv: -kv[1]))


def render_markdown(d: dict) -> str:
    L = []
    m, env = d["meta"], d["env"]
    where = f"DRY RUN, tiny shapes on {m.get('device')}" if m.get("dry_run") else str(m.get("device"))
    L.append(f"# GPU evidence: {m.get('label') or 'run'} ({where})")
    L.append("")
    L.append(f"started {m.get('started')}, elapsed {fmt(m.get('elapsed_s'), 1)} s, dtype {m.get('dtype')}, "
             f"context {m.get('context')}, k {m.get('k')}")
    if env:
        L.append("")
        L.append("## Environment")
        L.append("")
        keys = ("gpu_name", "gpu_capability", "gpu_memory_GiB", "nvidia_smi", "torch", "torch_cuda", "cudnn", "triton",
                "transformers", "python", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "minedraft_path", "git_head")
        for k in keys:
            if k in env:
                L.append(f"- {k}: {env[k]}")
        ro = env.get("runner_options", {})
        L.append(f"- ModelRunner{ro.get('signature', '')}: attention option {fmt(ro.get('attention'))}, "
                 f"cuda_graphs option {fmt(ro.get('cuda_graphs'))}")
        if "sdp_flags" in env:
            L.append(f"- SDPA flags: {env['sdp_flags']}")
    bw = d.get("bandwidth")
    if bw:
        L.append(f"- measured copy bandwidth (read+write): **{bw['GB_per_s']:.0f} GB/s** "
                 f"({bw['bytes'] >> 20} MiB copy, {bw['copy_ms']:.3f} ms)")
    sp = d.get("sdpa_probe")
    if sp:
        L.append("")
        L.append("## SDPA backends for our attention call (bool mask + enable_gqa)")
        L.append("")
        L.append(f"shape {sp.get('shape')}")
        L.append("")
        L.append("| query len | backend | runs | ms | note |")
        L.append("|---|---|---|---|---|")
        for qk in ("q1", "q5"):
            for b, r in (sp.get(qk) or {}).items():
                note = r.get("error") or r.get("backend_guess") or ""
                if r.get("warnings"):
                    note += " ; warnings: " + " / ".join(r["warnings"][:3])
                if r.get("kernels"):
                    note += " ; kernels: " + ", ".join(r["kernels"][:4])
                L.append(f"| {qk[1:]} | {b} | {fmt(r.get('ok'))} | {fmt(r.get('ms'), 3)} | {note.replace('|', '/')} |")
    dt = d.get("dial_self_test")
    if dt:
        L.append("")
        L.append(f"Dial self-test ({dt.get('device')}): " + ", ".join(
            f"{n} {'ok' if c.get('ok') else 'FAIL'}"
            + (f" ({c['value']:.3f})" if isinstance(c.get("value"), float) else "")
            for n, c in dt.get("checks", {}).items()))
    if d["stages"]:
        L.append("")
        L.append("## Stage timings")
        L.append("")
        L.append("median ms: CUDA events around the call (perf_counter on CPU); wall ms: host time between "
                 "synchronizes. floor_w = weight bytes read per forward x forwards / measured bandwidth; floor_wkv "
                 "adds one read of every cached K/V byte per forward. launches, syncs: CPU-side CUDA runtime/driver "
                 "events per forward (per call / fwd; torch.profiler, graph launches counted as launches); warn: "
                 "set_sync_debug_mode('warn') warnings per forward; kernels: GPU kernels executed per forward. "
                 "Counts come from a pass after all timings.")
        L.append("")
        L.append("| model | variant | stage | batch | new/seq | fwd | median ms | wall ms | floor_w ms | x floor_w "
                 "| floor_wkv ms | x floor_wkv | launches/fwd | syncs/fwd | warn/fwd | kernels/fwd |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

        def per(x, n):
            return None if x is None else round(x / n, 1) if n > 1 else x

        for r in d["stages"]:
            p = r.get("profile") or {}
            f = r.get("forwards") or 1
            err = r.get("time_error") or r.get("count_error")
            wall = (r.get("timing") or {}).get("wall_median_ms")
            t = (f"{fmt(r.get('median_ms'), 3)} | {fmt(wall, 3)} | {fmt(r.get('floor_w_ms'), 3)} | "
                 f"{fmt(r.get('x_floor_w'))} | {fmt(r.get('floor_wkv_ms'), 3)} | {fmt(r.get('x_floor_wkv'))}")
            if err:
                t = f"ERROR: {str(err)[:90].replace('|', '/')} | | | | |"
            var = r["variant"] + (f" (= {r['in_effect']})" if r.get("in_effect") not in (None, r["variant"]) else "")
            L.append(f"| {r['model']} | {var} | {r['stage']} | {r['batch']} | {r.get('new_per_seq')} | {f} | "
                     f"{t} | {fmt(per(p.get('launches'), f))} | {fmt(per(p.get('syncs'), f))} | "
                     f"{fmt(per(r.get('sync_warnings'), f))} | {fmt(per(p.get('gpu_kernels'), f))} |")
        names = _runtime_name_totals(d["stages"])
        if names:
            L.append("")
            L.append("CUDA runtime/driver events seen in profiled calls (total count, classification): " + ", ".join(
                f"{n} {c} ({classify_runtime(n) or 'other'})" for n, c in names.items()))
    if d.get("variant_errors"):
        L.append("")
        L.append("Variants that did not run: " + "; ".join(
            f"{v['model']} {v['variant']}: {v['error'][:160]}" for v in d["variant_errors"]))
    if d["e2e"]:
        L.append("")
        L.append("## End to end (in-process reference.generate, greedy, acceptance dial)")
        for e in d["e2e"]:
            L.append("")
            if e.get("error"):
                L.append(f"- {e.get('pair')} {e.get('variant')}: ERROR {e['error'][:300]}")
                continue
            acc, pr = e["acceptance"], e.get("psd_prediction") or {"error": "not measured"}
            eff = e.get("in_effect")
            var = e["variant"] + (f" = {eff}" if eff not in (None, e["variant"]) else "")
            L.append(f"### {e['pair']} ({var}): batch {e['batch']}, prompt {e['prompt_len']}, "
                     f"{e['new_tokens']} new tokens, k {e['k']}, dial a = {e['rate']}")
            L.append("")
            L.append("| mode | wall s | tok/s (incl. prefill) | decode tok/s | prefill s | steps | ms/step |")
            L.append("|---|---|---|---|---|---|---|")
            for name in ("ar", "sd"):
                x = e[name]
                L.append(f"| {name} | {fmt(x['wall_s'], 3)} | {fmt(x['tok_s'], 1)} | {fmt(x['decode_tok_s'], 1)} | "
                         f"{fmt(x['prefill_s'], 3)} | {x['steps']} | {fmt(x['ms_per_step'], 2)} |")
            L.append("")
            L.append(f"- sd/ar: **{fmt(e['sd_over_ar'])}x** (incl. prefill), "
                     f"**{fmt(e['sd_over_ar_decode'])}x** (decode)")
            L.append(f"- lossless (sd output == ar output, all {e['batch']} sequences): **{fmt(e['lossless'])}**; "
                     f"ar follows the dial chain: {fmt(e.get('ar_follows_dial'))}")
            L.append(f"- acceptance: per-token {fmt(acc['per_token_acceptance'], 3)} (dial {e['rate']}; "
                     f"{acc['accepted'] + acc['rejections']} trials, ok: {fmt(e['acceptance_ok'])}), accepted/drafted "
                     f"{fmt(acc['accepted_over_drafted'], 3)}, mean accepted length (tokens per verify step) "
                     f"**{fmt(acc['tokens_per_step'], 3)}** (expected {fmt(acc.get('expected_tokens_per_step'), 3)})")
            if "error" in pr:
                L.append(f"- T_draft / T_verify: ERROR {pr['error'][:300]}")
                continue
            L.append(f"- T_draft (one propose, k={e['k']}, batch {e['batch']}, context {pr['context']}) = "
                     f"{fmt(pr['T_draft_ms'], 3)} ms; T_verify (one verify_batch) = {fmt(pr['T_verify_ms'], 3)} ms; "
                     f"measured sd ms/step {fmt(e['sd']['ms_per_step'], 2)} vs T_d + T_v = {fmt(pr['sd_step_ms'], 2)}")
            L.append(f"- PSD prediction: psd step ~ max(T_d, T_v) = {fmt(pr['psd_step_ms'], 3)} ms vs sd step "
                     f"T_d + T_v = {fmt(pr['sd_step_ms'], 3)} ms -> psd/sd gain (T_d + T_v) / max(T_d, T_v) = "
                     f"**{fmt(pr['gain'], 3)}x**; predicted psd decode tok/s {fmt(pr['psd_decode_tok_s'], 1)} "
                     f"(= sd decode tok/s x gain), psd/ar {fmt(pr['psd_over_ar_decode'])}x")
            L.append(f"- {pr['note']}")
    if d.get("skipped"):
        L.append("")
        L.append("Skipped (time budget or flags): " + "; ".join(d["skipped"]))
    if d.get("checks"):
        L.append("")
        L.append("Checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in d["checks"].items()))
    return "\n".join(L) + "\n"
