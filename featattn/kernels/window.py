"""The hybrid layer (featattn/hybrid.py, docs/hybrid.md) in Triton: the softmax window fused
with the combination under one denominator, the linear part in the chunked kernel.

Legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), N key positions, the T
queries at the last T of them (position ``P0 + r`` for query row r, ``P0 = N - T``), D the
q/k head dim, Dv the value dim, W the window, f the per-head mixing weight.  For query
position p, its window is the keys ``p - W < s <= p`` and, with ``a_ps = scale * q_p . k_s``
and ``m_p = max_s a_ps``::

    A_p = sum_s exp(a_ps - m_p) v_s        a_p = sum_s exp(a_ps - m_p)
    o_p = (f A_p + (1 - f) L_p) / (f a_p + (1 - f) l_p + eps)  =: num_p / D_p

where ``L_p, l_p`` are the linear part's sums over the keys ``s <= p - W`` (and the state
before them): the chunked kernel (chunked.py) with its key shift KS = W - P0, run
normalised, gives ``L / l`` and ``l``.  ``m_p`` is part of the function: its gradient goes
to the maximal scores (shared equally by ties, as ``torch.amax``'s).  With ``u_p = do_p . o_p``,
the backward of the window is that of (A, a) under ``dA_p = f do_p / D_p`` and
``da_p = -f u_p / D_p``::

    dS_ps = p_ps (dA_p . v_s + da_p) - [a_ps = m_p] g_p / ties_p,   g_p = dA_p . A_p + da_p a_p

with ``p_ps = exp(a_ps - m_p)``; dq = scale dS k, dk = scale dS^T q, dv = p^T dA.  The linear
part's backward is the chunked kernel's normalised one given ``den = D / (1 - f)`` and
``delta = u`` (so d num = (1 - f) do / D, d den = -(1 - f) u / D); and
``df_p = (do . (A - L) - u (a - l)) / D`` summed over batch and tokens per head.

Kernels: forward, one program per (batch * head, query tile), flash-attention style (an
online max over the window's key tiles, then the sums rescaled to the final max, which is
m_p, and the count of maximal scores), reading the linear part's rows and writing o, D, m
and the ties.  dq: one program per (batch * head, query tile) in one pass over the key
tiles (A, a, the sum of the maximal keys and the dq sum together; the tie term is applied
at the end), writing dq (plus the linear part's dq when the map is fused), g and df's rows.
dk/dv: one program per (batch * kv head, key tile), looping over the query heads of the
group (no atomics), adding the linear part's dk/dv of the same keys.  Scores and sums in
fp32; products take the input dtype on the tensor cores (fp32 inputs: tf32x3), the
backward's fp32 intermediates a dtype with fp32's range (bf16 for bf16 inputs, else fp32 on
tf32 cores): _common's ``dot_in_tf32x3`` and ``mm_tf32x3``.  No feature, score or window sum reaches
HBM; the saved tensors are o, the linear part's output, and fp32 rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from .. import _switches
from . import _common
from . import chunked as _chunked
from . import maps as _maps
from ._common import INTERPRET, TunedLaunch, alloc, cdiv, empty_like_layout, next_pow2, row_dot
from ._common import exp_nonpos, launch_size, sequence_rows, unit_last
from ._common import dot_in_tf32x3 as _dot_in  # a @ b, fp32 inputs in tf32x3
from ._common import mm_tf32x3 as _mm

__all__ = ["hybrid_attention", "window_unsupported_reason", "MAX_D"]

#: the largest q/k and value head dims the tiles take
MAX_D = 128

#: added to the linear part's own denominator (which the chunked kernel divides by): it only
#: keeps 0 / 0 at 0 for queries with no linear keys and no state; D has the call's eps
_LIN_EPS = 1e-30


def window_unsupported_reason(d: int, dv: int) -> Optional[str]:
    """None when the window kernels take head dims ``d`` (q/k) and ``dv``, else why not."""
    if d > MAX_D or dv > MAX_D:
        return f"head dims d={d}, Dv={dv} are above the window kernels' {MAX_D}"
    return None


@triton.jit
def _scores(q, k, scale, rows, cols, W, FP32: tl.constexpr):
    """scale * q k^T [BT, BK] in fp32, -inf outside each row's window (rows / cols are the
    query / key positions, cols >= 0).  One subtraction and two compares an element: a
    valid row's window ends at the row, so keys past the last one (loaded as zeros) are
    outside it; rows past the last query are the callers' to discard (the forward and dq
    kernels do not store them, the dk/dv kernel's have zero gradients)."""
    s = _dot_in(q, tl.trans(k), FP32) * scale
    d = rows[:, None] - cols[None, :]
    ok = (d >= 0) & (d < W)
    return tl.where(ok, s, float("-inf")), ok


@triton.jit
def _rows(ptr, pos, mask, stride, width, BW: tl.constexpr):
    """The [len(pos), BW] tile of rows ``pos`` (stride apart, ``width`` valid columns) at
    ``ptr``, 0 where ``mask`` is off."""
    cols = tl.arange(0, BW)
    return tl.load(ptr + pos.to(tl.int64)[:, None] * stride + cols[None, :],
                   mask=mask[:, None] & (cols[None, :] < width), other=0.0)


@triton.jit
def _put(ptr, pos, mask, stride, width, x, BW: tl.constexpr):
    """Store x [len(pos), BW] into rows ``pos`` of ``ptr`` (as :func:`_rows` reads them)."""
    cols = tl.arange(0, BW)
    tl.store(ptr + pos.to(tl.int64)[:, None] * stride + cols[None, :],
             x.to(ptr.dtype.element_ty), mask=mask[:, None] & (cols[None, :] < width))


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
def _program(H, G, T, N, cu, VARLEN: tl.constexpr):
    """(query tile, batch, head, kv head, first token, queries, keys, row base) of this
    program (int64 indices): program row b * H + h of a [B, H, T] batch, or with VARLEN
    (sequence n, head h) of the packed [1, H, T] batch, tokens [cu[n], cu[n+1]) and no keys
    before them.  The [B, H, T] fp32 row buffers hold query row r at ``row base + r``."""
    i_bh = tl.program_id(0)
    i_b, i_h, bos, Ts = sequence_rows(i_bh, H, T, cu, VARLEN)
    if VARLEN:
        Ns = Ts
        rb = i_h * T + bos
    else:
        Ns = N
        rb = i_bh.to(tl.int64) * T
    return tl.program_id(1), i_b, i_h, i_h // G, bos, Ts, Ns, rb


@triton.jit
def _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, D, DV,
              BK: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, FP32: tl.constexpr):
    """The key/value tile at positions j0.. (below hi) and its masked scores with b_q."""
    cols = j0 + tl.arange(0, BK)
    b_k = _rows(k_base, cols, cols < hi, skt, D, BD)
    b_v = _rows(v_base, cols, cols < hi, svt, DV, BV)
    s, ok = _scores(b_q, b_k, scale, rows, cols, W, FP32)
    return b_k, b_v, s, ok


@triton.jit
def _linear_rows(L_base, lden, r, mr, row, sLt, DV, BV: tl.constexpr):
    """The linear part's numerator [BT, BV] (fp32: the chunked kernel's normalised output
    times its denominator) and denominator [BT] of query rows r."""
    b_l = tl.load(lden + row, mask=mr, other=0.0)
    return _rows(L_base, r, mr, sLt, DV, BV).to(tl.float32) * b_l[:, None], b_l


@triton.jit
def _grad_rows(do_base, sdt, u, Dn, m, ties, fw, r, mr, row, DV, BV: tl.constexpr):
    """The backward's per-row inputs of query rows r (flat rows ``row`` = b*h*T + r): do
    (fp32), dA = f do / D, da = -f u / D, u, D, m and the tie counts."""
    b_do = _rows(do_base, r, mr, sdt, DV, BV).to(tl.float32)
    b_u = tl.load(u + row, mask=mr, other=0.0)
    b_D = tl.load(Dn + row, mask=mr, other=1.0)
    return (b_do, b_do * (fw / b_D)[:, None], -fw * b_u / b_D, b_u, b_D,
            tl.load(m + row, mask=mr, other=0.0), tl.load(ties + row, mask=mr, other=1.0))


@triton.jit
def _top(s, ok, m_i, c_i, cols, a_i):
    """1.0 at each row's maximal keys: the forward's stored argmax ``a_i`` when the row has
    one maximum (so a score recomputed with other tiles cannot miss it by a rounding), else
    every key whose score equals the maximum (ties: duplicated keys, whose recomputed scores
    are equal to each other)."""
    one = cols[None, :] == a_i[:, None]
    tied = ok & (s == m_i[:, None])
    return tl.where(tl.where(c_i[:, None] > 1.0, tied, one), 1.0, 0.0)


@triton.jit
def _window_fwd_kernel(
    q, k, v, L, lden, f, o, Dn, m, ties, arg, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sLb, sLh, sLt, sob, soh, sot,
    T, N, H, G, D, DV, W, scale, eps, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * H, query tiles): o (input dtype, strided like q), fp32 [B*H, T] rows of
    D (eps included), m and the tie counts, and int32 rows of a maximal key's position.
    VARLEN: B = 1 holds packed sequences, grid (sequences * H, query tiles of the longest)."""
    i_t, i_b, i_h, i_hk, bos, Ts, Ns, rb = _program(H, G, T, N, cu, VARLEN)
    r, rows, mr, lo, hi = _query_tile(i_t, Ts, Ns, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh + bos * sqt, r, mr, sqt, D, BD)
    m_i = tl.full([BT], -1e30, tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    c_i = tl.zeros([BT], tl.float32)
    a_i = tl.zeros([BT], tl.int32)
    acc = tl.zeros([BT, BV], tl.float32)
    k_base = k + i_b * skb + i_hk * skh + bos * skt
    v_base = v + i_b * svb + i_hk * svh + bos * svt
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, D,
                                    DV, BK, BD, BV, FP32)
        tmax, targ = tl.max(s, 1, return_indices=True)
        a_i = tl.where(tmax > m_i, j0 + targ, a_i)
        m_new = tl.maximum(m_i, tmax)
        alpha = exp_nonpos(m_i - m_new)
        p = exp_nonpos(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        c_i = tl.where(tmax > m_i, 0.0, c_i) + tl.sum(tl.where(ok & (s == m_new[:, None]), 1.0, 0.0), 1)
        acc = acc * alpha[:, None] + _dot_in(p.to(b_v.dtype), b_v, FP32)
        m_i = m_new
    row = rb + r.to(tl.int64)
    b_L, b_l = _linear_rows(L + i_b * sLb + i_h * sLh + bos * sLt, lden, r, mr, row, sLt, DV, BV)
    fw = tl.load(f + i_h)
    den = fw * l_i + (1.0 - fw) * b_l + eps
    _put(o + i_b * sob + i_h * soh + bos * sot, r, mr, sot, DV,
         (fw * acc + (1.0 - fw) * b_L) * (1.0 / den)[:, None], BV)
    tl.store(Dn + row, den, mask=mr)
    tl.store(m + row, m_i, mask=mr)
    tl.store(ties + row, c_i, mask=mr)
    tl.store(arg + row, a_i, mask=mr)


@triton.jit
def _lin_grad(acc, x, dl, xscale, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
              DPHI: tl.constexpr):
    """acc plus the linear part's gradient dl of the same rows: dl itself (LIN_GRAD = 1), or
    (LIN_GRAD = 2: the features were PHI(xscale * x), made before the chunked kernel)
    dl * PHI'(xscale * x) * xscale."""
    if LIN_GRAD == 1:
        acc += dl
    if LIN_GRAD == 2:
        xs = x.to(tl.float32) * xscale
        acc += dl * DPHI(xs, PHI(xs)) * xscale
    return acc


@triton.jit
def _window_dq_kernel(
    q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dq, g, dfr, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sLb, sLh, sLt, sdb, sdh, sdt, slqb, slqh, slqt,
    T, N, H, G, D, DV, W, scale, xscale, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
    DPHI: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * H, query tiles): dq (strided like q; the linear part's dq dql [B, H, T, D]
    strided, added as :func:`_lin_grad` says: dql may be dq itself, each program reading
    its own rows before writing them), and fp32 [B*H, T] rows of g and of df.

    One pass over the key tiles: with dov = do v^T, dp = dov f / D + da and do . A =
    sum p dov, so A itself is never formed; the tie term -g / ties times the sum of each
    row's maximal keys is applied at the end (the key at ``arg`` when no row of the tile
    has tied maxima, else a second pass sums them)."""
    i_t, i_b, i_h, i_hk, bos, Ts, Ns, rb = _program(H, G, T, N, cu, VARLEN)
    r, rows, mr, lo, hi = _query_tile(i_t, Ts, Ns, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh + bos * sqt, r, mr, sqt, D, BD)
    row = rb + r.to(tl.int64)
    fw = tl.load(f + i_h)
    b_do, b_dA, b_da, b_u, b_D, m_i, c_i = _grad_rows(do + i_b * sdb + i_h * sdh + bos * sdt,
                                                      sdt, u, Dn, m, ties, fw, r, mr, row, DV,
                                                      BV)
    a_i = tl.load(arg + row, mask=mr, other=-1)
    doA = tl.zeros([BT], tl.float32)
    a = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BD], tl.float32)
    k_base = k + i_b * skb + i_hk * skh + bos * skt
    v_base = v + i_b * svb + i_hk * svh + bos * svt
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, D,
                                    DV, BK, BD, BV, FP32)
        p = exp_nonpos(s - m_i[:, None])
        dov = _mm(b_do, tl.trans(b_v), LOWP, FP32)
        a += tl.sum(p, 1)
        doA += tl.sum(p * dov, 1)
        acc += _mm(p * (dov * (fw / b_D)[:, None] + b_da[:, None]), b_k, LOWP, FP32)
    if tl.max(c_i) > 1.0:  # tied maxima in some row: sum each row's maximal keys
        ktop = tl.zeros([BT, BD], tl.float32)
        for j0 in range(lo, hi, BK):
            b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W,
                                        D, DV, BK, BD, BV, FP32)
            ktop += _mm(_top(s, ok, m_i, c_i, j0 + tl.arange(0, BK), a_i), b_k, LOWP, FP32)
    else:
        ktop = _rows(k_base, a_i, mr, skt, D, BD).to(tl.float32)
    b_L, b_l = _linear_rows(L + i_b * sLb + i_h * sLh + bos * sLt, lden, r, mr, row, sLt, DV, BV)
    g_i = fw * (doA - b_u * a) / b_D
    df_i = (doA - tl.sum(b_do * b_L, 1) - b_u * (a - b_l)) / b_D
    b_dq = (acc - (g_i / c_i)[:, None] * ktop) * scale
    if LIN_GRAD > 0:
        b_dq = _lin_grad(b_dq, b_q, _rows(dql + i_b * slqb + i_h * slqh + bos * slqt, r, mr,
                                          slqt, D, BD).to(tl.float32), xscale, LIN_GRAD, PHI,
                         DPHI)
    _put(dq + i_b * sqb + i_h * sqh + bos * sqt, r, mr, sqt, D, b_dq, BD)
    tl.store(g + row, g_i, mask=mr)
    tl.store(dfr + row, df_i, mask=mr)


@triton.jit
def _window_dkdv_kernel(
    q, k, v, do, f, u, Dn, m, ties, arg, g, dkl, dvl, dk, dv, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    slkb, slkh, slkt, slvb, slvh, slvt,
    T, N, NL, H, G, D, DV, W, scale, xscale, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
    DPHI: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * Hkv, key tiles); dk, dv laid out like k, v.  The linear part's dv and dk of
    keys s < NL, dvl / dkl [B, Hkv, >= NL, .] strided, are added (dk as :func:`_lin_grad`
    says, with xscale 1); they may be dv / dk themselves (a program reads its own rows
    before writing them).  VARLEN: (sequence, kv head) programs of the packed batch, each
    sequence's keys s < its length - W with a linear part (NL unused)."""
    i_bhk = tl.program_id(0)
    i_k = tl.program_id(1)
    Hkv = H // G
    i_b, i_hk, bos, Ts = sequence_rows(i_bhk, Hkv, T, cu, VARLEN)
    if VARLEN:
        Ns = Ts
        NLs = Ts - W
    else:
        Ns = N
        NLs = NL
    P0 = Ns - Ts
    cols = i_k * BK + tl.arange(0, BK)
    mc = cols < Ns
    b_k = _rows(k + i_b * skb + i_hk * skh + bos * skt, cols, mc, skt, D, BD)
    b_v = _rows(v + i_b * svb + i_hk * svh + bos * svt, cols, mc, svt, DV, BV)
    acc_k = tl.zeros([BK, BD], tl.float32)
    acc_v = tl.zeros([BK, BV], tl.float32)
    # query rows that see these keys: positions in [first key, last key + W - 1], rows >= 0
    lo = tl.maximum(i_k * BK - P0, 0)
    hi = tl.minimum(i_k * BK + BK - 1 + W - P0, Ts)
    for gi in range(0, G):
        i_h = i_hk * G + gi
        if VARLEN:
            rb = i_h * T + bos
        else:
            rb = (i_b * H + i_h) * T
        fw = tl.load(f + i_h)
        for r0 in range(lo, hi, BT):
            r = r0 + tl.arange(0, BT)
            mr = r < hi
            rows = P0 + r  # (rows past the last query: zero q, dA, da, g, so zero dS)
            b_q = _rows(q + i_b * sqb + i_h * sqh + bos * sqt, r, mr, sqt, D, BD)
            row = rb + r.to(tl.int64)
            _, b_dA, b_da, _, _, m_i, c_i = _grad_rows(do + i_b * sdb + i_h * sdh + bos * sdt,
                                                       sdt, u, Dn, m, ties, fw, r, mr, row, DV,
                                                       BV)
            g_i = tl.load(g + row, mask=mr, other=0.0)
            a_i = tl.load(arg + row, mask=mr, other=-1)
            s, ok = _scores(b_q, b_k, scale, rows, cols, W, FP32)
            p = exp_nonpos(s - m_i[:, None])
            dp = _mm(b_dA, tl.trans(b_v), LOWP, FP32) + b_da[:, None]
            dS = p * dp - _top(s, ok, m_i, c_i, cols, a_i) * (g_i / c_i)[:, None]
            acc_v += _mm(tl.trans(p), b_dA, LOWP, FP32)
            acc_k += _mm(tl.trans(dS), b_q, LOWP, FP32)
    acc_k = acc_k * scale
    ml = mc & (cols < NLs)
    acc_v += _rows(dvl + i_b * slvb + i_hk * slvh + bos * slvt, cols, ml, slvt, DV,
                   BV).to(tl.float32)
    if LIN_GRAD > 0:
        acc_k = _lin_grad(acc_k, b_k, _rows(dkl + i_b * slkb + i_hk * slkh + bos * slkt, cols,
                                            ml, slkt, D, BD).to(tl.float32), 1.0, LIN_GRAD,
                          PHI, DPHI)
    _put(dk + i_b * skb + i_hk * skh + bos * skt, cols, mc, skt, D, acc_k, BD)
    _put(dv + i_b * svb + i_hk * svh + bos * svt, cols, mc, svt, DV, acc_v, BV)


def _laid_out(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is [B, H, T, D] or a transposed [B, T, H, D] (both dense, so
    ``empty_like`` gives its gradient the same strides, which the kernels write with), else a
    contiguous copy (a slice along T, say)."""
    x = unit_last(x)
    return x if x.is_contiguous() or x.transpose(1, 2).is_contiguous() else x.contiguous()


def _configs():
    """Query tile BT, key tile BK, warps: one small config in the interpreter and with
    FEATATTN_NO_AUTOTUNE=1, else tuned per (D, Dv, W)."""
    if INTERPRET:
        return [triton.Config({"BT": 32, "BK": 32}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 64, "BK": 64}, num_warps=4, num_stages=2)]
    # H200, B8 H16 D64 W64, T = 16384 (docs/benchmarks.md, session 6): forward 64/32/4
    # warps/2 stages, dq 64/64/4/3, dk/dv 64/64/4/1; 128-row tiles, 8 and 2 warps were slower
    # for all three (a program loops over only 2-3 tiles, so it is mostly latency)
    space = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2),
             (128, 32, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 1), (64, 64, 4, 3),
             (32, 32, 4, 1), (64, 64, 2, 2)]
    return [triton.Config({"BT": bt, "BK": bk}, num_warps=nw, num_stages=ns)
            for bt, bk, nw, ns in space]


# tuned per head dims, window, problem size (SIZE: _common.size_bucket) and dtype; the
# launches go through TunedLaunch (the autotuner's key is built once per key, not per call)
_KEY = ["D", "DV", "W", "SIZE", "FP32"]


def _launches(configs=None, do_bench=None):
    """The forward, dq and dk/dv launches, autotuned over ``configs`` (default
    :func:`_configs`).  The dq and dk/dv kernels add into buffers they also read (the
    linear part's gradients, see :func:`_in_place`), so the autotuner, which runs every
    config of a new key many times on the call's own tensors, restores those buffers after
    each run (``restore_value``); without it the first backward of each key came out with
    the window's gradients added once per trial run.  (``do_bench``: tests stand in for
    the GPU's timer.)"""
    cfgs = configs or _configs()

    def tuned(kernel, key, restore=None):
        return TunedLaunch(triton.autotune(configs=cfgs, key=key, restore_value=restore,
                                           do_bench=do_bench)(kernel))

    return (tuned(_window_fwd_kernel, _KEY),
            tuned(_window_dq_kernel, _KEY + ["LIN_GRAD"], ["dq"]),
            tuned(_window_dkdv_kernel, _KEY + ["LIN_GRAD"], ["dk", "dv"]))


_FWD, _DQ, _DKDV = _launches()


def _dims(D: int, DV: int, dtype: torch.dtype):
    """Tile widths of the head dims: powers of two >= 32 on the GPU, >= 16 under the
    interpreter (as chunked._tiles: 16-wide tiles faulted on the H200)."""
    low = 16 if INTERPRET else 32
    return max(low, next_pow2(D)), max(low, next_pow2(DV))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def _in_place(part, like):
    """``part`` (the linear part's gradient) as the buffer of the whole gradient of ``like``
    when it has like's shape, dtype and strides (the window kernels write with like's), so
    the backward holds one tensor a gradient instead of two (B8 H16 T16384 D64 bf16: 805 MB
    less at the peak); else a new tensor laid out like ``like``."""
    if part.shape == like.shape and part.dtype == like.dtype and part.stride() == like.stride():
        return part
    return torch.empty_like(like)


def _hybrid_forward(q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps,
                    store_final, cu, max_len):
    """The forward launches: ``(o, kvT, zT, saved)``, ``saved`` the tensors the backward
    reads (q, k, v as laid out, the features, the linear part's rows, the window's rows).
    How the linear part gets its inputs (``mode``):

    * ``"features"``: fq, fk given (differentiable inputs of their own);
    * ``"plain"``: q and k are the features (no map, scale 1);
    * ``"kernel"``: raw q and k, the map (``fmap``) applied inside the chunked kernels;
    * ``"pass"``: the features made here by the map's Triton pass and saved; the chunked
      kernels run on them, and the window kernels apply the map's derivative to the linear
      part's gradients (no map backward pass, no separate gradient sums).
    """
    q, k, v = _laid_out(q), _laid_out(k), _laid_out(v)
    B, H, T, D = q.shape
    Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
    W = int(window)
    ks = W - (N - T)  # query row r sums the keys s <= r - ks (positions <= P0 + r - W)
    # programs: B * H rows of T queries, or (cu: packed) sequences * H of at most max_len
    NB, TQ = (cu.shape[0] - 1, max_len) if cu is not None else (B, T)
    size = launch_size(NB, H, T, packed=cu is not None)
    if mode == "pass":
        fq, fk = _maps.apply_map(q, fmap, scale), _maps.apply_map(k, fmap)
    lq, lk = (q, k) if fq is None else (unit_last(fq), unit_last(fk))
    # L / l is bounded by the values, but not when the features can be negative and l
    # nears 0 (no map, say): fp16 would overflow, so its L is fp32 (bf16 has the range)
    L, lden, kvT, zT = _chunked._forward(
        lq, lk, v, True, _LIN_EPS, kv0, z0, store_final, fmap if mode == "kernel" else "",
        scale if mode == "kernel" else 1.0, kshift=ks, cu_seqlens=cu,
        o_dtype=torch.float32 if q.dtype == torch.float16 else None)
    BD, BV = _dims(D, DV, q.dtype)
    o = empty_like_layout(q, B, H, T, DV, q.dtype)
    Dn, m, ties = (alloc((B, H, T), torch.float32, q.device) for _ in range(3))
    arg = torch.empty((B, H, T), dtype=torch.int32, device=q.device)  # (alloc poisons: NaN)
    _FWD[lambda c: (NB * H, cdiv(TQ, c["BT"]))](
        q, k, v, L, lden, f, o, Dn, m, ties, arg, cu if cu is not None else o,
        *_strides(q), *_strides(k), *_strides(v), *_strides(L), *_strides(o),
        T, N, H, H // Hkv, D, DV, W, float(wscale), float(eps), size, BD=BD, BV=BV,
        FP32=q.dtype == torch.float32, VARLEN=cu is not None)
    return o, kvT, zT, (q, k, v, fq, fk, L, lden, Dn, m, ties, arg)


def _hybrid_backward(q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu, do, dkvT,
                     dzT, mode, fmap, scale, wscale, W, max_len):
    """The backward launches: ``(dq, dk, dv, dfq, dfk, df, dkv0, dz0)`` (None where there is
    no such input), from the forward's saved tensors (:func:`_hybrid_forward`)."""
    B, H, T, D = q.shape
    Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
    ks = W - (N - T)
    varlen = cu is not None
    NB, TQ = (cu.shape[0] - 1, max_len) if varlen else (B, T)
    size = launch_size(NB, H, T, packed=varlen)
    do = unit_last(do)
    u = row_dot(o, do)
    # the linear part: the chunked backward with the shared denominator (per head
    # D / (1 - f)) and delta = do . o of the hybrid's own output
    lq, lk = (q, k) if fq is None else (unit_last(fq), unit_last(fk))
    dql, dkl, dvl, dkv0, dz0 = _chunked._backward(
        lq, lk, v, None, Dn / (1.0 - f).view(1, H, 1), kv0, z0, do, dkvT, dzT, True,
        fmap if mode == "kernel" else "", scale if mode == "kernel" else 1.0, kshift=ks,
        cu_seqlens=cu, delta=u)
    lin_grad = {"features": 0, "plain": 1, "kernel": 1, "pass": 2}[mode]
    form = _maps.lookup(fmap)[1] if mode == "pass" else None
    BD, BV = _dims(D, DV, q.dtype)
    meta = dict(BD=BD, BV=BV, LIN_GRAD=lin_grad, PHI=form.phi if form else None,
                DPHI=form.dphi if form else None, LOWP=q.dtype == torch.bfloat16,
                FP32=q.dtype == torch.float32, VARLEN=varlen)
    # the window's gradients are added to the linear part's in place where those are laid
    # out as the inputs are (not when they are the features' own gradients, returned)
    feats = mode == "features"
    dq = torch.empty_like(q) if feats else _in_place(dql, q)
    dk = torch.empty_like(k) if feats else _in_place(dkl, k)
    dv = _in_place(dvl, v)
    g, dfr = (alloc((B, H, T), torch.float32, q.device) for _ in range(2))
    cu_arg = cu if varlen else dq
    _DQ[lambda c: (NB * H, cdiv(TQ, c["BT"]))](
        q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dq, g, dfr, cu_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(L), *_strides(do), *_strides(dql),
        T, N, H, H // Hkv, D, DV, W, wscale, scale, size, **meta)
    nl = T - ks  # keys with a linear part: positions < N - W (packed: each sequence's)
    _DKDV[lambda c: (NB * Hkv, cdiv(N if not varlen else TQ, c["BK"]))](
        q, k, v, do, f, u, Dn, m, ties, arg, g, dkl, dvl, dk, dv, cu_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dkl),
        *_strides(dvl), T, N, nl, H, H // Hkv, D, DV, W, wscale, scale, size, **meta)
    dfq = dfk = None
    if mode == "features" and varlen:  # keys in each sequence's last W have no linear part
        dfq = dql
        ends = cu[1:].long()
        linear_to = torch.repeat_interleave(ends - W, ends - cu[:-1].long(), output_size=T)
        keep = torch.arange(T, device=q.device) < linear_to  # each token's sequence end - W
        dfk = torch.where(keep[:, None], dkl, 0.0).to(fk.dtype)
    elif mode == "features":  # the features' gradients (their map's backward is autograd's)
        dfq = dql
        if N == T and dkl.shape[2] == N:  # keys past N - W have no linear part
            dfk = dkl
            dfk[:, :, max(nl, 0):].zero_()
        else:
            dfk = torch.zeros_like(fk)
            if nl > 0:
                dfk[:, :, :nl] = dkl[:, :, :nl]
    df = dfr.sum((0, 2))
    return dq, dk, dv, dfq, dfk, df, dkv0, dz0


class _Hybrid(torch.autograd.Function):
    """The hybrid call in eager mode (:func:`_hybrid_forward` / :func:`_hybrid_backward`);
    under torch.compile the custom op ``featattn::hybrid_fwd`` runs the same launches."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps,
                store_final, cu, max_len):
        o, kvT, zT, saved = _hybrid_forward(q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale,
                                            wscale, window, eps, store_final, cu, max_len)
        q, k, v, fq, fk, L, lden, Dn, m, ties, arg = saved
        ctx.save_for_backward(q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu)
        ctx.meta = (mode, fmap, float(scale), float(wscale), int(window), int(max_len))
        return o, kvT, zT

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dkvT, dzT):
        grads = _hybrid_backward(*ctx.saved_tensors, do, dkvT, dzT, *ctx.meta)
        return grads + (None,) * 9


# ---------------------------------------------------------------- torch.compile: custom ops
# The same launches as featattn::hybrid_fwd / featattn::hybrid_bwd, which dynamo keeps as
# opaque nodes (it cannot trace a Triton launch inside an autograd.Function).  An empty
# tensor stands for None among the outputs (a custom op returns tensors only); outputs never
# alias inputs; the fake implementations give the real ones' shapes, dtypes and strides.

def _none(t):
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


@torch.library.custom_op("featattn::hybrid_fwd", mutates_args=())
def _hybrid_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: Optional[torch.Tensor],
    fk: Optional[torch.Tensor], f: torch.Tensor, kv0: Optional[torch.Tensor],
    z0: Optional[torch.Tensor], mode: str, fmap: str, scale: float, wscale: float, window: int,
    eps: float, store_final: bool, cu: Optional[torch.Tensor], max_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    o, kvT, zT, saved = _hybrid_forward(q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale,
                                        window, eps, store_final, cu, max_len)
    _, _, _, pfq, pfk, L, lden, Dn, m, ties, arg = saved
    e = q.new_empty(0, dtype=torch.float32)
    if mode == "pass":  # the map pass's features, which the backward reads
        pfq, pfk = pfq.contiguous(), pfk.contiguous()
    else:
        pfq, pfk = e.clone(), e.clone()
    return (o, kvT if kvT is not None else e.clone(), zT if zT is not None else e.clone(),
            L, lden, Dn, m, ties, arg, pfq, pfk)


@_hybrid_fwd_op.register_fake
def _(q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps, store_final, cu,
      max_len):
    B, H, T, D = q.shape
    DV = v.shape[-1]
    S = B if cu is None else cu.shape[0] - 1
    Dk = D if fq is None else fq.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    lq = unit_last(fq) if mode == "features" else _laid_out(q)  # as _hybrid_forward's
    o = empty_like_layout(_laid_out(q), B, H, T, DV, q.dtype, poison=False)
    L = empty_like_layout(lq, B, H, T, DV,  # (the chunked forward's o: lq's dtype)
                          torch.float32 if q.dtype == torch.float16 else lq.dtype, poison=False)
    rows = [torch.empty((B, H, T), **f32) for _ in range(4)]
    arg = torch.empty((B, H, T), dtype=torch.int32, device=q.device)
    kvT = torch.empty((S, H, Dk, DV), **f32) if store_final else torch.empty(0, **f32)
    zT = torch.empty((S, H, Dk), **f32) if store_final else torch.empty(0, **f32)
    if mode == "pass":
        pfq, pfk = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
            torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:
        pfq, pfk = torch.empty(0, **f32), torch.empty(0, **f32)
    return (o, kvT, zT, L, *rows, arg, pfq, pfk)


@torch.library.custom_op("featattn::hybrid_bwd", mutates_args=())
def _hybrid_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: Optional[torch.Tensor],
    fk: Optional[torch.Tensor], f: torch.Tensor, kv0: Optional[torch.Tensor],
    z0: Optional[torch.Tensor], o: torch.Tensor, L: torch.Tensor, lden: torch.Tensor,
    Dn: torch.Tensor, m: torch.Tensor, ties: torch.Tensor, arg: torch.Tensor,
    cu: Optional[torch.Tensor], do: torch.Tensor, dkvT: Optional[torch.Tensor],
    dzT: Optional[torch.Tensor], mode: str, fmap: str, scale: float, wscale: float,
    window: int, max_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    q, k, v = _laid_out(q), _laid_out(k), _laid_out(v)
    dq, dk, dv, dfq, dfk, df, dkv0, dz0 = _hybrid_backward(
        q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu, do, dkvT, dzT, mode,
        fmap, scale, wscale, window, max_len)
    e = q.new_empty(0, dtype=torch.float32)
    if dfq is not None:
        dfq, dfk = dfq.to(fq.dtype).contiguous(), dfk.to(fk.dtype).contiguous()
    return (dq, dk, dv, dfq if dfq is not None else e.clone(),
            dfk if dfk is not None else e.clone(), df,
            dkv0 if dkv0 is not None else e.clone(), dz0 if dz0 is not None else e.clone())


@_hybrid_bwd_op.register_fake
def _(q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu, do, dkvT, dzT, mode,
      fmap, scale, wscale, window, max_len):
    f32 = dict(dtype=torch.float32, device=q.device)
    q, k, v = _laid_out(q), _laid_out(k), _laid_out(v)
    feats = mode == "features"
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty(fq.shape, dtype=fq.dtype, device=q.device) if feats else torch.empty(0, **f32),
            torch.empty(fk.shape, dtype=fk.dtype, device=q.device) if feats else torch.empty(0, **f32),
            torch.empty(f.shape, **f32),
            torch.empty(kv0.shape, **f32) if kv0 is not None else torch.empty(0, **f32),
            torch.empty(z0.shape, **f32) if z0 is not None else torch.empty(0, **f32))


def _hybrid_setup(ctx, inputs, output):
    (q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps, store_final, cu,
     max_len) = inputs
    o, kvT, zT, L, lden, Dn, m, ties, arg, pfq, pfk = output
    if mode == "pass":
        fq, fk = pfq, pfk
    ctx.save_for_backward(q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu)
    ctx.meta = (mode, fmap, float(scale), float(wscale), int(window), int(max_len))
    ctx.store_final = store_final


def _hybrid_grads(ctx, do, dkvT, dzT, *unused):
    q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu = ctx.saved_tensors
    if not ctx.store_final:
        dkvT = dzT = None
    dq, dk, dv, dfq, dfk, df, dkv0, dz0 = _hybrid_bwd_op(
        q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, cu, do, dkvT, dzT, *ctx.meta)
    feats = ctx.meta[0] == "features"
    return (dq, dk, dv, dfq if feats else None, dfk if feats else None, df, _none(dkv0),
            _none(dz0)) + (None,) * 9


_hybrid_fwd_op.register_autograd(_hybrid_grads, setup_context=_hybrid_setup)


def _hybrid_compiled(q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps,
                     store_final, cu, max_len):
    """:class:`_Hybrid`'s call through the custom op (under torch.compile)."""
    o, kvT, zT, *_ = _hybrid_fwd_op(q, k, v, fq, fk, f, kv0, z0, mode, fmap, float(scale),
                                    float(wscale), int(window), float(eps), bool(store_final),
                                    cu, int(max_len))
    return o, (kvT if store_final else None), (zT if store_final else None)


def hybrid_attention(q, k, v, *, weight, window: int, window_scale: float, eps: float,
                     features=None, feature_map: str = "", map_pass: bool = False,
                     scale: float = 1.0, initial_kv=None, initial_z=None,
                     return_state: bool = False, cu_seqlens=None, max_len: int = 0,
                     check: bool = True):
    """The hybrid layer's output ``o [B, H, T, Dv]`` (and its linear state), both parts in
    Triton.

    Args:
        q: ``[B, H, T, D]``, the queries at the last T of the N key positions.
        k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]`` (unit last stride, any other strides;
            dk/dv come back with the same strides).
        weight: fp32 ``[H]``, the mixing weight f of each head (differentiable).
        window: W, 1 <= W <= N (N - T, the keys before the queries, at most W).
        window_scale: multiplies q . k in the softmax; eps: added to the shared denominator.
        features: None, or ``(fq [B, H, T, Dk], fk [B, Hkv, N, Dk])`` the linear part's
            features (differentiable); with None, q and k are the linear part's inputs: raw
            when ``feature_map`` is a key of featattn.kernels.maps (``fused_key``), whose map
            of ``scale * q`` and of k is applied inside the chunked kernels, or with
            ``map_pass`` by one Triton pass before them (faster when one program sweeps
            each head: B * H near the SM count); else features themselves.
        initial_kv, initial_z: fp32 ``[B, H, Dk, Dv]`` / ``[B, H, Dk]``, the linear state of
            the keys before the N (or None).
        return_state: also return the linear state over every key but the last W.
        cu_seqlens: None, or packed sequences (B = 1, N = T: no keys before the queries), an
            int32 tensor ``[S + 1]`` on q's device as featattn.linear_attention takes it, and
            ``max_len`` the longest sequence's length (0: read from cu_seqlens); each
            sequence is attended alone, the states are per sequence (``[S, H, ...]``).
        check: read cu_seqlens (a host synchronisation) to check max_len, which must cover
            the longest sequence (featattn.linear_attention knows it and passes False).

    Returns:
        ``(o, kv, z)``, kv / z None unless ``return_state``.
    """
    B, H, T, _ = q.shape
    N = k.shape[2]
    if cu_seqlens is not None and (check or max_len < 1):
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_len < 1:
            max_len = longest
        elif max_len < longest:
            raise ValueError(f"max_len = {max_len} is below the longest packed sequence, "
                             f"{longest} tokens; pass max_len=0 to read it from cu_seqlens")
    if cu_seqlens is not None and (B != 1 or N != T):
        raise ValueError(f"cu_seqlens packs sequences into a batch of one with no keys before "
                         f"the queries: got B = {B}, {N} keys for {T} queries")
    if cu_seqlens is not None and isinstance(window, int) and not isinstance(window, bool):
        window = min(window, N)  # (a window past every sequence's end: all softmax)
    if isinstance(window, bool) or not isinstance(window, int) or not N - T <= window <= N \
            or window < 1:
        raise ValueError(f"window must be an int with max(1, N - T) <= window <= N (the keys "
                         f"before the queries all in the first query's window), got window="
                         f"{window!r} with N = {N} keys and T = {T} queries; featattn."
                         f"linear_attention clamps and checks this for you")
    if not isinstance(weight, torch.Tensor) or weight.shape != (H,) \
            or weight.dtype != torch.float32 or weight.device != q.device:
        got = (tuple(weight.shape), weight.dtype, str(weight.device)) \
            if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be an fp32 [H] = [{H}] tensor on {q.device} (the mixing "
                         f"weight of each head), got {got}; e.g. torch.full(({H},), 0.5, "
                         f"device=q.device)")
    fq, fk = (None, None) if features is None else features
    if features is not None:
        mode = "features"
    elif feature_map:
        mode = "pass" if map_pass else "kernel"
    else:
        mode = "plain"
    Dk = q.shape[-1] if fq is None else fq.shape[-1]
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    kv0, z0 = _chunked.fill_state_half(True, initial_kv, initial_z, S, H, Dk, v.shape[-1],
                                       q.device)
    if kv0 is not None:
        kv0, z0 = kv0.float().contiguous(), z0.float().contiguous()
    run = _hybrid_compiled if torch.compiler.is_compiling() or _common.EAGER_CUSTOM_OP \
        else _Hybrid.apply
    return run(q, k, v, fq, fk, weight, kv0, z0, mode, feature_map, scale, window_scale,
               window, eps, bool(return_state), cu_seqlens, int(max_len))
