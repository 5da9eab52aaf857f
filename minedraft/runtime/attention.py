"""Attention over a paged KV cache for a batch of sequences that each append a different number of tokens.

The packed layout (all new tokens of all sequences in one [T] axis) keeps the linear layers dense; attention alone
needs the per-sequence view, which we build by gathering each sequence's cached keys through its block table into a
padded [B, Hkv, L, D] tensor and masking by position. That is what torch SDPA accepts on every device; a fused
paged kernel (Triton) can replace `paged_attention` on GPU without touching anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T] absolute position of every packed new token
    write_slots: torch.Tensor  # [T] cache slot each new token's k/v goes to
    query_index: torch.Tensor  # [B, Qmax] packed row of each (sequence, query) pair; padding points at row 0
    query_valid: torch.Tensor  # [B, Qmax] bool
    kv_slots: torch.Tensor  # [B, Lmax] cache slot of each (sequence, key position); padding points at slot 0
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = may attend

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], block_tables: list[list[int]], block_size: int,
              sliding_window: int | None, device: torch.device) -> "AttentionBatch":
        """starts[b]: position of sequence b's first new token (its cached length after rollback);
        lengths[b]: how many new tokens it appends."""
        B = len(starts)
        qmax, ctx = max(lengths), [s + n for s, n in zip(starts, lengths)]
        lmax = max(ctx)
        start = torch.tensor(starts, dtype=torch.long)
        n_new = torch.tensor(lengths, dtype=torch.long)
        j = torch.arange(qmax)
        query_valid = j[None, :] < n_new[:, None]
        offsets = torch.cumsum(n_new, 0) - n_new
        query_index = torch.where(query_valid, offsets[:, None] + j[None, :], 0)
        qpos = start[:, None] + j[None, :]  # [B, Qmax]

        nblk = max(len(t) for t in block_tables)
        table = torch.zeros(B, nblk, dtype=torch.long)
        for b, t in enumerate(block_tables):
            table[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        all_slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(B, -1)
        kv_slots = all_slots[:, :lmax]
        kpos = torch.arange(lmax)
        mask = kpos[None, None, :] <= qpos[:, :, None]
        if sliding_window is not None:
            mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
        # Padded query rows attend to key 0 only: a fully masked row would make SDPA return NaN.
        mask &= query_valid[:, :, None]
        mask[:, :, 0] |= ~query_valid
        positions = qpos[query_valid]
        write_slots = all_slots.gather(1, qpos.clamp(max=all_slots.shape[1] - 1))[query_valid]
        to = dict(device=device)
        return cls(positions.to(**to), write_slots.to(**to), query_index.to(**to), query_valid.to(**to),
                   kv_slots.to(**to), mask[:, None].to(**to))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D] packed queries (keys for them already written to the cache); caches: [slots, Hkv, D].
    Returns [T, H, D]."""
    qp = q[batch.query_index].transpose(1, 2)  # [B, H, Qmax, D]
    k = k_cache[batch.kv_slots].transpose(1, 2)  # [B, Hkv, Lmax, D]
    v = v_cache[batch.kv_slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=batch.mask, enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2)[batch.query_valid]  # [T, H, D] in packed order
