"""Learned projection maps (Hedgehog, T2R) computed inside the chunked kernels.

Legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), T time, D raw q/k head
dim, F the map's projection width, Dv value dim, BT chunk, BD / BF / BV tiles of D / F / Dv.

The maps (:class:`~featattn.feature_maps.base.ProjectionTritonForm`)::

    l = (scale * x) W_h + b_h                      # [F] logits, W_h [D, F] per head
    softmax_pair (Hedgehog): phi = [softmax(l), softmax(-l)]      (2F features)
    relu (T2R):              phi = relu(l)                         (F features)

The kernels read raw q / k tiles, compute the logits (tensor cores, fp32 operands: tf32, or
tf32x3 for fp32 inputs: _common.mm_tf32x3 with LOWP off) and the activation in fp32 registers,
round the features once to the input dtype (as the PyTorch maps do) and run the chunked algorithm of
:mod:`featattn.kernels.chunked` on them; the features never reach memory.  A softmax pair is
kept as two halves (``a = softmax(l)``, ``b = softmax(-l)``), each with its own state tile,
so every product of the plain kernel is a sum of two products and the state keeps the
PyTorch layout (rows ``0..F-1`` the first half, ``F..2F-1`` the second).

Backward: one launch, two kinds of programs (as the chunked kernel): phase 0 sweeps forward
for d(features of q), phase 1 backward for d(features of k) and dv.  Each recomputes the
features, backpropagates through the activation (softmax: ``dl = a (da - <da, a>) -
b (db - <db, b>)``) and the projection: ``dx = scale * dl W^T`` and the program's partial
``dW = scale * x^T dl``, ``db = sum dl``, accumulated in registers over its whole sweep and
written once per (program row, Dv tile); torch sums those fp32 partials (no atomics, so
results repeat bit for bit).  d(features) is linear, so Dv tiles and the q heads of a
key/value group simply add.

Limits: D <= 128 and F <= 128 (one tile each); Dv any (tiled by BV).  No split-T segments
(one program sweeps each head).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import _switches
from . import _common
from . import tuning as _tuning
from ._common import alloc as _alloc
from ._common import cdiv, check_inputs, check_packed_states, fill_state_half, next_pow2
from ._common import row_dot
from ._common import launch_size as _launch_size
from ._common import dtype_flags as _flags
from ._common import empty_like_layout as _empty_like_layout
from ._common import unit_last as _unit_last
from ._common import batch_head, head_base, head_start, sequence_heads
from ._common import dot_in_tf32x3 as _dot_in  # the chunked kernels' numerics
from ._common import mm_tf32x3 as _mm

__all__ = ["projected_attention", "projection_features", "projection_unsupported_reason",
           "ACTIVATIONS", "MAX_DIM"]

_INTERPRET = _common.INTERPRET

#: activation name -> (kernel code, features per projection column)
ACTIVATIONS = {"softmax_pair": (0, 2), "relu": (1, 1)}
#: largest D and F (one register tile each)
MAX_DIM = 128


def projection_unsupported_reason(form, d: int, H: int, Hkv: Optional[int] = None) -> Optional[str]:
    """None when the kernels take this map for ``H`` query heads (and ``Hkv`` key/value heads,
    when known) of dim ``d``, else why not."""
    if form.activation not in ACTIVATIONS:
        return (f"activation {form.activation!r} has no kernel (known: "
                f"{', '.join(ACTIVATIONS)})")
    wq, wk, bq, bk = form.q_weight, form.k_weight, form.q_bias, form.k_bias
    if wq.dim() != 3 or wk.dim() != 3:
        return f"its weights must be [heads, d, f], got {tuple(wq.shape)} / {tuple(wk.shape)}"
    f = wq.shape[-1]
    if d > MAX_DIM or f > MAX_DIM:
        return f"head dim {d} or projection width {f} is above {MAX_DIM} (one register tile)"
    hq, hk = wq.shape[0], wk.shape[0]
    fits = H % hq == 0 and hq == hk if form.q_shares_kv_head else hq == H and H % hk == 0
    fits = fits and (Hkv is None or hk == Hkv) and (form.heads is None or form.heads == H)
    if not fits or tuple(wq.shape[1:]) != (d, f) or tuple(wk.shape[1:]) != (d, f):
        kv = "" if Hkv is None else f" and {Hkv} key/value heads"
        built = "" if form.heads is None else f" (the map was built for {form.heads} query heads)"
        return (f"its weights {tuple(wq.shape)} / {tuple(wk.shape)} do not fit {H} query "
                f"heads{kv} of dim {d}{built}")
    if (bq is None) != (bk is None):
        return "it gives a bias for only one of queries and keys (both or neither)"
    if bq is not None and (tuple(bq.shape) != (hq, f) or tuple(bk.shape) != (hk, f)):
        return (f"its biases {tuple(bq.shape)} / {tuple(bk.shape)} must be [{hq}, {f}] / "
                f"[{hk}, {f}]")
    devices = {t.device for t in (wq, wk, bq, bk) if t is not None}
    if len(devices) > 1:
        return f"its weights and biases are on different devices ({sorted(map(str, devices))})"
    return None


def _configs():
    if _INTERPRET:
        return [triton.Config({"BT": 16}, num_warps=4, num_stages=1)]
    if _switches.enabled("FEATATTN_NO_AUTOTUNE"):
        return [triton.Config({"BT": 64}, num_warps=4, num_stages=2)]
    space = [(64, 4, 2), (64, 8, 2), (32, 4, 2), (64, 4, 3), (32, 8, 2)]
    return [triton.Config({"BT": bt}, num_warps=nw, num_stages=ns) for bt, nw, ns in space]


# --------------------------------------------------------------------------- the map
@triton.jit
def _load_w(w, offs_d, offs_f, md, mf, F):
    """One head's weight [BD, BF] (fp32) from w (that head's [D, F], contiguous)."""
    return tl.load(w + offs_d[:, None] * F + offs_f[None, :], mask=md[:, None] & mf[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _logits(x, w, bias, offs_f, mf, scale, HAS_BIAS: tl.constexpr, TF32X3: tl.constexpr):
    """(scale * x) w + bias in fp32 [BT, BF]."""
    lg = _mm(x, w, False, TF32X3) * scale
    if HAS_BIAS:
        lg += tl.load(bias + offs_f, mask=mf, other=0.0).to(tl.float32)[None, :]
    return lg


@triton.jit
def _act(lg, keep, mf, ACT: tl.constexpr, EVEN_F: tl.constexpr = False,
         KEEP: tl.constexpr = True):
    """The features (fp32) of logits l [BT, BF]: (a, b), b unused for one-half maps; 0 where
    ``keep`` ([BT, BF]: real row and column) is off.  EVEN_F: F == BF (no padded columns to
    leave out of the softmaxes); KEEP=False: padded entries may hold anything (the caller
    masks its stores and its gradients)."""
    if ACT == 0:
        if EVEN_F:
            lp = lg
        else:
            lp = tl.where(mf[None, :], lg, float("-inf"))
        # a reciprocal per row, then products, not a tile of IEEE divisions (offline, sm_90a:
        # the pass's forward loop 1343 -> 1225 instructions a 64-row tile)
        ep = _common.exp_nonpos(lp - tl.max(lp, axis=1)[:, None])
        a = ep * (1.0 / tl.sum(ep, axis=1))[:, None]
        if EVEN_F:
            ln = -lg
        else:
            ln = tl.where(mf[None, :], -lg, float("-inf"))
        en = _common.exp_nonpos(ln - tl.max(ln, axis=1)[:, None])
        b = en * (1.0 / tl.sum(en, axis=1))[:, None]
        if KEEP:
            a = tl.where(keep, a, 0.0)
            b = tl.where(keep, b, 0.0)
    else:
        a = tl.maximum(lg, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if KEEP:
            a = tl.where(keep, a, 0.0)
        b = a
    return a, b


@triton.jit
def _dact(lg, a, b, da, db, keep, ACT: tl.constexpr, KEEP: tl.constexpr = True):
    """d(logits) from the features' gradients (da, db) and the fp32 features (a, b).
    KEEP=False: da and db are 0 off ``keep`` (loaded so), which makes dl 0 there."""
    if ACT == 0:
        dl = a * (da - tl.sum(da * a, axis=1)[:, None]) - b * (db - tl.sum(db * b, axis=1)[:, None])
    else:
        dl = tl.where(lg > 0, da, 0.0)
    if KEEP:
        dl = tl.where(keep, dl, 0.0)
    return dl


# --------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=["T", "SIZE"])
def _fwd_kernel(
    q, k, v, wq, bq, wk, bk, o, den, kv0, z0, kvT, zT, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, D, F, DV, eps, scale, SIZE,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    LOWP: tl.constexpr, TF32X3: tl.constexpr, ACT: tl.constexpr, PAIR: tl.constexpr,
    QW_KV: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (B*H, NV).  q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv] strided (unit last
    stride); wq [Hq_w,D,F] (Hq_w = H, or Hkv with QW_KV), wk [Hkv,D,F], bq/bk [.., F]; o like
    q with Dv; den fp32 [B,H,T] (eps added); states fp32 [B,H,DK,Dv] / [B,H,DK] with
    DK = 2F (PAIR) or F."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b, i_h, i_hk, bos, TS, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)
    i_wq = i_hk if QW_KV else i_h
    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    o_base = head_base(o, i_b, i_h, bos, sob, soh, sot)
    d_base = den + row * T + bos
    wq_base = wq + i_wq * D * F
    wk_base = wk + i_hk * D * F

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    offs_v = i_v * BV + tl.arange(0, BV)
    md = offs_d < D
    mf = offs_f < F
    mv = offs_v < DV
    causal = offs_t[:, None] >= offs_t[None, :]
    own_t = (offs_t * 0 + i_v) == 0
    own_f = (offs_f * 0 + i_v) == 0
    DK = F * (1 + PAIR)
    st_off = i_bh.to(tl.int64) * DK * DV
    zt_off = i_bh.to(tl.int64) * DK

    Sa = tl.zeros([BF, BV], dtype=tl.float32)
    Sb = tl.zeros([BF, BV], dtype=tl.float32)
    za = tl.zeros([BF], dtype=tl.float32)
    zb = tl.zeros([BF], dtype=tl.float32)
    if HAS_INIT:
        mS = mf[:, None] & mv[None, :]
        Sa = tl.load(kv0 + st_off + offs_f[:, None] * DV + offs_v[None, :], mask=mS, other=0.0)
        if PAIR:
            Sb = tl.load(kv0 + st_off + (F + offs_f)[:, None] * DV + offs_v[None, :], mask=mS,
                         other=0.0)
        if NORMALIZE:
            za = tl.load(z0 + zt_off + offs_f, mask=mf, other=0.0)
            if PAIR:
                zb = tl.load(z0 + zt_off + F + offs_f, mask=mf, other=0.0)

    for i in range(0, tl.cdiv(TS, BT)):
        t0 = tl.cast(i * BT, tl.int64)
        mt = (i * BT + offs_t) < TS
        keep = mt[:, None] & mf[None, :]
        xq = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_d[None, :],
                     mask=mt[:, None] & md[None, :], other=0.0)
        xk = tl.load(k_base + t0 * skt + offs_t[:, None] * skt + offs_d[None, :],
                     mask=mt[:, None] & md[None, :], other=0.0)
        b_v = tl.load(v_base + t0 * svt + offs_t[:, None] * svt + offs_v[None, :],
                      mask=mt[:, None] & mv[None, :], other=0.0)
        lq = _logits(xq, _load_w(wq_base, offs_d, offs_f, md, mf, F), bq + i_wq * F, offs_f, mf, scale,
                     HAS_BIAS, TF32X3)
        qa, qb = _act(lq, keep, mf, ACT)
        qa = qa.to(xq.dtype)
        qb = qb.to(xq.dtype)
        lk = _logits(xk, _load_w(wk_base, offs_d, offs_f, md, mf, F), bk + i_hk * F, offs_f, mf, 1.0,
                     HAS_BIAS, TF32X3)
        ka, kb = _act(lk, keep, mf, ACT)
        ka = ka.to(xk.dtype)
        kb = kb.to(xk.dtype)

        A = _dot_in(qa, tl.trans(ka), TF32X3)
        if PAIR:
            A += _dot_in(qb, tl.trans(kb), TF32X3)
        A = tl.where(causal, A, 0.0)
        num = _mm(A, b_v, LOWP, TF32X3) + _mm(qa, Sa, LOWP, TF32X3)
        if PAIR:
            num += _mm(qb, Sb, LOWP, TF32X3)
        if NORMALIZE:
            d = tl.sum(A, axis=1) + tl.sum(qa.to(tl.float32) * za[None, :], axis=1)
            za += tl.sum(ka.to(tl.float32), axis=0)
            if PAIR:
                d += tl.sum(qb.to(tl.float32) * zb[None, :], axis=1)
                zb += tl.sum(kb.to(tl.float32), axis=0)
            d = d + eps
            num = num * (1.0 / d)[:, None]  # a reciprocal per row (see chunked.py)
            tl.store(d_base + t0 + offs_t, d, mask=mt & own_t)
        Sa += _dot_in(tl.trans(ka), b_v, TF32X3)
        if PAIR:
            Sb += _dot_in(tl.trans(kb), b_v, TF32X3)
        tl.store(o_base + t0 * sot + offs_t[:, None] * sot + offs_v[None, :],
                 num.to(o.dtype.element_ty), mask=mt[:, None] & mv[None, :])

    if STORE_FINAL:
        mS = mf[:, None] & mv[None, :]
        tl.store(kvT + st_off + offs_f[:, None] * DV + offs_v[None, :], Sa, mask=mS)
        if PAIR:
            tl.store(kvT + st_off + (F + offs_f)[:, None] * DV + offs_v[None, :], Sb, mask=mS)
        if NORMALIZE:
            tl.store(zT + zt_off + offs_f, za, mask=mf & own_f)
            if PAIR:
                tl.store(zT + zt_off + F + offs_f, zb, mask=mf & own_f)


# --------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=["T", "SIZE"])
def _bwd_kernel(
    q, k, v, do, wq, bq, wk, bk, den, delta, kv0, z0, dkvT, dzT,
    dq, dk, dv, dwq, dbq, dwk, dbk, dkv0, dz0, cu,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, NB, H, G, D, F, DV, scale, SIZE,
    BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    LOWP: tl.constexpr, TF32X3: tl.constexpr, ACT: tl.constexpr, PAIR: tl.constexpr,
    QW_KV: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Grid (B*H, NV, 2): phase 0 the dq sweep, phase 1 the dk/dv sweep (see the module
    docstring; the algebra is featattn.kernels.chunked's with two feature halves).
    Outputs: dq, dk [NV,NB,H,T,D] and dv [NB,H,T,Dv] (written per q head); dwq, dwk fp32
    [NV, B*H, D, F] and dbq, dbk [NV, B*H, F] partials; dkv0 / dz0 fp32 (HAS_INIT)."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    phase = tl.program_id(2)
    n_rows = NB * H
    i_b, i_h, i_hk, bos, TS, row = sequence_heads(i_bh, H, G, T, cu, VARLEN)
    i_wq = i_hk if QW_KV else i_h
    q_base = head_base(q, i_b, i_h, bos, sqb, sqh, sqt)
    k_base = head_base(k, i_b, i_hk, bos, skb, skh, skt)
    v_base = head_base(v, i_b, i_hk, bos, svb, svh, svt)
    do_base = head_base(do, i_b, i_h, bos, sdb, sdh, sdt)
    row_base = row * T + bos
    wq_base = wq + i_wq * D * F
    wk_base = wk + i_hk * D * F

    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    offs_v = i_v * BV + tl.arange(0, BV)
    md = offs_d < D
    mf = offs_f < F
    mv = offs_v < DV
    own_t = (offs_t * 0 + i_v) == 0
    own_f = (offs_f * 0 + i_v) == 0
    DK = F * (1 + PAIR)
    st_off = i_bh.to(tl.int64) * DK * DV
    zt_off = i_bh.to(tl.int64) * DK
    mS = mf[:, None] & mv[None, :]
    n_chunks = tl.cdiv(TS, BT)
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    dB = tl.zeros([BF], dtype=tl.float32)
    part = (i_v.to(tl.int64) * tl.num_programs(0) + i_bh) * D * F

    if phase == 0:
        causal = offs_t[:, None] >= offs_t[None, :]
        STa = tl.zeros([BV, BF], dtype=tl.float32)  # S^T halves
        STb = tl.zeros([BV, BF], dtype=tl.float32)
        za = tl.zeros([BF], dtype=tl.float32)
        zb = tl.zeros([BF], dtype=tl.float32)
        if HAS_INIT:
            mST = mf[None, :] & mv[:, None]
            STa = tl.load(kv0 + st_off + offs_f[None, :] * DV + offs_v[:, None], mask=mST,
                          other=0.0)
            if PAIR:
                STb = tl.load(kv0 + st_off + (F + offs_f)[None, :] * DV + offs_v[:, None],
                              mask=mST, other=0.0)
            if NORMALIZE:
                za = tl.load(z0 + zt_off + offs_f, mask=mf, other=0.0)
                if PAIR:
                    zb = tl.load(z0 + zt_off + F + offs_f, mask=mf, other=0.0)
        dq_base = dq + ((i_v.to(tl.int64) * n_rows + row) * T + bos) * D
        for i in range(0, n_chunks):
            t0 = tl.cast(i * BT, tl.int64)
            mt = (i * BT + offs_t) < TS
            keep = mt[:, None] & mf[None, :]
            b_do = tl.load(do_base + t0 * sdt + offs_t[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            b_v = tl.load(v_base + t0 * svt + offs_t[:, None] * svt + offs_v[None, :],
                          mask=mt[:, None] & mv[None, :], other=0.0)
            xk = tl.load(k_base + t0 * skt + offs_t[:, None] * skt + offs_d[None, :],
                         mask=mt[:, None] & md[None, :], other=0.0)
            lk = _logits(xk, _load_w(wk_base, offs_d, offs_f, md, mf, F), bk + i_hk * F, offs_f, mf,
                         1.0, HAS_BIAS, TF32X3)
            ka, kb = _act(lk, keep, mf, ACT)
            ka = ka.to(xk.dtype)
            kb = kb.to(xk.dtype)
            dA = _dot_in(b_do, tl.trans(b_v), TF32X3)
            if NORMALIZE:
                b_dl = tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t, other=0.0)
                dA = dA - b_dl[:, None]
            dA = tl.where(causal, dA, 0.0)
            dqa = _mm(dA, ka, LOWP, TF32X3) + _mm(b_do, STa, LOWP, TF32X3)
            if PAIR:
                dqb = _mm(dA, kb, LOWP, TF32X3) + _mm(b_do, STb, LOWP, TF32X3)
            else:
                dqb = dqa
            if NORMALIZE:
                b_r = 1.0 / tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                dqa = (dqa - b_dl[:, None] * za[None, :]) * b_r[:, None]
                za += tl.sum(ka.to(tl.float32), axis=0)
                if PAIR:
                    dqb = (dqb - b_dl[:, None] * zb[None, :]) * b_r[:, None]
                    zb += tl.sum(kb.to(tl.float32), axis=0)
            STa += _dot_in(tl.trans(b_v), ka, TF32X3)
            if PAIR:
                STb += _dot_in(tl.trans(b_v), kb, TF32X3)
            # through the map of q
            xq = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_d[None, :],
                         mask=mt[:, None] & md[None, :], other=0.0)
            w = _load_w(wq_base, offs_d, offs_f, md, mf, F)
            lq = _logits(xq, w, bq + i_wq * F, offs_f, mf, scale, HAS_BIAS, TF32X3)
            qa32, qb32 = _act(lq, keep, mf, ACT)
            dlq = _dact(lq, qa32, qb32, dqa, dqb, keep, ACT)
            b_dx = _mm(dlq, tl.trans(w), False, TF32X3) * scale
            tl.store(dq_base + t0 * D + offs_t[:, None] * D + offs_d[None, :],
                     b_dx.to(dq.dtype.element_ty), mask=mt[:, None] & md[None, :])
            dW += _mm(tl.trans(xq), dlq, False, TF32X3)
            dB += tl.sum(dlq, axis=0)
        mW = md[:, None] & mf[None, :]
        tl.store(dwq + part + offs_d[:, None] * F + offs_f[None, :], dW * scale, mask=mW)
        if HAS_BIAS:
            tl.store(dbq + part // D + offs_f, dB, mask=mf)
    else:
        anti = offs_t[:, None] <= offs_t[None, :]
        dSa = tl.zeros([BF, BV], dtype=tl.float32)
        dSb = tl.zeros([BF, BV], dtype=tl.float32)
        dza = tl.zeros([BF], dtype=tl.float32)
        dzb = tl.zeros([BF], dtype=tl.float32)
        if HAS_DFINAL:
            dSa = tl.load(dkvT + st_off + offs_f[:, None] * DV + offs_v[None, :], mask=mS,
                          other=0.0)
            if PAIR:
                dSb = tl.load(dkvT + st_off + (F + offs_f)[:, None] * DV + offs_v[None, :],
                              mask=mS, other=0.0)
            if NORMALIZE:
                dza = tl.load(dzT + zt_off + offs_f, mask=mf & own_f, other=0.0)
                if PAIR:
                    dzb = tl.load(dzT + zt_off + F + offs_f, mask=mf & own_f, other=0.0)
        dk_base = dk + ((i_v.to(tl.int64) * n_rows + row) * T + bos) * D
        dv_base = dv + (row * T + bos) * DV
        for j in range(0, n_chunks):
            i = n_chunks - 1 - j
            t0 = tl.cast(i * BT, tl.int64)
            mt = (i * BT + offs_t) < TS
            keep = mt[:, None] & mf[None, :]
            xq = tl.load(q_base + t0 * sqt + offs_t[:, None] * sqt + offs_d[None, :],
                         mask=mt[:, None] & md[None, :], other=0.0)
            xk = tl.load(k_base + t0 * skt + offs_t[:, None] * skt + offs_d[None, :],
                         mask=mt[:, None] & md[None, :], other=0.0)
            b_v = tl.load(v_base + t0 * svt + offs_t[:, None] * svt + offs_v[None, :],
                          mask=mt[:, None] & mv[None, :], other=0.0)
            b_do = tl.load(do_base + t0 * sdt + offs_t[:, None] * sdt + offs_v[None, :],
                           mask=mt[:, None] & mv[None, :], other=0.0)
            lq = _logits(xq, _load_w(wq_base, offs_d, offs_f, md, mf, F), bq + i_wq * F, offs_f, mf,
                         scale, HAS_BIAS, TF32X3)
            qa, qb = _act(lq, keep, mf, ACT)
            qa = qa.to(xq.dtype)
            qb = qb.to(xq.dtype)
            w = _load_w(wk_base, offs_d, offs_f, md, mf, F)
            lk = _logits(xk, w, bk + i_hk * F, offs_f, mf, 1.0, HAS_BIAS, TF32X3)
            ka32, kb32 = _act(lk, keep, mf, ACT)
            ka = ka32.to(xk.dtype)
            kb = kb32.to(xk.dtype)

            AT = _dot_in(ka, tl.trans(qa), TF32X3)
            if PAIR:
                AT += _dot_in(kb, tl.trans(qb), TF32X3)
            AT = tl.where(anti, AT, 0.0)
            dAT = _dot_in(b_v, tl.trans(b_do), TF32X3)
            if NORMALIZE:
                b_r = 1.0 / tl.load(den + row_base + t0 + offs_t, mask=mt, other=1.0)
                b_dn = b_do.to(tl.float32) * b_r[:, None]
                b_dd = -tl.load(delta + row_base + t0 + offs_t, mask=mt & own_t, other=0.0) * b_r
                dAT = dAT * b_r[None, :] + b_dd[None, :]
            else:
                b_dn = b_do
            dAT = tl.where(anti, dAT, 0.0)
            b_dv = _mm(AT, b_dn, LOWP, TF32X3) + _mm(ka, dSa, LOWP, TF32X3)
            dka = _mm(dAT, qa, LOWP, TF32X3) + _mm(b_v, tl.trans(dSa), LOWP, TF32X3)
            if PAIR:
                b_dv += _mm(kb, dSb, LOWP, TF32X3)
                dkb = _mm(dAT, qb, LOWP, TF32X3) + _mm(b_v, tl.trans(dSb), LOWP, TF32X3)
            else:
                dkb = dka
            if NORMALIZE:
                dka += dza[None, :]
                dza += tl.sum(qa.to(tl.float32) * b_dd[:, None], axis=0)
                if PAIR:
                    dkb += dzb[None, :]
                    dzb += tl.sum(qb.to(tl.float32) * b_dd[:, None], axis=0)
            dSa += _mm(tl.trans(qa), b_dn, LOWP, TF32X3)
            if PAIR:
                dSb += _mm(tl.trans(qb), b_dn, LOWP, TF32X3)
            dlk = _dact(lk, ka32, kb32, dka, dkb, keep, ACT)
            b_dx = _mm(dlk, tl.trans(w), False, TF32X3)
            tl.store(dk_base + t0 * D + offs_t[:, None] * D + offs_d[None, :],
                     b_dx.to(dk.dtype.element_ty), mask=mt[:, None] & md[None, :])
            tl.store(dv_base + t0 * DV + offs_t[:, None] * DV + offs_v[None, :],
                     b_dv.to(dv.dtype.element_ty), mask=mt[:, None] & mv[None, :])
            dW += _mm(tl.trans(xk), dlk, False, TF32X3)
            dB += tl.sum(dlk, axis=0)
        mW = md[:, None] & mf[None, :]
        tl.store(dwk + part + offs_d[:, None] * F + offs_f[None, :], dW, mask=mW)
        if HAS_BIAS:
            tl.store(dbk + part // D + offs_f, dB, mask=mf)
        if HAS_INIT:
            tl.store(dkv0 + st_off + offs_f[:, None] * DV + offs_v[None, :], dSa, mask=mS)
            if PAIR:
                tl.store(dkv0 + st_off + (F + offs_f)[:, None] * DV + offs_v[None, :], dSb,
                         mask=mS)
            if NORMALIZE:
                tl.store(dz0 + zt_off + offs_f, dza, mask=mf & own_f)
                if PAIR:
                    tl.store(dz0 + zt_off + F + offs_f, dzb, mask=mf & own_f)


# Tuned per shape of the map, form and problem size (SIZE, _common.size_bucket): a config
# tuned on a first small call was kept for every later size.
_fwd = triton.autotune(configs=_configs(),
                       key=["D", "F", "DV", "NORMALIZE", "ACT", "SIZE"])(_fwd_kernel)
_bwd = triton.autotune(configs=_configs(),
                       key=["D", "F", "DV", "NORMALIZE", "ACT", "SIZE"])(_bwd_kernel)
_FWD = _common.TunedLaunch(_fwd, "projected_fwd")
_BWD = _common.TunedLaunch(_bwd, "projected_bwd")


# --------------------------------------------------------------------------- wrappers
def _tiles(D: int, F: int, Dv: int, pair: bool, dtype) -> tuple[int, int, int]:
    # Tiles narrower than 32 only under the interpreter.  On the H200 (triton 3.6) the
    # backward kernel with a 16-wide D tile at BT 64 / 8 warps faults (illegal memory access
    # within 300 launches, bf16; fp32 faulted at 16-wide tiles too); with 32-wide tiles every
    # config of the space runs (benchmarks/gpu_faults.py, docs/benchmarks.md).
    low = 16 if _INTERPRET else 32
    bd = max(low, next_pow2(D))
    bf = max(low, next_pow2(F))
    # two [BF, BV] fp32 state halves live in registers: keep BF * BV * halves <= 8192
    cap = max(low, 8192 // (bf * (2 if pair else 1)))
    bv = max(low, min(next_pow2(Dv), 128, cap))
    return bd, bf, bv


def _launch_args(q, k, v, wq, wk, act):
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    F = wq.shape[-1]
    code, halves = ACTIVATIONS[act]
    pair = halves == 2
    BD, BF, BV = _tiles(D, F, Dv, pair, q.dtype)
    return B, H, T, D, Hkv, Dv, F, code, pair, BD, BF, BV


def _forward(q, k, v, wq, bq, wk, bk, act, normalize, eps, scale, kv0, z0, store_final, cu):
    B, H, T, D, Hkv, Dv, F, code, pair, BD, BF, BV = _launch_args(q, k, v, wq, wk, act)
    BV = (_tuning.forced("projected_fwd") or {}).get("BV", BV)
    NB = B
    if cu is not None:
        B = cu.shape[0] - 1
    NV = cdiv(Dv, BV)
    DK = F * (2 if pair else 1)
    dev = q.device
    o = _empty_like_layout(q, NB, H, T, Dv, q.dtype)
    den = _alloc((NB, H, T), torch.float32, dev) if normalize else o
    kvT = _alloc((B, H, DK, Dv), torch.float32, dev) if store_final else o
    zT = _alloc((B, H, DK), torch.float32, dev) if (store_final and normalize) else o
    lowp, tf32x3 = _flags(q.dtype)
    has_init = kv0 is not None
    qw_kv = wq.shape[0] != H  # query heads share their kv head's weights
    _FWD[(B * H, NV)](
        q, k, v, wq, bq if bq is not None else wq, wk, bk if bk is not None else wk,
        o, den, kv0 if has_init else o, z0 if (has_init and normalize) else o, kvT, zT,
        cu if cu is not None else o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        T, H, H // Hkv, D, F, Dv, eps, scale, _launch_size(B, H, T, packed=cu is not None),
        BD=BD, BF=BF, BV=BV, NORMALIZE=normalize, HAS_INIT=has_init, STORE_FINAL=store_final,
        LOWP=lowp, TF32X3=tf32x3, ACT=code, PAIR=pair, QW_KV=qw_kv,
        HAS_BIAS=bq is not None, VARLEN=cu is not None,
    )
    return o, (den if normalize else None), (kvT if store_final else None), \
        (zT if store_final and normalize else None)


def _backward(q, k, v, wq, bq, wk, bk, act, normalize, scale, o, den, kv0, z0, do, dkvT, dzT,
              cu):
    B, H, T, D, Hkv, Dv, F, code, pair, BD, BF, BV = _launch_args(q, k, v, wq, wk, act)
    BV = (_tuning.forced("projected_bwd") or {}).get("BV", BV)
    NB = B
    if cu is not None:
        B = cu.shape[0] - 1
    NV = cdiv(Dv, BV)
    G = H // Hkv
    DK = F * (2 if pair else 1)
    dev = q.device
    has_init = kv0 is not None
    has_dfinal = dkvT is not None or dzT is not None
    if has_dfinal:
        dkvT = torch.zeros(B, H, DK, Dv, dtype=torch.float32, device=dev) if dkvT is None \
            else dkvT.float().contiguous()
        if normalize:
            dzT = torch.zeros(B, H, DK, dtype=torch.float32, device=dev) if dzT is None \
                else dzT.float().contiguous()
    delta = row_dot(o, do) if normalize else do
    if not normalize:
        den = do
    reduce_dk = NV > 1 or G > 1
    dq = _alloc((NV, NB, H, T, D), torch.float32 if NV > 1 else q.dtype, dev)
    dk = _alloc((NV, NB, H, T, D), torch.float32 if reduce_dk else q.dtype, dev)
    dv = _alloc((NB, H, T, Dv), torch.float32 if G > 1 else q.dtype, dev)
    dwq = _alloc((NV, B * H, D, F), torch.float32, dev)
    dwk = _alloc((NV, B * H, D, F), torch.float32, dev)
    has_bias = bq is not None
    dbq = _alloc((NV, B * H, F), torch.float32, dev) if has_bias else dwq
    dbk = _alloc((NV, B * H, F), torch.float32, dev) if has_bias else dwk
    dkv0 = _alloc((B, H, DK, Dv), torch.float32, dev) if has_init else dq
    dz0 = _alloc((B, H, DK), torch.float32, dev) if (has_init and normalize) else dq
    lowp, tf32x3 = _flags(q.dtype)
    qw_kv = wq.shape[0] != H  # query heads share their kv head's weights
    _BWD[(B * H, NV, 2)](
        q, k, v, do, wq, bq if has_bias else wq, wk, bk if has_bias else wk, den, delta,
        kv0 if has_init else dq, z0 if (has_init and normalize) else dq,
        dkvT if has_dfinal else dq, dzT if (has_dfinal and normalize) else dq,
        dq, dk, dv, dwq, dbq, dwk, dbk, dkv0, dz0, cu if cu is not None else dq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        T, NB, H, G, D, F, Dv, scale, _launch_size(B, H, T, packed=cu is not None),
        BD=BD, BF=BF, BV=BV, NORMALIZE=normalize, HAS_INIT=has_init, HAS_DFINAL=has_dfinal,
        LOWP=lowp, TF32X3=tf32x3, ACT=code, PAIR=pair, QW_KV=qw_kv, HAS_BIAS=has_bias,
        VARLEN=cu is not None,
    )
    dq = dq[0] if NV == 1 else dq.sum(0).to(q.dtype)
    dk = dk.view(NV, NB, Hkv, G, T, D).sum((0, 3)).to(k.dtype) if reduce_dk else dk[0]
    dv = dv.view(NB, Hkv, G, T, Dv).sum(2).to(v.dtype) if G > 1 else dv
    dwk_ = dwk.view(NV, B, Hkv, G, D, F).sum((0, 1, 3))
    dbk_ = dbk.view(NV, B, Hkv, G, F).sum((0, 1, 3)) if has_bias else None
    if qw_kv:
        dwq_ = dwq.view(NV, B, Hkv, G, D, F).sum((0, 1, 3))
        dbq_ = dbq.view(NV, B, Hkv, G, F).sum((0, 1, 3)) if has_bias else None
    else:
        dwq_ = dwq.view(NV, B, H, D, F).sum((0, 1))
        dbq_ = dbq.view(NV, B, H, F).sum((0, 1)) if has_bias else None
    return (dq, dk, dv, dwq_, dbq_, dwk_, dbk_, (dkv0 if has_init else None),
            (dz0 if has_init and normalize else None))


def _weights_in(ctx, wq, bq, wk, bk):
    """The map's weights and biases made contiguous (None stays None); their dtypes kept on
    ``ctx`` for :func:`_weight_grads`."""
    ctx.dtypes = tuple(None if w is None else w.dtype for w in (wq, bq, wk, bk))
    return tuple(None if w is None else w.contiguous() for w in (wq, bq, wk, bk))


def _weight_grads(ctx, *grads):
    """The weights' and biases' gradients (fp32) in the parameters' own dtypes."""
    return tuple(None if g is None else g.to(t) for g, t in zip(grads, ctx.dtypes))


class _Projected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, wq, bq, wk, bk, kv0, z0, act, normalize, eps, scale,
                store_final, cu):
        wq_c, bq_c, wk_c, bk_c = _weights_in(ctx, wq, bq, wk, bk)
        o, den, kvT, zT = _forward(q, k, v, wq_c, bq_c, wk_c, bk_c, act, normalize, eps, scale,
                                   kv0, z0, store_final, cu)
        ctx.save_for_backward(q, k, v, wq_c, bq_c, wk_c, bk_c, o, den, kv0, z0, cu)
        ctx.act, ctx.normalize, ctx.scale = act, normalize, scale
        return o, kvT, zT

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dkvT, dzT):
        q, k, v, wq, bq, wk, bk, o, den, kv0, z0, cu = ctx.saved_tensors
        do = _unit_last(do)
        dq, dk, dv, dwq, dbq, dwk, dbk, dkv0, dz0 = _backward(
            q, k, v, wq, bq, wk, bk, ctx.act, ctx.normalize, ctx.scale, o, den, kv0, z0, do,
            dkvT, dzT, cu)
        return (dq, dk, dv, *_weight_grads(ctx, dwq, dbq, dwk, dbk), dkv0, dz0,
                None, None, None, None, None, None)


def projected_attention(q, k, v, form, *, normalize: bool, eps: float, scale: float = 1.0,
                        initial_kv=None, initial_z=None, return_state: bool = False,
                        cu_seqlens=None, check: bool = True):
    """Causal linear attention with a projection map fused into the kernels.

    Args:
        q: [B, H, T, D] raw queries; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv] (Hkv divides H).
            fp32, fp16 or bf16, all the same; any strides with a unit last stride.
        form: a :class:`~featattn.feature_maps.base.ProjectionTritonForm`: q_weight
            [H or Hkv, D, F] (Hkv: query head h uses row h // (H // Hkv)), k_weight
            [Hkv, D, F], biases [.., F] or None, activation "softmax_pair" (2F features)
            or "relu" (F).
        normalize, eps: as for :func:`~featattn.kernels.chunked_attention`.
        scale: multiplies q before its projection.
        initial_kv: None or fp32 [B, H, DK, Dv] (DK = the map's output dim); initial_z: fp32
            [B, H, DK] (normalize only).  With cu_seqlens the leading dim is N.
        return_state: also return the final state.
        cu_seqlens: None or int [N + 1] (q, k, v are then [1, ., total_T, .]).
        check: validate the inputs (featattn.linear_attention has, and passes False).

    Returns:
        (o, kv, z): o [B, H, T, Dv] in the input dtype; with return_state the fp32 final
        state, else None, None.  Differentiable in q, k, v, the weights and biases and the
        initial state (also through the returned state).
    """
    if check:
        if cu_seqlens is not None:
            from ..functional import _validate_cu_seqlens

            _validate_cu_seqlens(cu_seqlens, q)
        dk = form.q_weight.shape[-1] * ACTIVATIONS.get(form.activation, (0, 1))[1]
        check_inputs(q, k, v, normalize, None if cu_seqlens is not None else initial_kv,
                     None if cu_seqlens is not None else initial_z,
                     state_dim=lambda d: dk, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                     shape_reason=lambda d, dv: None)
        if cu_seqlens is not None:
            check_packed_states(cu_seqlens, q.shape[1], dk, v.shape[-1], normalize, initial_kv,
                                initial_z)
    why = projection_unsupported_reason(form, q.shape[-1], q.shape[1], k.shape[1])
    if why is None and form.q_weight.device != q.device:
        why = f"its weights are on {form.q_weight.device}, q on {q.device}"
    if why is not None:
        raise ValueError(f"projected_attention: {why}; build the map for these heads "
                         "(heads=, kv_heads=, head_dim=) or pass backend='torch'")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if initial_kv is not None:
        initial_kv = initial_kv.float().contiguous()
    if initial_z is not None:
        initial_z = initial_z.float().contiguous()
    B, H, _, D = q.shape
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    F = form.q_weight.shape[-1]
    DK = F * ACTIVATIONS[form.activation][1]
    if normalize and (initial_kv is None) != (initial_z is None):
        initial_kv, initial_z = fill_state_half(normalize, initial_kv, initial_z, B, H, DK,
                                                v.shape[-1], q.device)
    o, kv, z = _Projected.apply(q, k, v, form.q_weight, form.q_bias, form.k_weight, form.k_bias,
                                initial_kv, initial_z, form.activation, bool(normalize),
                                float(eps), float(scale), bool(return_state), cu_seqlens)
    if not return_state:
        return o, None, None
    return o, kv, (z if normalize else None)


# --------------------------------------------------------------------------- the map as a pass
# For large calls (featattn.dispatch: more than FUSE_MAX_ROWS rows, or T split into segments)
# one pass writes the features (input dtype) and the unchanged chunked kernel runs on them:
# its chunk loop stays as short as on precomputed features, and it can split T across
# programs.  The backward pass recomputes the features from x and returns dx and the weights'
# gradients (per-program fp32 partials, summed by torch).

_PASS_ROWS = 1024  # tokens per program: weight partials are [B, H, cdiv(T, 1024), D, F]
#: The pass's backward reads the features the forward wrote (kept by the attention kernels'
#: autograd node anyway, so no extra memory) instead of recomputing the logits and the
#: activation from x: more HBM traffic (2f more columns a row), far fewer instructions
#: (offline, sm_90a, bf16, BT 64: 2105 -> 1148 a tile).  On the H200 the Hedgehog op's
#: fwd+bwd at B8 H16 T16384 went 6.94 -> 6.68 ms (docs/benchmarks.md, session 11).
PASS_BWD_FROM_FEATURES = True


@triton.jit(do_not_specialize=["T", "SIZE"])
def _pass_kernel(x, w, bias, g, y, dx, dw, db,
                 sxb, sxh, sxt, T, H, D, F, WDIV, NR, scale, SIZE,
                 BT: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, ROWS: tl.constexpr,
                 ACT: tl.constexpr, PAIR: tl.constexpr, HAS_BIAS: tl.constexpr,
                 TF32X3: tl.constexpr, BWD: tl.constexpr, FROM_Y: tl.constexpr,
                 EVEN_F: tl.constexpr, FROM_DL: tl.constexpr = False):
    """Grid (B*H, NR).  x [B, H, T, D] strided (unit last stride); w [H // WDIV, D, F].
    Forward: y [B, H, T, DK] = phi((scale * x) w + bias), contiguous.  Backward (BWD): from
    g = dy [B, H, T, DK] contiguous: dx [B, H, T, D] contiguous, fp32 partials
    dw [B*H, NR, D, F] (scale included) and db [B*H, NR, F]; with FROM_Y the activation's
    outputs are read from y (the forward's features) instead of recomputed from x; with
    FROM_DL, g is already the logits' gradient dl [B, H, T, F] (the attention backward's
    EPI_PAIR) and y is not read."""
    i_bh = tl.program_id(0)
    i_r = tl.program_id(1)
    i_b, i_h, i_w = batch_head(i_bh, H, WDIV)  # WDIV heads share a weight row
    DK = F * (1 + PAIR)
    offs_t = tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BF)
    md = offs_d < D
    mf = offs_f < F
    wt = _load_w(w + i_w * D * F, offs_d, offs_f, md, mf, F)
    x_base = head_start(x, i_b, i_h, sxb, sxh)
    row0 = i_bh.to(tl.int64) * T
    dW = tl.zeros([BD, BF], dtype=tl.float32)
    dB = tl.zeros([BF], dtype=tl.float32)
    for r in range(i_r * ROWS, tl.minimum(T, (i_r + 1) * ROWS), BT):
        t = r + offs_t
        mt = t < T
        keep = mt[:, None] & mf[None, :]
        xt = tl.load(x_base + t.to(tl.int64)[:, None] * sxt + offs_d[None, :],
                     mask=mt[:, None] & md[None, :], other=0.0)
        rows = (row0 + t)[:, None] * DK
        if FROM_DL:
            lg = tl.zeros([BT, BF], dtype=tl.float32)  # (unused)
            a = lg
            b = lg
        elif FROM_Y:
            a = tl.load(y + rows + offs_f[None, :], mask=keep, other=0.0).to(tl.float32)
            b = a
            if PAIR:
                b = tl.load(y + rows + F + offs_f[None, :], mask=keep, other=0.0).to(tl.float32)
            lg = a  # relu's slope: l > 0 exactly where relu(l) > 0
        else:
            lg = _logits(xt, wt, bias + i_w * F, offs_f, mf, scale, HAS_BIAS, TF32X3)
            # stores and dl are masked (_dact): padded entries need no zeros here
            a, b = _act(lg, keep, mf, ACT, EVEN_F, False)
        if BWD and FROM_DL:
            dl = tl.load(g + (row0 + t)[:, None] * F + offs_f[None, :], mask=keep,
                         other=0.0).to(tl.float32)
        elif BWD:
            ga = tl.load(g + rows + offs_f[None, :], mask=keep, other=0.0).to(tl.float32)
            gb = ga
            if PAIR:
                gb = tl.load(g + rows + F + offs_f[None, :], mask=keep, other=0.0).to(tl.float32)
            # ga, gb are 0 off `keep`, which makes dl 0 on padded rows whatever a and b hold
            # there; with padded columns (F < BF) dl keeps its mask
            dl = _dact(lg, a, b, ga, gb, keep, ACT, not EVEN_F)
        if BWD:
            dxt = _mm(dl, tl.trans(wt), False, TF32X3) * scale
            tl.store(dx + (row0 + t)[:, None] * D + offs_d[None, :],
                     dxt.to(dx.dtype.element_ty), mask=mt[:, None] & md[None, :])
            dW += _mm(tl.trans(xt), dl, False, TF32X3)
            dB += tl.sum(dl, axis=0)
        else:
            tl.store(y + rows + offs_f[None, :], a.to(y.dtype.element_ty), mask=keep)
            if PAIR:
                tl.store(y + rows + F + offs_f[None, :], b.to(y.dtype.element_ty), mask=keep)
    if BWD:
        part = i_bh.to(tl.int64) * NR + i_r
        tl.store(dw + part * D * F + offs_d[:, None] * F + offs_f[None, :], dW * scale,
                 mask=md[:, None] & mf[None, :])
        if HAS_BIAS:
            tl.store(db + part * F + offs_f, dB, mask=mf)


def _pass(x, w, bias, act, scale, g=None, feats=None, from_dl=False):
    """Forward: the features of x [B, Hx, T, D] under weights w [Hx // wdiv, D, F]. Backward
    (g given): (dx, dw, db) with dw / db summed to w's / bias's shape (fp32); ``feats``, the
    forward's output, is read instead of recomputed when given; ``from_dl``: g is the logits'
    gradient [B, Hx, T, F] (contiguous), not the features'."""
    B, Hx, T, D = x.shape
    F = w.shape[-1]
    code, halves = ACTIVATIONS[act]
    pair = halves == 2
    BD, BF, _ = _tiles(D, F, 16, pair, x.dtype)
    wdiv = Hx // w.shape[0]
    NR = cdiv(T, _PASS_ROWS)
    dev = x.device
    bwd = g is not None
    if bwd:
        y = feats if feats is not None else g
        dx = _alloc((B, Hx, T, D), x.dtype, dev)
        dw = _alloc((B * Hx, NR, D, F), torch.float32, dev)
        db = _alloc((B * Hx, NR, F), torch.float32, dev) if bias is not None else dw
    else:
        y = _alloc((B, Hx, T, F * halves), x.dtype, dev)
        dx = dw = db = y
    _PASS[(B * Hx, NR)](
        x, w, bias if bias is not None else w, g if bwd else y, y, dx, dw, db,
        x.stride(0), x.stride(1), x.stride(2), T, Hx, D, F, wdiv, NR, scale,
        _launch_size(B * Hx, NR, _PASS_ROWS),
        BD=BD, BF=BF, ROWS=_PASS_ROWS, ACT=code, PAIR=pair, HAS_BIAS=bias is not None,
        TF32X3=x.dtype == torch.float32, BWD=bwd, FROM_Y=feats is not None and not from_dl,
        EVEN_F=F == BF, FROM_DL=from_dl)
    if not bwd:
        return y
    hw = w.shape[0]
    dw = dw.view(B, hw, wdiv, NR, D, F).sum((0, 2, 3))
    db = db.view(B, hw, wdiv, NR, F).sum((0, 2, 3)) if bias is not None else None
    return dx, dw, db


def _pass_configs():
    if _INTERPRET:
        return [triton.Config({"BT": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BT": 64}, num_warps=4, num_stages=2),
            triton.Config({"BT": 32}, num_warps=4, num_stages=2),
            triton.Config({"BT": 128}, num_warps=8, num_stages=2)]


_PASS = _common.TunedLaunch(triton.autotune(
    configs=_pass_configs(), key=["D", "F", "ACT", "BWD", "FROM_Y", "FROM_DL", "SIZE"])(
        _pass_kernel),
    "projection_pass")


class _ProjectionPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, act, scale):
        w_c = w.contiguous()
        b_c = bias.contiguous() if bias is not None else None
        ctx.act, ctx.scale = act, scale
        ctx.dtypes = (w.dtype, None if bias is None else bias.dtype)
        y = _pass(_unit_last(x), w_c, b_c, act, scale)
        # the features: the attention kernels' node keeps them too, so this costs no memory
        ctx.save_for_backward(x, w_c, b_c, y if PASS_BWD_FROM_FEATURES else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w, bias, y = ctx.saved_tensors
        dx, dw, db = _pass(_unit_last(x), w, bias, ctx.act, ctx.scale, g=g.contiguous(),
                           feats=y)
        return dx, dw.to(ctx.dtypes[0]), (None if db is None else db.to(ctx.dtypes[1])), None, None


#: Hedgehog's softmax pair through its pass (large calls) as one autograd node with the
#: attention kernels: the chunked backward turns the features' gradients into the logits'
#: as it stores them (chunked._bwd_kernel's EPI_PAIR) and the pass's backward starts from
#: those (FROM_DL): the features' gradients ([B, H, T, 2F] for q and for k, written and
#: read back) become the logits' ([B, H, T, F]), and the pass no longer reads the features
#: (the dq sweep reads q's instead): ~1.6 of ~4.3 GB of the backward's traffic outside the
#: sweeps' own at B8 H16 T16384 D64 -> 128, and half the features' gradients' memory.
#: Off until timed on the GPU (session 15: built and tested under the interpreter only).
PAIR_EPILOGUE = False


def pair_epilogue_applies(form, q) -> bool:
    """Whether :func:`projection_pass_attention` takes this call (PAIR_EPILOGUE on, a
    softmax pair whose 2F features fill one key tile of the chunked backward, eager)."""
    from . import chunked as _chunked

    return bool(PAIR_EPILOGUE and ACTIVATIONS[form.activation][1] == 2
                and _chunked.pair_epilogue_fits(form.q_weight.shape[-1], q.dtype)
                and not _common.EAGER_CUSTOM_OP and not torch.compiler.is_compiling())


class _PairPassAttention(torch.autograd.Function):
    """projection pass (q, k) -> chunked forward; backward: chunked backward with EPI_PAIR
    (the logits' gradients), then the pass's backward from them (FROM_DL)."""

    @staticmethod
    def forward(ctx, q, k, v, wq, bq, wk, bk, kv0, z0, act, normalize, eps, scale,
                store_final, cu):
        from . import chunked as _chunked

        wq_c, bq_c, wk_c, bk_c = _weights_in(ctx, wq, bq, wk, bk)
        q, k = _unit_last(q), _unit_last(k)
        fq = _pass(q, wq_c, bq_c, act, scale)
        fk = _pass(k, wk_c, bk_c, act, 1.0)
        o, den, kvT, zT = _chunked._forward(fq, fk, v, normalize, eps, kv0, z0, store_final,
                                            cu_seqlens=cu)
        ctx.save_for_backward(q, k, v, fq, fk, wq_c, bq_c, wk_c, bk_c,
                              o if normalize else None, den, kv0, z0, cu)
        ctx.act, ctx.normalize, ctx.scale = act, normalize, scale
        ctx.set_materialize_grads(False)
        return o, kvT, zT

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dkvT, dzT):
        from . import chunked as _chunked

        q, k, v, fq, fk, wq, bq, wk, bk, o, den, kv0, z0, cu = ctx.saved_tensors
        if do is None:  # only the returned state is used
            do = torch.zeros(*fq.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        dlq, dlk, dv, dkv0, dz0 = _chunked._backward(
            fq, fk, v, o, den, kv0, z0, _unit_last(do), dkvT, dzT, ctx.normalize,
            cu_seqlens=cu, like_inputs=False, pair=True)
        dq, dwq, dbq = _pass(q, wq, bq, ctx.act, ctx.scale, g=dlq.contiguous(), from_dl=True)
        dk, dwk, dbk = _pass(k, wk, bk, ctx.act, 1.0, g=dlk.contiguous(), from_dl=True)
        return (dq, dk, dv, *_weight_grads(ctx, dwq, dbq, dwk, dbk), dkv0, dz0,
                None, None, None, None, None, None)


def projection_pass_attention(q, k, v, form, *, normalize: bool, eps: float,
                              scale: float = 1.0, initial_kv=None, initial_z=None,
                              return_state: bool = False, cu_seqlens=None):
    """The softmax-pair projection map (Hedgehog) by its Triton pass, then the chunked
    kernels on the features, as one autograd node (see PAIR_EPILOGUE; the call must pass
    :func:`pair_epilogue_applies`).  q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv];
    returns (o [B, H, T, Dv], kv, z) as :func:`projected_attention` does; inputs are not
    validated here (featattn.linear_attention does)."""
    B, H = q.shape[0], q.shape[1]
    if cu_seqlens is not None:
        B = cu_seqlens.shape[0] - 1
    DK = 2 * form.q_weight.shape[-1]
    kv0 = initial_kv.float().contiguous() if initial_kv is not None else None
    z0 = initial_z.float().contiguous() if initial_z is not None else None
    kv0, z0 = fill_state_half(normalize, kv0, z0, B, H, DK, v.shape[-1], q.device)
    o, kv, z = _PairPassAttention.apply(
        q, k, _unit_last(v), form.q_weight, form.q_bias, form.k_weight, form.k_bias, kv0, z0,
        form.activation, bool(normalize), float(eps), float(scale), bool(return_state),
        cu_seqlens)
    if not return_state:
        return o, None, None
    return o, kv, (z if normalize else None)


def projection_features(q, k, form, scale: float = 1.0):
    """(phi(scale * q), phi(k)) of a projection map as one Triton pass each (features
    [B, H, T, DK] in the input dtype; differentiable in q, k and the map's weights)."""
    why = projection_unsupported_reason(form, q.shape[-1], q.shape[1], k.shape[1])
    if why is not None:
        raise ValueError(f"projection_features: {why}; build the map for these heads "
                         "(heads=, kv_heads=, head_dim=) or pass backend='torch'")
    fq = _ProjectionPass.apply(q, form.q_weight, form.q_bias, form.activation, float(scale))
    fk = _ProjectionPass.apply(k, form.k_weight, form.k_bias, form.activation, 1.0)
    return fq, fk
