"""End to end, in process, with the acceptance dial: target-only (ar) vs standard speculative decoding (sd).

minedraft.runtime.reference.generate over one batch of B random prompts (greedy, ignore_eos, N new tokens each):
ar = generate(target), sd = generate(target, draft=draft, k). Reports tokens/s of each (whole run incl. prefill, and
decode only: the batch's prefill timed separately and subtracted), sd/ar, the measured per-token acceptance and mean
accepted length (tokens per verify step), and asserts (records, and fails the run's exit code) sd output == ar output.

Then the PSD prediction from measured stage times at this batch and mid-generation context: T_draft (one propose of
k) and T_verify (one verify_batch of k+1 tokens per sequence). PSD runs the drafter and the verifier on two devices
on two batches at once, so a PSD step costs ~max(T_d, T_v) where SD pays T_d + T_v:
    predicted psd/sd = (T_d + T_v) / max(T_d, T_v)   (<= 2, reached when T_d == T_v)
One GPU time-slices two processes (no MPS), so a psd run with both models on one GPU cannot show this overlap; the
number is a prediction for two devices, not a measurement.

Run through run_all.py (`run_all.py ARGS --only e2e`), which imports this module.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import blocks_tokens, free_memory, in_effect, make_runner, runner_info, sync  # noqa: E402
from dial import _F_ADD, _F_MUL, acceptance_stats, counting, dial_pair  # noqa: E402
from stages import measure, prefill, random_prompts, stage_calls  # noqa: E402

PSD_NOTE = ("Prediction, not a measurement: PSD overlaps the draft of one batch with the verification of another on "
            "two devices (two GPUs, or GPU + CPU), so its step is ~max(T_d, T_v) where SD pays T_d + T_v. One GPU "
            "time-slices two processes (no MPS), so a one-GPU psd run cannot show this overlap.")


def _timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def psd_prediction(tr, dr, row: dict, *, batch: int, ctx: int, k: int, vocab: int, seed: int, warmup: int,
                   repeats: int, prefill_chunk: int) -> dict:
    """T_draft (one propose of k) and T_verify (one verify_batch) with the e2e runners at this batch and context ctx,
    and the psd/sd gain they predict for two devices."""
    device = tr.model.device
    try:
        ids = [f"e2e-{i}" for i in range(batch)]
        sp = random_prompts(batch, ctx + k + 2, vocab, seed + 12)
        prefill(tr, ids, sp, ctx, prefill_chunk)
        prefill(dr, ids, sp, ctx, prefill_chunk)
        t_v = measure(stage_calls(tr, "target", ["verify"], batch, ids, sp, ctx, k)["verify"][0], device, warmup,
                      repeats)["median_ms"]
        t_d = measure(stage_calls(dr, "draft", ["propose"], batch, ids, sp, ctx, k)["propose"][0], device, warmup,
                      repeats)["median_ms"]
    except Exception as e:  # noqa: BLE001 - the e2e numbers above stand without it
        return {"error": f"{type(e).__name__}: {e}"[:1000], "context": ctx}
    finally:
        tr.release_all()
        dr.release_all()
    gain = (t_d + t_v) / max(t_d, t_v)
    return {"context": ctx, "T_draft_ms": t_d, "T_verify_ms": t_v, "sd_step_ms": t_d + t_v,
            "psd_step_ms": max(t_d, t_v), "gain": gain, "formula": "psd/sd = (T_d + T_v) / max(T_d, T_v)",
            "psd_decode_tok_s": row["sd"]["decode_tok_s"] * gain,
            "psd_over_ar_decode": row["sd"]["decode_tok_s"] * gain / row["ar"]["decode_tok_s"], "note": PSD_NOTE}


def run_e2e(target, draft, pair: str, variant: dict, *, batch: int, prompt_len: int, new_tokens: int, k: int,
            rate: float, warm_tokens: int, stage_warmup: int, stage_repeats: int, prefill_chunk: int, results, clock,
            seed: int = 0) -> dict:
    from minedraft.runtime.reference import generate, make_sequences
    from minedraft.runtime.sampling import SamplingParams
    from minedraft.runtime.speculative import DraftRequest, propose

    device = target.device
    row: dict = {"pair": pair, "variant": variant["label"], "kwargs": variant["kwargs"], "batch": batch,
                 "prompt_len": prompt_len, "new_tokens": new_tokens, "k": k, "rate": rate}
    t_m, d_m = dial_pair(target, draft, rate, seed)
    vocab = t_m.dial_vocab
    max_len = min(target.arch.max_position, draft.arch.max_position)
    prompts = random_prompts(batch, prompt_len, vocab, seed + 11)
    cap = blocks_tokens([prompt_len + new_tokens + k + 2] * batch)
    greedy = SamplingParams()
    tr = dr = None
    phase = "build"  # an error while building the runners means the variant is not supported, not a failed run
    try:
        tr = make_runner(t_m, cap, variant["kwargs"])
        dr = make_runner(d_m, cap, variant["kwargs"])
        phase = "run"
        row["runner"] = {"target": runner_info(tr), "draft": runner_info(dr)}
        row["in_effect"] = in_effect(row["runner"]["target"])

        def seqs(n):
            return make_sequences(prompts, greedy, n, max_len, ignore_eos=True)

        with torch.inference_mode():
            if hasattr(tr, "capture_graphs"):  # every graph the timed runs replay, so none is captured mid-run
                longest = prompt_len + new_tokens + k + 2
                n_t = tr.capture_graphs([batch], list(range(1, k + 2)), longest)
                n_d = dr.capture_graphs([batch], [1, 2], longest)
                clock.log(f"e2e {pair} {variant['label']}: captured {n_t} target / {n_d} draft CUDA graphs")
            clock.log(f"e2e {pair} {variant['label']}: warm-up ({warm_tokens} tokens ar + sd)")
            generate(tr, seqs(warm_tokens))
            generate(tr, seqs(warm_tokens), dr, k)
            pre_t = _timed(lambda: generate(tr, seqs(1)), device)  # target prefill of the batch (+1 token)

            def draft_prefill():
                propose(dr, [DraftRequest(f"seq-{i}", 0, prompts[i], 0, greedy) for i in range(batch)])
                dr.release_all()

            pre_d = _timed(draft_prefill, device)
            ar = seqs(new_tokens)
            wall_ar = _timed(lambda: generate(tr, ar), device)
            clock.log(f"e2e {pair} {variant['label']}: ar {wall_ar:.3f} s")
            sd = counting(seqs(new_tokens))
            wall_sd = _timed(lambda: generate(tr, sd, dr, k), device)
            clock.log(f"e2e {pair} {variant['label']}: sd {wall_sd:.3f} s")
        n_tok = batch * new_tokens
        dec_tok = batch * (new_tokens - 1)
        ar_steps = max(s.verify_steps for s in ar) - 1
        sd_steps = max(s.verify_steps for s in sd) - 1

        def mode(wall, pre, steps):
            dec = max(wall - pre, 1e-9)
            return {"wall_s": wall, "tok_s": n_tok / wall, "prefill_s": pre, "decode_s": dec,
                    "decode_tok_s": dec_tok / dec, "steps": steps, "ms_per_step": dec / max(steps, 1) * 1e3}

        row["ar"] = mode(wall_ar, pre_t, ar_steps)
        row["sd"] = mode(wall_sd, pre_t + pre_d, sd_steps)
        row["sd"]["draft_prefill_s"] = pre_d
        row["sd_over_ar"] = row["sd"]["tok_s"] / row["ar"]["tok_s"]
        row["sd_over_ar_decode"] = row["sd"]["decode_tok_s"] / row["ar"]["decode_tok_s"]
        mism = [i for i, (a, b) in enumerate(zip(ar, sd)) if a.output != b.output]
        row["lossless"] = not mism and all(len(s.output) == new_tokens for s in ar)
        row["mismatched_sequences"] = mism[:16]
        chain = True
        for s in ar:
            prev = s.prompt[-1]
            for t in s.output:
                chain &= t == (prev * _F_MUL + _F_ADD) % vocab
                prev = t
        row["ar_follows_dial"] = bool(chain)  # False: the runner did not use the dialed forward for the target
        acc = acceptance_stats(sd, k, rate)
        row["acceptance"] = acc
        trials = acc["accepted"] + acc["rejections"]
        a_hat = acc["per_token_acceptance"]
        tol = max(0.05, 3 * math.sqrt(rate * (1 - rate) / max(trials, 1)))
        row["acceptance_ok"] = a_hat is not None and abs(a_hat - rate) <= tol
        row["acceptance_tol"] = tol

        clock.log(f"e2e {pair} {variant['label']}: ar {row['ar']['tok_s']:.1f} tok/s, sd {row['sd']['tok_s']:.1f} "
                  f"tok/s (sd/ar {row['sd_over_ar']:.2f}, decode {row['sd_over_ar_decode']:.2f}), lossless "
                  f"{row['lossless']}, dial applied {row['ar_follows_dial']}, acceptance {a_hat:.3f} (dial {rate}), "
                  f"tokens/step {acc['tokens_per_step']:.2f}")
        row["psd_prediction"] = psd_prediction(tr, dr, row, batch=batch, ctx=prompt_len + new_tokens // 2, k=k,
                                               vocab=vocab, seed=seed, warmup=stage_warmup, repeats=stage_repeats,
                                               prefill_chunk=prefill_chunk)
        pr = row["psd_prediction"]
        if "error" in pr:
            clock.log(f"e2e {pair} {variant['label']}: T_d / T_v ERROR {pr['error'][:300]}")
        else:
            clock.log(f"e2e {pair} {variant['label']}: T_d {pr['T_draft_ms']:.2f} ms, T_v {pr['T_verify_ms']:.2f} ms "
                      f"-> predicted psd/sd {pr['gain']:.2f}")
    except Exception as e:  # noqa: BLE001 - recorded; the run goes on
        import traceback

        row["error"] = f"{phase}: {type(e).__name__}: {e}"[:1000]
        row["error_phase"] = phase
        row["traceback"] = traceback.format_exc()[-3000:]
        clock.log(f"e2e {pair} {variant['label']}: ERROR {row['error'][:300]}")
    finally:
        for r in (tr, dr):
            if r is not None:
                try:
                    r.release_all()
                except Exception:  # noqa: BLE001
                    pass
        tr = dr = t_m = d_m = None
        free_memory(device)
    results.data["e2e"].append(row)
    if row.get("error_phase") == "run":
        results.data["checks"][f"e2e {pair} {variant['label']} ran without error"] = False
    if "error" not in row:
        key = f"e2e {pair} {variant['label']}"
        results.data["checks"][key + " lossless"] = bool(row["lossless"])
        results.data["checks"][key + " dial applied (ar follows chain)"] = row["ar_follows_dial"]
        results.data["checks"][key + " acceptance ~ dial"] = bool(row["acceptance_ok"])
    results.save()
    return row
