"""Fused Taylor linear attention in Triton: the feature map is computed inside the kernel.

Legend: B batch, H query heads, Hkv key/value heads (H % Hkv == 0, G = H // Hkv), T time,
d raw q/k head dim, Dk = 1 + d + d*d expanded feature dim, Dv value dim, BT chunk length,
BV tile of Dv, DP = max(16, next_pow2(d)) padded d, Q padded quadratic dim (see _pads).

What is computed (identical to ``feature_map="taylor"`` on materialised features)::

    phi(x) = [1, x / d**0.25, vec(x x^T) / sqrt(2 d)]      (row-major: index i*d + j)
    a(q, k) = phi(q) . phi(k) = 1 + s + s^2 / 2,   s = q . k / sqrt(d)
    num_t = sum_{s<=t} a(q_t, k_s) v_s + phi(q_t) KV0
    den_t = sum_{s<=t} a(q_t, k_s)     + phi(q_t) . Z0 + eps
    o_t   = num_t / den_t   if normalize else num_t

q arrives already multiplied by the caller's scale; k, v are raw.

This module holds the chunked (recurrent) form.  :func:`taylor_attention` sends a call with
no state in or out and T <= ``taylor_parallel.PARALLEL_MAX_T`` to the parallel (quadratic,
FlashAttention-like) form in :mod:`featattn.kernels.taylor_parallel` instead, which is
faster there on the H100 (docs/benchmarks.md).

State: the symmetric form
-------------------------
The boundary format is the *full* expanded layout, exactly the ``LinearAttentionState``
layout of every other backend: kv [Dk, Dv] split as row 0 (the constant feature, S0 [Dv]),
rows 1..d (linear, S1 [d, Dv]) and rows 1+d.. (quadratic, row 1+d+i*d+j).  z likewise.

Inside the kernel (d <= 16) the quadratic part is held in the *symmetric* form, since
q_i q_j = q_j q_i: the d squares as Sd [d, Dv] (row (i, i)) and the d(d-1)/2 pairs i != j as
S2 [Q, Dv] holding S[i, j] + S[j, i].  For d = 16 that is 16 + 120 rows in tiles of 16 + 128
instead of 256 (1 + 16 + 136 = 153 would pad to 256 as one tile, hence the split); on the
H100 it halved the forward (3.5 -> 1.6 ms at T = 16384).  Slot p = (r-1)*d + i holds the
pair {i, (i+r) % d}, r = 1..d/2, an index the kernel computes (see :func:`_slots`).  A slot
contributes q_i q_j S2[p] to the output and takes 2 k_i k_j v (``c2o = 2 c2``) per key.

At the boundaries the pair sum is read as kv[i, j] + kv[j, i] and written back as
kv0[i, j] + (S2[p] / 2 - (kv0[i, j] + kv0[j, i]) / 2) and the same for (j, i), so an
arbitrary (non-symmetric) initial state keeps its antisymmetric part exactly as the full-form
math does, and a prefill here hands its state to the torch path and back unchanged in
layout; d(initial state) is written the same way from the pair-sum gradient.

Quadratic features without materialising them
---------------------------------------------
The state is only ever touched through [BT, Q] tiles of quadratic features built in
registers from the raw [BT, d] tile.  For d <= 16 by two *selection* products on the tensor
cores::

    qa = q @ Ri,  qb = q @ Rj,   Ri[m, p] = [i(p) == m],  Rj[m, p] = [j(p) == m]
    f2(q) = qa * qb             (= q_i q_j, exact: each output is one product with 1.0)

(and transposed, [Q, BT], as Ri^T @ k^T), and the same 0/1 matrices fold the quadratic
gradient back onto d: d/dq_m sum_p g_p q_i q_j = ((g * qb) @ Ri^T + (g * qa) @ Rj^T)_m.
(Building the tiles with ``tl.gather`` instead was tried: 15-40% slower on the H100.)
For 16 < d <= 32 (``FOLD3``) the full form is kept: the selection
matrices would not fit in shared memory, so the tiles are a 3-D broadcast product reshaped
to [BT, DP*DP] (index i*DP + j, masked to i, j < d) and the fold is a 3-D reduction;
correct, but it spills (not tuned).

The quadratic part of z never needs a [Q] vector: it is held as a [d, d] matrix Z2, so the
denominator term is q^T Z2 q and its gradient q (Z2 + Z2^T): small full-fp32 products.

Forward (fused chunk form): one program per (batch*head, Dv tile) walks the chunks in
order holding S0, S1, Sd, S2 (and z) in registers; per chunk
``num = mask(1 + s + s^2/2) @ v + S0 + c1 q S1 + c2 (q*q Sd + f2(q) S2)`` and the state
update ``S2 += 2 c2 f2(k)^T v``, ``Sd += c2 (k*k)^T v`` etc. (c1 = d**-0.25, c2 = 1/sqrt(2d)).  The denominator is
fp32 work (row sum of the score tile, q . z1, q^T Z2 q in full fp32): no bf16 rounding.  Dv tiles are independent; the denominator is computed by each and stored by
tile 0.  q, k, v are read once, o written once, den (fp32 [B,H,T]) saved for backward.

Backward: one launch, grid axis 2 picks the sweep:
  * phase 0 walks forward for dq holding the transposed state S1^T [BV, d], S2^T [BV, Q]
    (built as v^T k, v^T f2(k): no transpose of a dot result is ever taken -- fla issue
    #640 on Hopper with Triton 3.4-3.6);
  * phase 1 walks backward for dk, dv and d(initial state), holding dS^T (starting from
    d(final state) when the caller backpropagates through the returned state).  dv is
    computed transposed ([BV, BT]) and stored through transposed addresses.
With r_t = 1 / den_t and delta_t = do_t . o_t: d num_t = r_t do_t, d den_t = -r_t delta_t
(the denominator is the numerator of a "ones" value column owned by Dv tile 0).
dq and dk are partial over Dv tiles and summed by torch (fp32); dk/dv are summed over
the q heads of a k/v group by torch.  No atomics: results are deterministic.

Numerics
--------
All accumulation, the state, the denominator, eps and the division are fp32; o and the
gradients are cast once at the store.  Products of two inputs (q k^T, the selection
products, do v^T) run in the input dtype with fp32 accumulation (exact for the selections).
Products with an fp32 intermediate: bf16 inputs round it to bf16 (~4e-3, as fla does);
fp16 inputs use tf32 on fp32 operands (the state and den exceed the fp16 range at long T);
fp32 inputs use ``input_precision="ieee"``.

Tiles: BT (chunk), BV (Dv tile), warps and stages come from ``triton.autotune`` keyed on
(d, Dv, flags, problem-size bucket) for the forward; the backward's BV is fixed by
:func:`_bwd_block_v` (it sizes the partial-gradient buffers; 64 for d <= 16: on the H100
one Dv tile per head beat 32 / 16 because the feature work is per tile) and
BT/warps/stages are autotuned.  The measured alternatives are listed at the config spaces;
``benchmarks/gpu_taylor.py --sweep`` times them.  T is not specialised.  Under
TRITON_INTERPRET=1 one small config is used.  Batch/head bases and chunk starts are int64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _switches
from . import _common
from . import tuning as _tuning
from ._common import cdiv, next_pow2
from ._common import alloc as _alloc
from ._common import dtype_flags as _flags
from ._common import empty_like_layout as _empty_like_layout
from ._common import TunedLaunch, check_inputs, check_packed_states, fill_state_half
from ._common import register_attention_ops, row_dot
from ._common import launch_size as _launch_size
from ._common import torch_forward
from ._common import unit_last as _unit_last
from ._common import head_base, sequence_heads
from ._common import dot_in_ieee as _dot_in  # a @ b, ieee for fp32 inputs (Numerics)
from ._common import mm_ieee as _mm

__all__ = ["taylor_attention", "taylor_unsupported_reason", "TAYLOR_LIMITS"]

_INTERPRET = _common.INTERPRET

#: What the fused Taylor kernel accepts.
TAYLOR_LIMITS = {
    "max_d": 32,
    "max_dv": 256,
    "dtypes": (torch.float32, torch.float16, torch.bfloat16),
}

def taylor_unsupported_reason(d: int, dv: int) -> Optional[str]:
    """None when the fused kernel runs raw q/k dim ``d`` with value dim ``dv``, else why not."""
    if d < 1 or d > TAYLOR_LIMITS["max_d"]:
        return f"taylor_fused: q/k head dim d={d} is outside 1..{TAYLOR_LIMITS['max_d']}"
    if dv < 1 or dv > TAYLOR_LIMITS["max_dv"]:
        return f"taylor_fused: value dim Dv={dv} is outside 1..{TAYLOR_LIMITS['max_dv']}"
    return None


def _pads(d: int) -> tuple[int, int, bool]:
    """(DP, Q, FOLD3): padded d, the number of quadratic slots held per state column (>= 16:
    tl.dot needs every dim >= 16) and the form.  d <= 16: the symmetric form, the d(d-1)/2
    pairs i != j in next_pow2(d * (d // 2)) slots (128 for d = 16) plus the d squares apart,
    built by selection products.  d > 16 (FOLD3): the full form, every (i, j) in DP*DP slots
    built by a 3-D broadcast + reshape (the 0/1 selection matrices would not fit in shared
    memory)."""
    dp = max(16, next_pow2(d))
    if d > 16:
        return dp, dp * dp, True
    return dp, max(16, next_pow2(d * (d // 2))), False


def _fwd_configs(big: bool):
    if _INTERPRET:
        return [triton.Config({"BT": 32, "BV": 32}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 16 if big else 64, "BV": 16 if big else 32},
                              num_warps=4, num_stages=1 if big else 2)]
    # The loop is a chain of ~13 dependent tensor-core products per chunk and every config
    # sits at 255 registers; on the H100 (d=16, Dv=64, T=16384, bf16) BT 64 / BV 32 / 4 warps
    # / 2 stages ran 1.60 ms, BV 64 / 8 warps 2.04, BT 32 / BV 32 2.06, BT 128 >= 2.4, and
    # capping registers (maxnreg 128/168) for more programs per SM 3-4 ms (spills).
    if big:  # d > 16: Q = 1024 quadratic rows in registers
        space = [(16, 16, 4, 1), (16, 16, 8, 1)]
    else:
        space = [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 1)]
    return [triton.Config({"BT": bt, "BV": bv}, num_warps=nw, num_stages=ns)
            for bt, bv, nw, ns in space]


def _bwd_configs(big: bool):
    if _INTERPRET:
        return [triton.Config({"BT": 32}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 16 if big else 32}, num_warps=4, num_stages=1 if big else 3)]
    # H100, BV 64, T=16384: BT 32 / 4 warps / 3 stages 4.98 ms, 8 warps 5.22, BT 64 >= 6.0,
    # BT 16 5.63, BV 32 >= 8.8 (the feature work is per Dv tile)
    if big:
        space = [(16, 4, 1), (16, 8, 1)]
    else:
        space = [(32, 4, 3), (32, 8, 3), (16, 4, 2)]
    return [triton.Config({"BT": bt}, num_warps=nw, num_stages=ns) for bt, nw, ns in space]


def _bwd_block_v(d: int, dv: int) -> int:
    """Dv tile of the backward (it decides the partial dq/dk buffers, so it is not autotuned;
    ``tuning.override("taylor_bwd", BV=...)`` fixes it for benchmarking)."""
    cap = 16 if _pads(d)[2] else 64
    if _INTERPRET:
        cap = 32
    return max(16, min(cap, next_pow2(dv)))


# --------------------------------------------------------------------------- helpers
@triton.jit
def _dot32(a, b):
    """Full-fp32 a @ b for the small [*, d] x [d, d] products of the denominator path."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _quad(a, b, LOWP: tl.constexpr):
    """Element-wise a * b of two [BT, Q] tiles, kept in bf16 for bf16 inputs (the tile only
    feeds a bf16 tensor-core product; halving it keeps the kernel out of local memory)."""
    if LOWP:
        r = a.to(tl.bfloat16) * b.to(tl.bfloat16)
    else:
        r = a.to(tl.float32) * b.to(tl.float32)
    return r


@triton.jit
def _feat(x, Ri, Rj, BT: tl.constexpr, Q: tl.constexpr, FOLD3: tl.constexpr,
          LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Quadratic features x_i x_j (unscaled) of a [BT, DP] tile: [BT, Q]."""
    if FOLD3:
        if LOWP:
            xx = x.to(tl.bfloat16)
        else:
            xx = x.to(tl.float32)
        r = tl.reshape(xx[:, :, None] * xx[:, None, :], (BT, Q))
    else:
        # a selection product is a copy of x: cast back to x's dtype at once (exact), so the
        # two fp32 accumulators are never live together
        xa = _dot_in(x, Ri, FP32_IEEE).to(x.dtype)
        xb = _dot_in(x, Rj, FP32_IEEE).to(x.dtype)
        r = _quad(xa, xb, LOWP)
    return r


@triton.jit
def _featT(xT, RiT, RjT, BT: tl.constexpr, Q: tl.constexpr, FOLD3: tl.constexpr,
           LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Quadratic features of a transposed [DP, BT] tile: [Q, BT]."""
    if FOLD3:
        if LOWP:
            xx = xT.to(tl.bfloat16)
        else:
            xx = xT.to(tl.float32)
        r = tl.reshape(xx[:, None, :] * xx[None, :, :], (Q, BT))
    else:
        xa = _dot_in(RiT, xT, FP32_IEEE).to(xT.dtype)
        xb = _dot_in(RjT, xT, FP32_IEEE).to(xT.dtype)
        r = _quad(xa, xb, LOWP)
    return r


@triton.jit
def _fold(g, x, Ri, Rj, RiT, RjT, BT: tl.constexpr, DP: tl.constexpr, FOLD3: tl.constexpr,
          LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """Gradient of sum_ij g_ij x_i x_j w.r.t. x_m, i.e. sum_j (g_mj + g_jm) x_j: [BT, DP]
    from g [BT, Q] (fp32) and x [BT, DP]."""
    if FOLD3:
        G = tl.reshape(g, (BT, DP, DP))
        xf = x.to(tl.float32)
        r = tl.sum(G * xf[:, None, :], axis=2) + tl.sum(G * xf[:, :, None], axis=1)
    else:
        xa = _dot_in(x, Ri, FP32_IEEE).to(x.dtype)
        xb = _dot_in(x, Rj, FP32_IEEE).to(x.dtype)
        r = _mm(_quad(g, xb, LOWP), RiT, LOWP, FP32_IEEE) + _mm(_quad(g, xa, LOWP), RjT, LOWP, FP32_IEEE)
    return r


@triton.jit
def _slots(D: tl.constexpr, DP: tl.constexpr, Q: tl.constexpr, FOLD3: tl.constexpr):
    """The Q quadratic slots as (i, j, valid, row, mirror row); row = 1 + D + i*D + j is the
    slot's row in the full state layout and mirror row that of (j, i).

    FOLD3 (full form): slot i*DP + j, every ordered pair.  Otherwise (symmetric form) slot
    p = (r - 1)*D + i holds the unordered pair {i, (i + r) % D} for r = 1 .. D//2 (for even D,
    r = D/2 only for i < D/2): every pair i != j exactly once, D*(D-1)/2 slots in D*(D//2)
    (d = 16: 120 pairs in exactly 128 slots).  The diagonal is held apart (see _fwd_kernel)."""
    offs_q = tl.arange(0, Q)
    if FOLD3:
        pi = offs_q // DP
        pj = offs_q % DP
        valid = (pi < D) & (pj < D)
    else:
        pi = offs_q % D
        r = offs_q // D + 1
        pj = (pi + r) % D
        valid = (offs_q < D * (D // 2)) & ((2 * r != D) | (pi < D // 2))
    return pi, pj, valid, 1 + D + pi * D + pj, 1 + D + pj * D + pi


@triton.jit
def _selectors(pi, pj, valid, DP: tl.constexpr):
    """0/1 matrices of the slots: Ri [DP, Q] = [i == m], Rj [DP, Q] = [j == m], and their
    transposes [Q, DP] (fp32); invalid slots are all-zero columns/rows."""
    offs_d = tl.arange(0, DP)
    Ri = tl.where((pi[None, :] == offs_d[:, None]) & valid[None, :], 1.0, 0.0)
    Rj = tl.where((pj[None, :] == offs_d[:, None]) & valid[None, :], 1.0, 0.0)
    RiT = tl.where((pi[:, None] == offs_d[None, :]) & valid[:, None], 1.0, 0.0)
    RjT = tl.where((pj[:, None] == offs_d[None, :]) & valid[:, None], 1.0, 0.0)
    return Ri, Rj, RiT, RjT


@triton.jit
def _quad_offs(row, valid, offs_v, mv, DV: tl.constexpr, TRANS: tl.constexpr):
    """Addresses and mask of the quadratic block of a [Dk, Dv] state: [Q, BV] or, TRANS, [BV, Q]."""
    if TRANS:
        off = row[None, :] * DV + offs_v[:, None]
        m = valid[None, :] & mv[:, None]
    else:
        off = row[:, None] * DV + offs_v[None, :]
        m = valid[:, None] & mv[None, :]
    return off, m


@triton.jit
def _load_quad(ptr, row, rowm, valid, offs_v, mv, DV: tl.constexpr, SYM: tl.constexpr,
               TRANS: tl.constexpr, HALF: tl.constexpr):
    """The quadratic block of a full-layout state as the kernel holds it.  SYM: the sum of the
    (i, j) and (j, i) rows (HALF: their mean)."""
    off, m = _quad_offs(row, valid, offs_v, mv, DV, TRANS)
    x = tl.load(ptr + off, mask=m, other=0.0)
    if SYM:
        offm, _m = _quad_offs(rowm, valid, offs_v, mv, DV, TRANS)
        x += tl.load(ptr + offm, mask=m, other=0.0)
        if HALF:
            x = 0.5 * x
    return x


@triton.jit
def _store_quad(ptr, x, base, row, rowm, valid, offs_v, mv, DV: tl.constexpr,
                SYM: tl.constexpr, TRANS: tl.constexpr, HAS_BASE: tl.constexpr):
    """Write a held quadratic block x back in the full layout.  SYM writes
    out_ij = base_ij + x - (base_ij + base_ji) / 2 (base: a full-layout state or None) to both
    rows, which keeps base's antisymmetric part exactly as the full-form math does: the
    forward passes x = pair sum / 2 and base = the initial state, the backward x = d pair sum
    and base = the final state's cotangent."""
    off, m = _quad_offs(row, valid, offs_v, mv, DV, TRANS)
    if SYM:
        offm, _m = _quad_offs(rowm, valid, offs_v, mv, DV, TRANS)
        if HAS_BASE:
            b0 = tl.load(base + off, mask=m, other=0.0)
            b1 = tl.load(base + offm, mask=m, other=0.0)
            shift = x - 0.5 * (b0 + b1)
            tl.store(ptr + off, b0 + shift, mask=m)
            tl.store(ptr + offm, b1 + shift, mask=m)
        else:
            tl.store(ptr + off, x, mask=m)
            tl.store(ptr + offm, x, mask=m)
    else:
        tl.store(ptr + off, x, mask=m)


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "SIZE"])
def _fwd_kernel(
    q, k, v, o, den, kv0, z0, kvT, zT, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, eps, c1, c2, c2o, inv, SIZE,
    D: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, Q: tl.constexpr,
    FOLD3: tl.constexpr, SYM: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    LOWP: tl.constexpr, FP32_IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (B*H, cdiv(Dv, BV)).  q [B,H,T,d], k [B,Hkv,T,d], v [B,Hkv,T,Dv] (unit last
    stride); o [B,H,T,Dv] strided; den fp32 [B,H,T] (eps included); kv0/kvT fp32
    [B,H,Dk,Dv]; z0/zT fp32 [B,H,Dk].  VARLEN: B = 1 holds N packed sequences, program row
    i_bh is (sequence i_bh // H, head i_bh % H), tokens [cu[n], cu[n+1]) (_common.sequence_heads),
    and the states are [N, H, ...].

    The quadratic part of z is held as a [d, d] matrix Z2 (den gets q^T Z2 q, an exact fp32
    product), the quadratic part of kv as S2 [Q, BV]."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b, i_h, i_hk, bos, T_s, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)
    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    o_base = head_base(o, i_b, i_h, bos, sob, soh, sot)
    d_base = den + row * T + bos

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, DP)
    offs_v = i_v * BV + tl.arange(0, BV)
    md = offs_d < D
    pi, pj, mq, qrow, qrowm = _slots(D, DP, Q, FOLD3)
    drow = 1 + D + offs_d * (D + 1)  # row of (i, i)
    mv = offs_v < DV
    mdd = md[:, None] & md[None, :]
    sq_off = 1 + D + offs_d[:, None] * D + offs_d[None, :]  # z index of (i, j)
    causal = offs_t[:, None] >= offs_t[None, :]
    own_t = (offs_t * 0 + i_v) == 0  # vectors: the interpreter rejects vector & scalar masks

    Ri, Rj, RiT, RjT = _selectors(pi, pj, mq, DP)
    Ri = Ri.to(q.dtype.element_ty)
    Rj = Rj.to(q.dtype.element_ty)
    RiT = RiT.to(q.dtype.element_ty)
    RjT = RjT.to(q.dtype.element_ty)

    st = i_bh.to(tl.int64) * DK * DV
    S0 = tl.zeros([BV], dtype=tl.float32)
    S1 = tl.zeros([DP, BV], dtype=tl.float32)
    S2 = tl.zeros([Q, BV], dtype=tl.float32)
    Sd = tl.zeros([DP, BV], dtype=tl.float32)
    zc = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    z1 = tl.zeros([DP], dtype=tl.float32)
    Z2 = tl.zeros([DP, DP], dtype=tl.float32)
    if HAS_INIT:
        S0 = tl.load(kv0 + st + offs_v, mask=mv, other=0.0)
        S1 = tl.load(kv0 + st + (1 + offs_d)[:, None] * DV + offs_v[None, :],
                     mask=md[:, None] & mv[None, :], other=0.0)
        S2 = _load_quad(kv0 + st, qrow, qrowm, mq, offs_v, mv, DV, SYM, False, False)
        if SYM:
            Sd = tl.load(kv0 + st + drow[:, None] * DV + offs_v[None, :],
                         mask=md[:, None] & mv[None, :], other=0.0)
        if NORMALIZE:
            zst = z0 + i_bh.to(tl.int64) * DK
            zc = tl.load(zst)
            z1 = tl.load(zst + 1 + offs_d, mask=md, other=0.0)
            Z2 = tl.load(zst + sq_off, mask=mdd, other=0.0)

    for i in range(0, tl.cdiv(T_s, BT)):
        t0 = tl.cast(i * BT, tl.int64)
        mt = (i * BT + offs_t) < T_s
        b_q = tl.load(q_base + (t0 + offs_t)[:, None] * sqt + offs_d[None, :],
                      mask=mt[:, None] & md[None, :], other=0.0)
        b_k = tl.load(k_base + (t0 + offs_t)[:, None] * skt + offs_d[None, :],
                      mask=mt[:, None] & md[None, :], other=0.0)
        b_v = tl.load(v_base + (t0 + offs_t)[:, None] * svt + offs_v[None, :],
                      mask=mt[:, None] & mv[None, :], other=0.0)
        b_kT = tl.trans(b_k)
        s = _dot_in(b_q, b_kT, FP32_IEEE) * inv  # [BT, BT] fp32
        A = tl.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
        num = _mm(A, b_v, LOWP, FP32_IEEE) + S0[None, :] + c1 * _mm(b_q, S1, LOWP, FP32_IEEE)
        f2q = _feat(b_q, Ri, Rj, BT, Q, FOLD3, LOWP, FP32_IEEE)  # [BT, Q] q_i q_j
        n2 = _mm(f2q, S2, LOWP, FP32_IEEE)
        if SYM:
            b_qf = b_q.to(tl.float32)
            n2 += _mm(b_qf * b_qf, Sd, LOWP, FP32_IEEE)
        num += c2 * n2
        if NORMALIZE:
            b_qf = b_q.to(tl.float32)
            dn = tl.sum(A, axis=1) + zc + c1 * tl.sum(b_qf * z1[None, :], axis=1)
            dn += c2 * tl.sum(_dot32(b_qf, Z2) * b_qf, axis=1)
            dn = dn + eps
            num = num * (1.0 / dn)[:, None]  # a reciprocal per row (see chunked.py)
            tl.store(d_base + t0 + offs_t, dn, mask=mt & own_t)
            zc += tl.sum(tl.where(mt, 1.0, 0.0), axis=0)
            z1 += c1 * tl.sum(b_k.to(tl.float32), axis=0)
            Z2 += c2 * _dot_in(b_kT, b_k, FP32_IEEE)
        tl.store(o_base + (t0 + offs_t)[:, None] * sot + offs_v[None, :],
                 num.to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        S0 += tl.sum(b_v.to(tl.float32), axis=0)
        S1 += c1 * _dot_in(b_kT, b_v, FP32_IEEE)
        f2kT = _featT(b_kT, RiT, RjT, BT, Q, FOLD3, LOWP, FP32_IEEE)  # [Q, BT]
        S2 += c2o * _mm(f2kT, b_v, LOWP, FP32_IEEE)
        if SYM:
            b_kTf = b_kT.to(tl.float32)
            Sd += c2 * _mm(b_kTf * b_kTf, b_v, LOWP, FP32_IEEE)

    if STORE_FINAL:
        tl.store(kvT + st + offs_v, S0, mask=mv)
        tl.store(kvT + st + (1 + offs_d)[:, None] * DV + offs_v[None, :], S1,
                 mask=md[:, None] & mv[None, :])
        if SYM:
            _store_quad(kvT + st, 0.5 * S2, kv0 + st, qrow, qrowm, mq, offs_v, mv, DV,
                        SYM, False, HAS_INIT)
            tl.store(kvT + st + drow[:, None] * DV + offs_v[None, :], Sd,
                     mask=md[:, None] & mv[None, :])
        else:
            _store_quad(kvT + st, S2, kv0 + st, qrow, qrowm, mq, offs_v, mv, DV,
                        SYM, False, HAS_INIT)
        if NORMALIZE:
            if i_v == 0:
                zst = zT + i_bh.to(tl.int64) * DK
                tl.store(zst, zc)
                tl.store(zst + 1 + offs_d, z1, mask=md)
                tl.store(zst + sq_off, Z2, mask=mdd)


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T", "SIZE"])
def _bwd_kernel(
    q, k, v, do, den, delta, kv0, z0, dkvT, dzT,
    dq, dk, dv, dkv0, dz0, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, NB, H, G, c1, c2, c2o, inv, SIZE,
    D: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DP: tl.constexpr, Q: tl.constexpr,
    FOLD3: tl.constexpr, SYM: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    LOWP: tl.constexpr, FP32_IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (B*H, NV, 2); axis 2: 0 = dq sweep (forward in time), 1 = dk/dv/d-state sweep.

    Outputs (contiguous, per q head): dq, dk [NV, NB, H, T, d] (partials over Dv tiles);
    dv [NB, H, T, Dv]; dkv0 fp32 [B,H,Dk,Dv], dz0 fp32 [B,H,Dk] (when HAS_INIT).  VARLEN as
    in the forward (NB = 1, B = N sequences)."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    phase = tl.program_id(2)
    n_rows = NB * H
    i_b, i_h, i_hk, bos, T_s, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)
    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    do_base = head_base(do, i_b, i_h, bos, sdb, sdh, sdt)
    row_base = row * T + bos

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, DP)
    offs_v = i_v * BV + tl.arange(0, BV)
    md = offs_d < D
    pi, pj, mq, qrow, qrowm = _slots(D, DP, Q, FOLD3)
    drow = 1 + D + offs_d * (D + 1)  # row of (i, i)
    mv = offs_v < DV
    mdd = md[:, None] & md[None, :]
    sq_off = 1 + D + offs_d[:, None] * D + offs_d[None, :]  # z index of (i, j)
    sq_offT = 1 + D + offs_d[None, :] * D + offs_d[:, None]  # ... of (j, i)
    own_t = (offs_t * 0 + i_v) == 0
    st = i_bh.to(tl.int64) * DK * DV
    NT = tl.cdiv(T_s, BT)

    Ri, Rj, RiT_f, RjT_f = _selectors(pi, pj, mq, DP)
    Ri = Ri.to(q.dtype.element_ty)
    Rj = Rj.to(q.dtype.element_ty)

    if phase == 0:
        # ---- forward sweep: dq.  S^T held as [BV, .] so nothing transposes a dot result.
        #   dq_t = r_t [ (dA o (1+s)) k / sqrt(d) + c1 (do S1^T - delta z1)
        #                + c2 sum_j (G_mj + G_jm) q_j ],   G = do S2^T - delta Z2
        causal = offs_t[:, None] >= offs_t[None, :]
        S1T = tl.zeros([BV, DP], dtype=tl.float32)
        S2T = tl.zeros([BV, Q], dtype=tl.float32)
        SdT = tl.zeros([BV, DP], dtype=tl.float32)
        z1 = tl.zeros([DP], dtype=tl.float32)
        W = tl.zeros([DP, DP], dtype=tl.float32)  # Z2 + Z2^T
        if HAS_INIT:
            S1T = tl.load(kv0 + st + (1 + offs_d)[None, :] * DV + offs_v[:, None],
                          mask=md[None, :] & mv[:, None], other=0.0)
            S2T = _load_quad(kv0 + st, qrow, qrowm, mq, offs_v, mv, DV, SYM, True, False)
            if SYM:
                SdT = tl.load(kv0 + st + drow[None, :] * DV + offs_v[:, None],
                              mask=md[None, :] & mv[:, None], other=0.0)
            if NORMALIZE:
                zst = z0 + i_bh.to(tl.int64) * DK
                z1 = tl.load(zst + 1 + offs_d, mask=md, other=0.0)
                W = tl.load(zst + sq_off, mask=mdd, other=0.0) + tl.load(zst + sq_offT, mask=mdd, other=0.0)
        dq_base = dq + ((i_v.to(tl.int64) * n_rows + row) * T + bos) * D
        for i in range(0, NT):
            t0 = tl.cast(i * BT, tl.int64)
            mt = (i * BT + offs_t) < T_s
            b_q = tl.load(q_base + (t0 + offs_t)[:, None] * sqt + offs_d[None, :],
                          mask=mt[:, None] & md[None, :], other=0.0)
            b_k = tl.load(k_base + (t0 + offs_t)[:, None] * skt + offs_d[None, :],
                          mask=mt[:, None] & md[None, :], other=0.0)
            b_v = tl.load(v_base + (t0 + offs_t)[:, None] * svt + offs_v[None, :],
                          mask=mt[:, None] & mv[None, :], other=0.0)
            b_do = tl.load(do_base + (t0 + offs_t)[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            b_vT = tl.trans(b_v)
            b_kT = tl.trans(b_k)
            s = _dot_in(b_q, b_kT, FP32_IEEE) * inv
            dA = _dot_in(b_do, b_vT, FP32_IEEE)  # [t, s] do_t . v_s
            if NORMALIZE:
                b_dl = tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t, other=0.0)
                dA = dA - b_dl[:, None]
            dA = tl.where(causal, dA * (1.0 + s), 0.0)
            b_dq = inv * _mm(dA, b_k, LOWP, FP32_IEEE) + c1 * _mm(b_do, S1T, LOWP, FP32_IEEE)
            if NORMALIZE:
                b_dq -= b_dl[:, None] * (c1 * z1[None, :] + c2 * _dot32(b_q, W))
            g2 = _mm(b_do, S2T, LOWP, FP32_IEEE)  # [BT, Q]
            gq = _fold(g2, b_q, Ri, Rj, RiT_f, RjT_f, BT, DP, FOLD3, LOWP, FP32_IEEE)
            if SYM:
                gq += 2.0 * b_q.to(tl.float32) * _mm(b_do, SdT, LOWP, FP32_IEEE)
            b_dq += c2 * gq
            if NORMALIZE:
                b_den = tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dq = b_dq * (1.0 / b_den)[:, None]
                z1 += c1 * tl.sum(b_k.to(tl.float32), axis=0)
                W += (2.0 * c2) * _dot_in(b_kT, b_k, FP32_IEEE)
            tl.store(dq_base + (t0 + offs_t)[:, None] * D + offs_d[None, :],
                     b_dq.to(dq.dtype.element_ty), mask=mt[:, None] & md[None, :])
            S1T += c1 * _dot_in(b_vT, b_k, FP32_IEEE)
            f2k = _feat(b_k, Ri, Rj, BT, Q, FOLD3, LOWP, FP32_IEEE)  # [BT, Q]
            S2T += c2o * _mm(b_vT, f2k, LOWP, FP32_IEEE)
            if SYM:
                b_kf = b_k.to(tl.float32)
                SdT += c2 * _mm(b_vT, b_kf * b_kf, LOWP, FP32_IEEE)
    else:
        # ---- reverse sweep: dk, dv, d(initial state).  dn_t = r_t do_t, dd_t = -r_t delta_t.
        causal = offs_t[:, None] >= offs_t[None, :]  # [t, s]
        anti = offs_t[:, None] <= offs_t[None, :]  # [s, t]
        RiT = RiT_f.to(q.dtype.element_ty)
        RjT = RjT_f.to(q.dtype.element_ty)
        dS0 = tl.zeros([BV], dtype=tl.float32)
        dS1T = tl.zeros([BV, DP], dtype=tl.float32)
        dS2T = tl.zeros([BV, Q], dtype=tl.float32)
        dSdT = tl.zeros([BV, DP], dtype=tl.float32)
        dzc = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
        dz1 = tl.zeros([DP], dtype=tl.float32)
        DZ2 = tl.zeros([DP, DP], dtype=tl.float32)
        DZ2T = tl.zeros([DP, DP], dtype=tl.float32)
        if HAS_DFINAL:
            dS0 = tl.load(dkvT + st + offs_v, mask=mv, other=0.0)
            dS1T = tl.load(dkvT + st + (1 + offs_d)[None, :] * DV + offs_v[:, None],
                           mask=md[None, :] & mv[:, None], other=0.0)
            dS2T = _load_quad(dkvT + st, qrow, qrowm, mq, offs_v, mv, DV, SYM, True, True)
            if SYM:
                dSdT = tl.load(dkvT + st + drow[None, :] * DV + offs_v[:, None],
                               mask=md[None, :] & mv[:, None], other=0.0)
            if NORMALIZE:
                if i_v == 0:
                    zst = dzT + i_bh.to(tl.int64) * DK
                    dzc = tl.load(zst)
                    dz1 = tl.load(zst + 1 + offs_d, mask=md, other=0.0)
                    DZ2 = tl.load(zst + sq_off, mask=mdd, other=0.0)
                    DZ2T = tl.load(zst + sq_offT, mask=mdd, other=0.0)
        dk_base = dk + ((i_v.to(tl.int64) * n_rows + row) * T + bos) * D
        dv_base = dv + (row * T + bos) * DV
        for j in range(0, NT):
            i = NT - 1 - j
            t0 = tl.cast(i * BT, tl.int64)
            mt = (i * BT + offs_t) < T_s
            b_q = tl.load(q_base + (t0 + offs_t)[:, None] * sqt + offs_d[None, :],
                          mask=mt[:, None] & md[None, :], other=0.0)
            b_k = tl.load(k_base + (t0 + offs_t)[:, None] * skt + offs_d[None, :],
                          mask=mt[:, None] & md[None, :], other=0.0)
            b_v = tl.load(v_base + (t0 + offs_t)[:, None] * svt + offs_v[None, :],
                          mask=mt[:, None] & mv[None, :], other=0.0)
            b_do = tl.load(do_base + (t0 + offs_t)[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            b_qT = tl.trans(b_q)
            b_kT = tl.trans(b_k)
            b_doT = tl.trans(b_do)  # [BV, BT]
            # -- dk_s = (dA^T o (1+s^T)) q / sqrt(d) + d phi(k_s) . (dKV v_s + dZ)
            sT = _dot_in(b_k, b_qT, FP32_IEEE) * inv  # [s, t]
            dAT = _dot_in(b_v, b_doT, FP32_IEEE)  # [s, t] v_s . do_t
            if NORMALIZE:
                b_r = 1.0 / tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dd = -tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t, other=0.0) * b_r
                dAT = dAT * b_r[None, :] + b_dd[None, :]
                b_dnT = b_doT.to(tl.float32) * b_r[None, :]
            else:
                b_dnT = b_doT.to(tl.float32)
            dAT = tl.where(anti, dAT * (1.0 + sT), 0.0)
            b_dk = inv * _mm(dAT, b_q, LOWP, FP32_IEEE) + c1 * _mm(b_v, dS1T, LOWP, FP32_IEEE)
            if NORMALIZE:
                b_dk += c1 * dz1[None, :] + c2 * _dot32(b_k, DZ2 + DZ2T)
            gd2 = _mm(b_v, dS2T, LOWP, FP32_IEEE)  # [BT, Q]
            b_dk += c2o * _fold(gd2, b_k, Ri, Rj, RiT_f, RjT_f, BT, DP, FOLD3, LOWP, FP32_IEEE)
            if SYM:
                b_dk += (2.0 * c2) * b_k.to(tl.float32) * _mm(b_v, dSdT, LOWP, FP32_IEEE)
            tl.store(dk_base + (t0 + offs_t)[:, None] * D + offs_d[None, :],
                     b_dk.to(dk.dtype.element_ty), mask=mt[:, None] & md[None, :])
            # -- dv_s^T = dn^T A + dS0 + c1 dS1^T k_s^T + c2 dS2^T f2(k_s)^T   ([BV, BT])
            s = _dot_in(b_q, b_kT, FP32_IEEE) * inv  # [t, s]
            A = tl.where(causal, 1.0 + s + 0.5 * s * s, 0.0)
            b_dvT = _mm(b_dnT, A, LOWP, FP32_IEEE) + dS0[:, None] + c1 * _mm(dS1T, b_kT, LOWP, FP32_IEEE)
            f2kT = _featT(b_kT, RiT, RjT, BT, Q, FOLD3, LOWP, FP32_IEEE)  # [Q, BT]
            b_dvT += c2o * _mm(dS2T, f2kT, LOWP, FP32_IEEE)
            if SYM:
                b_kTf = b_kT.to(tl.float32)
                b_dvT += c2 * _mm(dSdT, b_kTf * b_kTf, LOWP, FP32_IEEE)
            tl.store(dv_base + (t0 + offs_t)[None, :] * DV + offs_v[:, None],
                     b_dvT.to(dv.dtype.element_ty), mask=mt[None, :] & mv[:, None])
            # -- this chunk's queries into dS, dz
            dS0 += tl.sum(b_dnT, axis=1)
            dS1T += c1 * _mm(b_dnT, b_q, LOWP, FP32_IEEE)
            f2q = _feat(b_q, Ri, Rj, BT, Q, FOLD3, LOWP, FP32_IEEE)  # [BT, Q]
            dS2T += c2 * _mm(b_dnT, f2q, LOWP, FP32_IEEE)
            if SYM:
                b_qf2 = b_q.to(tl.float32)
                dSdT += c2 * _mm(b_dnT, b_qf2 * b_qf2, LOWP, FP32_IEEE)
            if NORMALIZE:
                b_qd = b_q.to(tl.float32) * b_dd[:, None]
                dzc += tl.sum(b_dd, axis=0)
                dz1 += c1 * tl.sum(b_qd, axis=0)
                inc = c2 * _dot32(b_qT, b_qd)  # symmetric
                DZ2 += inc
                DZ2T += inc
        if HAS_INIT:
            tl.store(dkv0 + st + offs_v, dS0, mask=mv)
            tl.store(dkv0 + st + (1 + offs_d)[None, :] * DV + offs_v[:, None], dS1T,
                     mask=md[None, :] & mv[:, None])
            _store_quad(dkv0 + st, dS2T, dkvT + st, qrow, qrowm, mq, offs_v, mv, DV,
                        SYM, True, HAS_DFINAL)
            if SYM:
                tl.store(dkv0 + st + drow[None, :] * DV + offs_v[:, None], dSdT,
                         mask=md[None, :] & mv[:, None])
            if NORMALIZE:
                if i_v == 0:
                    zst = dz0 + i_bh.to(tl.int64) * DK
                    tl.store(zst, dzc)
                    tl.store(zst + 1 + offs_d, dz1, mask=md)
                    tl.store(zst + sq_off, DZ2, mask=mdd)


# SIZE (_common.size_bucket): a config tuned on a first small call was kept for every size
_FWD_KEY = ["D", "DV", "NORMALIZE", "HAS_INIT", "LOWP", "FP32_IEEE", "SIZE"]
_BWD_KEY = ["D", "DV", "BV", "NORMALIZE", "LOWP", "FP32_IEEE", "SIZE"]
_fwd_small = triton.autotune(configs=_fwd_configs(False), key=_FWD_KEY)(_fwd_kernel)
_fwd_big = triton.autotune(configs=_fwd_configs(True), key=_FWD_KEY)(_fwd_kernel)
_bwd_small = triton.autotune(configs=_bwd_configs(False), key=_BWD_KEY)(_bwd_kernel)
_bwd_big = triton.autotune(configs=_bwd_configs(True), key=_BWD_KEY)(_bwd_kernel)
_LAUNCH = {t: TunedLaunch(t) for t in (_fwd_small, _fwd_big, _bwd_small, _bwd_big)}


# --------------------------------------------------------------------------- wrappers
def _consts(d: int) -> tuple[float, float, float, float]:
    """(c1, c2, c2o, 1/sqrt(d)): the linear and quadratic feature scales, the scale of a
    quadratic slot's state update (2 c2 in the symmetric form: a slot stands for (i, j) and
    (j, i)) and the score scale."""
    c2 = 1.0 / math.sqrt(2.0 * d)
    return d ** -0.25, c2, (c2 if _pads(d)[2] else 2.0 * c2), 1.0 / math.sqrt(d)


def _forward(q, k, v, normalize, eps, kv0, z0, store_final, cu_seqlens=None):
    """Launch the forward; ``tuning.override("taylor_fwd", ...)`` fixes its config.
    ``cu_seqlens``: q, k, v hold packed sequences (B = 1); the states are per sequence."""
    NB, H, T, d = q.shape
    B = NB if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Hkv, Dv = k.shape[1], v.shape[-1]
    DK = 1 + d + d * d
    DP, Q, FOLD3 = _pads(d)
    dev = q.device
    has_init = kv0 is not None
    o = _empty_like_layout(q, NB, H, T, Dv, q.dtype)
    den = _alloc((NB, H, T), torch.float32, dev) if normalize else o
    kvT = _alloc((B, H, DK, Dv), torch.float32, dev) if store_final else o
    zT = _alloc((B, H, DK), torch.float32, dev) if (store_final and normalize) else o
    lowp, fp32_ieee = _flags(q.dtype)
    c1, c2, c2o, inv = _consts(d)
    fn = _LAUNCH[_fwd_big if FOLD3 else _fwd_small]
    size = _launch_size(B, H, T, packed=cu_seqlens is not None)
    meta = {}
    config = _tuning.forced("taylor_fwd")
    if config:
        fn, meta = _fwd_kernel, dict(config)

    def grid(m):  # BV is autotuned: nothing the wrapper allocates depends on it
        return (B * H, cdiv(Dv, m["BV"]))

    fn[grid](
        q, k, v, o, den,
        kv0 if has_init else o, z0 if (has_init and normalize) else o, kvT, zT,
        cu_seqlens if cu_seqlens is not None else o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, H, H // Hkv, eps, c1, c2, c2o, inv, size,
        D=d, DK=DK, DV=Dv, DP=DP, Q=Q, FOLD3=FOLD3, SYM=not FOLD3, NORMALIZE=normalize, HAS_INIT=has_init,
        STORE_FINAL=store_final, LOWP=lowp, FP32_IEEE=fp32_ieee, VARLEN=cu_seqlens is not None, **meta,
    )
    return (o, den if normalize else None, kvT if store_final else None,
            zT if (store_final and normalize) else None)


def _backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, cu_seqlens=None):
    """Launch the backward; ``tuning.override("taylor_bwd", ...)`` fixes its config (BV alone:
    the Dv tile, the rest still autotuned)."""
    NB, H, T, d = q.shape
    B = NB if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    DK = 1 + d + d * d
    DP, Q, FOLD3 = _pads(d)
    dev = q.device
    config = _tuning.forced("taylor_bwd") or {}
    BV = config.get("BV") or _bwd_block_v(d, Dv)
    NV = cdiv(Dv, BV)
    has_init = kv0 is not None
    has_dfinal = dkvT is not None or dzT is not None
    if has_dfinal:
        dkvT = torch.zeros(B, H, DK, Dv, dtype=torch.float32, device=dev) if dkvT is None \
            else dkvT.float().contiguous()
        if normalize:
            dzT = torch.zeros(B, H, DK, dtype=torch.float32, device=dev) if dzT is None \
                else dzT.float().contiguous()
    if normalize:
        delta = row_dot(o, do)
    else:
        delta = den = do  # unused placeholders
    # fp32 where several programs contribute to one element (summed below), else direct.
    reduce_dk = NV > 1 or G > 1
    dq = _alloc((NV, NB, H, T, d), torch.float32 if NV > 1 else q.dtype, dev)
    dk = _alloc((NV, NB, H, T, d), torch.float32 if reduce_dk else k.dtype, dev)
    dv = _alloc((NB, H, T, Dv), torch.float32 if G > 1 else v.dtype, dev)
    dkv0 = _alloc((B, H, DK, Dv), torch.float32, dev) if has_init else dq
    dz0 = _alloc((B, H, DK), torch.float32, dev) if (has_init and normalize) else dq
    lowp, fp32_ieee = _flags(q.dtype)
    c1, c2, c2o, inv = _consts(d)
    fn = _LAUNCH[_bwd_big if FOLD3 else _bwd_small]
    size = _launch_size(B, H, T, packed=cu_seqlens is not None)
    meta = {k_: v_ for k_, v_ in config.items() if k_ != "BV"}
    if meta:
        fn = _bwd_kernel
    fn[(B * H, NV, 2)](
        q, k, v, do, den, delta,
        kv0 if has_init else dq, z0 if (has_init and normalize) else dq,
        dkvT if has_dfinal else dq, dzT if (has_dfinal and normalize) else dq,
        dq, dk, dv, dkv0, dz0, cu_seqlens if cu_seqlens is not None else dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        T, NB, H, G, c1, c2, c2o, inv, size,
        D=d, DK=DK, DV=Dv, DP=DP, Q=Q, FOLD3=FOLD3, SYM=not FOLD3, BV=BV, NORMALIZE=normalize, HAS_INIT=has_init,
        HAS_DFINAL=has_dfinal, LOWP=lowp, FP32_IEEE=fp32_ieee, VARLEN=cu_seqlens is not None, **meta,
    )
    dq = dq[0] if NV == 1 else dq.sum(0).to(q.dtype)
    dk = dk.view(NV, NB, Hkv, G, T, d).sum((0, 3)).to(k.dtype) if reduce_dk else dk[0]
    dv = dv.view(NB, Hkv, G, T, Dv).sum(2).to(v.dtype) if G > 1 else dv
    return dq, dk, dv, (dkv0 if has_init else None), (dz0 if (has_init and normalize) else None)


def taylor_attention(q, k, v, *, normalize: bool, eps: float,
                     initial_kv=None, initial_z=None, return_state: bool = False,
                     form: str = "auto", check: bool = True, cu_seqlens=None):
    """Causal linear attention with the second-order Taylor feature map fused in.

    Equal to ``linear_attention(q, k, v, feature_map="taylor", ...)`` on materialised
    features, without ever materialising them.  Calls with no state in or out and
    T <= ``taylor_parallel.PARALLEL_MAX_T`` (2048) run the parallel form, the others the
    chunked form; the results agree to rounding.

    Args:
        q: [B, H, T, d] raw queries, already multiplied by the caller's scale.
        k: [B, Hkv, T, d] raw keys; v: [B, Hkv, T, Dv].  Hkv divides H (q head h reads
            k/v head h // (H // Hkv)).  Any strides (a non-unit last stride is copied).
            float32, float16 or bfloat16, all the same.  d <= 32, Dv <= 256.
        normalize: divide by den_t = phi(q_t) . (z0 + sum_{s<=t} phi(k_s)) + eps (fp32).
        eps: added to the denominator.
        initial_kv: None or fp32 [B, H, Dk, Dv] (Dk = 1 + d + d*d), the expanded state of
            an earlier segment, in the LinearAttentionState layout of every backend.
        initial_z: None or fp32 [B, H, Dk] (normalize=True only).
        return_state: also return the final state.
        form: ``"parallel"`` (stateless calls only), ``"chunked"``, or ``"auto"`` (the
            dispatcher's rule: parallel for stateless calls up to
            ``FEATATTN_TAYLOR_PARALLEL_MAX_T`` tokens).  featattn.linear_attention passes the
            form featattn.dispatch chose.
        check: validate the inputs (featattn.linear_attention has, and passes False).
        cu_seqlens: None, or int32/int64 [N + 1]: q, k, v are [1, ., T, .] holding N
            sequences back to back, each attended alone (the chunked form); the states in and
            out are [N, H, ...].

    Returns:
        (o, kv, z): o [B, H, T, Dv] in the input dtype; with return_state kv fp32
        [B, H, Dk, Dv] and z fp32 [B, H, Dk] (None when normalize=False), else None, None.
        Differentiable in q, k, v, initial_kv, initial_z, also through kv and z.
    """
    varlen = cu_seqlens is not None
    if check:
        if varlen:
            from ..functional import _validate_cu_seqlens

            _validate_cu_seqlens(cu_seqlens, q)
        check_inputs(q, k, v, normalize, None if varlen else initial_kv,
                     None if varlen else initial_z, state_dim=lambda d: 1 + d + d * d,
                     dtypes=TAYLOR_LIMITS["dtypes"], shape_reason=taylor_unsupported_reason)
        if varlen:
            d = q.shape[-1]
            check_packed_states(cu_seqlens, q.shape[1], 1 + d + d * d, v.shape[-1], normalize,
                                initial_kv, initial_z)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    from . import taylor_parallel as _par  # imports this module's helpers: not at the top

    stateful = initial_kv is not None or initial_z is not None or return_state
    if varlen:
        if form == "parallel":
            raise ValueError("the Taylor parallel form takes no packed sequences: use "
                             "form='chunked' (or 'auto') with cu_seqlens")
        form = "chunked"
    if form == "auto":
        form = "parallel" if _par.use_parallel(q.shape[2], stateful) else "chunked"
    if form not in ("parallel", "chunked"):
        raise ValueError(f"form must be 'auto', 'parallel' or 'chunked', got {form!r}")
    if form == "parallel":
        if stateful:
            raise ValueError("the Taylor parallel form keeps no state: pass no initial state "
                             "and return_state=False, or use form='chunked'")
        o, _den, _, _ = _par.parallel_op(q, k, v, None, None, bool(normalize), float(eps), False)
        return o, None, None
    if initial_kv is not None:
        initial_kv = initial_kv.float().contiguous()
    if initial_z is not None:
        initial_z = initial_z.float().contiguous()
    B, H, _, d = q.shape
    if varlen:
        B = cu_seqlens.shape[0] - 1
    initial_kv, initial_z = fill_state_half(normalize, initial_kv, initial_z, B, H,
                                            1 + d + d * d, v.shape[-1], q.device)
    o, _den, kv, z = _fwd_op(q, k, v, initial_kv, initial_z, bool(normalize), float(eps),
                             bool(return_state), "", 1.0, cu_seqlens)
    if not return_state:
        return o, None, None
    return o, kv, (z if normalize else None)


# torch.library custom ops (fake kernels + autograd formula): see _common.py
_fwd_op = register_attention_ops("taylor", _forward, _backward, state_dim=lambda d: 1 + d + d * d,
                                 differentiable=torch_forward("taylor"))
