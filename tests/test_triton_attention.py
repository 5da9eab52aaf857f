"""The Triton paged-attention kernel against (a) a plain per-sequence reference and (b) the gather + SDPA path.

Runs on CPU under the Triton interpreter (set before triton is imported). On a GPU machine the same cases run
against the compiled kernel with `TRITON_INTERPRET=0 pytest tests/test_triton_attention.py`.

Each sequence's keys and values are generated as plain per-position arrays first and only then scattered into a
shuffled set of pages, so the reference never looks at the cache: a wrong slot, block-table or head lookup in the
kernel shows up as a mismatch. Cache slots no sequence owns (and, in most cases, unowned query rows) hold NaN, so
reading one poisons the output.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from minedraft.runtime import triton_attention  # noqa: E402
from minedraft.runtime.triton_attention import num_kv_splits, paged_attention_triton  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] != "0"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
GARBAGE_BLOCK = 10**6  # block-table entries past a sequence's used blocks: reading one would go far out of bounds
SENTINEL = 7.0  # value of output rows no sequence owns; they must come back unchanged


@pytest.fixture(autouse=True, params=["direct", "split-kv"])
def kv_split(request, monkeypatch):
    """Every case runs twice: as launched for these tiny shapes (one program per tile writes the output), and with
    split-KV forced on (4 splits of 64-key chunks, so short sequences also get empty splits), which is what a long
    sequence decoding alone gets on the GPU."""
    if request.param == "split-kv":
        monkeypatch.setattr(triton_attention, "MIN_SPLIT_KEYS", 16)
        monkeypatch.setattr(triton_attention, "MAX_SPLITS", 4)
    return request.param


def test_split_choice(kv_split):
    if kv_split != "direct":
        pytest.skip("checks the default thresholds")
    assert num_kv_splits(programs=8, max_keys=4096) == 16  # one sequence decoding, 8 kv heads
    assert num_kv_splits(programs=8, max_keys=300) == 1  # too short to be worth a second launch
    assert num_kv_splits(programs=512, max_keys=1 << 20) == 1  # the batch already fills the GPU
    assert 1 < num_kv_splits(programs=2, max_keys=1 << 20) <= triton_attention.MAX_SPLITS


def make_case(specs, H, Hkv, D, block_size, dtype=torch.float32, *, seed=0, layout="packed", max_q=None,
              nan_poison=True, extra_blocks=3):
    """specs: [(seq_len, q_len)], seq_len counting this step's keys. Returns the kernel's inputs plus the logical
    per-sequence k/v the reference uses."""
    g = torch.Generator().manual_seed(seed)
    B = len(specs)
    max_q = max_q or max(n for _, n in specs)
    ks = [torch.randn(L, Hkv, D, generator=g).to(dtype) for L, _ in specs]
    vs = [torch.randn(L, Hkv, D, generator=g).to(dtype) for L, _ in specs]
    nblocks = [-(-L // block_size) for L, _ in specs]
    total = sum(nblocks) + extra_blocks
    perm = torch.randperm(total, generator=g).tolist()  # non-contiguous, shuffled pages
    tables, used = [], 0
    for n in nblocks:
        tables.append(perm[used:used + n])
        used += n
    # One pool [layers, k/v, slots, Hkv, D] as PagedKVCache holds it; the kernel gets layer 1's non-contiguous views.
    shape = (2, 2, total * block_size, Hkv, D)
    if nan_poison:
        pool = torch.full(shape, float("nan"), dtype=dtype)
    else:  # the SDPA path gathers (and multiplies by zero) slots past a sequence's end: NaN would leak through it
        pool = (100 * torch.randn(shape, generator=g)).to(dtype)
    for b, (L, _) in enumerate(specs):
        pos = torch.arange(L)
        slots = torch.tensor(tables[b], dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        pool[1, 0, slots] = ks[b]
        pool[1, 1, slots] = vs[b]
    width = max([len(t) for t in tables] + [1]) + 2
    block_tables = torch.full((B, width), GARBAGE_BLOCK, dtype=torch.int32)
    for b, t in enumerate(tables):
        block_tables[b, : len(t)] = torch.tensor(t, dtype=torch.int32)

    q_lens = [n for _, n in specs]
    if layout == "packed":
        q_starts = [sum(q_lens[:b]) for b in range(B)]
        T = sum(q_lens) + 2  # two trailing rows nobody owns
    else:  # padded: sequence b owns rows [b * max_q, b * max_q + q_len)
        q_starts = [b * max_q for b in range(B)]
        T = B * max_q
    q = torch.randn(T, H, D, generator=g).to(dtype)
    owned = torch.zeros(T, dtype=torch.bool)
    for s, n in zip(q_starts, q_lens):
        owned[s:s + n] = True
    if nan_poison:
        q[~owned] = float("nan")
    pool, q, block_tables = pool.to(DEVICE), q.to(DEVICE), block_tables.to(DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return dict(q=q, pool=pool, k_cache=pool[1, 0], v_cache=pool[1, 1], block_tables=block_tables,
                tables=tables, seq_lens=torch.tensor([L for L, _ in specs], **i32),
                q_starts=torch.tensor(q_starts, **i32), q_lens=torch.tensor(q_lens, **i32), max_q=max_q,
                block_size=block_size, specs=specs, starts=q_starts, owned=owned, ks=ks, vs=vs)


def run_kernel(c, sliding_window=None):
    out = torch.full_like(c["q"], SENTINEL)
    res = paged_attention_triton(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["q_starts"],
                                 c["q_lens"], c["max_q"], c["block_size"], sliding_window, out=out)
    assert res is out
    return out.cpu()


def reference(c, sliding_window=None):
    """Per sequence, per query: softmax over the visible keys, in float64, from the logical (unpaged) k/v."""
    q = c["q"].cpu().double()
    T, H, D = q.shape
    out = torch.full((T, H, D), SENTINEL, dtype=torch.float64)
    for b, (L, n) in enumerate(c["specs"]):
        if n == 0:
            continue
        group = H // c["ks"][b].shape[1]
        k = c["ks"][b].double().repeat_interleave(group, dim=1)  # [L, H, D]: head h reads kv head h // group
        v = c["vs"][b].double().repeat_interleave(group, dim=1)
        rows = q[c["starts"][b]:c["starts"][b] + n]  # [n, H, D]
        scores = torch.einsum("nhd,lhd->hnl", rows, k) / math.sqrt(D)
        qpos = torch.arange(L - n, L)[:, None]
        kpos = torch.arange(L)[None, :]
        visible = kpos <= qpos
        if sliding_window is not None:
            visible &= kpos > qpos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[c["starts"][b]:c["starts"][b] + n] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
    return out


def sdpa_path(c, sliding_window=None):
    """The repo's gather + SDPA attention on the same cache (packed layout, owned rows first)."""
    from minedraft.runtime.attention import AttentionBatch, paged_attention

    starts = [L - n for L, n in c["specs"]]
    lengths = [n for _, n in c["specs"]]
    batch = AttentionBatch.build(starts, lengths, c["tables"], c["block_size"], sliding_window, DEVICE)
    n_owned = sum(lengths)
    return paged_attention(c["q"][:n_owned], c["k_cache"], c["v_cache"], batch).cpu()


def check(c, out, ref, atol=2e-5, rtol=1e-4):
    owned = c["owned"]
    assert not out[owned].isnan().any()
    torch.testing.assert_close(out[owned].double(), ref[owned], atol=atol, rtol=rtol)
    assert (out[~owned] == SENTINEL).all(), "rows no sequence owns were written"


# A decode (1 query over 37 keys), a verify (5 queries, 21 keys), an extend (20 queries after 3 cached keys),
# a sequence of length 1, and a longer decode: lengths cross 16-key pages and 64-key kernel tiles.
MIXED = [(37, 1), (21, 5), (23, 20), (1, 1), (70, 1)]


@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 64), (8, 2, 64), (8, 1, 80), (4, 2, 48)],
                         ids=["mha-d64", "gqa4-d64", "gqa8-d80", "gqa2-d48"])
def test_mixed_batch_head_layouts(H, Hkv, D):
    torch.manual_seed(0)
    c = make_case(MIXED, H, Hkv, D, block_size=16, seed=1)
    out = run_kernel(c)
    check(c, out, reference(c))


@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 64), (8, 2, 80)], ids=["mha-d64", "gqa4-d80"])
def test_matches_sdpa_path(H, Hkv, D):
    torch.manual_seed(0)
    c = make_case(MIXED, H, Hkv, D, block_size=16, seed=2, nan_poison=False)
    out = run_kernel(c)
    sdpa = sdpa_path(c)
    n = sdpa.shape[0]
    torch.testing.assert_close(out[:n], sdpa, atol=2e-5, rtol=1e-4)


def test_attention_batch_triton_backend():
    """attention.py's packed step metadata (backend "triton") drives this kernel through paged_attention."""
    import inspect

    from minedraft.runtime.attention import AttentionBatch, paged_attention

    if "backend" not in inspect.signature(AttentionBatch.build).parameters:
        pytest.skip("attention.py has no backend switch")
    torch.manual_seed(0)
    c = make_case(MIXED, 8, 2, 64, block_size=16, seed=11)
    starts = [L - n for L, n in c["specs"]]
    lengths = [n for _, n in c["specs"]]
    batch = AttentionBatch.build(starts, lengths, c["tables"], 16, None, DEVICE, backend="triton")
    n = sum(lengths)
    out = paged_attention(c["q"][:n], c["k_cache"], c["v_cache"], batch).cpu()
    torch.testing.assert_close(out.double(), reference(c)[:n], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [4, 128])
def test_page_sizes_smaller_and_larger_than_key_tile(block_size):
    torch.manual_seed(0)
    c = make_case([(45, 3), (130, 1), (9, 9), (200, 40)], 4, 2, 64, block_size=block_size, seed=3)
    check(c, run_kernel(c), reference(c))


def test_padding_sequence_and_padded_rows():
    """Rows at b * max_q with q_len < max_q (a captured graph's fixed layout), plus a padding sequence (q_len 0)."""
    torch.manual_seed(0)
    c = make_case([(30, 3), (0, 0), (17, 1), (12, 6), (5, 0)], 8, 2, 64, block_size=16, seed=4, layout="padded",
                  max_q=8)
    check(c, run_kernel(c), reference(c))


def test_max_q_larger_than_needed():
    """A graph captured for max_q = 16 replaying a step whose longest append is 2: extra tiles do nothing."""
    torch.manual_seed(0)
    c = make_case([(19, 2), (33, 1)], 8, 1, 64, block_size=16, seed=5, max_q=16)
    check(c, run_kernel(c), reference(c))


@pytest.mark.parametrize("window", [1, 8, 40, 150])
def test_sliding_window(window):
    torch.manual_seed(0)
    c = make_case([(90, 1), (60, 20), (12, 4), (300, 2)], 4, 2, 64, block_size=16, seed=6)
    check(c, run_kernel(c, window), reference(c, window))


def test_sliding_window_matches_sdpa_path():
    torch.manual_seed(0)
    c = make_case([(90, 1), (60, 20), (12, 4)], 4, 2, 64, block_size=16, seed=7, nan_poison=False)
    out = run_kernel(c, 8)
    sdpa = sdpa_path(c, 8)
    torch.testing.assert_close(out[: sdpa.shape[0]], sdpa, atol=2e-5, rtol=1e-4)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """The Triton interpreter stores bfloat16 as its raw uint16 bits and its tl.dot multiplies those bits as
    integers (seen in triton 3.9). Widen bf16 dot operands to fp32 first (exact), which is what the GPU's bf16 MMA
    with fp32 accumulation computes. Only under the interpreter; the compiled kernel is untouched."""
    if not INTERPRET:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or not hasattr(interpreter, "TensorHandle"):
        pytest.skip("Triton interpreter internals changed; bf16 dot cannot be checked on CPU")
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16 and h.data.dtype == np.uint16:
            f32 = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(f32, tl.float32)
        return h

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    monkeypatch.setattr(builder, "create_dot", create_dot)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, interpreter_bf16_dot):
    torch.manual_seed(0)
    c = make_case(MIXED, 8, 2, 80, block_size=16, dtype=dtype, seed=8)
    out = run_kernel(c)
    assert out.dtype == dtype
    check(c, out, reference(c), atol=3e-2, rtol=3e-2)


def test_rollback_reads_rewritten_keys():
    """Verify 4 drafts over 30 keys, reject 3 of them (rewind to 27), then append 2 new tokens at positions 27, 28.
    Attention must read the new k/v there and never the stale position 29 still sitting in the page."""
    torch.manual_seed(0)
    c = make_case([(30, 4)], 4, 2, 64, block_size=16, seed=9)
    check(c, run_kernel(c), reference(c))

    g = torch.Generator().manual_seed(10)
    fresh_k, fresh_v = torch.randn(2, 2, 64, generator=g), torch.randn(2, 2, 64, generator=g)
    pos = torch.arange(27, 29)
    slots = (torch.tensor(c["tables"][0])[pos // 16] * 16 + pos % 16).to(DEVICE)
    c["pool"][1, 0, slots] = fresh_k.to(DEVICE)
    c["pool"][1, 1, slots] = fresh_v.to(DEVICE)
    stale_k, stale_v = c["ks"][0], c["vs"][0]
    c["ks"], c["vs"] = [torch.cat([stale_k[:27], fresh_k])], [torch.cat([stale_v[:27], fresh_v])]
    c["specs"] = [(29, 2)]
    c["seq_lens"] = torch.tensor([29], dtype=torch.int32, device=DEVICE)
    c["q_lens"] = torch.tensor([2], dtype=torch.int32, device=DEVICE)  # max_q stays 4, as in a captured graph
    c["owned"] = torch.arange(c["q"].shape[0]) < 2
    out = run_kernel(c)
    check(c, out, reference(c))
    # The stale answers really differ, so the check above means something: old k/v at 27, 28 ...
    c["ks"], c["vs"] = [stale_k[:29]], [stale_v[:29]]
    assert not torch.allclose(out[:2].double(), reference(c)[:2], atol=1e-3)
    # ... or the stale position 29 attended to as well.
    c["ks"] = [torch.cat([stale_k[:27], fresh_k, stale_k[29:]])]
    c["vs"] = [torch.cat([stale_v[:27], fresh_v, stale_v[29:]])]
    c["specs"] = [(30, 2)]
    assert not torch.allclose(out[:2].double(), reference(c)[:2], atol=1e-3)
