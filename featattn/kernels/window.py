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

Kernels.  W <= 64 (LoLCATs' 64 included) and one program per head enough to fill the GPU
(the chunked kernel would not split T): the whole forward, both parts, is one sweep per head
(:func:`_window_fused_fwd_kernel`, tiles at least W long so a query tile's window lies in
its own key tile and the one before).  Otherwise the linear part runs in the chunked kernel
and the window forward is one program per (batch * head, query tile), flash-attention style (an
online max over the window's key tiles, then the sums rescaled to the final max, which is
m_p, and the count of maximal scores), reading the linear part's rows and writing o, D, m
and the ties.  Backward, W <= 64 (LoLCATs' 64 included): one sweep per (batch * kv head,
run of query tiles) with tiles at least W long, so a query tile sees only its own key tile
and the one before; the open key tile's dk/dv are carried across the query tiles and heads
of the group (:func:`_window_bwd_kernel`).  Longer windows: two kernels.  dq: one program
per (batch * head, query tile) in one pass over the key tiles (A, a, the sum of the maximal keys and the dq sum together; the tie term is applied
at the end), writing dq (plus the linear part's dq when the map is fused), g and df's rows.
dk/dv: one program per (batch * kv head, key tile), looping over the query heads of the
group (no atomics), adding the linear part's dk/dv of the same keys.  Scores and sums in
fp32; products take the input dtype on the tensor cores (fp32 inputs: tf32x3), the
backward's fp32 intermediates a dtype with fp32's range (bf16 for bf16 inputs, else fp32 on
tf32 cores): chunked.py's ``_dot_in`` and ``_mm``.  No feature, score or window sum reaches
HBM; the saved tensors are o, the linear part's output, and fp32 rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch.autograd.function import once_differentiable
import triton.language as tl

from .. import _switches
from . import chunked as _chunked
from . import maps as _maps
from ._common import INTERPRET, TunedLaunch, alloc, cdiv, empty_like_layout, next_pow2, row_dot
from ._common import size_bucket, unit_last
from .chunked import _dot_in, _mm  # a @ b with the fp32 precision named (TF32X3)

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
    q, k, v, L, lden, f, o, Dn, m, ties, arg,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sLb, sLh, sLt, sob, soh, sot,
    T, N, H, G, D, DV, W, scale, eps, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, FP32: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * H, query tiles): o (input dtype, strided like q), fp32 [B*H, T] rows of
    D (eps included), m and the tie counts, and int32 rows of a maximal key's position."""
    i_bh, i_t, i_b, i_h, i_hk = _program(H, G)
    r, rows, mr, lo, hi = _query_tile(i_t, T, N, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
    m_i = tl.full([BT], -1e30, tl.float32)
    l_i = tl.zeros([BT], tl.float32)
    c_i = tl.zeros([BT], tl.float32)
    a_i = tl.zeros([BT], tl.int32)
    acc = tl.zeros([BT, BV], tl.float32)
    k_base = k + i_b * skb + i_hk * skh
    v_base = v + i_b * svb + i_hk * svh
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, N,
                                    D, DV, BK, BD, BV, FP32)
        tmax, targ = tl.max(s, 1, return_indices=True)
        a_i = tl.where(tmax > m_i, j0 + targ, a_i)
        m_new = tl.maximum(m_i, tmax)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        c_i = tl.where(tmax > m_i, 0.0, c_i) + tl.sum(tl.where(ok & (s == m_new[:, None]), 1.0, 0.0), 1)
        acc = acc * alpha[:, None] + _dot_in(p.to(b_v.dtype), b_v, FP32)
        m_i = m_new
    row = i_bh.to(tl.int64) * T + r.to(tl.int64)
    b_L, b_l = _linear_rows(L + i_b * sLb + i_h * sLh, lden, r, mr, row, sLt, DV, BV)
    fw = tl.load(f + i_h)
    den = fw * l_i + (1.0 - fw) * b_l + eps
    _put(o + i_b * sob + i_h * soh, r, mr, sot, DV, (fw * acc + (1.0 - fw) * b_L) / den[:, None], BV)
    tl.store(Dn + row, den, mask=mr)
    tl.store(m + row, m_i, mask=mr)
    tl.store(ties + row, c_i, mask=mr)
    tl.store(arg + row, a_i, mask=mr)


@triton.jit
def _feature_rows(x_tile, fx, pos, mask, sft, DK, xscale, BF: tl.constexpr,
                  FEAT: tl.constexpr, PHI: tl.constexpr):
    """The linear part's features of rows ``pos``: the raw tile itself (FEAT 0), loaded from
    fx (FEAT 1, rows sft apart, DK wide), or PHI(xscale * x) of the raw tile (FEAT 2)."""
    if FEAT == 0:
        r = x_tile
    elif FEAT == 1:
        r = _rows(fx, pos, mask, sft, DK, BF)
    else:
        cols = tl.arange(0, BF)
        r = _chunked._features(x_tile, xscale, mask[:, None] & (cols[None, :] < DK), PHI)
    return r


@triton.jit
def _window_fused_fwd_kernel(
    q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg, kvT, zT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sfqb, sfqh, sfqt, sfkb, sfkh, sfkt,
    sob, soh, sot, sLb, sLh, sLt,
    T, N, H, G, D, DK, DV, W, wscale, scale, eps, lin_eps, SIZE,
    BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    FEAT: tl.constexpr, PHI: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    LIN_CUR: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr,
):
    """The whole hybrid forward in one sweep for W <= BT: grid (B * H,), one program per head
    walking its query tiles in order (tiles as :func:`_window_bwd_kernel`'s: query tile i
    sees key tiles i - 1 and i).  The linear state S, z holds the key tiles <= i - 2 (every
    key of them is linear for every row of tile i); the keys of tile i - 1 (and, when W <
    BT, LIN_CUR, of tile i) at or before p - W are added as a masked quadratic term, the
    rest are the window.  Writes what :func:`_window_fwd_kernel` and the chunked forward do
    together: o, the linear part's normalised output L (L's dtype) and denominator lden,
    D, m, ties, arg, and (STORE_FINAL) the state over the keys < N - W.  Features: see
    :func:`_feature_rows` (FEAT 2: PHI(scale q), PHI(k)); kv0 / z0 / kvT / zT fp32
    [B, H, DK, DV] / [B, H, DK]."""
    i_bh = tl.program_id(0)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hk = i_h // G
    P0 = N - T
    offs = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_v = tl.arange(0, BV)
    mf = offs_f < DK
    mv = offs_v < DV
    q_base = q + i_b * sqb + i_h * sqh
    fq_base = fq + i_b * sfqb + i_h * sfqh
    k_base = k + i_b * skb + i_hk * skh
    fk_base = fk + i_b * sfkb + i_hk * sfkh
    v_base = v + i_b * svb + i_hk * svh
    st_off = i_bh.to(tl.int64) * DK * DV
    S = tl.zeros([BF, BV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(kv0 + st_off + offs_f[:, None] * DV + offs_v[None, :],
                    mask=mf[:, None] & mv[None, :], other=0.0)
        z = tl.load(z0 + i_bh.to(tl.int64) * DK + offs_f, mask=mf, other=0.0)
    fw = tl.load(f + i_h)
    last_lin = N - 1 - W  # the last key with a linear part (the state's last key)
    cols_p = P0 - BT + offs
    mp = cols_p >= 0
    k_p = _rows(k_base, cols_p, mp, skt, D, BD)
    v_p = _rows(v_base, cols_p, mp, svt, DV, BV)
    f_p = _feature_rows(k_p, fk_base, cols_p, mp, sfkt, DK, 1.0, BF, FEAT, PHI)
    for i in range(0, tl.cdiv(T, BT)):
        r = i * BT + offs
        mr = r < T
        rows = tl.where(mr, P0 + r, N)
        cols_c = P0 + i * BT + offs
        mc = cols_c < N
        b_q = _rows(q_base, r, mr, sqt, D, BD)
        f_q = _feature_rows(b_q, fq_base, r, mr, sfqt, DK, scale, BF, FEAT, PHI)
        k_c = _rows(k_base, cols_c, mc, skt, D, BD)
        v_c = _rows(v_base, cols_c, mc, svt, DV, BV)
        f_c = _feature_rows(k_c, fk_base, cols_c, mc, sfkt, DK, 1.0, BF, FEAT, PHI)
        # the window: both tiles' scores, one max
        s_p, ok_p = _scores(b_q, k_p, wscale, rows, cols_p, W, N, FP32)
        s_c, ok_c = _scores(b_q, k_c, wscale, rows, cols_c, W, N, FP32)
        mx_p, ag_p = tl.max(s_p, 1, return_indices=True)
        mx_c, ag_c = tl.max(s_c, 1, return_indices=True)
        m_i = tl.maximum(tl.maximum(mx_p, mx_c), -1e30)  # -1e30: rows past T have no keys
        a_i = tl.where(mx_c > mx_p, P0 + i * BT + ag_c, P0 + (i - 1) * BT + ag_p)
        p_p = tl.exp(s_p - m_i[:, None])
        p_c = tl.exp(s_c - m_i[:, None])
        a = tl.sum(p_p, 1) + tl.sum(p_c, 1)
        c_i = tl.sum(tl.where(ok_p & (s_p == m_i[:, None]), 1.0, 0.0), 1) \
            + tl.sum(tl.where(ok_c & (s_c == m_i[:, None]), 1.0, 0.0), 1)
        acc = _dot_in(p_p.to(v_p.dtype), v_p, FP32) + _dot_in(p_c.to(v_c.dtype), v_c, FP32)
        # the linear part: the state, and the keys of tile i - 1 (and i) at or before p - W
        lin_p = (cols_p[None, :] <= rows[:, None] - W) & (cols_p[None, :] >= 0)
        A_p = tl.where(lin_p, _dot_in(f_q, tl.trans(f_p), FP32), 0.0)
        num = _mm(A_p, v_p, LOWP, FP32) + _mm(f_q, S, LOWP, FP32)
        l_i = tl.sum(A_p, 1) + tl.sum(f_q.to(tl.float32) * z[None, :], 1)
        if LIN_CUR:
            lin_c = cols_c[None, :] <= rows[:, None] - W
            A_c = tl.where(lin_c, _dot_in(f_q, tl.trans(f_c), FP32), 0.0)
            num += _mm(A_c, v_c, LOWP, FP32)
            l_i += tl.sum(A_c, 1)
        # the state takes tile i - 1 (its keys up to the last linear one)
        f_s = tl.where((cols_p <= last_lin)[:, None], f_p, 0.0).to(f_p.dtype)
        S += _dot_in(tl.trans(f_s), v_p, FP32)
        z += tl.sum(f_s.to(tl.float32), 0)
        l_i = l_i + lin_eps
        row = i_bh.to(tl.int64) * T + r.to(tl.int64)
        den = fw * a + (1.0 - fw) * l_i + eps
        _put(o + i_b * sob + i_h * soh, r, mr, sot, DV, (fw * acc + (1.0 - fw) * num) / den[:, None],
             BV)
        _put(L + i_b * sLb + i_h * sLh, r, mr, sLt, DV, num / l_i[:, None], BV)
        tl.store(lden + row, l_i, mask=mr)
        tl.store(Dn + row, den, mask=mr)
        tl.store(m + row, m_i, mask=mr)
        tl.store(ties + row, c_i, mask=mr)
        tl.store(arg + row, a_i, mask=mr)
        k_p, v_p, f_p, cols_p = k_c, v_c, f_c, cols_c
    if STORE_FINAL:  # the last tile's keys up to the last linear one
        f_s = tl.where((cols_p <= last_lin)[:, None], f_p, 0.0).to(f_p.dtype)
        S += _dot_in(tl.trans(f_s), v_p, FP32)
        z += tl.sum(f_s.to(tl.float32), 0)
        tl.store(kvT + st_off + offs_f[:, None] * DV + offs_v[None, :], S,
                 mask=mf[:, None] & mv[None, :])
        tl.store(zT + i_bh.to(tl.int64) * DK + offs_f, z, mask=mf)


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
    q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dq, g, dfr,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sLb, sLh, sLt, sdb, sdh, sdt,
    T, N, H, G, D, DV, W, scale, xscale, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
    DPHI: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * H, query tiles): dq (strided like q; the linear part's dq dql [B, H, T, D]
    contiguous added as :func:`_lin_grad` says), and fp32 [B*H, T] rows of g and of df.

    One pass over the key tiles: with dov = do v^T, dp = dov f / D + da and do . A =
    sum p dov, so A itself is never formed; the tie term -g / ties times the sum of each
    row's maximal keys is applied at the end (the key at ``arg`` when no row of the tile
    has tied maxima, else a second pass sums them)."""
    i_bh, i_t, i_b, i_h, i_hk = _program(H, G)
    r, rows, mr, lo, hi = _query_tile(i_t, T, N, W, BT)
    b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
    row = i_bh.to(tl.int64) * T + r.to(tl.int64)
    fw = tl.load(f + i_h)
    b_do, b_dA, b_da, b_u, b_D, m_i, c_i = _grad_rows(do + i_b * sdb + i_h * sdh, sdt, u, Dn, m,
                                                      ties, fw, r, mr, row, DV, BV)
    a_i = tl.load(arg + row, mask=mr, other=-1)
    doA = tl.zeros([BT], tl.float32)
    a = tl.zeros([BT], tl.float32)
    acc = tl.zeros([BT, BD], tl.float32)
    k_base = k + i_b * skb + i_hk * skh
    v_base = v + i_b * svb + i_hk * svh
    for j0 in range(lo, hi, BK):
        b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W, N,
                                    D, DV, BK, BD, BV, FP32)
        p = tl.exp(s - m_i[:, None])
        dov = _mm(b_do, tl.trans(b_v), LOWP, FP32)
        a += tl.sum(p, 1)
        doA += tl.sum(p * dov, 1)
        acc += _mm(p * (dov * (fw / b_D)[:, None] + b_da[:, None]), b_k, LOWP, FP32)
    if tl.max(c_i) > 1.0:  # tied maxima in some row: sum each row's maximal keys
        ktop = tl.zeros([BT, BD], tl.float32)
        for j0 in range(lo, hi, BK):
            b_k, b_v, s, ok = _key_tile(k_base, v_base, j0, hi, skt, svt, b_q, scale, rows, W,
                                        N, D, DV, BK, BD, BV, FP32)
            ktop += _mm(_top(s, ok, m_i, c_i, j0 + tl.arange(0, BK), a_i), b_k, LOWP, FP32)
    else:
        ktop = _rows(k_base, a_i, mr, skt, D, BD).to(tl.float32)
    b_L, b_l = _linear_rows(L + i_b * sLb + i_h * sLh, lden, r, mr, row, sLt, DV, BV)
    g_i = fw * (doA - b_u * a) / b_D
    df_i = (doA - tl.sum(b_do * b_L, 1) - b_u * (a - b_l)) / b_D
    b_dq = (acc - (g_i / c_i)[:, None] * ktop) * scale
    if LIN_GRAD > 0:
        b_dq = _lin_grad(b_dq, b_q, _rows(dql + i_bh.to(tl.int64) * T * D, r, mr, D, D,
                                          BD).to(tl.float32), xscale, LIN_GRAD, PHI, DPHI)
    _put(dq + i_b * sqb + i_h * sqh, r, mr, sqt, D, b_dq, BD)
    tl.store(g + row, g_i, mask=mr)
    tl.store(dfr + row, df_i, mask=mr)


@triton.jit
def _window_dkdv_kernel(
    q, k, v, do, f, u, Dn, m, ties, arg, g, dkl, dvl, dk, dv,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    slkb, slkh, slkt, slvb, slvh, slvt,
    T, N, NL, H, G, D, DV, W, scale, xscale, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
    DPHI: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Grid (B * Hkv, key tiles); dk, dv laid out like k, v.  The linear part's dv and dk of
    keys s < NL, dvl / dkl [B, Hkv, >= NL, .] strided, are added (dk as :func:`_lin_grad`
    says, with xscale 1)."""
    i_bhk = tl.program_id(0)
    i_k = tl.program_id(1)
    Hkv = H // G
    i_b = (i_bhk // Hkv).to(tl.int64)
    i_hk = (i_bhk % Hkv).to(tl.int64)
    P0 = N - T
    cols = i_k * BK + tl.arange(0, BK)
    mc = cols < N
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
        fw = tl.load(f + i_h)
        for r0 in range(lo, hi, BT):
            r = r0 + tl.arange(0, BT)
            mr = r < hi
            rows = tl.where(mr, P0 + r, N)  # a masked row has no keys
            b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
            row = i_bh * T + r.to(tl.int64)
            _, b_dA, b_da, _, _, m_i, c_i = _grad_rows(do + i_b * sdb + i_h * sdh, sdt, u, Dn, m,
                                                       ties, fw, r, mr, row, DV, BV)
            g_i = tl.load(g + row, mask=mr, other=0.0)
            a_i = tl.load(arg + row, mask=mr, other=-1)
            s, ok = _scores(b_q, b_k, scale, rows, cols, W, N, FP32)
            p = tl.exp(s - m_i[:, None])
            dp = _mm(b_dA, tl.trans(b_v), LOWP, FP32) + b_da[:, None]
            dS = p * dp - _top(s, ok, m_i, c_i, cols, a_i) * (g_i / c_i)[:, None]
            acc_v += _mm(tl.trans(p), b_dA, LOWP, FP32)
            acc_k += _mm(tl.trans(dS), b_q, LOWP, FP32)
    acc_k = acc_k * scale
    ml = mc & (cols < NL)
    acc_v += _rows(dvl + i_b * slvb + i_hk * slvh, cols, ml, slvt, DV, BV).to(tl.float32)
    if LIN_GRAD > 0:
        acc_k = _lin_grad(acc_k, b_k, _rows(dkl + i_b * slkb + i_hk * slkh, cols, ml, slkt, D,
                                            BD).to(tl.float32), 1.0, LIN_GRAD, PHI, DPHI)
    _put(dk + i_b * skb + i_hk * skh, cols, mc, skt, D, acc_k, BD)
    _put(dv + i_b * svb + i_hk * svh, cols, mc, svt, DV, acc_v, BV)


@triton.jit
def _pair(b_q, b_do, b_dA, b_da, b_r, m_i, c_i, a_i, gc, b_k, b_v, cols, rows, acc_k, acc_v,
          W, N, scale, LOWP: tl.constexpr, FP32: tl.constexpr):
    """One (query tile, key tile) pair of the window's backward (:func:`_window_bwd_kernel`):
    the pair's part of dq / scale (dS k), of each row's window sum a (sum p) and of do . A
    (sum p dov), and acc_k += dS^T q (dk / scale), acc_v += p^T dA.  b_r = f / D per row,
    gc = g / ties."""
    s, ok = _scores(b_q, b_k, scale, rows, cols, W, N, FP32)
    p = tl.exp(s - m_i[:, None])
    dov = _mm(b_do, tl.trans(b_v), LOWP, FP32)
    dS = p * (dov * b_r[:, None] + b_da[:, None]) - _top(s, ok, m_i, c_i, cols, a_i) * gc[:, None]
    acc_k += _mm(tl.trans(dS), b_q, LOWP, FP32)
    acc_v += _mm(tl.trans(p), b_dA, LOWP, FP32)
    return _mm(dS, b_k, LOWP, FP32), tl.sum(p, 1), tl.sum(p * dov, 1), acc_k, acc_v


@triton.jit
def _close_keys(dk, dv, dkl, dvl, b_k, acc_k, acc_v, cols, own, NL, i_b, i_hk,
                skb, skh, skt, svb, svh, svt, slkb, slkh, slkt, slvb, slvh, slvt, D, DV, scale,
                BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
                DPHI: tl.constexpr):
    """Store dk, dv of the key rows ``cols`` where ``own``: the window's sums plus the
    linear part's dvl / dkl of keys below NL (dk as :func:`_lin_grad` says, xscale 1)."""
    ml = own & (cols < NL)
    acc_k = acc_k * scale
    acc_v += _rows(dvl + i_b * slvb + i_hk * slvh, cols, ml, slvt, DV, BV).to(tl.float32)
    if LIN_GRAD > 0:
        acc_k = _lin_grad(acc_k, b_k, _rows(dkl + i_b * slkb + i_hk * slkh, cols, ml, slkt, D,
                                            BD).to(tl.float32), 1.0, LIN_GRAD, PHI, DPHI)
    _put(dk + i_b * skb + i_hk * skh, cols, own, skt, D, acc_k, BD)
    _put(dv + i_b * svb + i_hk * svh, cols, own, svt, DV, acc_v, BV)


@triton.jit
def _window_bwd_kernel(
    q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dkl, dvl, dq, dk, dv, dfr,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sLb, sLh, sLt, sdb, sdh, sdt,
    slkb, slkh, slkt, slvb, slvh, slvt,
    T, N, NL, H, G, D, DV, W, scale, xscale, eps, SIZE,
    BD: tl.constexpr, BV: tl.constexpr, LIN_GRAD: tl.constexpr, PHI: tl.constexpr,
    DPHI: tl.constexpr, LOWP: tl.constexpr, FP32: tl.constexpr, BT: tl.constexpr,
    SPT: tl.constexpr,
):
    """The whole window backward in one sweep, for W <= BT.  Grid (B * Hkv, segments of SPT
    query tiles).  Query tile i (rows i*BT.., positions P0 + i*BT..) sees key tiles i - 1
    and i, key tile j being positions P0 + j*BT.. (tile -1 holds the keys before the
    queries, as P0 = N - T <= W <= BT), so key tile j is seen by query tiles j and j + 1
    only.  The program of query tiles [i0, i1) sweeps them in order with the key tile i - 1
    open in registers (k, v and its dk/dv sums over every query head of the group), and
    closes it after query tile i: q, do, k and v are read once (plus one tile each at the
    segment's ends), and no atomics.  It owns dq of its query tiles and dk/dv of key tiles
    [i0, i1) (and -1 when i0 = 0): the step i = i1 only adds query tile i1's part to key tile
    i1 - 1, and key tile i0 - 1's sums are dropped.

    Each row's tie gradient g = f (do . A - u a) / D is needed before dS, so it is taken from
    the rows instead of the window's sums: with num = f A + (1 - f) L and u = do . num / D,
    ``g = ((1 - f) (u l - do . L) + eps u) / D``; df's row uses the exact sums of the sweep.
    dq (strided like q), dk / dv (like k / v), fp32 df rows [B*H, T]; dql / dkl / dvl as in
    :func:`_window_dq_kernel` and :func:`_window_dkdv_kernel`."""
    i_bhk = tl.program_id(0)
    Hkv = H // G
    i_b = (i_bhk // Hkv).to(tl.int64)
    i_hk = (i_bhk % Hkv).to(tl.int64)
    P0 = N - T
    i0 = tl.program_id(1) * SPT
    i1 = tl.minimum(i0 + SPT, tl.cdiv(T, BT))
    k_base = k + i_b * skb + i_hk * skh
    v_base = v + i_b * svb + i_hk * svh
    offs = tl.arange(0, BT)
    cols_p = P0 + (i0 - 1) * BT + offs
    mp = (cols_p >= 0) & (cols_p < N)
    k_p = _rows(k_base, cols_p, mp, skt, D, BD)
    v_p = _rows(v_base, cols_p, mp, svt, DV, BV)
    dk_p = tl.zeros([BT, BD], tl.float32)
    dv_p = tl.zeros([BT, BV], tl.float32)
    for i in range(i0, i1 + 1):
        live = (offs * 0 + i) < i1  # query tile i is this program's (vectors: interpreter)
        cols_c = P0 + i * BT + offs
        mc = (cols_c < N) & live
        k_c = _rows(k_base, cols_c, mc, skt, D, BD)
        v_c = _rows(v_base, cols_c, mc, svt, DV, BV)
        dk_c = tl.zeros([BT, BD], tl.float32)
        dv_c = tl.zeros([BT, BV], tl.float32)
        r = i * BT + offs
        mr = r < T
        mo = mr & live
        rows = tl.where(mr, P0 + r, N)  # a row past the last query has no keys
        for gi in range(0, G):
            i_h = i_hk * G + gi
            i_bh = i_b * H + i_h
            row = i_bh * T + r.to(tl.int64)
            fw = tl.load(f + i_h)
            b_q = _rows(q + i_b * sqb + i_h * sqh, r, mr, sqt, D, BD)
            b_do, b_dA, b_da, b_u, b_D, m_i, c_i = _grad_rows(do + i_b * sdb + i_h * sdh, sdt, u,
                                                              Dn, m, ties, fw, r, mr, row, DV, BV)
            a_i = tl.load(arg + row, mask=mr, other=-1)
            b_L, b_l = _linear_rows(L + i_b * sLb + i_h * sLh, lden, r, mr, row, sLt, DV, BV)
            dL = tl.sum(b_do * b_L, 1)
            gc = ((1.0 - fw) * (b_u * b_l - dL) + eps * b_u) / b_D / c_i
            b_r = fw / b_D
            dq1, a1, doA1, dk_p, dv_p = _pair(b_q, b_do, b_dA, b_da, b_r, m_i, c_i, a_i, gc, k_p,
                                              v_p, cols_p, rows, dk_p, dv_p, W, N, scale, LOWP,
                                              FP32)
            dq2, a2, doA2, dk_c, dv_c = _pair(b_q, b_do, b_dA, b_da, b_r, m_i, c_i, a_i, gc, k_c,
                                              v_c, cols_c, rows, dk_c, dv_c, W, N, scale, LOWP,
                                              FP32)
            b_dq = (dq1 + dq2) * scale
            if LIN_GRAD > 0:
                b_dq = _lin_grad(b_dq, b_q, _rows(dql + i_bh * T * D, r, mo, D, D,
                                                  BD).to(tl.float32), xscale, LIN_GRAD, PHI, DPHI)
            _put(dq + i_b * sqb + i_h * sqh, r, mo, sqt, D, b_dq, BD)
            tl.store(dfr + row, (doA1 + doA2 - dL - b_u * (a1 + a2 - b_l)) / b_D, mask=mo)
        # key tile i - 1 is complete: this program's unless it is the tile before i0 > 0
        own = mp & (((offs * 0 + i) > i0) | ((offs * 0 + i0) == 0))
        _close_keys(dk, dv, dkl, dvl, k_p, dk_p, dv_p, cols_p, own, NL, i_b, i_hk,
                    skb, skh, skt, svb, svh, svt, slkb, slkh, slkt, slvb, slvh, slvt, D, DV,
                    scale, BD, BV, LIN_GRAD, PHI, DPHI)
        k_p, v_p, dk_p, dv_p, cols_p, mp = k_c, v_c, dk_c, dv_c, cols_c, cols_c < N


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
    # H200, B8 H16 D64 W64 (docs/benchmarks.md): 64/32/4 forward, 64/64/4 dq and 32/32/4
    # dk/dv won among the first six; the fatter tiles and other pipeline depths after them
    # are not yet measured (a program loops over only 2-3 tiles, so it is mostly latency)
    space = [(32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2),
             (128, 32, 8, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 1), (64, 64, 4, 3),
             (32, 32, 4, 1), (64, 64, 2, 2)]
    return [triton.Config({"BT": bt, "BK": bk}, num_warps=nw, num_stages=ns)
            for bt, bk, nw, ns in space]


#: the longest window the one-sweep backward (:func:`_window_bwd_kernel`) takes: its tiles are
#: at least W long, and longer ones would not fit in registers; longer windows take the dq and
#: dk/dv kernels
SWEEP_MAX_W = 64


def _sweep_tile(W: int) -> int:
    """The sweep's tile length for window W: a power of two >= W (>= 32 on the GPU)."""
    return max(16 if INTERPRET else 32, next_pow2(W))


def _sweep_configs():
    """Query tiles per program (SPT), warps, stages.  Two tiles a program in the interpreter,
    so the tests cross segment ends."""
    if INTERPRET:
        return [triton.Config({"SPT": 2}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"SPT": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"SPT": spt}, num_warps=nw, num_stages=ns)
            for spt in (8, 32) for nw in (4, 8) for ns in (1, 2)]


# tuned per head dims, window, problem size (SIZE: _common.size_bucket) and dtype; the
# launches go through TunedLaunch (the autotuner's key is built once per key, not per call)
_KEY = ["D", "DV", "W", "SIZE", "FP32"]
_FWD = TunedLaunch(triton.autotune(configs=_configs(), key=_KEY)(_window_fwd_kernel))
_DQ = TunedLaunch(triton.autotune(configs=_configs(), key=_KEY + ["LIN_GRAD"])(_window_dq_kernel))
_DKDV = TunedLaunch(triton.autotune(configs=_configs(), key=_KEY + ["LIN_GRAD"])(_window_dkdv_kernel))
_FUSED_FWD = TunedLaunch(triton.autotune(
    configs=[triton.Config({}, num_warps=4, num_stages=1)]
    if INTERPRET or _switches.enabled("FEATATTN_NO_AUTOTUNE") else
    [triton.Config({}, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (1, 2)],
    key=["D", "DK", "DV", "SIZE", "FP32", "FEAT", "BT"])(_window_fused_fwd_kernel))
_BWD = TunedLaunch(triton.autotune(configs=_sweep_configs(),
                                   key=_KEY + ["LIN_GRAD", "BT"])(_window_bwd_kernel))


def _dims(D: int, DV: int, dtype: torch.dtype):
    """Tile widths of the head dims: powers of two >= 16, >= 32 for fp32 on the GPU (as
    chunked._tiles: 16-wide tf32x3 products faulted on the H200)."""
    low = 32 if dtype == torch.float32 and not INTERPRET else 16
    return max(low, next_pow2(D)), max(low, next_pow2(DV))


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


class _Hybrid(torch.autograd.Function):
    """The hybrid call.  How the linear part gets its inputs (``mode``):

    * ``"features"``: fq, fk given (differentiable inputs of their own);
    * ``"plain"``: q and k are the features (no map, scale 1);
    * ``"kernel"``: raw q and k, the map (``fmap``) applied inside the chunked kernels;
    * ``"pass"``: the features made here by the map's Triton pass and saved; the chunked
      kernels run on them, and the window kernels apply the map's derivative to the linear
      part's gradients (no map backward pass, no separate gradient sums).
    """

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, f, kv0, z0, mode, fmap, scale, wscale, window, eps,
                store_final):
        q, k, v = _laid_out(q), _laid_out(k), _laid_out(v)
        B, H, T, D = q.shape
        Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
        W = int(window)
        ks = W - (N - T)  # query row r sums the keys s <= r - ks (positions <= P0 + r - W)
        if mode == "pass":
            fq, fk = _maps.apply_map(q, fmap, scale), _maps.apply_map(k, fmap)
        lq, lk = (q, k) if fq is None else (unit_last(fq), unit_last(fk))
        Dk, dev = lq.shape[-1], q.device
        # L / l is bounded by the values, but not when the features can be negative and l
        # nears 0 (no map, say): fp16 would overflow, so its L is fp32 (bf16 has the range)
        l_dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
        BD, BV = _dims(D, DV, q.dtype)
        o = empty_like_layout(q, B, H, T, DV, q.dtype)
        Dn, m, ties = (alloc((B, H, T), torch.float32, dev) for _ in range(3))
        arg = torch.empty((B, H, T), dtype=torch.int32, device=dev)  # (alloc poisons: NaN)
        if W <= SWEEP_MAX_W and Dk <= MAX_D and _chunked.segments(B * H, T, dev)[0] == 1:
            # one sweep per head does both parts (the chunked kernel would not split T either)
            feat = 2 if mode == "kernel" else (0 if fq is None else 1)
            L = alloc((B, H, T, DV), l_dtype, dev)
            lden = alloc((B, H, T), torch.float32, dev)
            kvT = alloc((B, H, Dk, DV), torch.float32, dev) if store_final else None
            zT = alloc((B, H, Dk), torch.float32, dev) if store_final else None
            bt = _sweep_tile(W)
            _FUSED_FWD[(B * H,)](
                q, k, v, lq, lk, f, o if kv0 is None else kv0, o if z0 is None else z0, o, L,
                lden, Dn, m, ties, arg, o if kvT is None else kvT, o if zT is None else zT,
                *_strides(q), *_strides(k), *_strides(v), *_strides(lq), *_strides(lk),
                *_strides(o), *_strides(L), T, N, H, H // Hkv, D, Dk, DV, W, float(wscale),
                float(scale), float(eps), _LIN_EPS, size_bucket(B, H, T), BD=BD,
                BF=BD if feat != 1 else _dims(Dk, DV, q.dtype)[0], BV=BV, BT=bt, FEAT=feat,
                PHI=_chunked._map_form(fmap)[1] if feat == 2 else None,
                HAS_INIT=kv0 is not None, STORE_FINAL=bool(store_final), LIN_CUR=W < bt,
                LOWP=q.dtype == torch.bfloat16, FP32=q.dtype == torch.float32)
        else:
            L, lden, kvT, zT = _chunked._forward(
                lq, lk, v, True, _LIN_EPS, kv0, z0, store_final,
                fmap if mode == "kernel" else "", scale if mode == "kernel" else 1.0, kshift=ks,
                o_dtype=l_dtype)
            _FWD[lambda c: (B * H, cdiv(T, c["BT"]))](
                q, k, v, L, lden, f, o, Dn, m, ties, arg, *_strides(q), *_strides(k),
                *_strides(v), *_strides(L), *_strides(o), T, N, H, H // Hkv, D, DV, W,
                float(wscale), float(eps), size_bucket(B, H, T), BD=BD, BV=BV,
                FP32=q.dtype == torch.float32)
        ctx.save_for_backward(q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg)
        ctx.meta = (mode, fmap, float(scale), float(wscale), W, ks, float(eps))
        return o, kvT, zT

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dkvT, dzT):
        q, k, v, fq, fk, f, kv0, z0, o, L, lden, Dn, m, ties, arg = ctx.saved_tensors
        mode, fmap, scale, wscale, W, ks, eps = ctx.meta
        B, H, T, D = q.shape
        Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
        do = unit_last(do)
        u = row_dot(o, do)
        # the linear part: the chunked backward with the shared denominator (per head
        # D / (1 - f)) and delta = do . o of the hybrid's own output
        lq, lk = (q, k) if fq is None else (unit_last(fq), unit_last(fk))
        dql, dkl, dvl, dkv0, dz0 = _chunked._backward(
            lq, lk, v, None, Dn / (1.0 - f).view(1, H, 1), kv0, z0, do, dkvT, dzT, True,
            fmap if mode == "kernel" else "", scale if mode == "kernel" else 1.0, kshift=ks,
            delta=u)
        lin_grad = {"features": 0, "plain": 1, "kernel": 1, "pass": 2}[mode]
        form = _maps.lookup(fmap)[1] if mode == "pass" else None
        BD, BV = _dims(D, DV, q.dtype)
        meta = dict(BD=BD, BV=BV, LIN_GRAD=lin_grad, PHI=form.phi if form else None,
                    DPHI=form.dphi if form else None, LOWP=q.dtype == torch.bfloat16,
                    FP32=q.dtype == torch.float32)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dfr = alloc((B, H, T), torch.float32, q.device)
        nl = T - ks  # keys with a linear part: positions < N - W
        if W <= SWEEP_MAX_W:
            bt = _sweep_tile(W)
            _BWD[lambda c: (B * Hkv, cdiv(cdiv(T, bt), c["SPT"]))](
                q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dkl, dvl, dq, dk, dv, dfr,
                *_strides(q), *_strides(k), *_strides(v), *_strides(L), *_strides(do),
                *_strides(dkl), *_strides(dvl), T, N, nl, H, H // Hkv, D, DV, W, wscale, scale,
                eps, size_bucket(B, H, T), BT=bt, **meta)
        else:
            g = alloc((B, H, T), torch.float32, q.device)
            _DQ[lambda c: (B * H, cdiv(T, c["BT"]))](
                q, k, v, do, L, lden, f, u, Dn, m, ties, arg, dql, dq, g, dfr,
                *_strides(q), *_strides(k), *_strides(v), *_strides(L), *_strides(do),
                T, N, H, H // Hkv, D, DV, W, wscale, scale, size_bucket(B, H, T), **meta)
            _DKDV[lambda c: (B * Hkv, cdiv(N, c["BK"]))](
                q, k, v, do, f, u, Dn, m, ties, arg, g, dkl, dvl, dk, dv,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dkl),
                *_strides(dvl), T, N, nl, H, H // Hkv, D, DV, W, wscale, scale,
                size_bucket(B, H, T), **meta)
        dfq = dfk = None
        if mode == "features":  # the features' gradients (their map's backward is autograd's)
            dfq = dql
            if N == T and dkl.shape[2] == N:  # keys past N - W have no linear part
                dfk = dkl
                dfk[:, :, max(nl, 0):].zero_()
            else:
                dfk = torch.zeros_like(fk)
                if nl > 0:
                    dfk[:, :, :nl] = dkl[:, :, :nl]
        df = dfr.sum((0, 2))
        return (dq, dk, dv, dfq, dfk, df, dkv0, dz0) + (None,) * 7


def hybrid_attention(q, k, v, *, weight, window: int, window_scale: float, eps: float,
                     features=None, feature_map: str = "", map_pass: bool = False,
                     scale: float = 1.0, initial_kv=None, initial_z=None,
                     return_state: bool = False):
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

    Returns:
        ``(o, kv, z)``, kv / z None unless ``return_state``.
    """
    B, H, T, _ = q.shape
    N = k.shape[2]
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
    kv0, z0 = _chunked.fill_state_half(True, initial_kv, initial_z, B, H, Dk, v.shape[-1],
                                       q.device)
    if kv0 is not None:
        kv0, z0 = kv0.float().contiguous(), z0.float().contiguous()
    return _Hybrid.apply(q, k, v, fq, fk, weight, kv0, z0, mode, feature_map, scale,
                         window_scale, window, eps, bool(return_state))
