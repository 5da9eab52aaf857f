"""ModelRunner: one model plus its KV cache, driven by 'write these tokens at these positions' requests.

Both model services use it the same way: the verifier extends each sequence by its last accepted token plus the
drafts and reads logits at every appended position; the drafter extends by one token (two after a fully accepted
draft, the catch-up) and reads the last. A write that starts before a sequence's cached length is a rollback:
positions from `start` on are simply overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minedraft.runtime.attention import AttentionBatch
from minedraft.runtime.kv_cache import CacheFull, PagedKVCache
from minedraft.runtime.model import CausalLM


@dataclass
class Extend:
    seq_id: str
    start: int  # position of tokens[0]; the sequence keeps its cached positions [0, start)
    tokens: list[int]
    all_logits: bool = False  # logits for every new token (verify) or just the last (draft, prefill)


class ModelRunner:
    def __init__(self, model: CausalLM, max_cached_tokens: int, block_size: int = 16):
        a = model.arch
        self.model = model
        self.cache = PagedKVCache(a.num_layers, a.num_kv_heads, a.head_dim, -(-max_cached_tokens // block_size),
                                  block_size, model.dtype, model.device)

    @property
    def arch(self):
        return self.model.arch

    def length(self, seq_id: str) -> int:
        return self.cache.length(seq_id)

    def validate(self, items: list[Extend]) -> None:
        """Raise ValueError (a caller's mistake) or CacheFull (no room now) before touching any state."""
        seen = set()
        a = self.arch
        for it in items:
            if it.seq_id in seen:
                raise ValueError(f"sequence {it.seq_id!r} appears twice in one step")
            seen.add(it.seq_id)
            if not it.tokens:
                raise ValueError(f"sequence {it.seq_id!r}: no tokens to append")
            cached = self.cache.length(it.seq_id)
            if not 0 <= it.start <= cached:
                raise ValueError(f"sequence {it.seq_id!r}: start {it.start} outside its cached length {cached}")
            end = it.start + len(it.tokens)
            if end > a.max_position:
                raise ValueError(f"sequence {it.seq_id!r}: length {end} exceeds the model context {a.max_position}")
            if min(it.tokens) < 0 or max(it.tokens) >= a.vocab_size:
                raise ValueError(f"sequence {it.seq_id!r}: token id outside vocabulary [0, {a.vocab_size})")
        if not self.cache.can_fit({it.seq_id: it.start + len(it.tokens) for it in items}):
            raise CacheFull(f"KV cache full ({self.cache.free_blocks} of {self.cache.num_blocks} blocks free)")

    def step(self, items: list[Extend]) -> list[torch.Tensor]:
        """Append every item's tokens in one forward. Returns, per item, logits [len(tokens) or 1, vocab]."""
        if not items:
            return []
        self.validate(items)
        tables = [self.cache.resize(it.seq_id, it.start + len(it.tokens)) for it in items]
        device = self.model.device
        batch = AttentionBatch.build([it.start for it in items], [len(it.tokens) for it in items], tables,
                                     self.cache.block_size, self.arch.sliding_window, device)
        flat = torch.tensor([t for it in items for t in it.tokens], dtype=torch.long, device=device)
        rows, spans, end = [], [], 0
        for it in items:
            n = len(it.tokens)
            take = range(end, end + n) if it.all_logits else range(end + n - 1, end + n)
            spans.append((len(rows), len(rows) + len(take)))
            rows.extend(take)
            end += n
        logits = self.model.forward(flat, batch, self.cache.kv, torch.tensor(rows, device=device))
        return [logits[a:b] for a, b in spans]

    def truncate(self, seq_id: str, length: int) -> None:
        if length > self.cache.length(seq_id):
            raise ValueError(f"cannot truncate {seq_id!r} to {length}: only {self.cache.length(seq_id)} cached")
        self.cache.resize(seq_id, length)

    def release(self, seq_id: str) -> bool:
        return self.cache.free(seq_id)

    def release_all(self) -> int:
        ids = list(self.cache.seqs)
        for s in ids:
            self.cache.free(s)
        return len(ids)


__all__ = ["CacheFull", "Extend", "ModelRunner"]
