"""Attention over a paged KV cache for a batch of sequences that each append a different number of tokens.

The packed layout (all new tokens of all sequences in one [T] axis) keeps the linear layers dense; attention alone
needs the per-sequence view. Two backends read the same step description:

- "triton" (the default on a GPU): one paged kernel (`triton_attention.py`) reads keys straight through each
  sequence's block table; decode, verify and extend are one launch, GQA native, no padding to the longest sequence.
- "sdpa" (CPU, and any device without Triton): gather each sequence's cached keys through its block table into a
  padded [B, Hkv, L, D] tensor and call torch SDPA with a position mask. Padding is per group: sequences appending a
  few tokens (decode, verify) share one SDPA call, while each long append (a prefill riding in the same step) gets
  its own, since padding every decoding sequence to a 400-token prompt would multiply its attention work.

Sync-free by construction: everything the step needs (tokens, positions, write slots, block tables, query spans, the
SDPA gather indices) is built on the host with numpy into ONE int32 buffer that reaches the device in one
non-blocking copy from pinned memory. Nothing here reads a device value back (no boolean-mask indexing, no
`.item()`), so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SHORT_APPEND = 16  # sequences appending at most this many tokens share one padded SDPA call
BACKENDS = ("auto", "sdpa", "triton")


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' = the Triton kernel on CUDA when triton imports, SDPA everywhere else."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "sdpa"
        return "triton"
    return name


class HostPack:
    """Named int32 arrays gathered on the host and moved to the device in a single copy."""

    def __init__(self):
        self._parts: list[tuple[str, np.ndarray]] = []

    def add(self, name: str, values) -> None:
        self._parts.append((name, np.asarray(values, dtype=np.int32)))

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        flat = np.concatenate([a.ravel() for _, a in self._parts]) if self._parts else np.zeros(0, np.int32)
        buf = torch.from_numpy(flat)
        if device.type == "cuda":
            # The caching host allocator recycles pinned blocks once their copy has completed, so this is cheap.
            buf = buf.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            buf = buf.to(device)
        out, at = {}, 0
        for name, a in self._parts:
            out[name] = buf[at: at + a.size].view(a.shape)
            at += a.size
        return out


@dataclass
class SdpaGroup:
    query_index: torch.Tensor  # [B, Qmax] packed row of each (sequence, query); padding points at row 0
    query_pos: torch.Tensor  # [B, Qmax] absolute position of each query; padding sits at 0 (attends key 0: no NaN)
    valid: torch.Tensor  # [n] flat indices into [B * Qmax] of the real queries, in packed-row order
    rows: torch.Tensor | None  # [n] their packed rows; None when the group is the whole step in packed order
    kv_slots: torch.Tensor  # [B, Lmax] cache slot of each (sequence, key position); padding points at slot 0


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T] absolute position of every packed new token
    write_slots: torch.Tensor  # [T] cache slot each new token's k/v goes to
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] keys per sequence after this step's append
    q_starts: torch.Tensor  # [B] packed row of each sequence's first new token
    q_lens: torch.Tensor  # [B] new tokens per sequence
    max_q: int  # host-side bound of q_lens (sizes the Triton grid without reading the device)
    block_size: int
    sliding_window: int | None
    backend: str = "sdpa"
    groups: list[SdpaGroup] = field(default_factory=list)

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], block_tables: list[list[int]], block_size: int,
              sliding_window: int | None, device: torch.device, backend: str = "sdpa") -> "AttentionBatch":
        """Packed layout. starts[b]: position of sequence b's first new token (its cached length after rollback);
        lengths[b]: how many new tokens it appends."""
        pack = HostPack()
        plan = plan_packed(pack, starts, lengths, block_tables, block_size, backend)
        return cls.from_pack(pack.to(device), plan, block_size, sliding_window, backend)

    @classmethod
    def from_pack(cls, t: dict[str, torch.Tensor], plan: "StepPlan", block_size: int, sliding_window: int | None,
                  backend: str) -> "AttentionBatch":
        groups = [SdpaGroup(t[f"g{i}.query_index"], t[f"g{i}.query_pos"], t[f"g{i}.valid"],
                            t.get(f"g{i}.rows"), t[f"g{i}.kv_slots"]) for i in range(plan.num_groups)]
        return cls(t["positions"], t["write_slots"], t["block_tables"], t["seq_lens"], t["q_starts"], t["q_lens"],
                   plan.max_q, block_size, sliding_window, backend, groups)


@dataclass
class StepPlan:
    max_q: int
    num_groups: int  # SDPA groups (0 for the Triton backend)


def block_table_array(block_tables: list[list[int]], width: int | None = None) -> np.ndarray:
    width = max(1, max((len(t) for t in block_tables), default=1)) if width is None else width
    table = np.zeros((len(block_tables), width), dtype=np.int32)
    for b, t in enumerate(block_tables):
        table[b, : len(t)] = t
    return table


def plan_packed(pack: HostPack, starts: list[int], lengths: list[int], block_tables: list[list[int]],
                block_size: int, backend: str) -> StepPlan:
    """Add the packed step's attention metadata to `pack` (positions, write slots, block tables, spans and, for
    SDPA, the per-group gather indices)."""
    start = np.asarray(starts, dtype=np.int64)
    n_new = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(n_new)))
    table = block_table_array(block_tables)
    owner = np.repeat(np.arange(len(lengths)), n_new)  # sequence of each packed row
    positions = start[owner] + np.arange(offsets[-1]) - offsets[:-1][owner]
    write_slots = table[owner, positions // block_size] * block_size + positions % block_size
    pack.add("positions", positions)
    pack.add("write_slots", write_slots)
    pack.add("block_tables", table)
    pack.add("seq_lens", start + n_new)
    pack.add("q_starts", offsets[:-1])
    pack.add("q_lens", n_new)
    max_q = int(n_new.max()) if len(n_new) else 0
    if backend != "sdpa":
        return StepPlan(max_q, 0)
    short = [b for b, n in enumerate(lengths) if n <= SHORT_APPEND]
    members = ([short] if short else []) + [[b] for b, n in enumerate(lengths) if n > SHORT_APPEND]
    whole = len(members) == 1  # one group holding every sequence: its valid queries come out in packed order
    for i, seqs in enumerate(members):
        _plan_group(pack, f"g{i}", np.asarray(seqs), start, n_new, offsets, table, block_size, whole)
    return StepPlan(max_q, len(members))


def _plan_group(pack, name, seqs, start, n_new, offsets, table, block_size, whole) -> None:
    s, n, off = start[seqs], n_new[seqs], offsets[:-1][seqs]
    qmax = int(n.max())
    lmax = int((s + n).max())
    j = np.arange(qmax)
    query_valid = j[None, :] < n[:, None]
    pack.add(f"{name}.query_index", np.where(query_valid, off[:, None] + j[None, :], 0))
    pack.add(f"{name}.query_pos", np.where(query_valid, s[:, None] + j[None, :], 0))
    pack.add(f"{name}.valid", np.flatnonzero(query_valid))
    if not whole:
        pack.add(f"{name}.rows", (off[:, None] + j[None, :])[query_valid])
    nblk = -(-lmax // block_size)
    slots = (table[seqs, :nblk, None] * block_size + np.arange(block_size)).reshape(len(seqs), -1)[:, :lmax]
    pack.add(f"{name}.kv_slots", slots)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D] packed queries (keys for them already written to the cache); caches: [slots, Hkv, D].
    Returns [T, H, D]."""
    if batch.backend == "triton":
        from minedraft.runtime.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.q_starts,
                                      batch.q_lens, batch.max_q, batch.block_size, batch.sliding_window)
    if len(batch.groups) == 1 and batch.groups[0].rows is None:
        return _attend(q, k_cache, v_cache, batch.groups[0], batch.sliding_window)
    out = torch.empty_like(q)
    for g in batch.groups:
        out[g.rows] = _attend(q, k_cache, v_cache, g, batch.sliding_window)
    return out


def _attend(q, k_cache, v_cache, g: SdpaGroup, sliding_window: int | None) -> torch.Tensor:
    B, qmax = g.query_index.shape
    lmax = g.kv_slots.shape[1]
    qp = q[g.query_index].transpose(1, 2)  # [B, H, Qmax, D]
    k = k_cache[g.kv_slots].transpose(1, 2)  # [B, Hkv, Lmax, D]
    v = v_cache[g.kv_slots].transpose(1, 2)
    kpos = torch.arange(lmax, device=q.device)
    qpos = g.query_pos[:, :, None]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2).reshape(B * qmax, o.shape[1], o.shape[3])[g.valid]  # in packed-row order
