"""Fused Taylor attention in its *parallel* (quadratic, attention-like) form, for short T.

Legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), T time, d raw q/k head
dim, DP = max(16, next_pow2(d)), Dv value dim, BM query block, BN key block.

The same function as :mod:`featattn.kernels.taylor_fused` (read its docstring for the map)::

    a_ts = 1 + s_ts + s_ts^2 / 2,   s_ts = q_t . k_s / sqrt(d)          (s <= t)
    o_t  = sum_s a_ts v_s / (sum_s a_ts + eps)   (normalised)   or   sum_s a_ts v_s

computed the way FlashAttention computes softmax attention: one program per (query block,
batch*head) walks the key blocks s <= t, so nothing is sequential across the sequence and
no state exists.  Work is O(T^2 (d + Dv)) against the chunked kernel's O(T (d^2 Dv)), but
the chunked kernel is a chain of ~14 dependent products per chunk in one program per head
(see taylor_fused), while this form keeps every SM busy with independent blocks: on the
H100 it is the faster one up to a few thousand tokens.  Unlike softmax there is no running
max and no exp: a_ts >= 1/2 > 0, so the denominator is a plain fp32 row sum.

:func:`featattn.kernels.taylor_fused.taylor_attention` picks this form when no state goes in
or out and T <= ``PARALLEL_MAX_T`` (measured crossover; see docs/benchmarks.md).

Backward (normalised; r_t = 1 / den_t, delta_t = do_t . o_t):
    dv_s = sum_t a_ts r_t do_t
    dP_ts = r_t (do_t . v_s) - r_t delta_t,    dS_ts = dP_ts (1 + s_ts)
    dq_t = sum_s dS_ts k_s / sqrt(d),          dk_s = sum_t dS_ts q_t / sqrt(d)
in one launch of ``_bwd_kernel``, whose programs are of two kinds: one per key block, walking
the query blocks t >= s for dk and dv (everything held transposed, [BN, BM], so no dot
result is ever transposed), and one per query block, walking the key blocks s <= t for dq.
Both compute delta = do . o for the query rows they read, so no separate pass over o and do
is needed.  dk/dv are per q head, summed over a k/v group by torch.  No atomics: results
are deterministic.

Numerics are those of taylor_fused: fp32 scores, a, sums and accumulators; the products
with an fp32 operand (a @ v, dS @ k, ...) round it to bf16 for bf16 inputs, use tf32 for
fp16 inputs and fp32_ieee fp32 for fp32 inputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _switches
from . import _common
from ._common import cdiv, next_pow2, size_bucket
from ._common import alloc as _alloc
from ._common import dtype_flags as _flags
from ._common import empty_like_layout as _empty_like_layout
from ._common import TunedLaunch, register_attention_ops, torch_forward
from ._common import batch_head, head_start
from ._common import dot_in_ieee as _dot_in  # taylor_fused's numerics
from ._common import mm_ieee as _mm

_INTERPRET = _common.INTERPRET

#: Longest T for which taylor_attention uses this form (no state in or out).  Measured on the
#: H100 (B=8, H=16, d=16, Dv=64, bf16): see docs/benchmarks.md.  FEATATTN_TAYLOR_PARALLEL_MAX_T
#: overrides (0 turns the parallel form off).
PARALLEL_MAX_T = int(_switches.read("FEATATTN_TAYLOR_PARALLEL_MAX_T"))


def _configs(kind: str):
    """Tile configs.  "fwd": (BM queries, BN keys per step, warps, stages); "bwd": (BMK, BNK,
    BMQ, BNQ, warps, stages): the dk/dv programs own BNK keys and step BMK queries at a
    time, the dq programs own BMQ queries and step BNQ keys."""
    if _INTERPRET:  # unequal blocks, so CI exercises the diagonal/off-diagonal split
        if kind == "fwd":
            return [triton.Config({"BM": 32, "BN": 16}, num_warps=4, num_stages=1)]
        return [triton.Config({"BMK": 16, "BNK": 32, "BMQ": 32, "BNQ": 16}, num_warps=4,
                              num_stages=1)]
    fixed = _switches.enabled("FEATATTN_NO_AUTOTUNE")
    # H100, B=8 H=16 d=16 Dv=64 bf16 T=2048, each kernel alone (gpu_taylor.py --par-sweep):
    # fwd 128/32/4w 0.148 ms, 64/64/4w/s3 0.158, 128/64/8w 0.200; the one-launch backward
    # (BMK/BNK + BMQ/BNQ) 32/128 + 128/32 0.619, 32/128 + 64/64 0.635, the same with 4 or 5
    # stages 0.660 / 0.684, 16/128 + 64/64 0.665, 64/64 + 64/64 0.879, 8 warps 0.832
    if kind == "fwd":
        space = [(128, 32, 4, 3)] if fixed else [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)]
        return [triton.Config({"BM": bm, "BN": bn}, num_warps=nw, num_stages=ns)
                for bm, bn, nw, ns in space]
    space = [(32, 128, 128, 32, 4, 3)] if fixed else [
        (32, 128, 128, 32, 4, 3), (32, 128, 64, 64, 4, 3), (16, 128, 64, 64, 4, 3),
        (64, 64, 64, 64, 4, 2)]
    return [triton.Config({"BMK": a, "BNK": b, "BMQ": c, "BNQ": e}, num_warps=nw, num_stages=ns)
            for a, b, c, e, nw, ns in space]


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "size_key"])
def _fwd_kernel(
    q, k, v, o, den,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, eps, inv, size_key,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    NORMALIZE: tl.constexpr, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BM), cdiv(Dv, BV)).  den fp32 [B, H, T] (eps included), written by
    Dv tile 0.  Query blocks run last-first (the last has the most keys to walk), so the
    heaviest programs start first and the lightest fill the tail."""
    i_bh = tl.program_id(0)
    i_m = tl.num_programs(1) - 1 - tl.program_id(1)
    i_v = tl.program_id(2)
    i_b, i_h, i_hk = batch_head(i_bh, H, G)
    q_base = head_start(q, i_b, i_h, sqb, sqh)
    k_base = head_start(k, i_b, i_hk, skb, skh)
    v_base = head_start(v, i_b, i_hk, svb, svh)
    o_base = head_start(o, i_b, i_h, sob, soh)

    offs_m = i_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    offs_v = i_v * BV + tl.arange(0, BV)
    mm = offs_m < T
    md = offs_d < D
    mv = offs_v < DV
    b_q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :],
                  mask=mm[:, None] & md[None, :], other=0.0)
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    # key blocks wholly before this query block: no mask
    for n0 in range(0, i_m * BM, BN):
        nn = (n0 + offs_n).to(tl.int64)
        b_kT = tl.load(k_base + nn[None, :] * skt + offs_d[:, None], mask=md[:, None], other=0.0)
        b_v = tl.load(v_base + nn[:, None] * svt + offs_v[None, :], mask=mv[None, :], other=0.0)
        s = _dot_in(b_q, b_kT, FP32_IEEE) * inv
        a = 1.0 + s + 0.5 * s * s
        acc += _mm(a, b_v, LOWP, FP32_IEEE)
        l += tl.sum(a, axis=1)
    # the diagonal block(s): causal mask and the end of the sequence
    for n0 in range(i_m * BM, tl.minimum(i_m * BM + BM, T), BN):
        nn = n0 + offs_n
        mn = nn < T
        b_kT = tl.load(k_base + nn[None, :].to(tl.int64) * skt + offs_d[:, None],
                       mask=md[:, None] & mn[None, :], other=0.0)
        b_v = tl.load(v_base + nn[:, None].to(tl.int64) * svt + offs_v[None, :],
                      mask=mn[:, None] & mv[None, :], other=0.0)
        s = _dot_in(b_q, b_kT, FP32_IEEE) * inv
        a = tl.where((offs_m[:, None] >= nn[None, :]) & mn[None, :], 1.0 + s + 0.5 * s * s, 0.0)
        acc += _mm(a, b_v, LOWP, FP32_IEEE)
        l += tl.sum(a, axis=1)
    if NORMALIZE:
        dn = l + eps
        acc = acc * (1.0 / dn)[:, None]
        own = (offs_m * 0 + i_v) == 0
        tl.store(den + i_bh.to(tl.int64) * T + offs_m, dn, mask=mm & own)
    tl.store(o_base + offs_m[:, None].to(tl.int64) * sot + offs_v[None, :],
             acc.to(o.dtype.element_ty), mask=mm[:, None] & mv[None, :])


# --------------------------------------------------------------------------- backward
@triton.jit
def _row_delta(o_base, b_do, tm64, sot, offs_v, m, den, row, tm, mt):
    """(r, delta * r) of query rows tm: r = 1 / den, delta = do . o (fp32)."""
    b_o = tl.load(o_base + tm64[:, None] * sot + offs_v[None, :], mask=m, other=0.0)
    r = 1.0 / tl.load(den + row + tm, mask=mt, other=1.0)
    return r, tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1) * r


@triton.jit
def _kv_step(q_base, do_base, o_base, den, row, m0, T, sqt, sdt, sot, inv, b_k, b_v, b_dk, b_dv,
             offs_n, offs_m, offs_d, offs_v, md, mv, MASK: tl.constexpr,
             NORMALIZE: tl.constexpr, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One query block of the dk/dv walk, in the transposed [key, query] orientation.
    Query rows past T load as zeros and then add nothing (do = delta = 0, q = 0)."""
    tm = m0 + offs_m
    mt = tm < T
    tm64 = tm.to(tl.int64)
    b_q = tl.load(q_base + tm64[:, None] * sqt + offs_d[None, :],
                  mask=mt[:, None] & md[None, :], other=0.0)
    b_do = tl.load(do_base + tm64[:, None] * sdt + offs_v[None, :],
                   mask=mt[:, None] & mv[None, :], other=0.0)
    sT = _dot_in(b_k, tl.trans(b_q), FP32_IEEE) * inv  # [BN, BM]
    aT = 1.0 + sT + 0.5 * sT * sT
    dpT = _dot_in(b_v, tl.trans(b_do), FP32_IEEE)  # [BN, BM] v_s . do_t
    if NORMALIZE:
        r, dl = _row_delta(o_base, b_do, tm64, sot, offs_v, mt[:, None] & mv[None, :], den, row,
                           tm, mt)
        dn = b_do.to(tl.float32) * r[:, None]
        dpT = dpT * r[None, :] - dl[None, :]
    else:
        dn = b_do
    dsT = dpT * (1.0 + sT)
    if MASK:
        keep = tm[None, :] >= offs_n[:, None]
        aT = tl.where(keep, aT, 0.0)
        dsT = tl.where(keep, dsT, 0.0)
    b_dv += _mm(aT, dn, LOWP, FP32_IEEE)
    b_dk += _mm(dsT, b_q, LOWP, FP32_IEEE)
    return b_dk, b_dv


@triton.jit
def _q_step(k_base, v_base, n0, T, skt, svt, inv, b_q, b_do, r, dl, b_dq, offs_m, offs_n,
            offs_d, offs_v, md, mv, MASK: tl.constexpr, NORMALIZE: tl.constexpr,
            LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """One key block of the dq walk.  Keys past T load as zeros and add nothing (k = 0)."""
    nn = n0 + offs_n
    mn = nn < T
    nn64 = nn.to(tl.int64)
    b_k = tl.load(k_base + nn64[:, None] * skt + offs_d[None, :],
                  mask=mn[:, None] & md[None, :], other=0.0)
    b_v = tl.load(v_base + nn64[:, None] * svt + offs_v[None, :],
                  mask=mn[:, None] & mv[None, :], other=0.0)
    s = _dot_in(b_q, tl.trans(b_k), FP32_IEEE) * inv
    dp = _dot_in(b_do, tl.trans(b_v), FP32_IEEE)  # [BM, BN] do_t . v_s
    if NORMALIZE:
        dp = dp * r[:, None] - dl[:, None]
    ds = dp * (1.0 + s)
    if MASK:
        ds = tl.where(offs_m[:, None] >= nn[None, :], ds, 0.0)
    b_dq += _mm(ds, b_k, LOWP, FP32_IEEE)
    return b_dq


@triton.jit
def _kv_part(pid, q_base, k_base, v_base, o_base, do_base, den, dk, dv, row, T,
             sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
             BMK: tl.constexpr, BNK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             DP: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, LOWP: tl.constexpr,
             FP32_IEEE: tl.constexpr):
    """A dk/dv program: keys pid*BNK.. , walking the query blocks (BMK) from its own on."""
    offs_n = pid * BNK + tl.arange(0, BNK)
    offs_m = tl.arange(0, BMK)
    mn = offs_n < T
    nn = offs_n.to(tl.int64)
    b_k = tl.load(k_base + nn[:, None] * skt + offs_d[None, :],
                  mask=mn[:, None] & md[None, :], other=0.0)
    b_v = tl.load(v_base + nn[:, None] * svt + offs_v[None, :],
                  mask=mn[:, None] & mv[None, :], other=0.0)
    b_dk = tl.zeros([BNK, DP], dtype=tl.float32)
    b_dv = tl.zeros([BNK, BV], dtype=tl.float32)
    # query blocks that overlap this key block need the causal mask, later ones do not
    m_lo = (pid * BNK // BMK) * BMK
    m_mid = m_lo + ((pid * BNK + BNK - m_lo + BMK - 1) // BMK) * BMK
    for m0 in range(m_lo, tl.minimum(m_mid, T), BMK):
        b_dk, b_dv = _kv_step(q_base, do_base, o_base, den, row, m0, T, sqt, sdt, sot, inv,
                              b_k, b_v, b_dk, b_dv, offs_n, offs_m, offs_d, offs_v, md, mv,
                              True, NORMALIZE, LOWP, FP32_IEEE)
    for m0 in range(m_mid, T, BMK):
        b_dk, b_dv = _kv_step(q_base, do_base, o_base, den, row, m0, T, sqt, sdt, sot, inv,
                              b_k, b_v, b_dk, b_dv, offs_n, offs_m, offs_d, offs_v, md, mv,
                              False, NORMALIZE, LOWP, FP32_IEEE)
    tl.store(dk + (row + nn)[:, None] * D + offs_d[None, :],
             (b_dk * inv).to(dk.dtype.element_ty), mask=mn[:, None] & md[None, :])
    tl.store(dv + (row + nn)[:, None] * DV + offs_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=mn[:, None] & mv[None, :])


@triton.jit
def _q_part(i_m, q_base, k_base, v_base, o_base, do_base, den, dq, row, T,
            sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
            BMQ: tl.constexpr, BNQ: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
            DP: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, LOWP: tl.constexpr,
            FP32_IEEE: tl.constexpr):
    """A dq program: queries i_m*BMQ.., walking the key blocks (BNQ) up to its own."""
    offs_m = i_m * BMQ + tl.arange(0, BMQ)
    offs_n = tl.arange(0, BNQ)
    mm = offs_m < T
    tm64 = offs_m.to(tl.int64)
    b_q = tl.load(q_base + tm64[:, None] * sqt + offs_d[None, :],
                  mask=mm[:, None] & md[None, :], other=0.0)
    b_do = tl.load(do_base + tm64[:, None] * sdt + offs_v[None, :],
                   mask=mm[:, None] & mv[None, :], other=0.0)
    if NORMALIZE:
        r, dl = _row_delta(o_base, b_do, tm64, sot, offs_v, mm[:, None] & mv[None, :], den,
                           row, offs_m, mm)
    else:
        r = offs_m.to(tl.float32)  # unused
        dl = r
    b_dq = tl.zeros([BMQ, DP], dtype=tl.float32)
    # key blocks wholly before this query block need no mask; then the diagonal one(s)
    n_mid = (i_m * BMQ // BNQ) * BNQ
    for n0 in range(0, n_mid, BNQ):
        b_dq = _q_step(k_base, v_base, n0, T, skt, svt, inv, b_q, b_do, r, dl, b_dq, offs_m,
                       offs_n, offs_d, offs_v, md, mv, False, NORMALIZE, LOWP, FP32_IEEE)
    for n0 in range(n_mid, tl.minimum(i_m * BMQ + BMQ, T), BNQ):
        b_dq = _q_step(k_base, v_base, n0, T, skt, svt, inv, b_q, b_do, r, dl, b_dq, offs_m,
                       offs_n, offs_d, offs_v, md, mv, True, NORMALIZE, LOWP, FP32_IEEE)
    tl.store(dq + (row + tm64)[:, None] * D + offs_d[None, :],
             (b_dq * inv).to(dq.dtype.element_ty), mask=mm[:, None] & md[None, :])


@triton.jit(do_not_specialize=["T", "size_key"])
def _bwd_kernel(
    q, k, v, o, do, den, dq, dk, dv,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
    T, H, G, inv, size_key,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    BMK: tl.constexpr, BNK: tl.constexpr, BMQ: tl.constexpr, BNQ: tl.constexpr,
    NORMALIZE: tl.constexpr, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BNK) + cdiv(T, BMQ)).  The first cdiv(T, BNK) programs each own a
    block of BNK keys and walk the query blocks (BMK) after it for dk, dv; the others each
    own a block of BMQ queries and walk the key blocks (BNQ) before it for dq.  Both kinds
    run heaviest first (key blocks first-first, query blocks last-first).  Both compute
    delta = do . o themselves, so the backward is this one launch.  dq, dk [B, H, T, d] and
    dv [B, H, T, Dv] are per q head (contiguous); BV covers all of Dv."""
    i_bh = tl.program_id(0)
    pid = tl.program_id(1)
    i_b, i_h, i_hk = batch_head(i_bh, H, G)
    q_base = head_start(q, i_b, i_h, sqb, sqh)
    k_base = head_start(k, i_b, i_hk, skb, skh)
    v_base = head_start(v, i_b, i_hk, svb, svh)
    o_base = head_start(o, i_b, i_h, sob, soh)
    do_base = head_start(do, i_b, i_h, sdb, sdh)
    row = i_bh.to(tl.int64) * T
    offs_d = tl.arange(0, DP)
    offs_v = tl.arange(0, BV)
    md = offs_d < D
    mv = offs_v < DV
    n_kv = tl.cdiv(T, BNK)
    if pid < n_kv:
        _kv_part(pid, q_base, k_base, v_base, o_base, do_base, den, dk, dv, row, T,
                 sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
                 BMK, BNK, D, DV, DP, BV, NORMALIZE, LOWP, FP32_IEEE)
    else:
        _q_part(tl.cdiv(T, BMQ) - 1 - (pid - n_kv), q_base, k_base, v_base, o_base, do_base, den, dq, row, T,
                sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
                BMQ, BNQ, D, DV, DP, BV, NORMALIZE, LOWP, FP32_IEEE)


#: size_key (see _size_key) is in the key: tiles tuned on a small problem (few programs)
#: are not the ones for a large one
_KEY = ["D", "DV", "NORMALIZE", "LOWP", "FP32_IEEE", "size_key"]
_fwd = triton.autotune(configs=_configs("fwd"), key=_KEY)(_fwd_kernel)
_bwd = triton.autotune(configs=_configs("bwd"), key=_KEY)(_bwd_kernel)
_FWD, _BWD = TunedLaunch(_fwd), TunedLaunch(_bwd)


# --------------------------------------------------------------------------- wrappers
def _size_key(B: int, H: int, T: int) -> int:
    """Autotuning bucket of a problem (_common.size_bucket)."""
    return size_bucket(B, H, T)


def _dims(q, k, v):
    B, H, T, d = q.shape
    return B, H, T, d, k.shape[1], v.shape[-1], max(16, next_pow2(d))


def _forward(q, k, v, normalize, eps, kv0, z0, store_final):
    """(o, den, None, None): the parallel form keeps no state (kv0 / z0 must be None and
    store_final False; taylor_attention only routes such calls here)."""
    if kv0 is not None or z0 is not None or store_final:
        raise ValueError("the parallel Taylor form takes no initial state and returns none")
    B, H, T, d, Hkv, Dv, DP = _dims(q, k, v)
    o = _empty_like_layout(q, B, H, T, Dv, q.dtype)
    den = _alloc((B, H, T), torch.float32, q.device) if normalize else o
    lowp, fp32_ieee = _flags(q.dtype)
    BV = min(128, max(16, next_pow2(Dv)))

    def grid(m):
        return (B * H, cdiv(T, m["BM"]), cdiv(Dv, BV))

    _FWD[grid](
        q, k, v, o, den,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, H, H // Hkv, eps, 1.0 / math.sqrt(d), size_key=_size_key(B, H, T),
        D=d, DP=DP, DV=Dv, BV=BV, NORMALIZE=normalize, LOWP=lowp, FP32_IEEE=fp32_ieee,
    )
    return o, (den if normalize else None), None, None


def _backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize):
    """(dq, dk, dv, None, None): one launch (see _bwd_kernel)."""
    if dkvT is not None or dzT is not None:
        raise ValueError("the parallel Taylor form returns no state to differentiate")
    B, H, T, d, Hkv, Dv, DP = _dims(q, k, v)
    G = H // Hkv
    dev = q.device
    if not normalize:
        o = den = do  # unused placeholders
    lowp, fp32_ieee = _flags(q.dtype)
    dq = _alloc((B, H, T, d), q.dtype, dev)
    dk = _alloc((B, H, T, d), torch.float32 if G > 1 else k.dtype, dev)
    dv = _alloc((B, H, T, Dv), torch.float32 if G > 1 else v.dtype, dev)

    def grid(m):
        return (B * H, cdiv(T, m["BNK"]) + cdiv(T, m["BMQ"]))

    _BWD[grid](
        q, k, v, o, do, den, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        T, H, G, 1.0 / math.sqrt(d), size_key=_size_key(B, H, T),
        D=d, DP=DP, DV=Dv, BV=max(16, next_pow2(Dv)), NORMALIZE=normalize,
        LOWP=lowp, FP32_IEEE=fp32_ieee,
    )
    if G > 1:
        dk = dk.view(B, Hkv, G, T, d).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, G, T, Dv).sum(2).to(v.dtype)
    return dq, dk, dv, None, None


def max_t() -> int:
    """The longest T the parallel form is used for (the dispatcher's rule)."""
    return PARALLEL_MAX_T


def use_parallel(T: int, has_state: bool) -> bool:
    """Whether ``taylor_attention(form="auto")`` runs the parallel form for T tokens (the
    same rule as featattn.dispatch's ``taylor_parallel``)."""
    return not has_state and T <= PARALLEL_MAX_T


#: torch.library custom op ``featattn::taylor_parallel_fwd`` (+ ``_bwd``), autograd included
parallel_op = register_attention_ops("taylor_parallel", _forward, _backward,
                                     state_dim=lambda d: 1 + d + d * d,
                                     differentiable=torch_forward("taylor"))
