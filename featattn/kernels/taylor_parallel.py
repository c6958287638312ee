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
from . import tuning as _tuning
from ._common import cdiv, next_pow2, size_bucket
from ._common import alloc as _alloc
from ._common import dtype_flags as _flags
from ._common import empty_like_layout as _empty_like_layout
from ._common import TunedLaunch, register_attention_ops, torch_forward
from ._common import batch_head, head_start
from ._common import dot_in_ieee as _dot_in  # taylor_fused's numerics
from ._common import mm_ieee as _mm
from .taylor_fused import _dot32, _feat, _featT, _fold, _pads, _selectors, pair_slots

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



# --------------------------------------------------------------------------- blocked form
# Time is cut into blocks of L tokens.  Within a block the quadratic form runs as above; what
# the earlier blocks contribute is a Taylor state, the sum of their keys' features times
# values, in the symmetric layout of taylor_fused (d <= 16):
#     S2 [Q, Dv] (pairs, 2 c2 f2(k)^T v) | S1 [DP, Dv] (c1 k^T v) | Sd [DP, Dv] (c2 (k*k)^T v)
#     | S0 [Dv] (sum v) | zc (count) | z1 [DP] (c1 sum k) | Z2 [DP, DP] (c2 k^T k)
# one fp32 record of _width() elements per (head, block) in hz [B*Hkv, NB, width].
# _sums_kernel writes every block's own sums, _scan_kernel turns them in place into the
# exclusive prefix (forward) or suffix (backward: the same sums over queries with
# do / den for v and -(do . o) / den as the weights of z) sums, and the kernels above add
# phi(q_t) . prefix to the outputs (dq) and the suffix terms to dk, dv.


@triton.jit
def _block_ptr(hz, n, blk, NB, Q: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr):
    """Record of (head row n, block blk) in hz."""
    W: tl.constexpr = (Q + 2 * DP + 1) * DV + 1 + DP + DP * DP
    return hz + (n.to(tl.int64) * NB + blk) * W


@triton.jit
def _load_rows(hp, row0, offs_r, offs_v, mv, DV: tl.constexpr, TRANS: tl.constexpr):
    """Rows row0 + offs_r of a record's [R, Dv] part: [len(offs_r), BV] or, TRANS, its
    transpose.  The transpose is taken of the loaded tile: a tile loaded through transposed
    addresses and fed straight to a bf16 tl.dot gave wrong dq / dk on the H200 (Triton 3.6),
    while tl.trans of a loaded tile is the pattern the chunked kernels use throughout."""
    x = tl.load(hp + (row0 + offs_r)[:, None] * DV + offs_v[None, :], mask=mv[None, :],
                other=0.0)
    if TRANS:
        x = tl.trans(x)
    return x


@triton.jit
def _z_parts(hp, offs_d, Q: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr):
    """(zc, z1 [DP], Z2 + Z2^T [DP, DP]) of a record."""
    zp = hp + (Q + 2 * DP + 1) * DV
    z1 = tl.load(zp + 1 + offs_d)
    Z2 = tl.load(zp + 1 + DP + offs_d[:, None] * DP + offs_d[None, :])
    Z2 += tl.load(zp + 1 + DP + offs_d[None, :] * DP + offs_d[:, None])
    return tl.load(zp), z1, Z2


#: LOWP flag of the state terms' products: always False, i.e. tf32 on fp32
#: operands (fp32 inputs: FP32_IEEE) even for bf16 inputs: they run once per program, not per
#: step of a walk.  With bf16 operands dq and dk came out wrong on the H200
#: (Triton 3.6; rel. error 0.2-0.35 against float64, while emulating the bf16 rounding in the
#: interpreter gave 1e-2, the chunked kernel's figure).
TF32: tl.constexpr = tl.constexpr(False)


@triton.jit
def _sub_sel(p0, D: tl.constexpr, DP: tl.constexpr, KQ: tl.constexpr, dtype):
    """Selection matrices of the KQ slots p0.. (Ri, Rj [DP, KQ] in dtype, RiT, RjT [KQ, DP]
    fp32): the state terms walk the Q slots KQ at a time, so no [rows, Q] feature tile is
    ever live (it spilled)."""
    pi, pj, valid = pair_slots(p0 + tl.arange(0, KQ), D)
    Ri, Rj, RiT, RjT = _selectors(pi, pj, valid, DP)
    return Ri.to(dtype), Rj.to(dtype), RiT, RjT


@triton.jit
def _state_out(hp, b_q, offs_d, offs_v, mv, c1, c2, D: tl.constexpr, DP: tl.constexpr,
               DV: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr, BM: tl.constexpr,
               NORMALIZE: tl.constexpr, FP32_IEEE: tl.constexpr):
    """(num [BM, BV], den [BM]) of the prefix state at hp for the query rows b_q."""
    b_qf = b_q.to(tl.float32)
    num = tl.load(hp + (Q + 2 * DP) * DV + offs_v, mask=mv, other=0.0)[None, :] \
        + c1 * _mm(b_q, _load_rows(hp, Q, offs_d, offs_v, mv, DV, False), TF32, FP32_IEEE)
    num += c2 * _mm(b_qf * b_qf, _load_rows(hp, Q + DP, offs_d, offs_v, mv, DV, False),
                    TF32, FP32_IEEE)
    offs_p = tl.arange(0, KQ)
    for p0 in tl.static_range(0, Q, KQ):
        Ri, Rj, _RiT, _RjT = _sub_sel(p0, D, DP, KQ, b_q.dtype)
        f2q = _feat(b_q, Ri, Rj, BM, KQ, False, TF32, FP32_IEEE)
        num += c2 * _mm(f2q, _load_rows(hp, p0, offs_p, offs_v, mv, DV, False), TF32,
                        FP32_IEEE)
    dn = tl.zeros([BM], dtype=tl.float32)
    if NORMALIZE:
        zc, z1, W2 = _z_parts(hp, offs_d, Q, DP, DV)
        dn += zc + c1 * tl.sum(b_qf * z1[None, :], axis=1)
        dn += (0.5 * c2) * tl.sum(_dot32(b_qf, W2) * b_qf, axis=1)
    return num, dn


@triton.jit
def _state_dq(hp, b_q, b_do, r, dl, offs_d, offs_v, mv, c1, c2, D: tl.constexpr,
              DP: tl.constexpr, DV: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr,
              BM: tl.constexpr, NORMALIZE: tl.constexpr, FP32_IEEE: tl.constexpr):
    """dq [BM, DP] of the prefix-state term: r (c1 do S1^T + c2 (fold(do S2^T) + 2 q (do Sd^T)))
    - (delta r) (c1 z1 + c2 q (Z2 + Z2^T))."""
    g = c1 * _mm(b_do, _load_rows(hp, Q, offs_d, offs_v, mv, DV, True), TF32, FP32_IEEE)
    g += (2.0 * c2) * b_q.to(tl.float32) * _mm(
        b_do, _load_rows(hp, Q + DP, offs_d, offs_v, mv, DV, True), TF32, FP32_IEEE)
    offs_p = tl.arange(0, KQ)
    for p0 in tl.static_range(0, Q, KQ):
        Ri, Rj, RiT, RjT = _sub_sel(p0, D, DP, KQ, b_q.dtype)
        g2 = _mm(b_do, _load_rows(hp, p0, offs_p, offs_v, mv, DV, True), TF32, FP32_IEEE)
        g += c2 * _fold(g2, b_q, Ri, Rj, RiT, RjT, BM, DP, False, TF32, FP32_IEEE)
    if NORMALIZE:
        _zc, z1, W2 = _z_parts(hp, offs_d, Q, DP, DV)
        g = g * r[:, None] - dl[:, None] * (c1 * z1[None, :] + c2 * _dot32(b_q, W2))
    return g


@triton.jit
def _state_dkdv(hp, b_k, b_v, offs_d, offs_v, mv, c1, c2, c2o, D: tl.constexpr,
                DP: tl.constexpr, DV: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr,
                BN: tl.constexpr, NORMALIZE: tl.constexpr, FP32_IEEE: tl.constexpr):
    """(dk [BN, DP], dv [BN, BV]) of the suffix-state term (dS: sums over later queries of
    phi(q)^T do / den, dz: of phi(q) * -(do . o) / den)."""
    b_kf = b_k.to(tl.float32)
    dk = c1 * _mm(b_v, _load_rows(hp, Q, offs_d, offs_v, mv, DV, True), TF32, FP32_IEEE)
    dk += (2.0 * c2) * b_kf * _mm(b_v, _load_rows(hp, Q + DP, offs_d, offs_v, mv, DV, True),
                                  TF32, FP32_IEEE)
    dv = tl.load(hp + (Q + 2 * DP) * DV + offs_v, mask=mv, other=0.0)[None, :] \
        + c1 * _mm(b_k, _load_rows(hp, Q, offs_d, offs_v, mv, DV, False), TF32, FP32_IEEE)
    dv += c2 * _mm(b_kf * b_kf, _load_rows(hp, Q + DP, offs_d, offs_v, mv, DV, False),
                   TF32, FP32_IEEE)
    offs_p = tl.arange(0, KQ)
    for p0 in tl.static_range(0, Q, KQ):
        Ri, Rj, RiT, RjT = _sub_sel(p0, D, DP, KQ, b_k.dtype)
        gd2 = _mm(b_v, _load_rows(hp, p0, offs_p, offs_v, mv, DV, True), TF32, FP32_IEEE)
        dk += c2o * _fold(gd2, b_k, Ri, Rj, RiT, RjT, BN, DP, False, TF32, FP32_IEEE)
        f2k = _feat(b_k, Ri, Rj, BN, KQ, False, TF32, FP32_IEEE)
        dv += c2o * _mm(f2k, _load_rows(hp, p0, offs_p, offs_v, mv, DV, False), TF32,
                        FP32_IEEE)
    if NORMALIZE:
        _zc, dz1, W2 = _z_parts(hp, offs_d, Q, DP, DV)
        dk += c1 * dz1[None, :] + c2 * _dot32(b_k, W2)
    return dk, dv


@triton.jit(do_not_specialize=["T", "L", "NB"])
def _sums_kernel(
    a, b, o, den, hz,
    sab, sah, sat, sbb, sbh, sbt, sob, soh, sot,
    T, HA, L, NB, c1, c2, cq,
    D: tl.constexpr, DP: tl.constexpr, Q: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    DVP: tl.constexpr, BT: tl.constexpr, BWD: tl.constexpr, NORMALIZE: tl.constexpr,
    LOWP: tl.constexpr, FP32_IEEE: tl.constexpr,
):
    """Grid (B*HA, NB, cdiv(Dv, BV)): the sums of block j of head row n into hz[n, j].

    Forward (a = k, b = v, HA = Hkv): S2 = cq f2(k)^T v (cq = 2 c2), S1 = c1 k^T v,
    Sd = c2 (k*k)^T v, S0 = sum v; zc = count, z1 = c1 sum k, Z2 = c2 k^T k.
    Backward (a = q, b = do, HA = H): the same with dn = do / den in place of v (cq = c2)
    and the weights w = -(do . o) / den in the z sums (zc = sum w, z1 = c1 q^T w,
    Z2 = c2 q^T (q w)); o and den are read only then.  Dv tile 0 writes z."""
    n = tl.program_id(0)
    j = tl.program_id(1)
    i_v = tl.program_id(2)
    i_b = n // HA
    i_h = n % HA
    a_base = head_start(a, i_b, i_h, sab, sah)
    b_base = head_start(b, i_b, i_h, sbb, sbh)
    o_base = head_start(o, i_b, i_h, sob, soh)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, DP)
    offs_v = i_v * BV + tl.arange(0, BV)
    md = offs_d < D
    mv = offs_v < DV
    _Ri, _Rj, RiT, RjT = _sub_sel(0, D, DP, Q, a.dtype.element_ty)
    RiT = RiT.to(a.dtype.element_ty)
    RjT = RjT.to(a.dtype.element_ty)
    S2 = tl.zeros([Q, BV], dtype=tl.float32)
    S1 = tl.zeros([DP, BV], dtype=tl.float32)
    Sd = tl.zeros([DP, BV], dtype=tl.float32)
    S0 = tl.zeros([BV], dtype=tl.float32)
    zc = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    z1 = tl.zeros([DP], dtype=tl.float32)
    Z2 = tl.zeros([DP, DP], dtype=tl.float32)
    t_end = tl.minimum(j * L + L, T)
    for t0 in range(j * L, t_end, BT):
        tt = t0 + offs_t
        mt = tt < t_end
        tt64 = tt.to(tl.int64)
        x = tl.load(a_base + tt64[:, None] * sat + offs_d[None, :],
                    mask=mt[:, None] & md[None, :], other=0.0)
        y = tl.load(b_base + tt64[:, None] * sbt + offs_v[None, :],
                    mask=mt[:, None] & mv[None, :], other=0.0)
        xT = tl.trans(x)
        xf = x.to(tl.float32)
        xTf = xT.to(tl.float32)
        f2T = _featT(xT, RiT, RjT, BT, Q, False, LOWP, FP32_IEEE)  # [Q, BT]
        if BWD:
            if NORMALIZE:
                r = 1.0 / tl.load(den + n.to(tl.int64) * T + tt, mask=mt, other=1.0)
                offs_w = tl.arange(0, DVP)
                mw = mt[:, None] & (offs_w < DV)[None, :]
                fo = tl.load(o_base + tt64[:, None] * sot + offs_w[None, :], mask=mw, other=0.0)
                fd = tl.load(b_base + tt64[:, None] * sbt + offs_w[None, :], mask=mw, other=0.0)
                w = -tl.sum(fo.to(tl.float32) * fd.to(tl.float32), axis=1) * r
                yv = y.to(tl.float32) * r[:, None]
            else:
                w = tl.zeros([BT], dtype=tl.float32)
                yv = y.to(tl.float32)
            S1 += c1 * _mm(xT, yv, LOWP, FP32_IEEE)
            S0 += tl.sum(yv, axis=0)
        else:
            w = tl.where(mt, 1.0, 0.0)
            yv = y
            S1 += c1 * _dot_in(xT, y, FP32_IEEE)
            S0 += tl.sum(y.to(tl.float32), axis=0)
        S2 += cq * _mm(f2T, yv, LOWP, FP32_IEEE)
        Sd += c2 * _mm(xTf * xTf, yv, LOWP, FP32_IEEE)
        if NORMALIZE:
            zc += tl.sum(w, axis=0)
            z1 += c1 * tl.sum(xf * w[:, None], axis=0)
            Z2 += c2 * _dot32(xT, xf * w[:, None])
    hp = _block_ptr(hz, n, j, NB, Q, DP, DV)
    offs_q = tl.arange(0, Q)
    tl.store(hp + offs_q[:, None] * DV + offs_v[None, :], S2, mask=mv[None, :])
    tl.store(hp + (Q + offs_d)[:, None] * DV + offs_v[None, :], S1, mask=mv[None, :])
    tl.store(hp + (Q + DP + offs_d)[:, None] * DV + offs_v[None, :], Sd, mask=mv[None, :])
    tl.store(hp + (Q + 2 * DP) * DV + offs_v, S0, mask=mv)
    if NORMALIZE:
        if i_v == 0:
            zp = hp + (Q + 2 * DP + 1) * DV
            tl.store(zp, zc)
            tl.store(zp + 1 + offs_d, z1)
            tl.store(zp + 1 + DP + offs_d[:, None] * DP + offs_d[None, :], Z2)


@triton.jit(do_not_specialize=["NB", "W"])
def _scan_kernel(x, NB, W, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(W, BLOCK)): x [rows, NB, W] fp32 becomes, in place, its exclusive
    prefix sums over NB (REVERSE: suffix sums)."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < W
    base = x + tl.program_id(0).to(tl.int64) * NB * W + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for jj in range(0, NB):
        if REVERSE:
            j = NB - 1 - jj
        else:
            j = jj
        p = base + tl.cast(j, tl.int64) * W
        val = tl.load(p, mask=m, other=0.0)
        tl.store(p, acc, mask=m)
        acc += val


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "size_key", "L", "NB"])
def _fwd_kernel(
    q, k, v, o, den, hz,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, eps, inv, size_key, L, NB, c1, c2,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
    NORMALIZE: tl.constexpr, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr,
    STATE: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BM), cdiv(Dv, BV)).  den fp32 [B, H, T] (eps included), written by
    Dv tile 0.  Query blocks run last-first (the last has the most keys to walk), so the
    heaviest programs start first and the lightest fill the tail.

    Blocked (STATE): keys are walked from the start of the query block's time block of L
    tokens (a multiple of BM and BN) and what came before enters through hz, the scanned
    block states (see _sums_kernel); else L >= T and hz is unused."""
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
    blk = (i_m * BM) // L
    if STATE:
        acc, l = _state_out(_block_ptr(hz, i_b * (H // G) + i_hk, blk, NB, Q, DP, DV), b_q,
                            offs_d, offs_v, mv, c1, c2, D, DP, DV, Q, KQ, BM,
                            NORMALIZE, FP32_IEEE)
    # key blocks wholly before this query block (and in its time block): no mask
    for n0 in range(blk * L, i_m * BM, BN):
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
        acc = acc / dn[:, None]
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
             hzb, i_bh, L, NB, c1, c2, c2o,
             BMK: tl.constexpr, BNK: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
             DP: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, LOWP: tl.constexpr,
             FP32_IEEE: tl.constexpr, STATE: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr):
    """A dk/dv program: keys pid*BNK.. , walking the query blocks (BMK) from its own to the
    end of its time block (blocked form: the later blocks through the suffix state hzb)."""
    offs_n = pid * BNK + tl.arange(0, BNK)
    offs_m = tl.arange(0, BMK)
    mn = offs_n < T
    nn = offs_n.to(tl.int64)
    b_k = tl.load(k_base + nn[:, None] * skt + offs_d[None, :],
                  mask=mn[:, None] & md[None, :], other=0.0)
    b_v = tl.load(v_base + nn[:, None] * svt + offs_v[None, :],
                  mask=mn[:, None] & mv[None, :], other=0.0)
    blk = (pid * BNK) // L
    if STATE:
        dk_st, b_dv = _state_dkdv(_block_ptr(hzb, i_bh, blk, NB, Q, DP, DV), b_k, b_v, offs_d,
                                  offs_v, mv, c1, c2, c2o, D, DP, DV, Q, KQ, BNK, NORMALIZE,
                                  FP32_IEEE)
    else:
        dk_st = tl.zeros([BNK, DP], dtype=tl.float32)
        b_dv = tl.zeros([BNK, BV], dtype=tl.float32)
    b_dk = tl.zeros([BNK, DP], dtype=tl.float32)
    hi = tl.minimum(T, blk * L + L)
    # query blocks that overlap this key block need the causal mask, later ones do not
    m_lo = (pid * BNK // BMK) * BMK
    m_mid = m_lo + ((pid * BNK + BNK - m_lo + BMK - 1) // BMK) * BMK
    for m0 in range(m_lo, tl.minimum(m_mid, hi), BMK):
        b_dk, b_dv = _kv_step(q_base, do_base, o_base, den, row, m0, T, sqt, sdt, sot, inv,
                              b_k, b_v, b_dk, b_dv, offs_n, offs_m, offs_d, offs_v, md, mv,
                              True, NORMALIZE, LOWP, FP32_IEEE)
    for m0 in range(m_mid, hi, BMK):
        b_dk, b_dv = _kv_step(q_base, do_base, o_base, den, row, m0, T, sqt, sdt, sot, inv,
                              b_k, b_v, b_dk, b_dv, offs_n, offs_m, offs_d, offs_v, md, mv,
                              False, NORMALIZE, LOWP, FP32_IEEE)
    tl.store(dk + (row + nn)[:, None] * D + offs_d[None, :],
             (b_dk * inv + dk_st).to(dk.dtype.element_ty), mask=mn[:, None] & md[None, :])
    tl.store(dv + (row + nn)[:, None] * DV + offs_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=mn[:, None] & mv[None, :])


@triton.jit
def _q_part(i_m, q_base, k_base, v_base, o_base, do_base, den, dq, row, T,
            sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
            hzf, n_kv, L, NB, c1, c2,
            BMQ: tl.constexpr, BNQ: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
            DP: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, LOWP: tl.constexpr,
            FP32_IEEE: tl.constexpr, STATE: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr):
    """A dq program: queries i_m*BMQ.., walking the key blocks (BNQ) from the start of its
    time block up to its own (blocked form: the earlier blocks through the prefix state hzf
    of k/v head row n_kv)."""
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
    blk = (i_m * BMQ) // L
    if STATE:
        dq_st = _state_dq(_block_ptr(hzf, n_kv, blk, NB, Q, DP, DV), b_q, b_do, r, dl, offs_d,
                          offs_v, mv, c1, c2, D, DP, DV, Q, KQ, BMQ, NORMALIZE, FP32_IEEE)
    else:
        dq_st = tl.zeros([BMQ, DP], dtype=tl.float32)
    # key blocks wholly before this query block need no mask; then the diagonal one(s)
    n_mid = (i_m * BMQ // BNQ) * BNQ
    for n0 in range(blk * L, n_mid, BNQ):
        b_dq = _q_step(k_base, v_base, n0, T, skt, svt, inv, b_q, b_do, r, dl, b_dq, offs_m,
                       offs_n, offs_d, offs_v, md, mv, False, NORMALIZE, LOWP, FP32_IEEE)
    for n0 in range(n_mid, tl.minimum(i_m * BMQ + BMQ, T), BNQ):
        b_dq = _q_step(k_base, v_base, n0, T, skt, svt, inv, b_q, b_do, r, dl, b_dq, offs_m,
                       offs_n, offs_d, offs_v, md, mv, True, NORMALIZE, LOWP, FP32_IEEE)
    tl.store(dq + (row + tm64)[:, None] * D + offs_d[None, :],
             (b_dq * inv + dq_st).to(dq.dtype.element_ty), mask=mm[:, None] & md[None, :])


@triton.jit(do_not_specialize=["T", "size_key", "L", "NB"])
def _bwd_kernel(
    q, k, v, o, do, den, dq, dk, dv, hzf, hzb,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdb, sdh, sdt,
    T, H, G, inv, size_key, L, NB, c1, c2, c2o,
    D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    BMK: tl.constexpr, BNK: tl.constexpr, BMQ: tl.constexpr, BNQ: tl.constexpr,
    NORMALIZE: tl.constexpr, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr,
    STATE: tl.constexpr, Q: tl.constexpr, KQ: tl.constexpr,
):
    """Grid (B*H, cdiv(T, BNK) + cdiv(T, BMQ)).  The first cdiv(T, BNK) programs each own a
    block of BNK keys and walk the query blocks (BMK) after it for dk, dv; the others each
    own a block of BMQ queries and walk the key blocks (BNQ) before it for dq.  Both kinds
    run heaviest first (key blocks first-first, query blocks last-first).  Both compute
    delta = do . o themselves, so the backward is this one launch.  dq, dk [B, H, T, d] and
    dv [B, H, T, Dv] are per q head (contiguous); BV covers all of Dv.  Blocked (STATE): the
    walks stop at the edges of time blocks of L tokens, and hzf (scanned forward sums, per k/v
    head) and hzb (scanned backward sums, per q head) bring in the rest."""
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
                 hzb, i_bh, L, NB, c1, c2, c2o,
                 BMK, BNK, D, DV, DP, BV, NORMALIZE, LOWP, FP32_IEEE, STATE, Q, KQ)
    else:
        _q_part(tl.cdiv(T, BMQ) - 1 - (pid - n_kv), q_base, k_base, v_base, o_base, do_base, den, dq, row, T,
                sqt, skt, svt, sot, sdt, inv, offs_d, offs_v, md, mv,
                hzf, i_b * (H // G) + i_hk, L, NB, c1, c2,
                BMQ, BNQ, D, DV, DP, BV, NORMALIZE, LOWP, FP32_IEEE, STATE, Q, KQ)


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


#: Time block of the blocked form (tokens; a power of two >= 128 on the GPU, a multiple of
#: every tile).  ``tuning.override("taylor_blocked", L=...)`` fixes another for benchmarking.
BLOCK_LEN = 32 if _INTERPRET else 512
_NO_BLOCK = 1 << 30  # "L" of the plain parallel form: one block holds every T
_KQ = 32  # slots per step of the state terms' walk over the Q pair slots


def block_len() -> int:
    """The time block the blocked form uses now."""
    return int((_tuning.forced("taylor_blocked") or {}).get("L", BLOCK_LEN))


def _sums_configs():
    if _INTERPRET:
        return [triton.Config({"BT": 16, "BV": 16}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 64, "BV": 64}, num_warps=4, num_stages=2)]
    space = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)]
    return [triton.Config({"BT": bt, "BV": bv}, num_warps=nw, num_stages=ns)
            for bt, bv, nw, ns in space]


_SUMS = TunedLaunch(triton.autotune(configs=_sums_configs(),
                                    key=["D", "DV", "BWD", "NORMALIZE", "LOWP", "FP32_IEEE"])(
    _sums_kernel))
_SCAN_BLOCK = 256 if _INTERPRET else 1024


def _block_sums(a, b, o, den, L, normalize, bwd, d, c1, c2, cq):
    """Scanned block sums hz [B*HA, NB, width] of a [B, HA, T, d] and b [B, HA, T, Dv]
    (forward: keys and values, exclusive prefix sums; bwd: queries and do, with o and den,
    exclusive suffix sums).  See _sums_kernel."""
    B, HA, T, _ = a.shape
    Dv = b.shape[-1]
    DP, Q, _f3 = _pads(d)
    NB = cdiv(T, L)
    width = (Q + 2 * DP + 1) * Dv + 1 + DP + DP * DP
    hz = _alloc((B * HA, NB, width), torch.float32, a.device)
    lowp, fp32_ieee = _flags(a.dtype)

    def grid(m):
        return (B * HA, NB, cdiv(Dv, m["BV"]))

    _SUMS[grid](
        a, b, o, den, hz,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        T, HA, L, NB, c1, c2, cq,
        D=d, DP=DP, Q=Q, DV=Dv, DVP=max(16, next_pow2(Dv)), BWD=bwd, NORMALIZE=normalize,
        LOWP=lowp, FP32_IEEE=fp32_ieee,
    )
    if NB > 1:
        _scan_kernel[(B * HA, cdiv(width, _SCAN_BLOCK))](hz, NB, width, REVERSE=bwd,
                                                         BLOCK=_SCAN_BLOCK, num_warps=4)
    return hz, NB


def _blocks(T: int, d: int, block):
    """(STATE, L, Q, consts) of a call: blocked when a block length below T is asked for."""
    DP, Q, fold3 = _pads(d)
    c2 = 1.0 / math.sqrt(2.0 * d)
    consts = (d ** -0.25, c2, 2.0 * c2)
    if block is None or block >= T:
        return False, _NO_BLOCK, Q, consts
    if fold3:
        raise ValueError(f"the blocked Taylor form takes q/k head dims d <= 16, got d={d}: "
                         "use form='chunked'")
    return True, int(block), Q, consts


def _forward(q, k, v, normalize, eps, kv0, z0, store_final, block=None):
    """(o, den, None, None): the parallel form keeps no state (kv0 / z0 must be None and
    store_final False; taylor_attention only routes such calls here).  ``block``: a time
    block length below T selects the blocked form."""
    if kv0 is not None or z0 is not None or store_final:
        raise ValueError("the parallel Taylor form takes no initial state and returns none")
    B, H, T, d, Hkv, Dv, DP = _dims(q, k, v)
    o = _empty_like_layout(q, B, H, T, Dv, q.dtype)
    den = _alloc((B, H, T), torch.float32, q.device) if normalize else o
    lowp, fp32_ieee = _flags(q.dtype)
    BV = min(128, max(16, next_pow2(Dv)))
    state, L, Q, (c1, c2, c2o) = _blocks(T, d, block)
    hz, NB = (_block_sums(k, v, v, den, L, normalize, False, d, c1, c2, c2o) if state
              else (o, 1))

    def grid(m):
        return (B * H, cdiv(T, m["BM"]), cdiv(Dv, BV))

    _FWD[grid](
        q, k, v, o, den, hz,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, H, H // Hkv, eps, 1.0 / math.sqrt(d), _size_key(B, H, T), L, NB, c1, c2,
        D=d, DP=DP, DV=Dv, BV=BV, NORMALIZE=normalize, LOWP=lowp, FP32_IEEE=fp32_ieee,
        STATE=state, Q=Q, KQ=min(Q, _KQ),
    )
    return o, (den if normalize else None), None, None


def _backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, block=None):
    """(dq, dk, dv, None, None): one launch (see _bwd_kernel), after the block sums when
    blocked."""
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
    state, L, Q, (c1, c2, c2o) = _blocks(T, d, block)
    if state:
        hzf, NB = _block_sums(k, v, v, den, L, normalize, False, d, c1, c2, c2o)
        hzb, _nb = _block_sums(q, do, o, den, L, normalize, True, d, c1, c2, c2)
    else:
        hzf = hzb = dq
        NB = 1

    def grid(m):
        return (B * H, cdiv(T, m["BNK"]) + cdiv(T, m["BMQ"]))

    _BWD[grid](
        q, k, v, o, do, den, dq, dk, dv, hzf, hzb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        T, H, G, 1.0 / math.sqrt(d), _size_key(B, H, T), L, NB, c1, c2, c2o,
        D=d, DP=DP, DV=Dv, BV=max(16, next_pow2(Dv)), NORMALIZE=normalize,
        LOWP=lowp, FP32_IEEE=fp32_ieee, STATE=state, Q=Q, KQ=min(Q, _KQ),
    )
    if G > 1:
        dk = dk.view(B, Hkv, G, T, d).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, G, T, Dv).sum(2).to(v.dtype)
    return dq, dk, dv, None, None


def _forward_blocked(q, k, v, normalize, eps, kv0, z0, store_final):
    return _forward(q, k, v, normalize, eps, kv0, z0, store_final, block=block_len())


def _backward_blocked(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize):
    return _backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, block=block_len())


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
#: ``featattn::taylor_blocked_fwd`` (+ ``_bwd``): the blocked form, time blocks of block_len()
blocked_op = register_attention_ops("taylor_blocked", _forward_blocked, _backward_blocked,
                                    state_dim=lambda d: 1 + d + d * d,
                                    differentiable=torch_forward("taylor"))
