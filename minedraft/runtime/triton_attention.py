"""A Triton paged-attention kernel for the GPU path: one kernel for decode, verify and extend/prefill.

Why a kernel of our own instead of the gather + SDPA path in `attention.py`:

* One launch covers every sequence of a step whatever it appends (1 token for decode, k+1 for verifying k drafts, a
  long chunk for an extend), reading keys straight from the existing page layout through the block table. Nothing is
  gathered into a padded copy and nothing is padded to the longest sequence: each program walks only the key tiles
  its own query rows may see (causal bound, and the sliding-window lower bound when there is one).
* GQA is native: a program owns one (sequence, kv head) pair and a tile of its (query token, head-in-group) rows, so
  each K/V tile is loaded once for the whole group instead of once per query head.
* It is CUDA-graph capturable: the grid is (B, Hkv, cdiv(max_q * group, BLOCK_M) * splits) with B, Hkv, max_q and
  the split-KV factor all host integers (splits comes from the block-table width), so a launch never reads a device
  value. Per-step data (block tables, lengths, row starts) are device tensors the kernel reads; a captured graph
  replays with new contents in the same buffers.
* Few programs (one long sequence decoding: B * Hkv programs) would leave most of the GPU idle, so such steps split
  each key range over several programs and merge the partial softmaxes in a second small kernel (flash-decoding).

Layout (the one `PagedKVCache` and `CausalLM.forward` use): k_cache/v_cache are [slots, Hkv, D] views of one
[layers, 2, slots, Hkv, D] pool (each contiguous within, not as a pair; strides are passed), and
slot = block_table[b, pos // block_size] * block_size + pos % block_size. The keys of this step's new tokens are
already written when the kernel runs, so a sequence's keys are positions [0, seq_len).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _attend_key_tiles(acc, m_i, l_i, q, qpos, start, end, hi, bt_row, k_head, v_head,
                      stride_ks, stride_vs, qk_scale, window, offs_d, d_ok,
                      MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_F32_IEEE: tl.constexpr):
    """Online-softmax update of (acc, m, l) with the key tiles starting at start, start + BLOCK_N, ... < end.
    Keys at positions >= hi are never loaded (nor their block-table entries). MASKED=False is for tiles every row
    sees in full (below the causal diagonal, inside the window): no score mask."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < hi
        block = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE

        k = tl.load(k_head + slot[:, None] * stride_ks + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        kt = tl.trans(k)
        if DOT_F32_IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        if MASKED:
            visible = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
            if USE_WINDOW:
                visible = visible & (offs_n[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_head + slot[:, None] * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32_IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Out, BlockTables, SeqLens, QStarts, QLens,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_bt,
    qk_scale,  # 1/sqrt(D) * log2(e): scores live in the log2 domain so the softmax uses exp2
    window,  # sliding window W (only read when USE_WINDOW)
    num_splits,  # programs sharing one tile's key range (split-KV); 1 = write the output directly
    Part,  # split-KV partials (only touched when SPLIT): see _combine_splits_kernel
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32_IEEE: tl.constexpr,
):
    """One program = one sequence b, one kv head, one tile of BLOCK_M query rows.

    A tile row r stands for the pair (query token j = r // GROUP, query head kvh * GROUP + r % GROUP): token-major,
    so a tile holds consecutive tokens with all the heads that share this kv head, and one tile of BLOCK_N keys
    (K and V loaded as [BLOCK_N, BLOCK_D], S = Q K^T) serves every row. Keys are walked in tiles of
    BLOCK_N positions from the window's lower bound up to the last position the tile's last token may see; a key
    tile may span several pages, so each key's slot is looked up in the block table. Flash-attention online
    softmax: running max m, running sum l and the output accumulator are kept in fp32 and rescaled per key tile.
    Masked scores are -inf while m starts finite, so a row that sees nothing yet in a tile adds exactly zero.

    Split-KV (SPLIT): with few (sequence, kv head, tile) programs, e.g. one long sequence decoding, the GPU would sit
    mostly idle, so the tile's key range is cut into num_splits contiguous chunks (multiples of BLOCK_N), one per
    program; each writes its unnormalised accumulator with its m and l, and _combine_splits_kernel merges them.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits

    q_len = tl.load(QLens + b)
    n_rows = q_len * GROUP
    row_first = tile * BLOCK_M
    if row_first >= n_rows:  # padding sequence (q_len 0) or a tile past this sequence's queries
        return
    seq_len = tl.load(SeqLens + b)
    q_start = tl.load(QStarts + b)
    ctx = seq_len - q_len  # absolute position of query 0

    rows = row_first + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = rows < n_rows
    qpos = ctx + tok  # absolute position of each row's query
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_rows = (q_start + tok).to(tl.int64)
    q_ptrs = Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Key range this tile needs: causal bound from its last valid token, window bound from its first.
    row_last = tl.minimum(row_first + BLOCK_M, n_rows) - 1
    hi = tl.minimum(ctx + row_last // GROUP + 1, seq_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + row_first // GROUP - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N

    # Three runs of key tiles: [lo, full_lo) and [full_hi, hi) hold the window's lower edge and the causal
    # diagonal, where rows see different keys and scores are masked; every row of the tile sees every key of the
    # tiles in [full_lo, full_hi), which skip the mask. All bounds are lo + a multiple of BLOCK_N.
    pos_first = ctx + row_first // GROUP
    pos_last = ctx + row_last // GROUP
    full_hi = lo + tl.maximum(pos_first + 1 - lo, 0) // BLOCK_N * BLOCK_N
    full_lo = lo
    if USE_WINDOW:
        full_lo = tl.minimum(lo + tl.cdiv(tl.maximum(pos_last - window + 1 - lo, 0), BLOCK_N) * BLOCK_N, full_hi)
    if SPLIT:  # this program's chunk of the range
        chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)  # a split past the range gets lo >= hi: no iterations, l = 0
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTables + b.to(tl.int64) * stride_bt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    acc, m_i, l_i = _attend_key_tiles(acc, m_i, l_i, q, qpos, lo, full_lo, hi, bt_row, k_head, v_head,
                                      stride_ks, stride_vs, qk_scale, window, offs_d, d_ok,
                                      True, USE_WINDOW, BLOCK_SIZE, BLOCK_N, DOT_F32_IEEE)
    acc, m_i, l_i = _attend_key_tiles(acc, m_i, l_i, q, qpos, full_lo, full_hi, hi, bt_row, k_head, v_head,
                                      stride_ks, stride_vs, qk_scale, window, offs_d, d_ok,
                                      False, USE_WINDOW, BLOCK_SIZE, BLOCK_N, DOT_F32_IEEE)
    acc, m_i, l_i = _attend_key_tiles(acc, m_i, l_i, q, qpos, full_hi, hi, hi, bt_row, k_head, v_head,
                                      stride_ks, stride_vs, qk_scale, window, offs_d, d_ok,
                                      True, USE_WINDOW, BLOCK_SIZE, BLOCK_N, DOT_F32_IEEE)

    if SPLIT:
        # Part holds, per partial row (split, b, kvh, tile, row), the fp32 accumulator [BLOCK_D] in its first
        # n * BLOCK_D elements, then m [n], then l [n], with n = num_splits * B * Hkv * tiles * BLOCK_M.
        n = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2) * BLOCK_M
        tiles = tl.num_programs(2) // num_splits
        part = ((split * tl.num_programs(0) + b) * tl.num_programs(1) + kvh) * tiles + tile
        prow = part.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(Part + prow[:, None] * BLOCK_D + offs_d[None, :], acc)
        tl.store(Part + n * BLOCK_D + prow, m_i)
        tl.store(Part + n * (BLOCK_D + 1) + prow, l_i)
    else:
        # Every valid row sees at least its own key, so l > 0 there; the guard only keeps invalid rows finite.
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_i[:, None]
        o_ptrs = Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_splits_kernel(
    Out, QStarts, QLens, Part, stride_ot, stride_oh, num_splits,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the split-KV partials of one (sequence, kv head, row tile), same grid as the attention kernel without
    the split factor: o = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s with m = max_s m_s. A split that saw no key
    has l_s = 0, acc_s = 0 and m_s = -1e30, so it weighs nothing."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    q_len = tl.load(QLens + b)
    row_first = tile * BLOCK_M
    if row_first >= q_len * GROUP:
        return
    q_start = tl.load(QStarts + b)
    rows = row_first + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = rows < q_len * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    per_split = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)  # tiles per split
    n = per_split * num_splits * BLOCK_M  # partial rows (layout: see the end of _paged_attention_kernel)
    first = (b * tl.num_programs(1) + kvh) * tl.num_programs(2) + tile
    m = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        prow = (s * per_split + first).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_s = tl.load(Part + n * BLOCK_D + prow)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)
        l = l * alpha + tl.load(Part + n * (BLOCK_D + 1) + prow) * beta
        acc = acc * alpha[:, None] + tl.load(Part + prow[:, None] * BLOCK_D + offs_d[None, :]) * beta[:, None]
        m = m_new
    l = tl.where(l > 0.0, l, 1.0)
    o = acc / l[:, None]
    q_rows = (q_start + tok).to(tl.int64)
    o_ptrs = Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# Split-KV: aim for this many programs when a step alone would launch fewer (H100: 132 SMs, ~2 waves), giving each
# split at least MIN_SPLIT_KEYS keys of the longest possible sequence (host bound: block-table width * block size).
TARGET_PROGRAMS = 256
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 32


def tile_config(rows: int, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a step whose sequences have up to `rows` (token, head) rows per
    kv head. Decode/verify rows fit one 16- or 32-row tile (tl.dot needs 16); long extends take 64-row tiles.
    On an H100 (bf16, D=128) 128-row tiles, 8 warps, 3 stages or 32/128-key tiles measured no faster for prefill."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, 4, 2


def num_kv_splits(programs: int, max_keys: int) -> int:
    """How many programs share each tile's key range, from host-side numbers only (graph-capturable)."""
    if programs >= TARGET_PROGRAMS // 2:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, programs), max_keys // MIN_SPLIT_KEYS))


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, q_starts: torch.Tensor, q_lens: torch.Tensor, max_q: int,
                           block_size: int, sliding_window: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of packed queries over a paged KV cache.

    q: [T, H, D] (fp32/fp16/bf16); k_cache, v_cache: [slots, Hkv, D] with H a multiple of Hkv;
    block_tables: [B, max_blocks] int32; seq_lens, q_starts, q_lens: [B] int32 device tensors.
    Sequence b has seq_lens[b] keys (this step's included); its query j < q_lens[b] is row q_starts[b] + j at
    position seq_lens[b] - q_lens[b] + j and sees keys at positions <= its own (and > position - sliding_window).
    q_lens[b] == 0 marks a padding sequence. max_q (host int) must bound every q_lens[b] (queries past it are not
    computed): the grid is sized from it, never from device values, so the launch can be captured in a CUDA graph.
    Every tensor needs a contiguous last dimension; fp32 inputs use exact fp32 dots (no TF32).
    Returns out ([T, H, D], q's dtype); rows no sequence owns are left untouched.
    """
    T, H, D = q.shape
    num_slots, Hkv, Dk = k_cache.shape
    B = block_tables.shape[0]
    if Dk != D or tuple(v_cache.shape) != (num_slots, Hkv, D):
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} kv heads")
    if not (seq_lens.shape[0] == q_starts.shape[0] == q_lens.shape[0] == B):
        raise ValueError("seq_lens, q_starts, q_lens and block_tables must agree on the batch size")
    if out is None:
        out = torch.empty_like(q)
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, out)) or block_tables.stride(-1) != 1:
        raise ValueError("q, the caches, out and block_tables need a contiguous last dimension")
    if B == 0 or max_q <= 0 or T == 0:
        return out
    group = H // Hkv
    rows = max_q * group
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, num_warps, num_stages = tile_config(rows, block_d)
    tiles = triton.cdiv(rows, block_m)
    max_keys = block_tables.shape[1] * block_size
    if sliding_window is not None:
        max_keys = min(max_keys, sliding_window + max_q + block_n)
    splits = num_kv_splits(B * Hkv * tiles, max_keys)
    n_part = splits * B * Hkv * tiles * block_m
    part = torch.empty(n_part * (block_d + 2), dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_attention_kernel[(B, Hkv, tiles * splits)](
        q, k_cache, v_cache, out, block_tables, seq_lens, q_starts, q_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        (1.0 / math.sqrt(D)) * 1.4426950408889634,
        sliding_window if sliding_window is not None else 0,
        splits, part,
        HEAD_DIM=D, GROUP=group, BLOCK_SIZE=block_size, USE_WINDOW=sliding_window is not None,
        SPLIT=splits > 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_F32_IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _combine_splits_kernel[(B, Hkv, tiles)](
            out, q_starts, q_lens, part, out.stride(0), out.stride(1), splits,
            HEAD_DIM=D, GROUP=group, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )
    return out
