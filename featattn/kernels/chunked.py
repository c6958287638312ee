"""Chunked causal linear attention in Triton: forward, backward, recurrent state.

Legend: B batch, H query heads, Hkv key/value heads (H % Hkv == 0, G = H // Hkv),
T time, Dk q/k feature dim, Dv value dim, BT chunk length, BK / BV tile of Dk / Dv.

What is computed (q, k are already feature-mapped by the caller)::

    S_t   = S0 + sum_{s<=t} k_s^T v_s             # [Dk, Dv] fp32 running state
    z_t   = z0 + sum_{s<=t} k_s                   # [Dk]     fp32 running normaliser
    num_t = q_t S_t
    den_t = q_t . z_t + eps
    o_t   = num_t / den_t   if normalize else num_t

Algorithm (the "fused chunk" form, linear in T)
-----------------------------------------------
Time is cut into chunks of BT rows.  Within a chunk the causal part is a masked
quadratic product, ``tril(q k^T) v``; everything before the chunk is in the state::

    num_c = tril(q_c k_c^T) v_c + q_c S        then  S += k_c^T v_c
    den_c = rowsum(tril(q_c k_c^T)) + q_c z    then  z += colsum(k_c)

Forward: one program per (batch*head, Dk tile, Dv tile) walks the chunks in order,
holding its state tile S [BK, BV] (and z [BK]) in registers, so q, k, v are read once
and o written once (the HBM floor) when Dk and Dv fit one tile each.  The denominator
is the same computation with a value column of ones: for bf16 / fp16 with key tiles of at
most DEN_IN_MMA_MAX_BK, a tile of equal columns made on the tensor cores (A @ ones and
q @ Z, Z += k^T @ ones), otherwise a row sum and a [BT, BK] x [BK] product; no extra pass.
When Dk needs several tiles (Dk > 128, e.g. the 273 features of a second-order Taylor
map) numerator and denominator are linear in the Dk split: every Dk tile writes fp32
partials and a torch sum + division finishes.
Dv tiles are independent (each writes its own columns of o); the denominator is
computed redundantly by every Dv tile and stored by tile 0.

Backward: one launch whose programs are of two kinds (grid axis 2):
  * phase 0 sweeps forward for dq, holding S^T [BV, BK] (built as v^T k, so no
    transpose of a dot result is ever taken: see fla issue #640 on Hopper);
  * phase 1 sweeps backward for dk, dv and d(initial state), holding dS [BK, BV]
    (and dz [BK]) which starts from d(final state) when the caller backpropagates
    through the returned state.
Both kinds run concurrently, which doubles the number of programs in flight.
For the normalised output, with r_t = 1/den_t and delta_t = do_t . o_t::

    d num_t = r_t do_t,      d den_t = -r_t delta_t

i.e. the plain linear-attention backward with one extra "ones" value column whose
output gradient is d den.  dq keeps the factor r_t outside its sums (it is a row
scale), which keeps the summed terms O(1) even when den grows with t.  den (fp32
[B, H, T]) is saved by the forward; delta is a small row-sum kernel.

Segments (split T): one program per (batch*head, tile) sweeping all of T is latency-bound
when B*H is small (B = 1, H = 16 leaves most SMs idle).  `segments` then cuts T into NS
segments (multiples of 64 tokens) swept in parallel, grid axis 2.  A segment-sums kernel
(`_seg_kernel`) first writes each segment's own state contribution, fp32
[B*H, NS, Dk, Dv] (and [.., Dk] for z): sum k^T v forward; sum q^T (do / den) backward for
the reverse sweep.  The program of segment s adds the sums of segments < s (forward, dq
sweep) or > s (dk/dv sweep) to the initial / final-state gradient and sweeps its own
chunks.  Costs one more read of k and v (and of q and do backward) and O(NS) state tiles;
the last segment's program stores the final state, segment 0's the initial-state gradient.

Reductions that cross programs are done by torch on fp32 buffers (never atomics, so
results are deterministic): dq and dk over Dv tiles, dv over Dk tiles, dk and dv over
the q heads of a key/value group.  With Dk, Dv <= 128 and no grouping there is none.

Numerics
--------
The state, the denominator, eps and the division are fp32; o is cast once when stored.
Products whose operands are both inputs (q k^T, k^T v, do v^T) run on the tensor
cores in the input dtype with fp32 accumulation.  Products involving an fp32
intermediate (the masked score tile, the state, d num) are done
  * bf16 inputs: by rounding the intermediate to bf16 (same exponent range as fp32,
    relative error ~4e-3 -- the usual flash-linear-attention trade);
  * fp16 inputs: in tf32 on fp32 operands, because the state and den exceed the fp16
    range at long T (an fp16 round would overflow or flush to zero);
  * fp32 inputs: every product uses ``input_precision="tf32x3"`` (three tf32 tensor-core
    products, error ~1e-6 relative), so fp32 results are fp32-grade where Triton's
    default (tf32, ~3e-4) would not be.  "ieee" would do too, but it becomes unrolled
    FMA code: on the H100 the fp32 test cases then compiled several times slower.

Performance (H100, bf16, B=8, H=16; docs/benchmarks.md): Dk=Dv=64 at T=16384 runs at
0.381 ms forward (HBM floor 0.358) and 1.37 ms forward+backward.  Rows whose byte stride is
not a multiple of 16 defeat vectorised loads: Dk=273 took 11.5 ms forward with 546-byte rows
and 6.2 ms with rows padded to 288 elements (what taylor_features produces).  The rest of the
Dk=273 cost is the Dk split: three 128-wide tiles write fp32 partials that torch sums.

Tiles: BK = min(128, next_pow2(Dk)) and BV = min(128, next_pow2(Dv)) (>= 16, as tl.dot
needs; >= 32 on the GPU, see `_tiles`), chosen by `_tiles` because they decide the buffers
the wrapper allocates; the chunk length BT, num_warps and num_stages come from
`triton.autotune`, keyed on (Dk, Dv), the form, the dtypes and a bucket of the problem's
size (a new bucket re-tunes; T itself is not specialised, so a new length does not recompile).
Under TRITON_INTERPRET=1 one small config is used.  Offsets that can pass 2**31
(batch/head bases, chunk starts) are int64; per-tile offsets stay int32.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .. import _switches
from . import _common
from . import maps as _maps
from ..feature_maps.base import outdated_form_reason
from ._common import cdiv, next_pow2
from ._common import alloc as _alloc
from ._common import dtype_flags as _flags
from ._common import empty_like_layout as _empty_like_layout
from ._common import TunedLaunch, check_inputs, check_packed_states, fill_state_half
from ._common import register_attention_ops, row_dot
from ._common import graph_backward, torch_forward
from ._common import unit_last as _unit_last
from ._common import batch_head, head_base, head_start, sequence_heads
# a @ b with the fp32 precision named (Numerics above), shared with projected.py and window.py
from ._common import dot_in_tf32x3 as _dot_in
from ._common import mm_tf32x3 as _mm

__all__ = ["chunked_attention", "KERNEL_LIMITS", "segments", "splits_only_as_pass",
           "splits_time"]

_INTERPRET = _common.INTERPRET

# Largest tile on each of Dk / Dv; larger dims are split into several tiles.
_MAX_BK = 128
_MAX_BV = 128
#: The backward's largest Dk tile, which may differ from the forward's: each Dk tile is a
#: program of its own with its own [BK, BV] state (dv then comes back as fp32 partials summed
#: by torch).  Offline (sm_90a, bf16, Dk = 128, Dv = 64, BT 64 / 4 warps): one 128-wide tile
#: spills 1148 bytes a thread in the backward, two 64-wide ones 276; untimed on the GPU yet.
BWD_MAX_BK = _MAX_BK

#: What the kernels accept, for the dispatcher to explain its choice.
KERNEL_LIMITS = {
    "max_dk": 4096,  # any Dk up to this (tiled by 128); larger is untested
    "max_dv": 4096,  # any Dv up to this (tiled by 128)
    "dtypes": (torch.float32, torch.float16, torch.bfloat16),
}

def _tiles(Dk: int, Dv: int, dtype: torch.dtype, max_bk: int = _MAX_BK) -> tuple[int, int]:
    """(BK, BV): one tile per dim up to 128 (Dk: ``max_bk``), padded to a power of two >= 32
    on the GPU (>= 16 under the interpreter, to keep its tests small).

    Tiles of 16 are never used on the GPU: on the H200 (triton 3.6) every autotune config of
    both kernels hit an illegal memory access with fp32 inputs at Dk = Dv = 16 (the tf32x3
    products on 16-wide tiles; benchmarks/gpu_configs.py), the projected kernels' backward
    faulted within repeated launches with a 16-wide bf16 tile at BT 64 / 8 warps (a config
    this space has too; benchmarks/gpu_faults.py), and a bf16 call at Dv = 16 with the map
    in the kernel faulted in the GPU test run; 32-wide tiles, masked, pass.  The padding
    costs nothing that matters at such small dims.  (Session 13: a 16-wide denominator tile beside 64-wide ones
    faulted too.  Upstream reports the same class of fault, illegal shared-memory reads by
    Hopper wgmma with small tiles in Triton >= 3.6 and clean on 3.5: triton-lang/triton
    issues 11366 (its reproducer: 32-wide tiles), 10573, 10486.  Our 32-wide tiles, and the
    backward's 16-wide key-sum accumulator, have passed every GPU run so far; a new small
    tile needs a GPU run under autotuning before it is trusted.)"""
    low = 16 if _INTERPRET else 32
    bk = min(max(low, next_pow2(Dk)), max(max_bk, low))
    bv = min(max(low, next_pow2(Dv)), _MAX_BV)
    return bk, bv


def _configs():
    """Autotune space: chunk length BT, warps, pipeline depth.  One small config in the
    interpreter (autotuning there is slow and pointless) or when FEATATTN_NO_AUTOTUNE=1
    (quick GPU test runs: every new (Dk, Dv) would otherwise compile the whole space)."""
    if _INTERPRET:
        return [triton.Config({"BT": 32}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 64}, num_warps=4, num_stages=2)]
    space = [(64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (32, 4, 2)]
    return [triton.Config({"BT": bt}, num_warps=nw, num_stages=ns) for bt, nw, ns in space]


# --------------------------------------------------------------------------- helpers
@triton.jit
def _features(x, scale, mask, PHI: tl.constexpr, MASK: tl.constexpr = True):
    """PHI(scale * x) in fp32, rounded once to x's dtype (as the PyTorch maps do), and 0
    where ``mask`` is off: padded rows and columns must stay 0, and PHI(0) need not be.
    MASK=False: no padding that matters (``mask`` unused)."""
    y = PHI(x.to(tl.float32) * scale)
    if MASK:
        y = tl.where(mask, y, 0.0)
    return y.to(x.dtype)


@triton.jit
def _row_masks(i, offs_t, TS, KS, BT: tl.constexpr, FULL: tl.constexpr):
    """(rows before TS, rows with a key) of chunk i; constant under FULL (every chunk full,
    no key shift), which the compiler folds out of the loads and stores."""
    if FULL:
        mt = tl.full([BT], 1, tl.int1)
        ms = mt
    else:
        mt = (i * BT + offs_t) < TS
        ms = mt & ((i * BT + offs_t) >= KS)
    return mt, ms


@triton.jit
def _pair_logit_grad(g, y, BT: tl.constexpr, BK: tl.constexpr):
    """The logits' gradient dl [BT, BK // 2] of a softmax pair's features y = [a, b] (fp32
    [BT, BK], halves a = softmax(l), b = softmax(-l) of BK // 2 columns each) from the
    features' gradient g = [da, db] (fp32): dl = a (da - <da, a>) - b (db - <db, b>), the
    map's backward (projected._dact) done where g is made (_bwd_kernel's EPI_PAIR)."""
    first = (tl.arange(0, BK) < BK // 2)[None, :]
    p = g * y
    sa = tl.sum(tl.where(first, p, 0.0), axis=1)
    sb = tl.sum(tl.where(first, 0.0, p), axis=1)
    h = y * (g - tl.where(first, sa[:, None], sb[:, None]))
    ha, hb = tl.split(tl.permute(tl.reshape(h, [BT, 2, BK // 2]), (0, 2, 1)))
    return ha - hb


# --------------------------------------------------------------------------- segment sums
@triton.jit(do_not_specialize=["T", "SEG", "NS", "J0", "KS", "SIZE"])
def _seg_kernel(
    a, b, den, delta, outS, outz,
    sab, sah, sat, sbb, sbh, sbt,
    T, H, DK, DV, SEG, NS, J0, KS, scale, SIZE,
    NV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BWD: tl.constexpr, HAS_Z: tl.constexpr, LOWP: tl.constexpr, TF32X3: tl.constexpr,
    FUSED: tl.constexpr, PHI: tl.constexpr, FULL: tl.constexpr = False,
):
    """Grid (B*H, NK*NV, n).  Program (bh, tile, p) sums segment j = J0 + p (tokens
    [j*SEG, min(T, (j+1)*SEG)), SEG a multiple of BT) of head bh into fp32
    outS [B*H, NS, Dk, Dv] and, with HAS_Z, outz [B*H, NS, Dk] (stored by Dv tile 0):

        forward  (BWD=0, a = k, b = v):   S_j = sum_t f(a_t)^T b_t,          z_j = sum_t f(a_t)
        backward (BWD=1, a = q, b = do):  S_j = sum_t f(a_t)^T (b_t / den_t),
                                          z_j = -sum_t f(a_t) delta_t / den_t
    (without HAS_Z the backward's b is not divided), where f(x) = PHI(scale * x) when
    FUSED, else x.  a and b are [B, H, T, D] strided; den / delta fp32 [B*H, T].  KS: row t
    of a and b is their row t - KS, none for t < KS (the forward's key shift, see _fwd_kernel;
    0 backward)."""
    i_bh = tl.program_id(0)
    i_kv = tl.program_id(1)
    j = J0 + tl.program_id(2)
    i_k = i_kv // NV
    i_v = i_kv % NV
    i_b, i_h, _ = batch_head(i_bh, H, 1)
    a_base = head_start(a, i_b, i_h, sab, sah)
    b_base = head_start(b, i_b, i_h, sbb, sbh)
    row_base = i_bh.to(tl.int64) * T
    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = tl.full([BK], 1, tl.int1) if FULL else offs_k < DK  # FULL: as in _fwd_kernel
    mv = tl.full([BV], 1, tl.int1) if FULL else offs_v < DV
    own_k = (offs_k * 0 + i_v) == 0
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    c0 = j * (SEG // BT)
    c1 = tl.minimum(c0 + SEG // BT, tl.cdiv(T, BT))
    for i in range(c0, c1):
        t0 = tl.cast(i * BT, tl.int64)
        _in_t, mt = _row_masks(i, offs_t, T, KS, BT, FULL)  # (rows with a key)
        b_a = tl.load(a_base + (t0 - KS) * sat + offs_t[:, None] * sat + offs_k[None, :],
                      mask=mt[:, None] & mk[None, :], other=0.0)
        b_b = tl.load(b_base + (t0 - KS) * sbt + offs_t[:, None] * sbt + offs_v[None, :],
                      mask=mt[:, None] & mv[None, :], other=0.0)
        if FUSED:
            b_a = _features(b_a, scale, mt[:, None] & mk[None, :], PHI)
        if BWD:
            if HAS_Z:
                b_r = 1.0 / tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dn = b_b.to(tl.float32) * b_r[:, None]
                b_dd = -tl.load(delta + row_base + t0 + offs_t, mask=mt, other=0.0) * b_r
                z += tl.sum(b_a.to(tl.float32) * b_dd[:, None], axis=0)
                S += _mm(tl.trans(b_a), b_dn, LOWP, TF32X3)
            else:
                S += _mm(tl.trans(b_a), b_b, LOWP, TF32X3)
        else:
            if HAS_Z:
                z += tl.sum(b_a.to(tl.float32), axis=0)
            S += _dot_in(tl.trans(b_a), b_b, TF32X3)
    st = (i_bh.to(tl.int64) * NS + j) * DK
    tl.store(outS + st * DV + offs_k[:, None] * DV + offs_v[None, :], S,
             mask=mk[:, None] & mv[None, :])
    if HAS_Z:
        tl.store(outz + st + offs_k, z, mask=mk & own_k)


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "SEG", "NS", "KS", "SIZE"])
def _fwd_kernel(
    q, k, v, o, den, kv0, z0, kvT, zT, segS, segz, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, NB, H, G, DK, DV, SEG, NS, KS, eps, scale, SIZE,
    NV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    SPLIT_K: tl.constexpr, LOWP: tl.constexpr, TF32X3: tl.constexpr,
    FUSED: tl.constexpr, PHI: tl.constexpr, VARLEN: tl.constexpr, DEN_DOT: tl.constexpr,
    EVEN_K: tl.constexpr, FULL: tl.constexpr = False,
):
    """Grid (B*H, NK*NV, NS); program (bh, tile, s) covers tokens [s*SEG, (s+1)*SEG) (all of
    T when NS = 1) starting from the initial state plus the sums of segments 0..s-1 (segS
    fp32 [B*Hkv, NS, Dk, Dv], segz [B*Hkv, NS, Dk], from _seg_kernel).
    q: [B,H,T,Dk], k: [B,Hkv,T,Dk], v: [B,Hkv,T,Dv] (strided, unit last stride).  o: [B,H,T,Dv] strided (input dtype) or, with SPLIT_K, fp32
    partial numerators [NK,B,H,T,Dv] contiguous.  den: fp32 [B,H,T] (eps added) or,
    with SPLIT_K, fp32 partials [NK,B,H,T].  kv0/kvT: fp32 [B,H,Dk,Dv]; z0/zT: fp32
    [B,H,Dk].  FUSED: q, k are raw and the features are PHI(scale * q), PHI(k), made here.
    VARLEN: NB = 1 and program row i_bh is (sequence i_bh // H, head i_bh % H) of the packed
    batch, tokens [cu[n], cu[n+1]) (``_common.sequence_heads``); its states are kv0/kvT [N, H, ...].
    KS (key shift, the hybrid layer's linear part): key/value row t is row t - KS of k and v,
    and rows t < KS have none (zero features), so query t sums the keys s <= t - KS; k and v
    need only T - KS rows."""
    i_bh = tl.program_id(0)
    i_kv = tl.program_id(1)
    i_s = tl.program_id(2)
    i_k = i_kv // NV
    i_v = i_kv % NV
    n_rows = NB * H
    i_b, i_h, i_hk, bos, TS, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)

    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    if SPLIT_K:
        o_base = o + ((i_k.to(tl.int64) * n_rows + row) * T + bos) * DV
        d_base = den + (i_k.to(tl.int64) * n_rows + row) * T + bos
        sot_ = DV
    else:
        o_base = head_base(o, i_b, i_h, bos, sob, soh, sot)
        d_base = den + row * T + bos
        sot_ = sot

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    # FULL: every tile full (Dk, Dv multiples of the tiles, T of every chunk length, no key
    # shift): constant masks, which the compiler folds out of the loads and stores
    mk = tl.full([BK], 1, tl.int1) if FULL else offs_k < DK
    mv = tl.full([BV], 1, tl.int1) if FULL else offs_v < DV
    causal = offs_t[:, None] >= offs_t[None, :]
    # Dv tile 0 stores den / z.  (Built as vectors: the interpreter rejects a
    # vector & scalar mask.)
    own_t = (offs_t * 0 + i_v) == 0
    own_k = (offs_k * 0 + i_v) == 0

    st_off = i_bh.to(tl.int64) * DK * DV
    S = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(kv0 + st_off + offs_k[:, None] * DV + offs_v[None, :],
                    mask=mk[:, None] & mv[None, :], other=0.0)
        if NORMALIZE:
            z = tl.load(z0 + i_bh.to(tl.int64) * DK + offs_k, mask=mk, other=0.0)
    seg0 = (i_b * (H // G) + i_hk) * NS
    for j in range(0, i_s):  # the segments before this one
        S += tl.load(segS + (seg0 + j) * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
                     mask=mk[:, None] & mv[None, :], other=0.0)
        if NORMALIZE:
            z += tl.load(segz + (seg0 + j) * DK + offs_k, mask=mk, other=0.0)
    KSUM_DOT: tl.constexpr = NORMALIZE and not TF32X3 and not FUSED and not DEN_DOT
    if DEN_DOT:
        # (NORMALIZE, bf16 / fp16 features) the denominators as a [BT, BV] tile whose columns
        # are all den_t, made on the tensor cores: A @ ones + q @ Zt, Zt [BK, BV] holding z
        # in every column (accumulated as k^T @ ones: exact products, fp32 sums).  No row
        # sum of A and no broadcast of z through shared memory in the chunk loop; den comes
        # out in num's own layout (a max within each quad of lanes).  A enters as the same
        # rounded operand as in num = A v, and Zt as q @ S takes S (one bf16 / tf32 operand:
        # the bf16 error at T = 65536 stays 1.98e-3, as with the row sums; z as two bf16
        # terms, hi + lo, measured slower and no more accurate).  An elementwise 1 / den on
        # the tile instead of the quad max measured 1182 instructions a chunk offline.
        Zt = z[:, None] + tl.zeros([BK, BV], dtype=tl.float32)
        ones_v = tl.full([BT, BV], 1.0, dtype=k.dtype.element_ty)
        col0 = (tl.arange(0, BV) == 0)[None, :]
    if KSUM_DOT:
        # bf16 / fp16 features: z, the running sum of the key features, accumulates on the
        # tensor cores as k^T @ ones (exact products, fp32 sums) in each of Z's 32 columns,
        # instead of a reduction of k's rows across warps in every chunk (through shared
        # memory, with a barrier, on the chunk loop's critical path).  H200, B8 H16 T16384
        # D64 normalised forward: 0.572 -> 0.545 ms.  fp32 inputs would get tf32 products
        # here, so they keep tl.sum; with the map in the kernel (FUSED) the same change
        # measured slower (1.09 -> 1.36 ms, with other edits: docs/benchmarks.md).
        Z = z[:, None] + tl.zeros([BK, 32], dtype=tl.float32)
        ones = tl.full([BT, 32], 1.0, dtype=k.dtype.element_ty)

    c0 = i_s * (SEG // BT)
    for i in range(c0, tl.minimum(c0 + SEG // BT, tl.cdiv(TS, BT))):
        t0 = tl.cast(i * BT, tl.int64)
        mt, ms = _row_masks(i, offs_t, TS, KS, BT, FULL)
        if FULL and FUSED:  # k's rows keep a (true) mask: unmasked, the compiler recomputed
            ms = (i * BT + offs_t) < TS  # the features for each use instead of converting
        b_q = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_k[None, :],
                      mask=mt[:, None] & mk[None, :], other=0.0)
        b_k = tl.load(k_base + (t0 - KS) * skt + offs_t[:, None] * skt + offs_k[None, :],
                      mask=ms[:, None] & mk[None, :], other=0.0)
        b_v = tl.load(v_base + (t0 - KS) * svt + offs_t[:, None] * svt + offs_v[None, :],
                      mask=ms[:, None] & mv[None, :], other=0.0)
        if FUSED:
            # q's padded rows need no zeros (their outputs are not stored), nor its columns
            # when the Dk tiles are full (EVEN_K); k's padded rows do (they enter S and z)
            b_q = _features(b_q, scale, mk[None, :], PHI, not EVEN_K)
            if EVEN_K:
                b_k = _features(b_k, 1.0, ms[:, None], PHI)
            else:
                b_k = _features(b_k, 1.0, ms[:, None] & mk[None, :], PHI)
        A = _dot_in(b_q, tl.trans(b_k), TF32X3)  # [BT, BT] fp32
        A = tl.where(causal, A, 0.0)
        num = _mm(A, b_v, LOWP, TF32X3) + _mm(b_q, S, LOWP, TF32X3)  # [BT, BV]
        if DEN_DOT:
            dt = _mm(A, ones_v, LOWP, TF32X3) + _mm(b_q, Zt, LOWP, TF32X3)  # [BT, BV]
            Zt += tl.dot(tl.trans(b_k), ones_v)
        elif NORMALIZE:
            if KSUM_DOT:
                z = tl.max(Z, axis=1)  # its columns are equal
            d = tl.sum(A, axis=1) + tl.sum(b_q.to(tl.float32) * z[None, :], axis=1)
            if KSUM_DOT:
                Z += tl.dot(tl.trans(b_k), ones)
            else:
                z += tl.sum(b_k.to(tl.float32), axis=0)
        S += _dot_in(tl.trans(b_k), b_v, TF32X3)

        o_ptr = o_base + t0 * sot_ + offs_t[:, None] * sot_ + offs_v[None, :]
        if DEN_DOT:
            if SPLIT_K:  # each row's partial den from the thread holding its column 0
                tl.store(o_ptr, num.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])
                tl.store(d_base + t0 + offs_t[:, None] + 0 * offs_v[None, :], dt,
                         mask=(mt & own_t)[:, None] & col0)
            else:
                d = tl.max(dt, axis=1) + eps  # its columns are equal: a reduction in a quad
                num = num * (1.0 / d)[:, None]
                tl.store(d_base + t0 + offs_t, d, mask=mt & own_t)
                tl.store(o_ptr, num.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])
        elif SPLIT_K:
            tl.store(o_ptr, num.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])
            if NORMALIZE:
                tl.store(d_base + t0 + offs_t, d, mask=mt & own_t)
        else:
            if NORMALIZE:
                d = d + eps
                # one reciprocal per row, then products: a [BT, BV] tile of IEEE divisions
                # is ~10 instructions an element (offline, sm_90a: 753 -> 664 a chunk)
                num = num * (1.0 / d)[:, None]
                tl.store(d_base + t0 + offs_t, d, mask=mt & own_t)
            tl.store(o_ptr, num.to(o_ptr.dtype.element_ty), mask=mt[:, None] & mv[None, :])

    if KSUM_DOT:
        z = tl.max(Z, axis=1)
    if DEN_DOT:
        z = tl.max(Zt, axis=1)
    if STORE_FINAL:
        last = (offs_k * 0 + i_s) == NS - 1  # the last segment's program ends with the state
        tl.store(kvT + st_off + offs_k[:, None] * DV + offs_v[None, :], S,
                 mask=mk[:, None] & mv[None, :] & last[:, None])
        if NORMALIZE:
            tl.store(zT + i_bh.to(tl.int64) * DK + offs_k, z, mask=mk & own_k & last)


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T", "SEG", "NS", "KS", "SIZE"])
def _bwd_kernel(
    q, k, v, do, o, den, delta, kv0, z0, dkvT, dzT,
    dq, dk, dv, dkv0, dz0, segS, segz, segdS, segdz, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sob, soh, sot,
    sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt,
    T, NB, H, G, DK, DV, SEG, NS, KS, scale, SIZE,
    NV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    LOWP: tl.constexpr, TF32X3: tl.constexpr,
    FUSED: tl.constexpr, PHI: tl.constexpr, DPHI: tl.constexpr, VARLEN: tl.constexpr,
    DELTA_O: tl.constexpr, EPI_DPHI: tl.constexpr, DPHI_Y: tl.constexpr, EVEN_K: tl.constexpr,
    KSUM_DOT: tl.constexpr, FULL: tl.constexpr = False, EPI_PAIR: tl.constexpr = False,
):
    """Grid (B*H, NK*NV, 2*NS); axis 2 is phase * NS + s: phase 0 is the dq sweep, phase 1
    the dk/dv sweep, over segment s (tokens [s*SEG, (s+1)*SEG)).  The dq sweep starts from
    the initial state plus the forward sums of segments < s (segS / segz as in the forward);
    the dk/dv sweep from d(final state) plus the backward sums of segments > s (segdS fp32
    [B*H, NS, Dk, Dv], segdz [B*H, NS, Dk], _seg_kernel with BWD).

    q/k/v as in the forward; do: [B,H,T,Dv] strided; den, delta: fp32 [B,H,T].
    DELTA_O (NV == 1 only): delta is not read; each program computes delta_t = do_t . o_t
    from the forward output o ([B,H,T,Dv] strided), which saves the delta kernel's launch.
    Outputs (written per q head): dq [NV,B,H,T,Dk], dk [NV,B,H,T,Dk], dv [NK,B,H,T,Dv]
    with the (batch, head, token) strides sgq*, sgk*, sgv* (partials, contiguous and
    summed by the wrapper when NV/NK/G > 1; partial i lies i * NB * sg*b further on);
    dkv0 fp32 [B,H,Dk,Dv], dz0 fp32 [B,H,Dk] (written when HAS_INIT).
    FUSED: q, k are raw; the features are recomputed as in the forward, and dq, dk are
    the raw inputs' gradients (the feature gradients times scale * PHI', DPHI').
    EPI_DPHI (not FUSED): q, k are features y = PHI(x) made by a pass before the forward,
    and dq, dk are stored as the pass's inputs' gradients, the feature gradients times
    scale * DPHI_Y(y) and DPHI_Y(y) (ElementwiseTritonForm.dphi_from_y): the map's backward
    pass folded into the stores (the dq sweep reads q's features for it).
    EPI_PAIR (not FUSED, one Dk tile, Dk = BK): q, k are softmax-pair features [a, b] of a
    projection pass (projected.py), and dq, dk are stored as the logits' gradients, [.., T,
    Dk // 2] (_pair_logit_grad): the map's backward up to its projection, folded into the
    stores, so the features' gradients never reach memory.
    KS: the forward's key shift; dk, dv of key row t go to row t - KS (rows >= T - KS of
    the buffers are not written).
    """
    i_bh = tl.program_id(0)
    i_kv = tl.program_id(1)
    phase = tl.program_id(2) // NS
    i_s = tl.program_id(2) % NS
    i_k = i_kv // NV
    i_v = i_kv % NV
    i_b, i_h, i_hk, bos, TS, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)

    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    do_base = head_base(do, i_b, i_h, bos, sdb, sdh, sdt)
    o_base = head_base(o, i_b, i_h, bos, sob, soh, sot)
    row_base = row * T + bos  # den / delta rows

    offs_t = tl.arange(0, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_h = tl.arange(0, BK // 2)  # EPI_PAIR: the logits' columns (one Dk tile, Dk = BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = tl.full([BK], 1, tl.int1) if FULL else offs_k < DK  # FULL: as in the forward
    mv = tl.full([BV], 1, tl.int1) if FULL else offs_v < DV
    st_off = i_bh.to(tl.int64) * DK * DV
    # The den term belongs to the "ones" value column, owned by Dv tile 0: the other
    # tiles load delta / d(final z) as zeros, so its terms vanish there.
    own_t = (offs_t * 0 + i_v) == 0  # vectors: the interpreter rejects vector & scalar
    own_k = (offs_k * 0 + i_v) == 0
    c0 = i_s * (SEG // BT)
    c1 = tl.minimum(c0 + SEG // BT, tl.cdiv(TS, BT))

    if phase == 0:
        # ---- forward sweep: dq_t = r_t [ sum_{s<=t} (do_t.v_s - delta_t) k_s
        #                                  + do_t S_{<c}  - delta_t z_{<c} ]
        causal = offs_t[:, None] >= offs_t[None, :]
        ST = tl.zeros([BV, BK], dtype=tl.float32)  # S^T, so no transposed dot result
        z = tl.zeros([BK], dtype=tl.float32)
        if HAS_INIT:
            ST = tl.load(kv0 + st_off + offs_k[None, :] * DV + offs_v[:, None],
                         mask=mk[None, :] & mv[:, None], other=0.0)
            if NORMALIZE:
                z = tl.load(z0 + i_bh.to(tl.int64) * DK + offs_k, mask=mk, other=0.0)
        seg0 = (i_b * (H // G) + i_hk) * NS
        for j in range(0, i_s):
            ST += tl.load(segS + (seg0 + j) * DK * DV + offs_k[None, :] * DV + offs_v[:, None],
                          mask=mk[None, :] & mv[:, None], other=0.0)
            if NORMALIZE:
                z += tl.load(segz + (seg0 + j) * DK + offs_k, mask=mk, other=0.0)
        dq_base = head_base(dq, i_b, i_h, bos, sgqb, sgqh, sgqt) + i_v.to(tl.int64) * NB * sgqb
        if KSUM_DOT:  # z as k^T @ ones on the tensor cores, as in the forward (exact, fp32 sums)
            Z = z[:, None] + tl.zeros([BK, 16], dtype=tl.float32)
            ones = tl.full([BT, 16], 1.0, dtype=k.dtype.element_ty)
        for i in range(c0, c1):
            t0 = tl.cast(i * BT, tl.int64)
            # (the map's features keep their row masks: see the forward)
            mt, ms = _row_masks(i, offs_t, TS, KS, BT, FULL and not FUSED)
            b_do = tl.load(do_base + t0 * sdt + offs_t[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            b_v = tl.load(v_base + (t0 - KS) * svt + offs_t[:, None] * svt + offs_v[None, :],
                          mask=ms[:, None] & mv[None, :], other=0.0)
            b_k = tl.load(k_base + (t0 - KS) * skt + offs_t[:, None] * skt + offs_k[None, :],
                          mask=ms[:, None] & mk[None, :], other=0.0)
            if FUSED:
                if EVEN_K:  # full Dk tiles: only the rows need the padding's zeros
                    b_k = _features(b_k, 1.0, ms[:, None], PHI)
                else:
                    b_k = _features(b_k, 1.0, ms[:, None] & mk[None, :], PHI)
            dA = _dot_in(b_do, tl.trans(b_v), TF32X3)  # [BT, BT]
            if NORMALIZE:
                if DELTA_O:
                    b_o = tl.load(o_base + t0 * sot + offs_t[:, None] * sot + offs_v[None, :],
                                  mask=mt[:, None] & mv[None, :], other=0.0)
                    b_dl = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)
                else:
                    b_dl = tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t, other=0.0)
                dA = dA - b_dl[:, None]
            dA = tl.where(causal, dA, 0.0)
            b_dq = _mm(dA, b_k, LOWP, TF32X3) + _mm(b_do, ST, LOWP, TF32X3)  # [BT, BK]
            if NORMALIZE:
                if KSUM_DOT:
                    z = tl.max(Z, axis=1)  # its columns are equal
                b_dq -= b_dl[:, None] * z[None, :]
                b_den = tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dq = b_dq * (1.0 / b_den)[:, None]
                if KSUM_DOT:
                    Z += tl.dot(tl.trans(b_k), ones)
                else:
                    z += tl.sum(b_k.to(tl.float32), axis=0)
            ST += _dot_in(tl.trans(b_v), b_k, TF32X3)
            if FUSED:
                b_xq = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_k[None, :],
                               mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32) * scale
                b_dq = b_dq * (DPHI(b_xq, PHI(b_xq)) * scale)
            if EPI_DPHI or EPI_PAIR:  # q's features, for the map's backward
                b_yq = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_k[None, :],
                               mask=mt[:, None] & mk[None, :], other=0.0).to(tl.float32)
            if EPI_DPHI:
                b_dq = b_dq * (DPHI_Y(b_yq) * scale)
            if EPI_PAIR:
                tl.store(dq_base + t0 * sgqt + offs_t[:, None] * sgqt + offs_h[None, :],
                         _pair_logit_grad(b_dq, b_yq, BT, BK).to(dq.dtype.element_ty),
                         mask=mt[:, None])
            else:
                tl.store(dq_base + t0 * sgqt + offs_t[:, None] * sgqt + offs_k[None, :],
                         b_dq.to(dq.dtype.element_ty), mask=mt[:, None] & mk[None, :])
    else:
        # ---- reverse sweep, with dn_t = r_t do_t, dd_t = -r_t delta_t:
        #   dv_s = sum_{t>=s} (q_t.k_s) dn_t + k_s dS
        #   dk_s = sum_{t>=s} (dn_t.v_s + dd_t) q_t + v_s dS^T + dz
        #   dS  += q_c^T dn_c,  dz += sum_t dd_t q_t     (dS, dz start at d(final state))
        anti = offs_t[:, None] <= offs_t[None, :]  # [s, t]: s <= t
        dS = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
        if HAS_DFINAL:
            dS = tl.load(dkvT + st_off + offs_k[:, None] * DV + offs_v[None, :],
                         mask=mk[:, None] & mv[None, :], other=0.0)
            if NORMALIZE:
                dz = tl.load(dzT + i_bh.to(tl.int64) * DK + offs_k, mask=mk & own_k, other=0.0)
        for j in range(i_s + 1, NS):  # the segments after this one
            sd = i_bh.to(tl.int64) * NS + j
            dS += tl.load(segdS + sd * DK * DV + offs_k[:, None] * DV + offs_v[None, :],
                          mask=mk[:, None] & mv[None, :], other=0.0)
            if NORMALIZE:
                dz += tl.load(segdz + sd * DK + offs_k, mask=mk & own_k, other=0.0)
        dk_base = head_base(dk, i_b, i_h, bos, sgkb, sgkh, sgkt) + i_v.to(tl.int64) * NB * sgkb
        dv_base = head_base(dv, i_b, i_h, bos, sgvb, sgvh, sgvt) + i_k.to(tl.int64) * NB * sgvb
        for j in range(0, c1 - c0):
            i = c1 - 1 - j
            t0 = tl.cast(i * BT, tl.int64)
            # (the map's features keep their row masks: see the forward)
            mt, ms = _row_masks(i, offs_t, TS, KS, BT, FULL and not FUSED)
            b_q = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_k[None, :],
                          mask=mt[:, None] & mk[None, :], other=0.0)
            b_k = tl.load(k_base + (t0 - KS) * skt + offs_t[:, None] * skt + offs_k[None, :],
                          mask=ms[:, None] & mk[None, :], other=0.0)
            b_v = tl.load(v_base + (t0 - KS) * svt + offs_t[:, None] * svt + offs_v[None, :],
                          mask=ms[:, None] & mv[None, :], other=0.0)
            b_do = tl.load(do_base + t0 * sdt + offs_t[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            if FUSED:
                b_xk = b_k.to(tl.float32)
                if EVEN_K:
                    b_q = _features(b_q, scale, mt[:, None], PHI)
                    b_k = _features(b_k, 1.0, ms[:, None], PHI)
                else:
                    b_q = _features(b_q, scale, mt[:, None] & mk[None, :], PHI)
                    b_k = _features(b_k, 1.0, ms[:, None] & mk[None, :], PHI)
            AT = tl.where(anti, _dot_in(b_k, tl.trans(b_q), TF32X3), 0.0)  # [s, t]
            if NORMALIZE:
                b_r = 1.0 / tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dn = b_do.to(tl.float32) * b_r[:, None]
            else:
                b_dn = b_do
            # dv first and stored at once: AT and dv are dead before dAT and dk are made
            b_dv = _mm(AT, b_dn, LOWP, TF32X3) + _mm(b_k, dS, LOWP, TF32X3)
            tl.store(dv_base + (t0 - KS) * sgvt + offs_t[:, None] * sgvt + offs_v[None, :],
                     b_dv.to(dv.dtype.element_ty), mask=ms[:, None] & mv[None, :])
            dAT = _dot_in(b_v, tl.trans(b_do), TF32X3)  # [s, t]
            if NORMALIZE:
                if DELTA_O:
                    b_o = tl.load(o_base + t0 * sot + offs_t[:, None] * sot + offs_v[None, :],
                                  mask=mt[:, None] & mv[None, :], other=0.0)
                    b_dd = -tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1) * b_r
                else:
                    b_dd = -tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t,
                                    other=0.0) * b_r
                dAT = dAT * b_r[None, :] + b_dd[None, :]
            dAT = tl.where(anti, dAT, 0.0)
            b_dk = _mm(dAT, b_q, LOWP, TF32X3) + _mm(b_v, tl.trans(dS), LOWP, TF32X3)
            if NORMALIZE:
                b_dk += dz[None, :]
                dz += tl.sum(b_q.to(tl.float32) * b_dd[:, None], axis=0)
            dS += _mm(tl.trans(b_q), b_dn, LOWP, TF32X3)
            if FUSED:
                b_dk = b_dk * DPHI(b_xk, PHI(b_xk))
            if EPI_DPHI:
                b_dk = b_dk * DPHI_Y(b_k.to(tl.float32))
            if EPI_PAIR:
                tl.store(dk_base + (t0 - KS) * sgkt + offs_t[:, None] * sgkt + offs_h[None, :],
                         _pair_logit_grad(b_dk, b_k.to(tl.float32), BT, BK).to(
                             dk.dtype.element_ty), mask=ms[:, None])
            else:
                tl.store(dk_base + (t0 - KS) * sgkt + offs_t[:, None] * sgkt + offs_k[None, :],
                         b_dk.to(dk.dtype.element_ty), mask=ms[:, None] & mk[None, :])
        if HAS_INIT:
            first = (offs_k * 0 + i_s) == 0  # segment 0's program ends with d(initial state)
            tl.store(dkv0 + st_off + offs_k[:, None] * DV + offs_v[None, :], dS,
                     mask=mk[:, None] & mv[None, :] & first[:, None])
            if NORMALIZE:
                tl.store(dz0 + i_bh.to(tl.int64) * DK + offs_k, dz, mask=mk & own_k & first)


# Tuned per head dims, form and problem size (SIZE, _common.launch_size: the programs and
# each one's tokens), as the window and parallel-Taylor kernels are: a config tuned on a first small
# call (a warm-up, a test at T = 1000, a short prompt) was kept for every later size.
_fwd = triton.autotune(configs=_configs(),
                       key=["DK", "DV", "NORMALIZE", "SPLIT_K", "FUSED", "DEN_DOT", "SIZE"])(
    _fwd_kernel)
_bwd = triton.autotune(configs=_configs(),
                       key=["DK", "DV", "NORMALIZE", "FUSED", "EPI_DPHI", "EPI_PAIR", "SIZE"])(
    _bwd_kernel)
_seg = triton.autotune(configs=_configs(),
                       key=["DK", "DV", "BWD", "HAS_Z", "FUSED", "SIZE"])(_seg_kernel)
_FWD = TunedLaunch(_fwd, "chunked_fwd")
_BWD = TunedLaunch(_bwd, "chunked_bwd")
_SEG = TunedLaunch(_seg, "chunked_seg")


# --------------------------------------------------------------------------- wrappers
#: Segments are whole multiples of this many tokens (every autotuned chunk length divides it).
SEG_ALIGN = 64
#: The normalised backward computes delta = do . o inside the kernel where it can (see
#: _backward); faster than the delta kernel at every size measured (H200, B8 H16 D64 fwd+bwd:
#: T = 1024 0.875 vs 0.925 ms, 16384 2.141 vs 2.172).  False (tests) keeps the delta kernel.
DELTA_IN_KERNEL = True
#: The normalised forward (bf16 / fp16, key tile at most DEN_IN_MMA_MAX_BK wide) makes its
#: denominators on the tensor cores as a tile in the output's layout (_fwd_kernel's DEN_DOT)
#: instead of row reductions of A and q * z with z broadcast through shared memory.  H200,
#: B8 H16 T16384 bf16, forward (gpu_ab.py, docs/benchmarks.md sessions 12-13): D64 features
#: 0.531 -> 0.493 ms, elu op 0.788 -> 0.747; the map in the kernel (elu) 0.869 -> 0.751; but
#: 128-wide features 0.871 -> 1.018, hence the width limit.  (A 16-wide denominator tile,
#: shorter offline, faulted on the GPU under triton 3.6: removed.)
DEN_IN_MMA = True
DEN_IN_MMA_MAX_BK = 64
#: (A 32-wide denominator tile below 64-wide value tiles, DEN_IN_MMA_WIDTH, 581 instead of
#: 660 instructions a chunk offline, hit an illegal memory access at B8 H16 T16384 D64 on
#: the H200 under Triton 3.6 in session 15 though its small GPU tests passed: removed.)
#: The normalised backward's dq sweep sums z on the tensor cores (k^T @ ones, exact products,
#: fp32 sums) instead of reducing k's rows across warps each chunk, as the forward does
#: (bf16 / fp16).  H200, B8 H16 T16384 D64 bf16, fwd+bwd (gpu_ab.py, session 13): Hedgehog
#: op 6.89 -> 6.32 ms, elu in the kernel 3.80 -> 3.69, features 2.14 -> 2.12 (same).  The
#: map-pass path (the slope applied as dq / dk are stored, EPI_DPHI) measured 2.30 ->
#: 2.41-2.52 with configs tuned on a T = 1000 call (session 13); with per-size configs
#: (session 15, two alternated rounds) 2.300 -> 2.199, so it is on there too.  bf16 error of
#: dq at T = 65536 unchanged.  (dAT = v @ dn^T from the rounded dn instead of v @ do^T times
#: 1 / den measured slower, features 2.15 -> 2.40: removed.)
BWD_KSUM_DOT = True
#: The chunked forward and backward with constant masks where every tile is full (T a
#: multiple of SEG_ALIGN, no key shift, Dk / Dv multiples of the tiles): offline (Triton
#: 3.6, sm_90a, D64 bf16 normalised) the forward's chunk loop falls 660 -> 548
#: instructions, the backward's sweeps 1812 -> 1504 and 749 -> 629, the segment sums'
#: 277 -> 225 and 464 -> 399; with the map in the kernel the forward 1107 -> 1020 (its
#: features keep their row masks: unmasked, the compiler recomputed them for each use, 98
#: exps a chunk instead of 66).  H200, B8 H16 T16384 bf16 (gpu_ab.py, session 15), fwd+bwd:
#: features 1.851 -> 1.679 ms, elu pass 2.300 -> 2.061, elu in the kernel 2.700 -> 2.627.
FULL_TILES = True
#: Shortest T that ``FEATATTN_SEGMENT=auto`` splits.
AUTO_SPLIT_MIN_T = 16384
#: N > 0: also split grids of one or two programs per SM (SMs / 2 < programs <= 2 * SMs,
#: e.g. B8 H16 D64: 128 forward programs, 256 backward on 132 SMs) into N segments (of at
#: least 1024 tokens).  Each chunk of the loop is one serial chain (sass_count.py --dump:
#: map, shared-memory store, barrier, tensor-core op, wait, ...) with one warp per
#: scheduler, so more programs per SM fill its stalls, for one more read of k, v (the
#: segment sums).  H200, session 9, forced with FEATATTN_SEGMENT (docs/benchmarks.md), B8 H16
#: T16384 fwd / fwd+bwd ms: features 0.572 / 2.144 unsplit, 0.498 / 2.013 in 4096-token
#: segments (N = 4), elu pass 0.827 / 2.778 -> 0.755 / 2.648 (one run, older kernels).
#: Session 14 (gpu_ab.py, per-size autotune keys, two alternated rounds, same numbers in
#: both), B8 H16 T16384 bf16: features 0.493 / 2.087 unsplit, 0.457 / 1.848 with N = 2,
#: 0.481 / 1.871 with N = 4; map in the kernel (elu) 0.746 / 3.031 -> 0.642 / 2.706 (N = 2),
#: 0.617 / 2.624 (N = 4); Hedgehog 1.396 / 5.910 -> 1.298 / 5.833 (N = 2), 1.341 / 5.903;
#: elu pass unchanged (0.750 / 2.305 -> 0.714 / 2.299).  So N = 2.  Such splits do not
#: move the map into the kernel (splits_time): there the pass stayed faster (2.30 vs 2.71).
AUTO_SPLIT_FULL_GRID = 2
_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    n = _SM_COUNT.get(device)
    if n is None:
        n = _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def segments(programs: int, T: int, device, full_grid: bool = True) -> tuple[int, int]:
    """(NS, SEG): how many segments of SEG tokens each head's sweep is split into.

    One program per (head, tile) walking T alone is latency-bound when there are few of
    them (B*H = 16 at B = 1 leaves 116 of the H200's 132 SMs idle), so T is cut into
    segments swept in parallel; a segment-sums pass first gives each program its starting
    state (one more read of k and v, two more launches backward).  Automatic, from the H200
    sweep of docs/benchmarks.md: split when the grid fills at most half the SMs and
    T >= 16384 (at B = 1, H = 16, T = 16384 the op on features went from 0.52 / 1.78 ms to
    ~0.2 / ~1.2 ms fwd / fwd+bwd; at shorter T or fuller grids the extra pass and launches
    cost more than the parallelism gave), into up to 16 segments aiming at two programs per
    SM; with :data:`AUTO_SPLIT_FULL_GRID` (and ``full_grid``), fuller grids too.
    ``FEATATTN_SEGMENT``: ``off``, or a segment length in tokens (a multiple of 64)."""
    mode = _switches.read("FEATATTN_SEGMENT")
    whole = cdiv(T, SEG_ALIGN) * SEG_ALIGN
    if mode == "off":
        return 1, whole
    if mode != "auto":
        try:
            seg = int(mode)
        except ValueError:
            seg = -1
        if seg <= 0 or seg % SEG_ALIGN:
            raise ValueError(f"FEATATTN_SEGMENT must be 'auto', 'off' or a positive multiple of "
                             f"{SEG_ALIGN} (tokens per segment), got {mode!r}")
        return cdiv(T, seg), seg
    if device.type != "cuda" or T < AUTO_SPLIT_MIN_T:
        return 1, whole
    sms = _sm_count(device)
    if 2 * programs <= sms:
        ns = min(cdiv(2 * sms, programs), 16)
    elif full_grid and AUTO_SPLIT_FULL_GRID > 0 and programs <= 2 * sms:
        ns = AUTO_SPLIT_FULL_GRID
    else:
        return 1, whole
    seg = max(cdiv(cdiv(T, ns), SEG_ALIGN) * SEG_ALIGN, 1024)
    return cdiv(T, seg), seg


#: Key-shifted calls (the hybrid layer's linear part) also split full grids
#: (AUTO_SPLIT_FULL_GRID): off until timed (`gpu_ab.py . .:chunked.SPLIT_KEY_SHIFTED=1 --only
#: hybrid`); the hybrid's timings predate the split, which gave the pure linear calls 8-12%
#: at B8 H16 T16384 (session 14).  Split key-shifted sweeps themselves are tested (and were
#: checked on the GPU in session 5 with FEATATTN_SEGMENT).
SPLIT_KEY_SHIFTED = False


def _split(programs, T, device, kshift, varlen, fused, NK) -> tuple[int, int]:
    """(NS, SEG) of a forward or backward launch: :func:`segments`, except that packed
    sequences and the map in the kernel with Dk in several tiles are never split.

    The latter gave wrong outputs and dq (relative error 0.4) and, with the fixed config
    BT 64 / 4 warps, an illegal memory access on the H200 under Triton 3.6 (session 15:
    tests/kernels/test_fused_maps.py's Dk = 136 case in 64-token segments, forward and
    backward), while the same calls unsplit, and on features split, passed; under the
    interpreter it passes, with every access inside its tensors (tests/_bounds.py).  Until
    a GPU run finds the cause, such calls sweep T whole (FEATATTN_SEGMENT included), and
    :func:`splits_time` says so, so the dispatcher keeps the map pass there."""
    if varlen or (fused and NK > 1):
        return 1, cdiv(T, SEG_ALIGN) * SEG_ALIGN
    return segments(programs, T, device, full_grid=kshift == 0 or SPLIT_KEY_SHIFTED)


def splits_time(B: int, H: int, T: int, Dk: int, Dv: int, dtype, device) -> bool:
    """Whether a forward call of this shape with an elementwise map inside the kernel runs
    in several segments because its grid leaves most SMs idle (see :func:`segments`; the
    dispatcher then puts the map inside the kernel).  Splits of fuller grids
    (AUTO_SPLIT_FULL_GRID) do not count, and with Dk in several key tiles such a call never
    splits (:func:`_split`), so this is False there."""
    BK, BV = _tiles(Dk, Dv, dtype)
    if Dk > BK:  # (the map in the kernel would not split: see _split)
        return False
    return segments(B * H * cdiv(Dk, BK) * cdiv(Dv, BV), T, device, full_grid=False)[0] > 1


def splits_only_as_pass(B: int, H: int, T: int, Dk: int, Dv: int, dtype, device) -> bool:
    """Whether a call of this shape splits T on features (after a map pass) but would sweep
    it whole with the map inside the kernel (Dk in several key tiles: :func:`_split`), so
    the dispatcher keeps the pass even where it would put the map inside."""
    if Dk <= _MAX_BK:  # (one key tile: the common case, decided without more work)
        return False
    BK, BV = _tiles(Dk, Dv, dtype)
    NK, NV = cdiv(Dk, BK), cdiv(Dv, BV)
    return NK > 1 and segments(B * H * NK * NV, T, device)[0] > 1


def _segment_sums(a, b, ns, seg, *, fused, phi, scale, has_z, den=None, delta=None, j0=0,
                  kshift=0):
    """fp32 (S [B*Ha, NS, Dk, Dv], z [B*Ha, NS, Dk]) for segments j0 .. j0 + NS - 2 of
    _seg_kernel (a: [B, Ha, T, Dk], b: [B, Ha, T, Dv])."""
    B, Ha, T, Dk = a.shape
    Dv = b.shape[-1]
    BK, BV = _tiles(Dk, Dv, a.dtype)
    NK, NV = cdiv(Dk, BK), cdiv(Dv, BV)
    dev = a.device
    # R sub-blocks a segment, each summed by its own program, then added up (deterministic):
    # the segment sums are one sweep of SEG tokens per head otherwise (SEG_SUM_PROGRAMS_PER_SM)
    R = _seg_sum_blocks(B * Ha * NK * NV * (ns - 1), seg, dev)
    S = _alloc((B * Ha, ns * R, Dk, Dv), torch.float32, dev)
    z = _alloc((B * Ha, ns * R, Dk), torch.float32, dev) if has_z else S
    bwd = den is not None or delta is not None
    lowp, tf32x3 = _flags(a.dtype)
    _SEG[(B * Ha, NK * NV, (ns - 1) * R)](
        a, b, den if den is not None else S, delta if delta is not None else S, S, z,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        T, Ha, Dk, Dv, seg // R, ns * R, j0 * R, kshift, scale,
        _common.launch_size(B * (ns - 1) * R, Ha, seg // R),
        NV=NV, BK=BK, BV=BV, BWD=bwd, HAS_Z=has_z, LOWP=lowp, TF32X3=tf32x3,
        FUSED=fused, PHI=phi,
        FULL=bool(FULL_TILES and not fused and kshift == 0 and T % SEG_ALIGN == 0
                  and Dk % BK == 0 and Dv % BV == 0),
    )
    if R > 1:  # (the slots of segments no program summed are never read)
        S = S.view(B * Ha, ns, R, Dk, Dv).sum(2)
        z = z.view(B * Ha, ns, R, Dk).sum(2) if has_z else S
    return S, z


#: N > 0: the segment sums (the pass before a split sweep) use up to N programs an SM, each
#: summing a block of the segment (a multiple of SEG_ALIGN tokens), the blocks then added
#: up; 0: one program a segment, which sweeps SEG tokens alone (B8 H16 T16384 in two
#: segments: 128 programs of 8192 tokens, latency-bound like the main sweep).  H200, B8 H16
#: T16384 bf16 (gpu_ab.py, session 15, two alternated rounds), fwd+bwd: features 1.851 ->
#: 1.792 ms, elu pass 2.300 -> 2.243, elu in the kernel 2.700 -> 2.524.
SEG_SUM_PROGRAMS_PER_SM = 4
#: > 0: exactly this many blocks a segment (where they divide it), on any device (tests).
SEG_SUM_BLOCKS = 0


def _seg_sum_blocks(programs: int, seg: int, device) -> int:
    """How many blocks each segment's sum is cut into (a divisor of seg // SEG_ALIGN)."""
    if SEG_SUM_BLOCKS > 0:
        want = SEG_SUM_BLOCKS
    elif SEG_SUM_PROGRAMS_PER_SM > 0 and device.type == "cuda" and programs > 0:
        want = max(1, (SEG_SUM_PROGRAMS_PER_SM * _sm_count(device)) // programs)
    else:
        return 1
    units = seg // SEG_ALIGN
    r = 1
    for d in range(1, units + 1):
        if units % d == 0 and d <= want:
            r = d
    return r


def _map_form(fmap: str):
    """(FUSED, PHI, DPHI) kernel arguments for a map key of featattn.kernels.maps ("" = none)."""
    if not fmap:
        return False, None, None
    form = _maps.lookup(fmap)[1]
    return True, form.phi, form.dphi


def _forward(q, k, v, normalize, eps, kv0, z0, store_final, fmap="", scale=1.0, cu_seqlens=None,
             kshift=0, o_dtype=None):
    """(o, den, kvT, zT) of the forward kernel (den fp32 with eps, normalised only).
    ``kshift``: query t reads the keys and values up to row t - kshift (_fwd_kernel's KS);
    k and v need only T - kshift rows (rows of k beyond are not read).  ``o_dtype``: o's
    dtype when not q's."""
    B, H, T, Dk = q.shape
    varlen = cu_seqlens is not None
    NB = B
    if varlen:  # B = 1 holds N packed sequences: one program row per (sequence, head)
        B = cu_seqlens.shape[0] - 1
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    BK, BV = _tiles(Dk, Dv, q.dtype)
    NK, NV = cdiv(Dk, BK), cdiv(Dv, BV)
    split_k = NK > 1
    dev = q.device
    has_init = kv0 is not None
    if split_k:
        o_buf = _alloc((NK, NB, H, T, Dv), torch.float32, dev)
        den_buf = _alloc((NK, NB, H, T), torch.float32, dev) if normalize else o_buf
        o = o_buf
    else:
        o = _empty_like_layout(q, NB, H, T, Dv, o_dtype or q.dtype)
        den_buf = _alloc((NB, H, T), torch.float32, dev) if normalize else o
    kvT = _alloc((B, H, Dk, Dv), torch.float32, dev) if store_final else o
    zT = _alloc((B, H, Dk), torch.float32, dev) if (store_final and normalize) else o
    lowp, tf32x3 = _flags(q.dtype)
    fused, phi, _ = _map_form(fmap)
    # (full grids split only without a key shift: the hybrid's timings predate it)
    ns, seg = _split(B * H * NK * NV, T, dev, kshift, varlen, fused, NK)
    segS = segz = o
    if ns > 1:
        segS, segz = _segment_sums(k, v, ns, seg, fused=fused, phi=phi, scale=1.0,
                                   has_z=normalize, kshift=kshift)
    grid = (B * H, NK * NV, ns)
    size = _common.launch_size(B * ns, H, T if varlen else min(T, seg), packed=varlen)
    _FWD[grid](
        q, k, v, o, den_buf,
        kv0 if has_init else o, z0 if (has_init and normalize) else o, kvT, zT, segS, segz,
        cu_seqlens if varlen else o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2) if not split_k else 0,
        T, NB, H, G, Dk, Dv, seg, ns, kshift, eps, scale, size,
        NV=NV, BK=BK, BV=BV, NORMALIZE=normalize, HAS_INIT=has_init,
        STORE_FINAL=store_final, SPLIT_K=split_k, LOWP=lowp, TF32X3=tf32x3,
        FUSED=fused, PHI=phi, VARLEN=varlen,
        DEN_DOT=DEN_IN_MMA and normalize and not tf32x3 and BK <= DEN_IN_MMA_MAX_BK,
        EVEN_K=Dk % BK == 0,
        FULL=bool(FULL_TILES and not varlen and kshift == 0 and T % SEG_ALIGN == 0
                  and Dk % BK == 0 and Dv % BV == 0),
    )
    den = den_buf if normalize else None
    if split_k:
        num = o_buf.sum(0)
        if normalize:
            den = den_buf.sum(0).add_(eps)
            num.div_(den[..., None])
        o = _empty_like_layout(q, NB, H, T, Dv, o_dtype or q.dtype)
        o.copy_(num)
    return o, den, (kvT if store_final else None), (zT if store_final and normalize else None)


def pair_epilogue_fits(F: int, dtype) -> bool:
    """Whether softmax-pair features of 2F columns fit the backward's EPI_PAIR (one key tile
    exactly their width: 2F a power of two within the tiles)."""
    return 2 * F == _tiles(2 * F, 16, dtype, BWD_MAX_BK)[0]


def _backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, fmap="", scale=1.0,
              cu_seqlens=None, kshift=0, delta=None, like_inputs=True, dphi_y=None,
              pair=False):
    """Gradients (dq, dk, dv, d initial_kv, d initial_z) of the forward above.

    The final-state gradients ``dkvT`` / ``dzT`` may be None (unused outputs);
    ``o`` and ``den`` are the saved forward output and fp32 denominator (normalised only).
    ``delta``: fp32 [B, H, T] given instead of ``do . o`` (``o`` is then not read): with
    ``den`` it sets d num_t = do_t / den_t and d den_t = -delta_t / den_t, which is how the
    hybrid layer backpropagates through its shared denominator.  ``kshift`` as in
    :func:`_forward`: dk, dv are [B, Hkv, T, .] with rows >= T - kshift undefined.
    ``like_inputs``: where one program writes each gradient element (a single Dk and Dv
    tile, no grouped heads), dq, dk, dv are laid out as q, k, v are (``[B, T, H, D]``
    transposed when the inputs are such views: a layer's transposes back are then free);
    otherwise, and with False, they are contiguous ``[B, H, T, D]``.
    ``dphi_y`` (no ``fmap``): q, k are a map pass's features ``phi(scale * x)``, ``phi(x)``
    and dq, dk come back as the gradients of its inputs x, through ``dphi_y`` (the form's
    ``dphi_from_y``) in the kernel (_bwd_kernel's EPI_DPHI).
    ``pair`` (no ``fmap``; Dk one tile, a power of two: :func:`pair_epilogue_fits`): q, k are
    softmax-pair features [a, b] and dq, dk come back as the logits' gradients,
    ``[B, H, T, Dk // 2]`` / ``[B, Hkv, T, Dk // 2]`` (_bwd_kernel's EPI_PAIR).
    """
    B, H, T, Dk = q.shape
    varlen = cu_seqlens is not None
    NB = B
    if varlen:
        B = cu_seqlens.shape[0] - 1
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    dev = q.device
    BK, BV = _tiles(Dk, Dv, q.dtype, BWD_MAX_BK)
    NK, NV = cdiv(Dk, BK), cdiv(Dv, BV)
    has_init = kv0 is not None
    has_dfinal = dkvT is not None or dzT is not None
    if has_dfinal:
        dkvT = torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=dev) if dkvT is None \
            else dkvT.float().contiguous()
        if normalize:
            dzT = torch.zeros(B, H, Dk, dtype=torch.float32, device=dev) if dzT is None \
                else dzT.float().contiguous()
    ns, seg = _split(2 * B * H * NK * NV, T, dev, kshift, varlen, bool(fmap), NK)
    # delta = do . o inside the kernel (no delta launch) where one Dv tile holds a whole
    # row and no segment sums need delta beforehand
    delta_o = DELTA_IN_KERNEL and normalize and delta is None and NV == 1 and ns == 1
    if not normalize:
        delta = den = do  # unused placeholders
    elif delta_o:
        delta = den  # unused placeholder
    elif delta is None:
        delta = row_dot(o, do)
    # Buffers reduced across programs are fp32; a buffer with a single writer per
    # element is written in the input dtype directly.
    reduce_dk = NV > 1 or G > 1
    reduce_dv = NK > 1 or G > 1
    if pair and not (NK == 1 and BK == Dk and not fmap):
        raise ValueError(f"pair=True needs the features in one key tile (Dk = {Dk}, tile {BK}) "
                         "and no fmap")
    Dg = Dk // 2 if pair else Dk  # dq / dk columns (the logits' with pair)
    if like_inputs and not (NV > 1 or reduce_dk or reduce_dv):
        dq = _empty_like_layout(q, NB, H, T, Dg, q.dtype)
        dk = _empty_like_layout(k, NB, H, T, Dg, q.dtype)
        dv = _empty_like_layout(v, NB, H, T, Dv, q.dtype)
        single = True
    else:
        dq = _alloc((NV, NB, H, T, Dg), torch.float32 if NV > 1 else q.dtype, dev)
        dk = _alloc((NV, NB, H, T, Dg), torch.float32 if reduce_dk else q.dtype, dev)
        dv = _alloc((NK, NB, H, T, Dv), torch.float32 if reduce_dv else q.dtype, dev)
        single = False
    dkv0 = _alloc((B, H, Dk, Dv), torch.float32, dev) if has_init else dq
    dz0 = _alloc((B, H, Dk), torch.float32, dev) if (has_init and normalize) else dq
    lowp, tf32x3 = _flags(q.dtype)
    fused, phi, dphi = _map_form(fmap)
    segS = segz = segdS = segdz = dq
    if ns > 1:
        segS, segz = _segment_sums(k, v, ns, seg, fused=fused, phi=phi, scale=1.0,
                                   has_z=normalize, kshift=kshift)
        segdS, segdz = _segment_sums(q, do, ns, seg, fused=fused, phi=phi, scale=scale,
                                     has_z=normalize, den=den, delta=delta, j0=1)
    ob = o if delta_o else do
    gq, gk, gv = (g if single else g[0] for g in (dq, dk, dv))  # [B, H, T, D] strides
    size = _common.launch_size(B * ns, H, T if varlen else min(T, seg), packed=varlen)
    _BWD[(B * H, NK * NV, 2 * ns)](
        q, k, v, do, ob, den, delta,
        kv0 if has_init else dq, z0 if (has_init and normalize) else dq,
        dkvT if has_dfinal else dq, dzT if (has_dfinal and normalize) else dq,
        dq, dk, dv, dkv0, dz0, segS, segz, segdS, segdz, cu_seqlens if varlen else dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        ob.stride(0), ob.stride(1), ob.stride(2),
        gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2),
        T, NB, H, G, Dk, Dv, seg, ns, kshift, scale, size,
        NV=NV, BK=BK, BV=BV, NORMALIZE=normalize, HAS_INIT=has_init,
        HAS_DFINAL=has_dfinal, LOWP=lowp, TF32X3=tf32x3, FUSED=fused, PHI=phi, DPHI=dphi,
        VARLEN=varlen, DELTA_O=delta_o, EPI_DPHI=dphi_y is not None, DPHI_Y=dphi_y,
        EVEN_K=Dk % BK == 0,
        KSUM_DOT=bool(BWD_KSUM_DOT) and normalize and not tf32x3,
        FULL=bool(FULL_TILES and not varlen and kshift == 0 and T % SEG_ALIGN == 0
                  and Dk % BK == 0 and Dv % BV == 0),
        EPI_PAIR=pair,
    )
    if single:
        return dq, dk, dv, (dkv0 if has_init else None), \
            (dz0 if (has_init and normalize) else None)
    dq = dq[0] if NV == 1 else dq.sum(0).to(q.dtype)
    dk = dk.view(NV, NB, Hkv, G, T, Dg).sum((0, 3)).to(k.dtype) if reduce_dk else dk[0]
    dv = dv.view(NK, NB, Hkv, G, T, Dv).sum((0, 3)).to(v.dtype) if reduce_dv else dv[0]
    return dq, dk, dv, (dkv0 if has_init else None), (dz0 if (has_init and normalize) else None)


class _MapPassAttention(torch.autograd.Function):
    """An elementwise map as one Triton pass, then the kernels on its features, as one
    autograd node whose backward is the backward kernel alone: the map's slope comes from
    the features the kernel loads (the form's ``dphi_from_y``) and multiplies dq, dk as
    they are stored, so neither the map's backward pass (read x and the feature gradients,
    write dx: ~0.3 ms for q and k at B8 H16 T16384 D64 bf16 on the H200) nor a second
    autograd node runs.  Eager calls only (torch.compile sees the map pass and the custom
    op: see chunked_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, kv0, z0, normalize, eps, store_final, fmap, scale, cu):
        fq = _maps.map_features(q, fmap, scale)
        fk = _maps.map_features(k, fmap)
        o, den, kvT, zT = _forward(fq, fk, v, normalize, eps, kv0, z0, store_final,
                                   cu_seqlens=cu)
        # raw q, k only for a differentiable backward (create_graph=True); the map pass
        # this replaces kept them too
        ctx.save_for_backward(q, k, fq, fk, v, o if normalize else None, den, kv0, z0, cu)
        ctx.normalize, ctx.eps, ctx.fmap, ctx.scale = normalize, eps, fmap, scale
        ctx.set_materialize_grads(False)
        return o, kvT, zT

    @staticmethod
    def backward(ctx, do, dkvT, dzT):
        q, k, fq, fk, v, o, den, kv0, z0, cu = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the backward: differentiate the torch path
            return graph_backward(
                ctx.needs_input_grad, (q, k, v, kv0, z0),
                lambda: torch_forward()(q, k, v, kv0, z0, ctx.normalize, ctx.eps,
                                        fmap=ctx.fmap, scale=ctx.scale, cu_seqlens=cu),
                (do, dkvT, dzT), 11)
        if do is None:  # only the returned state is used
            B, H, T, _ = q.shape
            do = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
        form = _maps.lookup(ctx.fmap)[1]
        dq, dk, dv, dkv0, dz0 = _backward(
            fq, fk, v, o, den, kv0, z0, _unit_last(do), dkvT, dzT, ctx.normalize,
            scale=ctx.scale, cu_seqlens=cu, dphi_y=form.dphi_from_y)
        return dq, dk, dv, dkv0, dz0, None, None, None, None, None, None


def _shape_reason(Dk: int, Dv: int):
    if Dk > KERNEL_LIMITS["max_dk"] or Dv > KERNEL_LIMITS["max_dv"]:
        return f"Dk={Dk}, Dv={Dv} exceed the kernel limits {KERNEL_LIMITS}"
    return None


def chunked_attention(q, k, v, *, normalize: bool, eps: float,
                      initial_kv=None, initial_z=None, return_state: bool = False,
                      feature_map=None, scale: float = 1.0, check: bool = True,
                      cu_seqlens=None, map_pass: bool = False):
    """Causal linear attention with Triton kernels (q, k already feature-mapped).

    Args:
        q: [B, H, T, Dk]; k: [B, Hkv, T, Dk]; v: [B, Hkv, T, Dv]. Hkv divides H (q head
            h reads k/v head h // (H // Hkv)). Any strides with a unit last stride (others
            are copied). fp32, fp16 or bf16, all the same.
        normalize: divide by den_t = q_t . (z0 + sum_{s<=t} k_s) + eps (in fp32).
        eps: added to the denominator.
        initial_kv: None or fp32 [B, H, Dk, Dv], state of an earlier segment.
        initial_z: None or fp32 [B, H, Dk] (normalize=True only).
        return_state: also return the final state.
        feature_map: None (q, k are features), or a FeatureMap with an elementwise Triton
            form (``feature_map.triton_elementwise()``): q, k are then raw and the kernels
            compute ``phi(scale * q)``, ``phi(k)`` in registers, forward and backward.
        scale: multiplies q inside the kernel (fused maps only; 1 otherwise).
        map_pass: with a fused ``feature_map``, make the features in one Triton pass before
            the kernels instead of inside them (faster where the kernels are latency-bound:
            the dispatcher's ``map_path="triton_pass"``); where the map's form has
            ``dphi_from_y`` the backward kernel applies the map's slope itself.
        check: validate the inputs (featattn.linear_attention has, and passes False).
        cu_seqlens: None, or int32/int64 [N + 1] on q's device: q, k, v are [1, H, T, D] with
            N sequences back to back (tokens cu[n]..cu[n+1]), each attended alone; the states
            in and out are then [N, H, ...].  Validated by featattn.linear_attention (here
            only with ``check``).

    Returns:
        (o, kv, z): o [B, H, T, Dv] in the input dtype; kv fp32 [B, H, Dk, Dv] and z fp32
        [B, H, Dk] (None when normalize=False) if return_state, else (o, None, None).
        Differentiable in q, k, v, initial_kv, initial_z, also through kv and z.
    """
    if check:
        if cu_seqlens is not None:
            from ..functional import _validate_cu_seqlens

            _validate_cu_seqlens(cu_seqlens, q)
        check_inputs(q, k, v, normalize, None if cu_seqlens is not None else initial_kv,
                     None if cu_seqlens is not None else initial_z, state_dim=lambda d: d,
                     dtypes=KERNEL_LIMITS["dtypes"], shape_reason=_shape_reason)
        if cu_seqlens is not None:
            check_packed_states(cu_seqlens, q.shape[1], q.shape[-1], v.shape[-1], normalize,
                                initial_kv, initial_z)
    fmap = ""
    if feature_map is not None:
        fmap = _maps.fused_key(feature_map)
        if fmap is None:
            outdated = outdated_form_reason(feature_map, "triton_elementwise")
            raise ValueError(
                f"feature map {feature_map.name!r} ({type(feature_map).__name__}) has no "
                "elementwise Triton form" + (f" of its own ({outdated})" if outdated else "")
                + ", so chunked_attention cannot fuse it; apply it first and pass the features "
                "with feature_map=None")
    elif scale != 1.0:
        raise ValueError(f"scale={scale} is only applied with a fused feature_map; multiply q "
                         "by it first when passing features")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if initial_kv is not None:
        initial_kv = initial_kv.float().contiguous()
    if initial_z is not None:
        initial_z = initial_z.float().contiguous()
    B, H, _, Dk = q.shape
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    initial_kv, initial_z = fill_state_half(normalize, initial_kv, initial_z, B, H, Dk,
                                            v.shape[-1], q.device)
    if map_pass and fmap:
        if (_maps.lookup(fmap)[1].dphi_from_y is not None and not _common.EAGER_CUSTOM_OP
                and not torch.compiler.is_compiling()):
            o, kv, z = _MapPassAttention.apply(q, k, v, initial_kv, initial_z, bool(normalize),
                                               float(eps), bool(return_state), fmap,
                                               float(scale), cu_seqlens)
            return o, kv, (z if (return_state and normalize) else None)
        # the pass as its own autograd node (and custom op under torch.compile)
        q, k = _maps.apply_map(q, fmap, scale), _maps.apply_map(k, fmap)
        fmap, scale = "", 1.0
    o, _den, kv, z = _fwd_op(q, k, v, initial_kv, initial_z, bool(normalize), float(eps),
                             bool(return_state), fmap, float(scale), cu_seqlens)
    if not return_state:
        return o, None, None
    return o, kv, (z if normalize else None)


# torch.library custom ops (fake kernels + autograd formula): see _common.py
_fwd_op = register_attention_ops("chunked", _forward, _backward, state_dim=lambda d: d,
                                 differentiable=torch_forward(), fuses_maps=True)
