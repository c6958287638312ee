"""The softmax window of the hybrid layer (featattn/hybrid.py, docs/hybrid.md) in Triton.

Legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), N key positions, the T
queries at the last T of them (position ``P0 + r`` for query row r, ``P0 = N - T``), D the
q/k head dim, Dv the value dim, W the window.  For query position p, its window is the keys
``p - W < s <= p`` and, with ``a_ps = scale * q_p . k_s`` and ``m_p = max_s a_ps``::

    A_p = sum_s exp(a_ps - m_p) v_s        a_p = sum_s exp(a_ps - m_p)

(the hybrid's softmax sums; featattn.hybrid combines them with the linear part under one
denominator).  ``m_p`` is part of the function: its gradient goes to the maximal scores
(shared equally by ties, as ``torch.amax``'s), so the backward of a loss through (A, a) is

    dS_ps = p_ps (dA_p . v_s + da_p) - [a_ps = m_p] (dA_p . A_p + da_p a_p) / ties_p

with ``p_ps = exp(a_ps - m_p)``; dq = scale dS k, dk = scale dS^T q, dv = p^T dA.

Forward: one program per (query tile, batch * head), flash-attention style: an online max
over the key tiles of the window, the sums rescaled to the final max (which is m_p), and
the number of maximal scores.  Backward: one program per (query tile, batch * head) for dq,
one per (key tile, batch * kv head) for dk and dv, looping over the query heads of the
group (no atomics, no per-head copies).  Scores and sums in fp32; the forward's products take
the input dtype on the tensor cores (fp32 inputs: tf32x3), the backward's fp32 gradients stay
in a dtype with fp32's range (bf16 for bf16 inputs, else fp32 on tf32 cores): chunked.py's
``_dot_in`` and ``_mm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from ._common import alloc, cdiv, next_pow2, unit_last
from .chunked import _dot_in, _mm  # a @ b with the fp32 precision named (TF32X3)

__all__ = ["window_softmax", "window_unsupported_reason", "MAX_D"]

#: the largest q/k and value head dims the tiles take
MAX_D = 128


def window_unsupported_reason(d: int, dv: int) -> Optional[str]:
    """None when the window kernels take head dims ``d`` (q/k) and ``dv``, else why not."""
    if d > MAX_D or dv > MAX_D:
        return f"head dims d={d}, Dv={dv} are above the window kernels' {MAX_D}"
    return None


@triton.jit
def _scores(q, k, scale, rows, cols, W, N, FP32: tl.constexpr):
    """scale * q k^T [BT, BK] in fp32, -inf outside each row's window (rows/cols are the
    query/key positions; a row past the last query has no keys)."""
    s = _dot_in(q, tl.trans(k), FP32) * scale
    ok = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - W) \
        & (cols[None, :] >= 0) & (cols[None, :] < N) & (rows[:, None] < N)
    return tl.where(ok, s, float("-inf")), ok


@triton.jit
def _rows(ptr, pos, mask, stride, width, BW: tl.constexpr):
    """The [len(pos), BW] tile of rows ``pos`` (stride apart, ``width`` valid columns) at
    ``ptr``, 0 where ``mask`` is off."""
    cols = tl.arange(0, BW)
    return tl.load(ptr + pos.to(tl.int64)[:, None] * stride + cols[None, :],
                   mask=mask[:, None] & (cols[None, :] < width), other=0.0)


@triton.jit
def _query_tile(i_t, T, N, W, BT: tl.constexpr):
    """Query tile i_t: its rows r, their key positions, the valid-row mask, and the key
    range [lo, hi) its windows cover."""
    r = i_t * BT + tl.arange(0, BT)
    P0 = N - T
    lo = tl.maximum(P0 + i_t * BT - W + 1, 0)
    hi = tl.minimum(P0 + i_t * BT + BT, N)
    return r, P0 + r, r < T, lo, hi


@triton.jit
def _grad_rows(dA, da, m, g, ties, row, mr, DV, BV: tl.constexpr):
    """The backward's per-row inputs of rows ``row`` (flat b*h*T + r)."""
    return (_rows(dA, row, mr, DV, DV, BV), tl.load(da + row, mask=mr, other=0.0),
            tl.load(m + row, mask=mr, other=0.0), tl.load(g + row, mask=mr, other=0.0),
            tl.load(ties + row, mask=mr, other=1.0))


@triton.jit
def _program(H, G):
    """(batch * head, query tile, batch, head, kv head) of this program, int64 indices."""
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    return i_bh, tl.program_id(1), i_b, i_h, i_h // G


@triton.jit
def _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, N, D, DV,
              BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, FP32: tl.constexpr):
    """The key/value tile at positions j0.. (below hi) and its masked scores with b_q."""
    cols = j0 + tl.arange(0, BK)
    b_k = _rows(k_base, cols, cols < hi, skt, D, BD)
    b_v = _rows(v_base, cols, cols < hi, svt, DV, BV)
    s, ok = _scores(b_q, b_k, scale, rows, cols, W, N, FP32)
    return b_k, b_v, s, ok


@triton.jit
def _fwd_kernel(
    q, k, v, A, asum, m, ties,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    T, N, H, G, D, DV, W, scale,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    FP32: tl.constexpr,
):
    i_bh, i_t, i_b, i_h, i_hk = _program(H, G)
    r, rows, mr, lo, hi = _query_tile(i_t, T, N, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
    m_i = tl.full([BT], -1e30, tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    c_i = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BV], tl.float32)
    k_base = k + i_b * skb + i_hk * skh
    v_base = v + i_b * svb + i_hk * svh
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, N,
                                    D, DV, BK, BD, BV, FP32)
        tmax = tl.max(s, 1)
        m_new = tl.maximum(m_i, tmax)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        c_i = tl.where(tmax > m_i, 0.0, c_i) + tl.sum(tl.where(ok & (s == m_new[:, None]), 1.0, 0.0), 1)
        acc = acc * alpha[:, None] + _dot_in(p.to(b_v.dtype), b_v, FP32)
        m_i = m_new
    row = i_bh.to(tl.int64) * T + r.to(tl.int64)
    ov = tl.arange(0, BV)
    tl.store(A + row[:, None] * DV + ov[None, :], acc, mask=mr[:, None] & (ov[None, :] < DV))
    tl.store(asum + row, l_i, mask=mr)
    tl.store(m + row, m_i, mask=mr)
    tl.store(ties + row, c_i, mask=mr)


@triton.jit
def _dS(s, ok, b_dA, b_v, da, m_i, g, c_i, LOWP: tl.constexpr, FP32: tl.constexpr):
    """p and dS of one [BT, BK] tile (module docstring); g = dA . A + da a per row."""
    p = tl.exp(s - m_i[:, None])
    dp = _mm(b_dA, tl.trans(b_v), LOWP, FP32) + da[:, None]
    top = tl.where(ok & (s == m_i[:, None]), 1.0, 0.0)
    return p, p * dp - top * (g / c_i)[:, None]


@triton.jit
def _dq_kernel(
    q, k, v, dA, da, m, g, ties, dq,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    T, N, H, G, D, DV, W, scale,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    LOWP: tl.constexpr, FP32: tl.constexpr,
):
    i_bh, i_t, i_b, i_h, i_hk = _program(H, G)
    r, rows, mr, lo, hi = _query_tile(i_t, T, N, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
    row = i_bh.to(tl.int64) * T + r.to(tl.int64)
    b_dA, b_da, m_i, g_i, c_i = _grad_rows(dA, da, m, g, ties, row, mr, DV, BV)
    acc = tl.zeros([BT, BD], tl.float32)
    k_base = k + i_b * skb + i_hk * skh
    v_base = v + i_b * svb + i_hk * svh
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, N,
                                    D, DV, BK, BD, BV, FP32)
        p, dS = _dS(s, ok, b_dA, b_v, b_da, m_i, g_i, c_i, LOWP, FP32)
        acc += _mm(dS, b_k, LOWP, FP32)
    od = tl.arange(0, BD)
    tl.store(dq + i_b * sqb + i_h * sqh + r.to(tl.int64)[:, None] * sqt + od[None, :],
             (acc * scale).to(dq.dtype.element_ty), mask=mr[:, None] & (od[None, :] < D))


@triton.jit
def _dkdv_kernel(
    q, k, v, dA, da, m, g, ties, dk, dv,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    T, N, H, G, D, DV, W, scale,
    BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    LOWP: tl.constexpr, FP32: tl.constexpr,
):
    """Grid (B * Hkv, key tiles); dk, dv laid out like k, v."""
    i_bhk = tl.program_id(0)
    i_k = tl.program_id(1)
    Hkv = H // G
    i_b = (i_bhk // Hkv).to(tl.int64)
    i_hk = (i_bhk % Hkv).to(tl.int64)
    P0 = N - T
    cols = i_k * BK + tl.arange(0, BK)
    mc = cols < N
    od = tl.arange(0, BD)
    ov = tl.arange(0, BV)
    b_k = _rows(k + i_b * skb + i_hk * skh, cols, mc, skt, D, BD)
    b_v = _rows(v + i_b * svb + i_hk * svh, cols, mc, svt, DV, BV)
    acc_k = tl.zeros([BK, BD], tl.float32)
    acc_v = tl.zeros([BK, BV], tl.float32)
    # query rows that see these keys: positions in [first key, last key + W - 1], rows >= 0
    lo = tl.maximum(i_k * BK - P0, 0)
    hi = tl.minimum(i_k * BK + BK - 1 + W - P0, T)
    for gi in range(0, G):
        i_h = i_hk * G + gi
        i_bh = i_b * H + i_h
        for r0 in range(lo, hi, BT):
            r = r0 + tl.arange(0, BT)
            mr = r < hi
            rows = tl.where(mr, P0 + r, N)  # a masked row has no keys
            b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
            row = i_bh * T + r.to(tl.int64)
            b_dA, b_da, m_i, g_i, c_i = _grad_rows(dA, da, m, g, ties, row, mr, DV, BV)
            s, ok = _scores(b_q, b_k, scale, rows, cols, W, N, FP32)
            p, dS = _dS(s, ok, b_dA, b_v, b_da, m_i, g_i, c_i, LOWP, FP32)
            acc_v += _mm(tl.trans(p), b_dA, LOWP, FP32)
            acc_k += _mm(tl.trans(dS), b_q, LOWP, FP32)
    tl.store(dk + i_b * skb + i_hk * skh + cols.to(tl.int64)[:, None] * skt + od[None, :],
             (acc_k * scale).to(dk.dtype.element_ty), mask=mc[:, None] & (od[None, :] < D))
    tl.store(dv + i_b * svb + i_hk * svh + cols.to(tl.int64)[:, None] * svt + ov[None, :],
             acc_v.to(dv.dtype.element_ty), mask=mc[:, None] & (ov[None, :] < DV))


def _laid_out(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is [B, H, T, D] or a transposed [B, T, H, D] (both dense, so
    ``empty_like`` gives its gradient the same strides, which the kernels write with), else a
    contiguous copy (a slice along T, say)."""
    x = unit_last(x)
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _tiles(D: int, DV: int):
    return 32, 32, max(16, next_pow2(D)), max(16, next_pow2(DV))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


class _Window(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        q, k, v = _laid_out(q), _laid_out(k), _laid_out(v)
        B, H, T, D = q.shape
        Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
        BT, BK, BD, BV = _tiles(D, DV)
        A = alloc((B, H, T, DV), torch.float32, q.device)
        a, m, ties = (alloc((B, H, T), torch.float32, q.device) for _ in range(3))
        fp32 = q.dtype == torch.float32
        _fwd_kernel[(B * H, cdiv(T, BT))](
            q, k, v, A, a, m, ties, *_strides(q), *_strides(k), *_strides(v),
            T, N, H, H // Hkv, D, DV, int(window), float(scale),
            BT=BT, BK=BK, BD=BD, BV=BV, FP32=fp32, num_warps=4, num_stages=2)
        ctx.save_for_backward(q, k, v, A, a, m, ties)
        ctx.window, ctx.scale = int(window), float(scale)
        ctx.mark_non_differentiable(m)
        return A, a, m

    @staticmethod
    @once_differentiable
    def backward(ctx, dA, da, _dm):
        q, k, v, A, a, m, ties = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
        dA = torch.zeros_like(A) if dA is None else dA.float().contiguous()
        da = torch.zeros_like(a) if da is None else da.float().contiguous()
        g = ((dA * A).sum(-1) + da * a).contiguous()
        BT, BK, BD, BV = _tiles(D, DV)
        fp32 = q.dtype == torch.float32
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        args = (T, N, H, H // Hkv, D, DV, ctx.window, ctx.scale)
        meta = dict(BT=BT, BK=BK, BD=BD, BV=BV, LOWP=q.dtype == torch.bfloat16, FP32=fp32,
                    num_warps=4, num_stages=2)
        _dq_kernel[(B * H, cdiv(T, BT))](
            q, k, v, dA, da, m, g, ties, dq, *_strides(q), *_strides(k), *_strides(v),
            *args, **meta)
        _dkdv_kernel[(B * Hkv, cdiv(N, BK))](
            q, k, v, dA, da, m, g, ties, dk, dv, *_strides(q), *_strides(k), *_strides(v),
            *args, **meta)
        return dq, dk, dv, None, None


def window_softmax(q, k, v, *, window: int, scale: float):
    """The window's softmax sums: ``(A [B, H, T, Dv], a [B, H, T], m [B, H, T])``, fp32.

    Args:
        q: ``[B, H, T, D]``, the queries at the last T of the N key positions.
        k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]`` (unit last stride, any other strides;
            dk/dv come back with the same strides).
        window: W >= 1; scale: multiplies q . k.

    Differentiable in q, k, v through A and a, with m's own dependence on the scores
    included (m itself is returned for inspection and is not differentiable).
    """
    return _Window.apply(q, k, v, window, scale)
