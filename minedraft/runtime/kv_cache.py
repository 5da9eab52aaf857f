"""Paged KV cache: a fixed pool of blocks, a block table per sequence, and a length per sequence.

Position-indexed, as in gpt-fast: rolling a sequence back after rejected drafts is a rewind of its length (freeing
whole blocks past it); the stale k/v left in a kept block are overwritten by the next write and masked until then.
Capacity is bounded up front so admission can ask `can_fit` instead of discovering OOM mid-step.

One extra block past the pool is never handed out: the scratch block. Rows that exist only to give a step a static
shape (padding in a CUDA-graph bucket, sequences already done in an on-device draft loop) write their k/v there, so
they can never touch a live sequence's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class CacheFull(RuntimeError):
    """Not enough free blocks; callers map this to RESOURCE_EXHAUSTED."""


@dataclass
class SequenceSlots:
    length: int = 0
    blocks: list[int] = field(default_factory=list)


class PagedKVCache:
    """Fixed-size blocks of K/V for every layer in one tensor, a block table per sequence, and a free list; a
    sequence grows or shrinks by whole blocks, so rollback is setting its length."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One tensor for the whole pool plus the scratch block: [layers, k/v, slots, heads, dim].
        # Slot = block * block_size + offset.
        self.kv = torch.zeros(num_layers, 2, (num_blocks + 1) * block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)
        self.scratch_slot = num_blocks * block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self.seqs: dict[str, SequenceSlots] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: str, new_length: int) -> int:
        """Blocks that growing (or creating) seq_id to new_length would take from the pool."""
        have = len(self.seqs[seq_id].blocks) if seq_id in self.seqs else 0
        return max(0, self.blocks_for(new_length) - have)

    def can_fit(self, growth: dict[str, int]) -> bool:
        """growth: seq_id -> length it is about to reach. True if all of it fits at once."""
        return sum(self.extra_blocks(s, n) for s, n in growth.items()) <= len(self._free)

    def length(self, seq_id: str) -> int:
        return self.seqs[seq_id].length if seq_id in self.seqs else 0

    def resize(self, seq_id: str, new_length: int) -> list[int]:
        """Make seq_id hold exactly new_length positions (grow or rewind) and return its block table.
        Raises CacheFull, leaving the sequence unchanged, when the pool cannot supply the blocks."""
        seq = self.seqs.setdefault(seq_id, SequenceSlots())
        need = self.blocks_for(new_length)
        if need > len(seq.blocks):
            if need - len(seq.blocks) > len(self._free):
                if not seq.blocks:
                    del self.seqs[seq_id]
                raise CacheFull(f"KV cache full: need {need - len(seq.blocks)} blocks, {len(self._free)} free")
            seq.blocks.extend(self._free.pop() for _ in range(need - len(seq.blocks)))
        else:
            while len(seq.blocks) > need:
                self._free.append(seq.blocks.pop())
        seq.length = new_length
        return seq.blocks

    def free(self, seq_id: str) -> bool:
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        self._free.extend(reversed(seq.blocks))
        return True
