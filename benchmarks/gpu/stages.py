"""Per-stage timings at real model shapes (random weights), each next to its memory floor, with kernel-launch and
host-sync counts.

Target (e.g. qwen3-8b): at each batch size B
    decode      one runner.step, 1 new token per sequence, logits of the last row
    verify_fwd  one runner.step, k+1 new tokens per sequence, logits of every new row (the verify forward alone)
    verify      one speculative.verify_batch with k drafts per sequence (forward + greedy acceptance: T_verify)
Draft (e.g. qwen3-0.6b): at batch --draft-batch
    decode      one runner.step, 1 new token per sequence (one draft forward)
    propose     one speculative.propose of k drafts (k forwards + sampling: T_draft)

Every sequence is first prefilled to --context tokens (in chunks of --prefill-chunk tokens); every timed call then
writes at position `context` (the sequence's cached length is rewound by starting the next call there again), so each
repeat sees the same context. Median of --repeats after --warmup calls. Counts come from a second pass (mode 'count',
after every timing of the run): 2 warm-up calls, one call under torch.profiler, one under
torch.cuda.set_sync_debug_mode('warn').

Run through run_all.py (it builds the models, measures bandwidth and writes the results): `run_all.py ARGS --only
stages`.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (blocks_tokens, free_memory, in_effect, make_runner, profile_counts, runner_info,  # noqa: E402
                    sync_warnings, time_fn)
from shapes import kv_bytes_per_token, weight_bytes  # noqa: E402


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def prefill(runner, ids: list[str], prompts: list[list[int]], context: int, chunk_tokens: int) -> None:
    """Cache the first `context` tokens of every prompt, a few whole sequences per step (bounded activation memory)."""
    from minedraft.runtime.runner import Extend

    per = max(1, chunk_tokens // max(context, 1))
    with torch.inference_mode():
        for i in range(0, len(ids), per):
            runner.step([Extend(ids[j], 0, prompts[j][:context]) for j in range(i, min(len(ids), i + per))])


def measure(fn, device, warmup: int, repeats: int) -> dict:
    with torch.inference_mode():
        return time_fn(fn, device, warmup, repeats)


def count(fn, device, warmup: int = 2) -> dict:
    """Launch/sync counts of one call (after `warmup` calls, so lazy graph captures are done)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        return {"profile": profile_counts(fn, device), "sync_warnings": sync_warnings(fn, device)}


def floors(arch, dtype, bandwidth_gbps: float, forwards: int, kv_tokens_read: int) -> dict:
    wb = weight_bytes(arch, dtype)["per_forward"] * forwards
    kvb = kv_tokens_read * kv_bytes_per_token(arch, dtype)
    bw = bandwidth_gbps * 1e9
    return {"weight_bytes": wb, "kv_bytes": kvb, "floor_w_ms": wb / bw * 1e3, "floor_wkv_ms": (wb + kvb) / bw * 1e3}


def stage_calls(runner, role: str, stages: list[str], batch: int, ids, prompts, context: int, k: int):
    """name -> (fn, new tokens per sequence, forwards, K/V token-reads summed over the forwards)."""
    from minedraft.runtime.runner import Extend
    from minedraft.runtime.sampling import SamplingParams
    from minedraft.runtime.speculative import DraftRequest, VerifyRequest, propose, verify_batch

    greedy = SamplingParams()
    b = range(batch)
    calls = {}
    for st in stages:
        if st == "decode":
            calls[st] = (lambda: runner.step([Extend(ids[j], context, [prompts[j][context]]) for j in b]),
                         1, 1, batch * (context + 1))
        elif st == "verify_fwd":
            calls[st] = (lambda: runner.step([Extend(ids[j], context, prompts[j][context:context + k + 1],
                                                     all_logits=True) for j in b]),
                         k + 1, 1, batch * (context + k + 1))
        elif st == "verify":
            calls[st] = (lambda: verify_batch(runner, [VerifyRequest(ids[j], context, [prompts[j][context]],
                                                                     prompts[j][context + 1:context + 1 + k], None,
                                                                     greedy) for j in b]),
                         k + 1, 1, batch * (context + k + 1))
        elif st == "propose":
            calls[st] = (lambda: propose(runner, [DraftRequest(ids[j], context, [prompts[j][context]], k, greedy)
                                                  for j in b]),
                         1, k, batch * sum(context + 1 + i for i in range(k)))
        else:
            raise ValueError(f"unknown stage {st!r} (decode, verify_fwd, verify, propose)")
    return calls


def _key(r: dict) -> tuple:
    return r["model"], r["role"], r["variant"], r["stage"], r["batch"]


def run_model_stages(model, name: str, role: str, variants: list[dict], batches: list[int], stages: list[str], *,
                     mode: str, context: int, k: int, warmup: int, repeats: int, bandwidth_gbps: float,
                     prefill_chunk: int, results, clock, reserve_s: float = 0.0, seed: int = 0) -> None:
    """mode 'time': median times of `stages` for every runner variant and batch size -> rows in
    results.data['stages']. mode 'count': the profiler launch/sync counts and sync-debug warnings of the same calls,
    merged into those rows. run_all runs every 'time' job before any 'count' job: a profiler session can leave CUPTI
    callbacks attached and slow every later launch, so no timing is taken after the first profiled call."""
    device, dtype, arch = model.device, model.dtype, model.arch
    bmax = max(batches)
    ids = [f"{role}-{i}" for i in range(bmax)]
    prompts = random_prompts(bmax, context + k + 2, arch.vocab_size, seed)
    failed = {(v["model"], v["variant"]) for v in results.data["variant_errors"]}
    for var in variants:
        if mode == "count" and (name, var["label"]) in failed:
            continue
        if clock.left(reserve_s) <= 0:
            results.data["skipped"].append(f"{mode} {name} {var['label']} (budget)")
            clock.log(f"skip {mode} {role} {name} {var['label']}: time budget")
            results.save()
            continue
        runner = fn = None
        try:
            try:
                runner = make_runner(model, blocks_tokens([context + k + 2] * bmax), var["kwargs"])
            except Exception as e:  # noqa: BLE001 - e.g. cuda_graphs with sdpa
                results.data["variant_errors"].append({"model": name, "variant": var["label"], "kwargs": var["kwargs"],
                                                       "error": f"{type(e).__name__}: {e}"})
                clock.log(f"{role} {name} {var['label']}: runner not built ({type(e).__name__}: {str(e)[:160]})")
                results.save()
                continue
            info = runner_info(runner)
            clock.log(f"{mode} {role} {name} {var['label']} (in effect: {in_effect(info)}): runner {info}; prefill "
                      f"{bmax} x {context}")
            try:
                prefill(runner, ids, prompts, context, prefill_chunk)
            except Exception as e:  # noqa: BLE001 - this variant cannot run; the next one may
                results.data["variant_errors"].append({"model": name, "variant": var["label"], "kwargs": var["kwargs"],
                                                       "error": f"prefill: {type(e).__name__}: {e}"[:1000]})
                clock.log(f"{mode} {role} {name} {var['label']}: prefill ERROR {type(e).__name__}: {str(e)[:200]}")
                results.save()
                continue
            rows = {_key(r): r for r in results.data["stages"]}
            broken = False
            for B in batches:
                for st in stages:
                    if broken:
                        break
                    if clock.left(reserve_s) <= 0:
                        results.data["skipped"].append(f"{mode} {name} {var['label']} {st} b={B} (budget)")
                        continue
                    fn, new, fwd, kv_reads = stage_calls(runner, role, [st], B, ids, prompts, context, k)[st]
                    key = (name, role, var["label"], st, B)
                    row = rows.get(key)
                    if row is None:
                        row = {"model": name, "role": role, "variant": var["label"], "kwargs": var["kwargs"],
                               "runner": info, "in_effect": in_effect(info), "stage": st, "batch": B,
                               "new_per_seq": new, "forwards": fwd, "context": context, "k": k, "dtype": str(dtype)}
                        results.data["stages"].append(row)
                        rows[key] = row
                    try:
                        if mode == "time":
                            t = measure(fn, device, warmup, repeats)
                            fl = floors(arch, dtype, bandwidth_gbps, fwd, kv_reads)
                            med = t["median_ms"]
                            row.update(median_ms=med, timing=t, **fl, x_floor_w=med / fl["floor_w_ms"],
                                       x_floor_wkv=med / fl["floor_wkv_ms"])
                            clock.log(f"time {role} {name} {var['label']} {st} b={B}: {med:.3f} ms (floor_w "
                                      f"{fl['floor_w_ms']:.3f}, x{med / fl['floor_w_ms']:.2f}; floor_wkv "
                                      f"{fl['floor_wkv_ms']:.3f}, x{med / fl['floor_wkv_ms']:.2f})")
                        else:
                            c = count(fn, device)
                            row.update(profile=c["profile"], sync_warnings=c["sync_warnings"])
                            p = c["profile"]
                            clock.log(f"count {role} {name} {var['label']} {st} b={B}: launches {p['launches']} "
                                      f"(graph {p['graph_launches']}), syncs {p['syncs']}, sync warnings "
                                      f"{c['sync_warnings']}, GPU kernels {p['gpu_kernels']} (per call, {fwd} fwd)")
                    except Exception as e:  # noqa: BLE001 - record and leave this variant
                        row[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:1000]
                        clock.log(f"{mode} {role} {name} {var['label']} {st} b={B}: ERROR {row[f'{mode}_error'][:200]}")
                        broken = True
                    results.save()
        finally:
            if runner is not None:
                try:
                    runner.release_all()
                except Exception:  # noqa: BLE001
                    pass
            runner = fn = None  # the stage closures hold the runner: drop them too before the next one is built
            free_memory(device)
