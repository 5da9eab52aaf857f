"""Fused elementwise kernels for the GPU forward: RMSNorm (with the residual add), the q/k/v epilogue (q/k norm,
RoPE and the KV-cache write in one pass) and SiLU*mul.

Why: in a CUDA graph the host no longer issues each kernel, but every kernel still costs the GPU a few microseconds
to start and drain, and an unfused Llama layer is ~56 of them (an RMSNorm alone is 8 elementwise ops, RoPE 6 per
tensor). At decode batch sizes these tiny kernels, not the weight reads, set the step time: measured on an H100,
the 0.6B draft forward ran 1,585 kernels in 6.2 ms against a 0.4 ms weight-read floor. Fused, a layer is ~10
kernels: 4 GEMMs, attention, and the 4-5 below.

Numerics follow the unfused torch code (and transformers) rounding step for step: values are widened to fp32 for
each op and rounded back to the model dtype wherever torch would store an intermediate, so bf16 results differ from
the eager path only by the order of fp32 reductions. The CPU keeps the unfused path (it is transformers' bit for
bit); these kernels run there only under the Triton interpreter, in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, Y, HOut, stride_x, stride_r, stride_y, stride_h, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One row: optionally h = x + r (rounded to the model dtype, stored), then y = w * (h / rms(h))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(HOut + row * stride_h + cols, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x: [T, N]. Without residual returns norm(x); with it returns (norm(x + residual), x + residual)."""
    T, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else y
    block = triton.next_power_of_2(N)
    if T:
        _rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, y, h, x.stride(0),
                               residual.stride(0) if residual is not None else 0, y.stride(0), h.stride(0), N, eps,
                               HAS_RES=residual is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return (y, h) if residual is not None else y


@triton.jit
def _rope_half(x1, x2, c1, c2, s1, s2, DT: tl.constexpr):
    """x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1), each product and the sum rounded to DT."""
    o1 = (x1 * c1).to(DT).to(tl.float32) + (-x2 * s1).to(DT).to(tl.float32)
    o2 = (x2 * c2).to(DT).to(tl.float32) + (x1 * s2).to(DT).to(tl.float32)
    return o1.to(DT), o2.to(DT)


@triton.jit
def _head_norm(x1, x2, W, offs, eps, D: tl.constexpr, DT: tl.constexpr):
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
    w1 = tl.load(W + offs).to(tl.float32)
    w2 = tl.load(W + D // 2 + offs).to(tl.float32)
    y1 = ((x1 * rstd).to(DT).to(tl.float32) * w1).to(DT).to(tl.float32)
    y2 = ((x2 * rstd).to(DT).to(tl.float32) * w2).to(DT).to(tl.float32)
    return y1, y2


@triton.jit
def _qkv_epilogue_kernel(QKV, Pos, Slots, Cos, Sin, QW, KW, QOut, KC, VC,
                         stride_qkv, stride_cos, stride_qo_t, stride_qo_h, stride_kc_s, stride_kc_h,
                         stride_vc_s, stride_vc_h, eps,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr):
    """Program (token t, head j): j < H is a query head (norm, RoPE, to QOut); H <= j < H + HKV a key head (norm,
    RoPE, into the cache at the token's slot); the rest value heads (copied into the cache)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    DT = QOut.dtype.element_ty
    offs = tl.arange(0, D // 2)
    base = QKV + t * stride_qkv + j * D
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + D // 2 + offs).to(tl.float32)
    slot = tl.load(Slots + t).to(tl.int64)
    if j < H + HKV:
        if QK_NORM:
            if j < H:
                x1, x2 = _head_norm(x1, x2, QW, offs, eps, D, DT)
            else:
                x1, x2 = _head_norm(x1, x2, KW, offs, eps, D, DT)
        pos = tl.load(Pos + t).to(tl.int64)
        c1 = tl.load(Cos + pos * stride_cos + offs).to(tl.float32)
        c2 = tl.load(Cos + pos * stride_cos + D // 2 + offs).to(tl.float32)
        s1 = tl.load(Sin + pos * stride_cos + offs).to(tl.float32)
        s2 = tl.load(Sin + pos * stride_cos + D // 2 + offs).to(tl.float32)
        o1, o2 = _rope_half(x1, x2, c1, c2, s1, s2, DT)
        if j < H:
            dst = QOut + t * stride_qo_t + j * stride_qo_h
        else:
            dst = KC + slot * stride_kc_s + (j - H) * stride_kc_h
        tl.store(dst + offs, o1)
        tl.store(dst + D // 2 + offs, o2)
    else:
        dst = VC + slot * stride_vc_s + (j - H - HKV) * stride_vc_h
        tl.store(dst + offs, x1.to(DT))
        tl.store(dst + D // 2 + offs, x2.to(DT))


def qkv_epilogue(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> torch.Tensor:
    """qkv: [T, (H + 2 Hkv) * D] output of the fused projection. Writes roped k and v into the cache at `slots`
    and returns roped q [T, H, D]."""
    T = qkv.shape[0]
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T:
        norm = q_norm is not None
        _qkv_epilogue_kernel[(T, num_heads + 2 * num_kv_heads)](
            qkv, positions, slots, cos, sin, q_norm if norm else qkv, k_norm if norm else qkv, q, k_cache, v_cache,
            qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), eps, H=num_heads, HKV=num_kv_heads, D=head_dim, QK_NORM=norm,
            num_warps=1 if head_dim <= 64 else 2)
    return q


@triton.jit
def _silu_mul_kernel(GU, Out, stride_gu, stride_o, I, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    DT = Out.dtype.element_ty
    g = tl.load(GU + t * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gu + I + cols, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
    tl.store(Out + t * stride_o + cols, (s * u).to(DT), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 I] -> silu(gate) * up, [T, I]."""
    T, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if T:
        _silu_mul_kernel[(T, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                           BLOCK=block, num_warps=4)
    return out
