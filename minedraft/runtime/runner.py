"""ModelRunner: one model plus its KV cache, driven by 'write these tokens at these positions' requests.

Both model services use it the same way: the verifier extends each sequence by its last accepted token plus the
drafts and reads logits at every appended position; the drafter extends by one token (two after a fully accepted
draft, the catch-up) and reads the last. A write that starts before a sequence's cached length is a rollback:
positions from `start` on are simply overwritten.

A step costs the host one pass over the items (metadata into one pinned buffer, see attention.py), one copy to the
device and, for the caller, one copy back (`StepOutput.argmax`, or whatever the caller computes from the logits).
On a GPU with `cuda_graphs`, steps where every sequence appends a few tokens replay a captured graph
(cuda_graphs.py); `greedy_continue` runs a whole greedy draft loop on the device, feeding each argmax back without
a round trip to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minedraft.runtime.attention import AttentionBatch, HostPack, plan_packed, resolve_backend
from minedraft.runtime.kv_cache import CacheFull, PagedKVCache
from minedraft.runtime.model import CausalLM


@dataclass
class Extend:
    seq_id: str
    start: int  # position of tokens[0]; the sequence keeps its cached positions [0, start)
    tokens: list[int]
    all_logits: bool = False  # logits for every new token (verify) or just the last (draft, prefill)


@dataclass
class StepOutput:
    """Device tensors of one forward; valid until the runner's next step (graph outputs are reused)."""

    logits: torch.Tensor  # [rows, V] fp32
    argmax: torch.Tensor  # [rows] greedy token of each row
    spans: list[tuple[int, int]]  # per item: its rows [lo, hi) in logits / argmax

    def item_logits(self) -> list[torch.Tensor]:
        return [self.logits[lo:hi] for lo, hi in self.spans]


class ModelRunner:
    """One model and its paged KV cache, stepped by lists of Extend items; knows nothing of drafts or requests."""

    def __init__(self, model: CausalLM, max_cached_tokens: int, block_size: int = 16, attention: str = "auto",
                 cuda_graphs: bool = False):
        a = model.arch
        self.model = model
        self.cache = PagedKVCache(a.num_layers, a.num_kv_heads, a.head_dim, -(-max_cached_tokens // block_size),
                                  block_size, model.dtype, model.device)
        self.attention = resolve_backend(attention, model.device)
        self.graphs = None
        if cuda_graphs and model.device.type == "cuda":
            if self.attention != "triton":
                raise ValueError("CUDA graphs need the Triton attention backend (SDPA pads to a varying length)")
            from minedraft.runtime.cuda_graphs import GraphedForward

            self.graphs = GraphedForward(model, self.cache)

    @property
    def arch(self):
        return self.model.arch

    def length(self, seq_id: str) -> int:
        return self.cache.length(seq_id)

    def validate(self, items: list[Extend], extra: list[int] | None = None) -> None:
        """Raise ValueError (a caller's mistake) or CacheFull (no room now) before touching any state. `extra[i]`:
        positions item i will take beyond its tokens (an on-device draft loop)."""
        seen = set()
        a = self.arch
        extra = extra or [0] * len(items)
        for it, more in zip(items, extra):
            if it.seq_id in seen:
                raise ValueError(f"sequence {it.seq_id!r} appears twice in one step")
            seen.add(it.seq_id)
            if not it.tokens:
                raise ValueError(f"sequence {it.seq_id!r}: no tokens to append")
            cached = self.cache.length(it.seq_id)
            if not 0 <= it.start <= cached:
                raise ValueError(f"sequence {it.seq_id!r}: start {it.start} outside its cached length {cached}")
            end = it.start + len(it.tokens) + more
            if end > a.max_position:
                raise ValueError(f"sequence {it.seq_id!r}: length {end} exceeds the model context {a.max_position}")
            if min(it.tokens) < 0 or max(it.tokens) >= a.vocab_size:
                raise ValueError(f"sequence {it.seq_id!r}: token id outside vocabulary [0, {a.vocab_size})")
        if not self.cache.can_fit({it.seq_id: it.start + len(it.tokens) + m for it, m in zip(items, extra)}):
            raise CacheFull(f"KV cache full ({self.cache.free_blocks} of {self.cache.num_blocks} blocks free)")

    # ---- one forward -----------------------------------------------------------------------------------------------
    def forward(self, items: list[Extend]) -> StepOutput:
        """Append every item's tokens in one forward; logits and argmax stay on the device."""
        self.validate(items)
        tables = [self.cache.resize(it.seq_id, it.start + len(it.tokens)) for it in items]
        starts = [it.start for it in items]
        lengths = [len(it.tokens) for it in items]
        if self.graphs is not None and self.graphs.fits(lengths):
            out = self.graphs.run(starts, lengths, tables, [it.tokens for it in items])
            q = out.q
            spans = [(b * q, b * q + n) if it.all_logits else (b * q + n - 1, b * q + n)
                     for b, (it, n) in enumerate(zip(items, lengths))]
            return StepOutput(out.logits, out.argmax, spans)
        rows, spans, end = [], [], 0
        for it, n in zip(items, lengths):
            take = range(end, end + n) if it.all_logits else range(end + n - 1, end + n)
            spans.append((len(rows), len(rows) + len(take)))
            rows.extend(take)
            end += n
        pack = HostPack()
        pack.add("tokens", [t for it in items for t in it.tokens])
        pack.add("logit_rows", rows)
        plan = plan_packed(pack, starts, lengths, tables, self.cache.block_size, self.attention)
        t = pack.to(self.model.device)
        batch = AttentionBatch.from_pack(t, plan, self.cache.block_size, self.arch.sliding_window, self.attention)
        logit_rows = None if len(rows) == end else t["logit_rows"]
        logits = self.model.forward(t["tokens"], batch, self.cache.kv, logit_rows)
        return StepOutput(logits, logits.argmax(dim=-1), spans)

    def step(self, items: list[Extend]) -> list[torch.Tensor]:
        """Append every item's tokens in one forward. Returns, per item, logits [len(tokens) or 1, vocab]."""
        if not items:
            return []
        return self.forward(items).item_logits()

    # ---- greedy continuation on the device -------------------------------------------------------------------------
    def greedy_continue(self, items: list[Extend], steps: list[int],
                        min_confidence: list[float] | None = None) -> list[list[int]]:
        """Append each item's tokens, then generate steps[i] greedy tokens for it, feeding each argmax back on the
        device; one copy to the host at the end. The last generated token is not fed (its k/v is not cached), exactly
        as a loop of `step` calls would leave it. steps[i] == 0 only caches the item's tokens. With `min_confidence`,
        an item stops early once the product of its tokens' probabilities would fall below its threshold."""
        if not items:
            return []
        if min_confidence is not None:
            return self._greedy_until_unsure(items, steps, min_confidence)
        extra = [max(s - 1, 0) for s in steps]
        self.validate(items, extra)
        first = self.forward(items)  # resizes to start + len(tokens); validated the rest above
        if max(steps) <= 1:
            toks = first.argmax[[hi - 1 for _, hi in first.spans]].tolist() if max(steps) == 1 else []
            return [[toks[i]] if s else [] for i, s in enumerate(steps)]
        base = [it.start + len(it.tokens) for it in items]
        tables = [self.cache.resize(it.seq_id, b + e) for it, b, e in zip(items, base, extra)]
        pack = HostPack()
        pack.add("last_rows", [hi - 1 for _, hi in first.spans])
        nxt = first.argmax[pack.to(self.model.device)["last_rows"]]  # [B] draft 1 of every item
        outputs = [nxt]
        if self.graphs is not None and self.graphs.fits([1] * len(items)):
            for d in range(1, max(steps)):
                active = [s > d for s in steps]
                # A finished sequence keeps its slot but writes to scratch; any cached position will do as its own.
                pos = [b + d - 1 if a else b - 1 for b, a in zip(base, active)]
                nxt = self.graphs.decode_fed(nxt, pos, active, tables)
                outputs.append(nxt)
            drafted = torch.stack(outputs).tolist()  # [steps, B]
            return [[drafted[d][i] for d in range(s)] for i, s in enumerate(steps)]
        # Eager: sequences that have all their drafts drop out of later forwards.
        alive = list(range(len(items)))
        owners = [alive]
        for d in range(1, max(steps)):
            now = [i for i in alive if steps[i] > d]
            pack = HostPack()
            pack.add("feed", [alive.index(i) for i in now])
            plan = plan_packed(pack, [base[i] + d - 1 for i in now], [1] * len(now), [tables[i] for i in now],
                               self.cache.block_size, self.attention)
            t = pack.to(self.model.device)
            batch = AttentionBatch.from_pack(t, plan, self.cache.block_size, self.arch.sliding_window, self.attention)
            nxt = self.model.forward(nxt[t["feed"]], batch, self.cache.kv).argmax(dim=-1)
            outputs.append(nxt)
            owners.append(now)
            alive = now
        flat = torch.cat(outputs).tolist()
        drafted: list[list[int]] = [[] for _ in items]
        at = 0
        for now in owners:
            for i in now:
                if steps[i] > len(drafted[i]):
                    drafted[i].append(flat[at])
                at += 1
        return drafted

    def _greedy_until_unsure(self, items: list[Extend], steps: list[int], taus: list[float]) -> list[list[int]]:
        """greedy_continue with confidence stops: token j + 1 of an item is made only while the product of the top
        probabilities of its tokens 1..j+1 stays >= its tau (the first token always). The decision is taken on the
        host, so this costs one device-to-host copy per step (the price of stopping early)."""
        self.validate(items, [max(s - 1, 0) for s in steps])
        first = self.forward(items)
        top, best = first.logits[[hi - 1 for _, hi in first.spans]].float().softmax(-1).max(-1)
        drafted = [[t] if s else [] for t, s in zip(best.tolist(), steps)]
        confidence = top.tolist()
        base = [it.start + len(it.tokens) for it in items]
        alive = [i for i, s in enumerate(steps) if s > 1]
        for d in range(1, max(steps, default=0)):
            alive = [i for i in alive if steps[i] > d]
            if not alive:
                break
            out = self.forward([Extend(items[i].seq_id, base[i] + d - 1, [drafted[i][-1]]) for i in alive])
            top, best = out.logits.float().softmax(-1).max(-1)
            keep = []
            for i, p, t in zip(alive, top.tolist(), best.tolist()):
                if confidence[i] * p >= taus[i]:
                    confidence[i] *= p
                    drafted[i].append(t)
                    keep.append(i)
            alive = keep
        return drafted

    def capture_graphs(self, batch_sizes: list[int], queries: list[int], max_len: int) -> int:
        """Capture the CUDA graphs that steps of these batch sizes, query rows per sequence and lengths up to max_len
        will replay (no-op without graphs). Lazy capture on first use costs a step a few forwards."""
        return self.graphs.capture(batch_sizes, queries, max_len) if self.graphs is not None else 0

    # ---- lifetime --------------------------------------------------------------------------------------------------
    def release(self, seq_id: str) -> bool:
        return self.cache.free(seq_id)

    def release_all(self) -> int:
        ids = list(self.cache.seqs)
        for s in ids:
            self.cache.free(s)
        return len(ids)


__all__ = ["CacheFull", "Extend", "ModelRunner", "StepOutput"]
