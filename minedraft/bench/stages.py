"""Isolated stage timings: T_draft (k draft steps for a batch of B) and T_verify (one verification of k+1 tokens per
sequence for a batch of B), measured in this process with the same runtime the services run, one torch thread.

Why: PSD can at best hide the shorter stage behind the longer one, so its ideal speedup over SD at equal per-batch
size is (T_d + T_v) / max(T_d, T_v) (<= 2, reached when T_d == T_v). The measured psd/sd ratio is only meaningful
next to this bound, and the bound must come from timings free of gRPC, the router and the other service, hence
in-process, single-threaded (each service runs one torch thread on its own core), with no cluster running.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass


@dataclass
class StageTiming:
    draft_dir: str
    target_dir: str
    k: int
    batch: int
    context: int  # mean context length of the batch's sequences
    context_max: int  # longest one: attention pads the batch's keys to it
    draft_ms: float  # median T_draft: k draft forwards (the first one on 1 new token per sequence)
    verify_ms: float  # median T_verify: one target forward over k+1 tokens per sequence, plus acceptance
    threads: int
    repeats: int

    @property
    def ideal(self) -> float:
        return ideal_bound(self.draft_ms, self.verify_ms)

    def as_dict(self) -> dict:
        return {**asdict(self), "ideal_bound": self.ideal, "draft_over_verify": self.draft_ms / self.verify_ms}


def ideal_bound(t_draft: float, t_verify: float) -> float:
    """Ideal PSD/SD throughput ratio at equal per-batch size: a tick costs max(T_d, T_v) instead of T_d + T_v."""
    longest = max(t_draft, t_verify)
    if longest <= 0:
        raise ValueError("stage timings must be positive")
    return (t_draft + t_verify) / longest


@functools.lru_cache(maxsize=4)
def _model(path: str, device: str, dtype: str = "auto"):
    from minedraft.runtime.checkpoint import load_model

    return load_model(path, device, dtype)


def _interleaved_ms(fns, repeats: int, warmup: int, sync=lambda: None) -> list[float]:
    times = [[] for _ in fns]
    for i in range(warmup + repeats):
        for j, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[j].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def time_stages(target_dir: str, draft_dir: str, k: int, batch: int, context: int | list[int], repeats: int = 7,
                warmup: int = 2, threads: int = 1, device: str = "cpu", seed: int = 0,
                dtype: str = "auto") -> StageTiming:
    """Prefill `batch` random sequences on both models, then time the two stages. `context` is one length for all,
    or per-sequence lengths (cycled), e.g. the workload's prompt lengths plus half the output: the runtime pads a
    batch's attention to its longest sequence, so a uniform context would flatter a mixed batch. Each repetition
    rewrites the same positions, which the runtime treats as a rollback, so the contexts stay fixed."""
    import torch

    from minedraft.runtime.runner import Extend, ModelRunner
    from minedraft.runtime.sampling import SamplingParams
    from minedraft.runtime.speculative import DraftRequest, VerifyRequest, propose, verify_batch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        target, draft = _model(target_dir, device, dtype), _model(draft_dir, device, dtype)
        vocab = min(target.arch.vocab_size, draft.arch.vocab_size)
        limit = min(target.arch.max_position, draft.arch.max_position) - k - 2
        wanted = context if isinstance(context, list) else [context]
        ctx = [max(1, min(wanted[i % len(wanted)], limit)) for i in range(batch)]
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(1, vocab, (c + 1 + k,), generator=g).tolist() for c in ctx]
        cap = sum(16 * -(-(c + k + 2) // 16) for c in ctx) + 64  # whole 16-token blocks per sequence
        runners = {"t": ModelRunner(target, cap), "d": ModelRunner(draft, cap)}
        ids = [f"bench-{i}" for i in range(batch)]
        with torch.inference_mode():
            for r in runners.values():  # prefill in chunks of a few sequences to bound memory
                for i in range(0, batch, 8):
                    r.step([Extend(ids[j], 0, prompts[j][:ctx[j]]) for j in range(i, min(batch, i + 8))])
            greedy = SamplingParams()

            def draft_step():
                propose(runners["d"], [DraftRequest(ids[j], ctx[j], [prompts[j][ctx[j]]], k, greedy)
                                       for j in range(batch)])

            def verify_step():
                verify_batch(runners["t"], [VerifyRequest(ids[j], ctx[j], [prompts[j][ctx[j]]],
                                                          prompts[j][ctx[j] + 1:ctx[j] + 1 + k], None, greedy)
                                            for j in range(batch)])

            sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
            # Interleaved (draft, verify, draft, ...): a disturbance from outside hits both stages alike, so their
            # ratio, which the bound depends on, stays stable even when the absolute times do not.
            d_ms, v_ms = _interleaved_ms([draft_step, verify_step], repeats, warmup, sync)
    finally:
        torch.set_num_threads(prev_threads)
    return StageTiming(draft_dir, target_dir, k, batch, round(sum(ctx) / batch), max(ctx), d_ms, v_ms, threads,
                       repeats)


def time_grid(target_dir: str, points: list[tuple[str, int, int]], context: int | list[int], progress: bool = True,
              **kw) -> dict[tuple[str, int, int], StageTiming]:
    """Stage timings for many (draft_dir, k, batch) points, with a progress bar."""
    from tqdm import tqdm

    out = {}
    for d, k, b in tqdm(list(dict.fromkeys(points)), desc="stage timings", disable=not progress, leave=False):
        out[(d, k, b)] = time_stages(target_dir, d, k, b, context, **kw)
    return out
