"""GPU evidence in one call: environment, SDPA backend probe, copy bandwidth, dial self-test, stage timings
(stages.py) and end to end ar vs sd with the acceptance dial (e2e.py). Writes OUT/results.json, OUT/results.md and
OUT/progress.log, rewritten after every unit, and prints the markdown at the end.

    PYTHONPATH=. python benchmarks/gpu/run_all.py --out $OUT                 # real run (CUDA), ~6 min budget
    PYTHONPATH=. python benchmarks/gpu/run_all.py --dry-run --out /tmp/gpu-dry  # tiny shapes on CPU

Exit status 1 when a correctness check failed (dial self-test, sd == ar, dial applied, acceptance ~ dial), else 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (Clock, Results, effective_variants, environment, free_memory, measure_bandwidth,  # noqa: E402
                    parse_variants, render_markdown, sdpa_probe, sdpa_probe_kernels)
from shapes import SHAPES, TINY, build_random_model  # noqa: E402

REAL = dict(device=None, dtype=None, targets="qwen3-8b", drafts="qwen3-0.6b,llama-3.2-1b",
            e2e_pairs="qwen3-8b:qwen3-0.6b", batches="1,8,32,64", draft_batch=32, context=1024,
            target_stages="decode,verify_fwd,verify", draft_stages="decode,propose",
            variants="triton:on,sdpa:off,triton:off,sdpa:on", e2e_variants="triton:on,sdpa:off", warmup=3,
            repeats=10, e2e_batch=32, e2e_prompt=1024, e2e_new_tokens=128, e2e_warm_tokens=8, budget_s=315.0,
            e2e_reserve_s=80.0, count_reserve_s=45.0, prefill_chunk=8192, e2e_stage_repeats=5)
DRY = dict(REAL, batches="1,4", draft_batch=4, context=64, variants="sdpa:off,auto:on", e2e_variants="sdpa:off",
           warmup=1, repeats=3, e2e_batch=8, e2e_prompt=64, e2e_new_tokens=48, e2e_warm_tokens=4, budget_s=170.0,
           e2e_reserve_s=30.0, count_reserve_s=20.0, prefill_chunk=256, e2e_stage_repeats=2)
# --quick: fewer variants, batch sizes and repeats (e.g. a before and an after run in one 10-minute call).
QUICK = dict(variants="triton:on,sdpa:off", e2e_variants="triton:on", batches="8,64", repeats=6, budget_s=200.0,
             e2e_reserve_s=60.0, count_reserve_s=30.0, e2e_stage_repeats=3)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for results.json / results.md / progress.log")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, small counts (a CPU check of the "
                    "scripts; every real model name is stood in by a tiny one of its family)")
    ap.add_argument("--quick", action="store_true", help="fewer variants (triton:on,sdpa:off; e2e triton:on), "
                    "batches 8,64, 6 repeats, budget 200 s (explicit flags still win)")
    ap.add_argument("--only", choices=("all", "stages", "e2e"), default="all")
    ap.add_argument("--label", default="", help="free text recorded in the results (e.g. before / after)")
    ap.add_argument("--device", help="default: cuda if available, else cpu (cpu under --dry-run)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--targets", help=f"comma list of target shapes for stage timings (default {REAL['targets']}); "
                    f"known: {', '.join(SHAPES)}")
    ap.add_argument("--drafts", help=f"comma list of draft shapes (default {REAL['drafts']})")
    ap.add_argument("--e2e-pairs", help=f"comma list of target:draft (default {REAL['e2e_pairs']}); 'none' for none")
    ap.add_argument("--batches", help=f"target batch sizes (default {REAL['batches']})")
    ap.add_argument("--draft-batch", type=int)
    ap.add_argument("--context", type=int, help="cached tokens per sequence before each timed step (default 1024)")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--target-stages", help=f"default {REAL['target_stages']}")
    ap.add_argument("--draft-stages", help=f"default {REAL['draft_stages']}")
    ap.add_argument("--variants", help="runner variants attention:graphs in priority order (default "
                    f"{REAL['variants']}); attention auto|sdpa|triton, graphs on|off; passed only where ModelRunner "
                    "has the option, duplicates dropped (the old runner runs one default variant)")
    ap.add_argument("--e2e-variants", help=f"default {REAL['e2e_variants']}")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--count-batches", help="target batch sizes of the count pass (default: smallest and largest of "
                    "--batches)")
    ap.add_argument("--no-profile", action="store_true", help="skip the count pass (profiler and sync-debug calls)")
    ap.add_argument("--rate", type=float, default=0.8, help="dial: per-token greedy acceptance of the draft")
    ap.add_argument("--e2e-batch", type=int)
    ap.add_argument("--e2e-prompt", type=int)
    ap.add_argument("--e2e-new-tokens", type=int)
    ap.add_argument("--e2e-warm-tokens", type=int)
    ap.add_argument("--e2e-stage-repeats", type=int)
    ap.add_argument("--budget-s", type=float, help="work not started by then is skipped (default 315; dry 170)")
    ap.add_argument("--e2e-reserve-s", type=float, help="stage timings stop this long before the budget while an "
                    "e2e is still to run (default 80)")
    ap.add_argument("--count-reserve-s", type=float, help="timings and e2e stop this long before the budget so the "
                    "profiler pass (launch/sync counts) still runs (default 45)")
    ap.add_argument("--prefill-chunk", type=int, help="tokens per prefill step (whole sequences; default 8192)")
    ap.add_argument("--no-self-test", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    base = dict(DRY if a.dry_run else REAL)
    if a.quick and not a.dry_run:
        base.update(QUICK)
    for key, val in base.items():
        if getattr(a, key, None) is None:
            setattr(a, key, val)
    if a.device is None:
        if not a.dry_run and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: real shapes on a CPU would take hours; use --dry-run (tiny shapes) or "
                             "pass --device cpu explicitly")
        a.device = "cpu" if a.dry_run else "cuda"
    if a.dtype is None:
        a.dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    return a


def _names(spec: str, dry: bool) -> list[str]:
    out = []
    for n in [x.strip() for x in spec.split(",") if x.strip() and x.strip() != "none"]:
        n = TINY.get(n, n) if dry else n
        if n not in SHAPES:
            raise SystemExit(f"unknown model shape {n!r}; known: {', '.join(SHAPES)}")
        out.append(n)
    return out


def plan(a) -> list[tuple]:
    """Jobs in value order. Every timing job comes before every profiler job ('count'): a profiler session can leave
    CUPTI callbacks attached for the rest of the process and slow every later launch. Timings: the first e2e pair's
    target and draft stages, the e2e pairs, the other drafts and targets; then counts in the same model order; then
    the kernels of the SDPA probe."""
    targets, drafts = _names(a.targets, a.dry_run), _names(a.drafts, a.dry_run)
    pairs = []
    for p in [x for x in a.e2e_pairs.split(",") if x.strip() and x.strip() != "none"]:
        t, _, d = p.partition(":")
        pairs.append((_names(t, a.dry_run)[0], _names(d, a.dry_run)[0]))
    stage_models, first = [], []
    if a.only in ("all", "stages"):
        stage_models = [(n, "target") for n in targets] + [(n, "draft") for n in drafts]
        if pairs and a.only == "all":
            first = [m for m in ((pairs[0][0], "target"), (pairs[0][1], "draft")) if m in stage_models]
        stage_models = first + [m for m in stage_models if m not in first]
    jobs = [("time", n, r) for n, r in first]
    if a.only in ("all", "e2e"):
        jobs += [("e2e", t, d) for t, d in pairs]
    jobs += [("time", n, r) for n, r in stage_models[len(first):]]
    if not a.no_profile:
        jobs += [("count", n, r) for n, r in stage_models]
    # Last: a backend forced on by sdpa_kernel could in principle fail hard (a sticky CUDA error) and take every later
    # call with it, so the probe runs after every number that matters is saved.
    jobs += [("sdpa", "-", "-")]
    return jobs


def main(argv=None) -> int:
    a = parse_args(argv)
    clock = Clock(a.budget_s)
    meta = {"label": a.label, "dry_run": a.dry_run, "device": a.device, "dtype": a.dtype, "context": a.context,
            "k": a.k, "args": vars(a), "argv": sys.argv,
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
    res = Results(a.out, meta)
    clock.log_path = res.out / "progress.log"
    clock.log_path.write_text("")
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    if a.dry_run:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    res.data["env"] = environment(device)
    e = res.data["env"]
    clock.log(f"env: torch {e['torch']} (cuda {e['torch_cuda']}), triton {e['triton']}, transformers "
              f"{e['transformers']}, gpu {e.get('gpu_name')}, CUDA_VISIBLE_DEVICES={e['CUDA_VISIBLE_DEVICES']}, "
              f"minedraft {e['minedraft_path']}, runner {e['runner_options']['signature']}")
    res.data["bandwidth"] = bw = measure_bandwidth(device)
    clock.log(f"bandwidth: {bw['GB_per_s']:.0f} GB/s (read+write, {bw['bytes'] >> 20} MiB copy)")
    res.save()
    if not a.no_self_test:
        try:
            from dial import self_test

            st = self_test(str(device), a.rate, log=clock.log)
        except Exception as ex:  # noqa: BLE001
            st = {"ok": False, "error": f"{type(ex).__name__}: {ex}", "traceback": traceback.format_exc()[-3000:],
                  "checks": {}}
            clock.log(f"dial self-test ERROR {ex}")
        res.data["dial_self_test"] = st
        res.data["checks"]["dial self-test"] = bool(st.get("ok"))
        res.save()
        free_memory(device)

    variants = effective_variants(parse_variants(a.variants))
    e2e_variants = effective_variants(parse_variants(a.e2e_variants))
    res.data["meta"]["variants"] = variants
    res.data["meta"]["e2e_variants"] = e2e_variants
    clock.log("variants: " + ", ".join(f"{v['label']} {v['kwargs']}" for v in variants) + " | e2e: " +
              ", ".join(v["label"] for v in e2e_variants))
    jobs = plan(a)
    res.data["meta"]["jobs"] = [" ".join(j) for j in jobs]
    models: dict = {}

    def get(name):
        if name not in models:
            t = clock.elapsed()
            # the seed depends on the name only, so a model's weights do not depend on the job order
            models[name] = build_random_model(name, device, dtype, seed=a.seed * 1000 + zlib.crc32(name.encode()) % 997)
            mem = ""
            if device.type == "cuda":
                torch.cuda.synchronize()
                mem = f", GPU memory allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
            clock.log(f"built {name} ({dtype}) in {clock.elapsed() - t:.1f} s{mem}")
        return models[name]

    def release_unneeded(i):
        need = set()
        for j in jobs[i + 1:]:
            need.update(j[1:3] if j[0] == "e2e" else j[1:2] if j[0] in ("time", "count") else ())
        for n in [n for n in models if n not in need]:
            del models[n]
        free_memory(device)

    from stages import run_model_stages

    batches = [int(x) for x in str(a.batches).split(",")]
    count_batches = ([int(x) for x in str(a.count_batches).split(",")] if a.count_batches
                     else sorted({min(batches), max(batches)}))
    for i, job in enumerate(jobs):
        later = [j[0] for j in jobs[i + 1:]]
        # time budget: timings leave room for the e2e still to run and for the count pass; e2e for the count pass
        reserve = ((a.e2e_reserve_s if "e2e" in later else 0.0) + (a.count_reserve_s if "count" in later else 0.0)
                   if job[0] == "time" else a.count_reserve_s if job[0] == "e2e" and "count" in later else 0.0)
        try:
            if job[0] in ("time", "count"):
                kind, name, role = job
                if clock.left(reserve) <= 0:
                    res.data["skipped"].append(f"{kind} {role} stages {name} (budget)")
                    clock.log(f"skip {kind} {role} stages {name}: time budget")
                    continue
                model = get(name)
                stage_list = [s for s in (a.target_stages if role == "target" else a.draft_stages).split(",") if s]
                tb = batches if kind == "time" else count_batches
                run_model_stages(model, name, role, variants, tb if role == "target" else [a.draft_batch],
                                 stage_list, mode=kind, context=a.context, k=a.k, warmup=a.warmup, repeats=a.repeats,
                                 bandwidth_gbps=bw["GB_per_s"], prefill_chunk=a.prefill_chunk, results=res,
                                 clock=clock, reserve_s=reserve, seed=a.seed)
            elif job[0] == "e2e":
                from e2e import run_e2e

                _, tname, dname = job
                for v in e2e_variants:
                    if clock.left(reserve) <= 0:
                        res.data["skipped"].append(f"e2e {tname}:{dname} {v['label']} (budget)")
                        clock.log(f"skip e2e {tname}:{dname} {v['label']}: time budget")
                        continue
                    run_e2e(get(tname), get(dname), f"{tname}:{dname}", v, batch=a.e2e_batch,
                            prompt_len=a.e2e_prompt, new_tokens=a.e2e_new_tokens, k=a.k, rate=a.rate,
                            warm_tokens=a.e2e_warm_tokens, stage_warmup=a.warmup,
                            stage_repeats=a.e2e_stage_repeats, prefill_chunk=a.prefill_chunk, results=res,
                            clock=clock, seed=a.seed)
            elif job[0] == "sdpa":
                probe_dims = (dict(heads=32, kv_heads=8, head_dim=128, batch=8, context=a.context) if not a.dry_run
                              else dict(heads=8, kv_heads=2, head_dim=32, batch=2, context=a.context))
                res.data["sdpa_probe"] = sp = sdpa_probe(device, dtype, **probe_dims)
                clock.log("sdpa probe (each backend alone): " + "; ".join(
                    f"q{q[1:]}: " + ", ".join(f"{b}={'ok' if r.get('ok') else 'no'}"
                                              for b, r in (sp.get(q) or {}).items()) for q in ("q1", "q5")))
                res.save()
                if not a.no_profile:
                    sdpa_probe_kernels(sp, device, dtype)
                    clock.log("sdpa default backend (kernel names): " + ", ".join(
                        f"q{q}: {sp.get(f'q{q}', {}).get('default', {}).get('backend_guess')}" for q in (1, 5)))
        except Exception as ex:  # noqa: BLE001 - one job failing must not lose the others
            res.data["skipped"].append(f"{' '.join(job)}: ERROR {type(ex).__name__}: {str(ex)[:300]}")
            clock.log(f"job {' '.join(job)} ERROR {type(ex).__name__}: {ex}")
            traceback.print_exc()
        res.data["meta"]["elapsed_s"] = clock.elapsed()
        res.save()
        release_unneeded(i)

    res.data["meta"]["elapsed_s"] = clock.elapsed()
    res.save()
    clock.log(f"done in {clock.elapsed():.1f} s; wrote {res.out / 'results.json'}, {res.out / 'results.md'}, "
              f"{res.out / 'progress.log'}")
    print("\n" + render_markdown(res.data), flush=True)
    failed = [k for k, v in res.data["checks"].items() if not v]
    if failed:
        print("FAILED CHECKS: " + "; ".join(failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
