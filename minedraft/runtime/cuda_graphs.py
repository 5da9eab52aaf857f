"""CUDA graphs of the model forward for steps where every sequence appends a few tokens (decode, draft, verify).

Why: an eager forward of an 8B Llama is ~1,500-2,500 kernel launches; at batch 32 the GPU finishes each kernel
before the host has issued the next, so the step is bound by the host, and a 0.6B draft forward costs nearly as
much as the 8B target's. Replaying a captured graph issues the whole forward with one launch.

A graph has fixed shapes and fixed addresses, so each one is captured for a padded layout (B sequence slots x q
query rows each, block tables W blocks wide; B and W rounded up to buckets) and reads all of its step metadata from
one static int32 buffer that the host refills with one non-blocking copy per step. Padding rows write their k/v to
the cache's scratch block and have q_len 0, so the attention kernel skips them. Graphs are captured lazily, the
first time a (B, q, W) is needed, into one shared memory pool; graphs only replay one at a time and callers read a
graph's outputs before the next step, so sharing the pool is safe.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from minedraft.runtime.attention import AttentionBatch, block_table_array
from minedraft.runtime.kv_cache import PagedKVCache
from minedraft.runtime.model import CausalLM

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
MAX_QUERY = 16  # steps appending more tokens per sequence than this (prefill) run eagerly


def _bucket_width(blocks: int) -> int:
    return max(8, 1 << (max(blocks, 1) - 1).bit_length())


@dataclass
class GraphOutput:
    q: int
    logits: torch.Tensor  # [B * q, V] rows b * q + j
    argmax: torch.Tensor  # [B * q]


class _Graph:
    """One captured forward for B sequence slots of q rows each, block tables W wide."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, B: int, q: int, W: int, pool, capture: bool = True):
        self.B, self.q, self.W = B, q, W
        n = B * q
        self.scratch = cache.scratch_slot
        self.block_size = cache.block_size
        self.meta = torch.zeros(3 * n + 3 * B + B * W, dtype=torch.int32, device=model.device)
        m, at = self.meta, 0
        views = []
        for size in (n, n, n, B, B, B, B * W):
            views.append(m[at: at + size])
            at += size
        self.tokens, positions, slots, seq_lens, q_starts, q_lens, tables = views
        batch = AttentionBatch(positions, slots, tables.view(B, W), seq_lens, q_starts, q_lens, q, cache.block_size,
                               model.arch.sliding_window, "triton")
        self.load(self.fill([], [], [], []))  # no real rows: every write hits scratch

        def forward():
            logits = model.forward(self.tokens, batch, cache.kv)
            return logits, logits.argmax(dim=-1)

        self.graph = None
        if not capture:  # the padded layout run eagerly: lets a CPU test check it (Triton interpreter)
            self._eager = forward
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles the Triton kernels and settles the allocator
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a probe or an IPC import on another thread must not be mistaken for part of this capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.logits, self.argmax = forward()

    def fill(self, starts, lengths, tables, tokens) -> np.ndarray:
        """The host image of `meta` for real sequences 0..len(starts)-1; the remaining slots are padding."""
        B, q, W = self.B, self.q, self.W
        n = B * q
        out = np.zeros(3 * n + 3 * B + B * W, dtype=np.int32)
        tok, pos, slot = out[:n], out[n:2 * n], out[2 * n:3 * n]
        seq_lens, q_starts, q_lens = out[3 * n:3 * n + B], out[3 * n + B:3 * n + 2 * B], out[3 * n + 2 * B:3 * n + 3 * B]
        slot[:] = self.scratch
        q_starts[:] = np.arange(B) * q
        if starts:
            start = np.asarray(starts, dtype=np.int64)
            n_new = np.asarray(lengths, dtype=np.int64)
            table = block_table_array(tables, W)
            owner = np.repeat(np.arange(len(starts)), n_new)
            j = np.arange(int(n_new.sum())) - np.repeat(np.cumsum(n_new) - n_new, n_new)
            rows = owner * q + j
            p = start[owner] + j
            if tokens:
                tok[rows] = [t for ts in tokens for t in ts]
            pos[rows] = p
            slot[rows] = table[owner, p // self.block_size] * self.block_size + p % self.block_size
            out[3 * n + 3 * B: 3 * n + 3 * B + len(starts) * W] = table.ravel()
            seq_lens[: len(starts)] = start + n_new
            q_lens[: len(starts)] = n_new
        return out

    def load(self, host: np.ndarray) -> None:
        src = torch.from_numpy(host)
        if self.meta.is_cuda:
            src = src.pin_memory()
        self.meta.copy_(src, non_blocking=True)

    def replay(self) -> None:
        if self.graph is None:
            self.logits, self.argmax = self._eager()
        else:
            self.graph.replay()


class GraphedForward:
    """Captures and replays `_Graph`s for a model and its cache."""

    def __init__(self, model: CausalLM, cache: PagedKVCache, capture: bool = True):
        self.model = model
        self.cache = cache
        self.capture_enabled = capture
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def fits(self, lengths: list[int]) -> bool:
        return 0 < len(lengths) <= BATCH_BUCKETS[-1] and max(lengths) <= MAX_QUERY

    def _graph(self, nseqs: int, q: int, nblocks: int) -> _Graph:
        B = BATCH_BUCKETS[bisect.bisect_left(BATCH_BUCKETS, nseqs)]
        W = _bucket_width(nblocks)
        key = (B, q, W)
        g = self.graphs.get(key)
        if g is None:
            t = time.perf_counter()
            g = self.graphs[key] = _Graph(self.model, self.cache, B, q, W, self.pool, self.capture_enabled)
            log.info("captured CUDA graph batch=%d q=%d width=%d blocks in %.0f ms (%d graphs)", B, q, W,
                     (time.perf_counter() - t) * 1e3, len(self.graphs))
        return g

    def capture(self, batch_sizes: list[int], queries: list[int], max_len: int) -> int:
        """Capture ahead of time (a service's or a benchmark's warm-up) instead of on first use. Returns how many
        graphs exist."""
        for b in batch_sizes:
            for q in queries:
                if self.fits([q] * b):
                    self._graph(b, q, -(-max_len // self.cache.block_size))
        return len(self.graphs)

    def run(self, starts: list[int], lengths: list[int], tables: list[list[int]], tokens: list[list[int]]) -> GraphOutput:
        g = self._graph(len(starts), max(lengths), max(len(t) for t in tables))
        g.load(g.fill(starts, lengths, tables, tokens))
        g.replay()
        return GraphOutput(g.q, g.logits, g.argmax)

    def decode_fed(self, tokens: torch.Tensor, starts: list[int], active: list[bool],
                   tables: list[list[int]]) -> torch.Tensor:
        """One decode step whose input tokens are already on the device (the previous step's argmax). Inactive
        sequences keep their slot (static shape) but write to scratch and are not attended. Returns [len(starts)]."""
        n = len(starts)
        g = self._graph(n, 1, max(len(t) for t in tables))
        host = g.fill(starts, [1] * n, tables, None)
        off = 3 * g.B * g.q
        q_lens = host[off + 2 * g.B: off + 3 * g.B]
        slots = host[2 * g.B * g.q: 3 * g.B * g.q]
        idle = np.flatnonzero(~np.asarray(active))
        q_lens[idle] = 0
        slots[idle] = g.scratch
        g.load(host)
        g.tokens[:n].copy_(tokens)
        g.replay()
        return g.argmax[:n].clone()
