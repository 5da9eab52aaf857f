"""Attention over a paged KV cache for a batch of sequences that each append a different number of tokens.

The packed layout (all new tokens of all sequences in one [T] axis) keeps the linear layers dense; attention alone
needs the per-sequence view, which we build by gathering each sequence's cached keys through its block table into a
padded [B, Hkv, L, D] tensor and masking by position. That is what torch SDPA accepts on every device; a fused
paged kernel (Triton) can replace `paged_attention` on GPU without touching anything else.

Padding is per group: sequences appending a few tokens (decode, verify) share one SDPA call, while each long append
(a prefill riding in the same step) gets its own. Padding all queries to a 400-token prompt would multiply the
attention work of every decoding sequence by the prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHORT_APPEND = 16  # sequences appending at most this many tokens share one padded attention call


@dataclass
class AttentionGroup:
    query_index: torch.Tensor  # [B, Qmax] packed row of each (sequence, query) pair; padding points at row 0
    query_valid: torch.Tensor  # [B, Qmax] bool
    rows: torch.Tensor  # [valid queries] packed rows, in query_index[query_valid] order
    kv_slots: torch.Tensor  # [B, Lmax] cache slot of each (sequence, key position); padding points at slot 0
    mask: torch.Tensor  # [B, 1, Qmax, Lmax] bool, True = may attend


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T] absolute position of every packed new token
    write_slots: torch.Tensor  # [T] cache slot each new token's k/v goes to
    groups: list[AttentionGroup]

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], block_tables: list[list[int]], block_size: int,
              sliding_window: int | None, device: torch.device) -> "AttentionBatch":
        """starts[b]: position of sequence b's first new token (its cached length after rollback);
        lengths[b]: how many new tokens it appends."""
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        positions, write_slots, groups = [], [], []
        short = [b for b, n in enumerate(lengths) if n <= SHORT_APPEND]
        members = ([short] if short else []) + [[b] for b, n in enumerate(lengths) if n > SHORT_APPEND]
        for seqs in members:
            g, pos, slots = _group([starts[b] for b in seqs], [lengths[b] for b in seqs], [offsets[b] for b in seqs],
                                   [block_tables[b] for b in seqs], block_size, sliding_window, device)
            groups.append(g)
            positions.append(pos)
            write_slots.append(slots)
        # Positions and write slots are per packed row; groups listed them group by group.
        rows = torch.cat([g.rows.cpu() for g in groups])
        order = torch.empty_like(rows)
        order[rows] = torch.arange(len(rows))
        positions = torch.cat(positions)[order]
        write_slots = torch.cat(write_slots)[order]
        return cls(positions.to(device), write_slots.to(device), groups)


def _group(starts, lengths, offsets, block_tables, block_size, sliding_window, device):
    B = len(starts)
    qmax = max(lengths)
    lmax = max(s + n for s, n in zip(starts, lengths))
    start = torch.tensor(starts, dtype=torch.long)
    n_new = torch.tensor(lengths, dtype=torch.long)
    j = torch.arange(qmax)
    query_valid = j[None, :] < n_new[:, None]
    query_index = torch.where(query_valid, torch.tensor(offsets)[:, None] + j[None, :], 0)
    qpos = start[:, None] + j[None, :]  # [B, Qmax]

    nblk = max(len(t) for t in block_tables)
    table = torch.zeros(B, nblk, dtype=torch.long)
    for b, t in enumerate(block_tables):
        table[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    all_slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(B, -1)
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
    group = AttentionGroup(query_index.to(**to), query_valid.to(**to), query_index[query_valid].to(**to),
                           all_slots[:, :lmax].to(**to), mask[:, None].to(**to))
    return group, positions, write_slots


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D] packed queries (keys for them already written to the cache); caches: [slots, Hkv, D].
    Returns [T, H, D]."""
    if len(batch.groups) == 1:
        return _attend(q, k_cache, v_cache, batch.groups[0])
    out = torch.empty_like(q)
    for g in batch.groups:
        out[g.rows] = _attend(q, k_cache, v_cache, g)
    return out


def _attend(q, k_cache, v_cache, g: AttentionGroup) -> torch.Tensor:
    qp = q[g.query_index].transpose(1, 2)  # [B, H, Qmax, D]
    k = k_cache[g.kv_slots].transpose(1, 2)  # [B, Hkv, Lmax, D]
    v = v_cache[g.kv_slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=g.mask, enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2)[g.query_valid]  # rows in g.rows order
