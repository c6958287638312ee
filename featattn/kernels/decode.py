"""The recurrent step: a few tokens (decoding, speculative or chunked) against a state.

Legend: B batch, H query heads, Hkv key/value heads (G = H // Hkv), T tokens (<= MAX_T),
d raw q/k head dim, Dk feature dim (d for elementwise maps, 1 + d + d^2 for Taylor), Dv value
dim.

One program per (batch, head) holds the head's whole state (fp32 [Dk, Dv] and z [Dk]) in
registers, walks the T tokens in order and, per token t (inclusive, as the chunked kernels)::

    S += phi(k_t)^T v_t;   z += phi(k_t)
    o_t = phi(q_t) S / (phi(q_t) . z + eps)        (numerator only without normalize)

then writes S and z back: into the same buffers (in place: each program owns its head's
state, so no other program reads what it overwrites) or into caller-given ones.  The map is
applied in registers to raw q/k: an elementwise map's Triton form (``phi(scale * q)``,
``phi(k)``), the Taylor map ``[1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]`` (in the layout of
:func:`featattn.feature_maps.taylor.taylor_features` and of every backend's state), or none.

No allocation when the output buffers are given, no host synchronisation, one fixed launch
config (no autotuning): a step can be captured in a CUDA graph and replayed.  Inference only
(no backward): the dispatcher takes it for calls with an initial state, T <= MAX_T and no
gradient, see featattn.dispatch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import maps as _maps
from ._common import alloc as _alloc
from ._common import empty_like_layout as _empty_like_layout
from ._common import batch_head, head_start, next_pow2

__all__ = ["recurrent_step", "recurrent_step_inplace", "MAX_T", "step_unsupported_reason",
           "hybrid_step", "hybrid_step_unsupported_reason", "HYBRID_MAX_DIM"]

#: the longest T the step kernel takes (longer calls are prefill: the chunked kernels)
MAX_T = 16
#: largest Dk (elementwise maps, no map), d (Taylor) and Dv the one-program-per-head state fits
MAX_DK, MAX_TAYLOR_D, MAX_DV, MAX_TAYLOR_DV = 128, 16, 128, 64


def step_unsupported_reason(kind: str, d: int, dv: int, T: int) -> Optional[str]:
    """None when the step kernel runs map ``kind`` ("none", "elementwise", "taylor") with raw
    q/k dim ``d``, value dim ``dv`` and T tokens, else why not."""
    if T > MAX_T:
        return f"T={T} is above the step kernel's {MAX_T} tokens (a prefill: chunked kernels)"
    if kind == "taylor":
        if d > MAX_TAYLOR_D or dv > MAX_TAYLOR_DV:
            return (f"the Taylor state [1 + d + d^2, Dv] with d={d}, Dv={dv} does not fit one "
                    f"program (d <= {MAX_TAYLOR_D}, Dv <= {MAX_TAYLOR_DV})")
        return None
    if d > MAX_DK or dv > MAX_DV:
        return f"the state [Dk={d}, Dv={dv}] does not fit one program (Dk, Dv <= {MAX_DK})"
    return None


@triton.jit
def _none_phi(x):
    return x


@triton.jit(do_not_specialize=["T"])
def _step_kernel(
    q, k, v, o, kv, z, kv_out, z_out,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, D, DK, DV, eps, scale, c1, c2,
    BD: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr, PHI: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_INIT: tl.constexpr, STORE: tl.constexpr,
):
    """Grid (B*H,).  MAP 0: q, k are features (Dk = D); 1: elementwise PHI on raw q/k
    (Dk = D); 2: Taylor on raw q/k (Dk = 1 + D + D*D, rows 0 | 1..D | 1+D+i*D+j).
    kv/kv_out fp32 [B*H, Dk, Dv] contiguous, z/z_out fp32 [B*H, Dk] (may alias)."""
    i_bh = tl.program_id(0)
    i_b, i_h, i_hk = batch_head(i_bh, H, G)
    q_base = head_start(q, i_b, i_h, sqb, sqh)
    k_base = head_start(k, i_b, i_hk, skb, skh)
    v_base = head_start(v, i_b, i_hk, svb, svh)
    o_base = head_start(o, i_b, i_h, sob, soh)
    st = i_bh.to(tl.int64) * DK * DV
    zt = i_bh.to(tl.int64) * DK

    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BV)
    md = offs_d < D
    mv = offs_v < DV
    m1 = md[:, None] & mv[None, :]
    if MAP == 2:
        row1 = 1 + offs_d                          # linear rows
        offs_p = tl.arange(0, BD * BD)
        pi = offs_p // BD
        pj = offs_p % BD
        mp = (pi < D) & (pj < D)
        row2 = 1 + D + pi * D + pj                 # quadratic rows, row-major (i, j)
        m2 = mp[:, None] & mv[None, :]
    else:
        row1 = offs_d

    S1 = tl.zeros([BD, BV], dtype=tl.float32)
    z1 = tl.zeros([BD], dtype=tl.float32)
    if MAP == 2:
        S0 = tl.zeros([BV], dtype=tl.float32)
        S2 = tl.zeros([BD * BD, BV], dtype=tl.float32)
        z0 = tl.zeros([1], dtype=tl.float32)
        z2 = tl.zeros([BD * BD], dtype=tl.float32)
    if HAS_INIT:
        S1 = tl.load(kv + st + row1[:, None] * DV + offs_v[None, :], mask=m1, other=0.0)
        if NORMALIZE:
            z1 = tl.load(z + zt + row1, mask=md, other=0.0)
        if MAP == 2:
            S0 = tl.load(kv + st + offs_v, mask=mv, other=0.0)
            S2 = tl.load(kv + st + row2[:, None] * DV + offs_v[None, :], mask=m2, other=0.0)
            if NORMALIZE:
                z0 = tl.load(z + zt + tl.arange(0, 1))
                z2 = tl.load(z + zt + row2, mask=mp, other=0.0)

    for t in range(0, T):
        xq = tl.load(q_base + t * sqt + offs_d, mask=md, other=0.0).to(tl.float32)
        xk = tl.load(k_base + t * skt + offs_d, mask=md, other=0.0).to(tl.float32)
        vv = tl.load(v_base + t * svt + offs_v, mask=mv, other=0.0).to(tl.float32)
        if MAP == 1:
            fq = tl.where(md, PHI(xq * scale), 0.0)
            fk = tl.where(md, PHI(xk), 0.0)
        elif MAP == 2:
            xq = xq * scale
            fq = xq * c1
            fk = xk * c1
        else:
            fq = xq
            fk = xk
        S1 += fk[:, None] * vv[None, :]
        num = tl.sum(fq[:, None] * S1, axis=0)
        if NORMALIZE:
            z1 += fk
            den = tl.sum(fq * z1, axis=0)
        if MAP == 2:
            fq2 = tl.reshape(xq[:, None] * xq[None, :], [BD * BD]) * c2
            fk2 = tl.reshape(xk[:, None] * xk[None, :], [BD * BD]) * c2
            S0 += vv
            S2 += fk2[:, None] * vv[None, :]
            num += S0 + tl.sum(fq2[:, None] * S2, axis=0)
            if NORMALIZE:
                z0 += 1.0
                z2 += fk2
                den += tl.sum(z0, axis=0) + tl.sum(fq2 * z2, axis=0)
        if NORMALIZE:
            num = num / (den + eps)
        tl.store(o_base + t * sot + offs_v, num.to(o.dtype.element_ty), mask=mv)

    if STORE:
        tl.store(kv_out + st + row1[:, None] * DV + offs_v[None, :], S1, mask=m1)
        if NORMALIZE:
            tl.store(z_out + zt + row1, z1, mask=md)
        if MAP == 2:
            tl.store(kv_out + st + offs_v, S0, mask=mv)
            tl.store(kv_out + st + row2[:, None] * DV + offs_v[None, :], S2, mask=m2)
            if NORMALIZE:
                tl.store(z_out + zt + tl.arange(0, 1), z0)
                tl.store(z_out + zt + row2, z2, mask=mp)


def recurrent_step(q, k, v, *, normalize: bool, eps: float, initial_kv=None, initial_z=None,
                   feature_map=None, scale: float = 1.0, taylor: bool = False,
                   kv_out=None, z_out=None, out=None, store_state: bool = True):
    """T <= MAX_T tokens of causal linear attention against a state, in one launch.

    Args:
        q: [B, H, T, d]; k: [B, Hkv, T, d]; v: [B, Hkv, T, Dv] (any strides with a unit last
            stride).  Raw q/k when ``feature_map`` (an elementwise map with a Triton form) or
            ``taylor`` is given, else features.
        normalize, eps: as in featattn.linear_attention.
        initial_kv: None (zeros) or fp32 [B, H, Dk, Dv] contiguous; initial_z: fp32 [B, H, Dk].
        scale: multiplies q before the map (maps only).
        kv_out, z_out: where the new state goes; pass ``initial_kv`` / ``initial_z`` themselves
            to update in place.  None: new buffers (only when ``store_state``).
        out: None, or a [B, H, T, Dv] tensor of q's dtype to write o into.

    Returns:
        (o, kv, z): o [B, H, T, Dv]; kv / z the new state (None without ``store_state``; z
        None without normalize).  Not differentiable.
    """
    B, H, T, d = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    Dk = 1 + d + d * d if taylor else d
    dev = q.device
    if out is None:
        out = _empty_like_layout(q, B, H, T, Dv, q.dtype)
    has_init = initial_kv is not None
    if store_state:
        if kv_out is None:
            kv_out = _alloc((B, H, Dk, Dv), torch.float32, dev)
        if normalize and z_out is None:
            z_out = _alloc((B, H, Dk), torch.float32, dev)
    if normalize and has_init and initial_z is None:
        raise ValueError("normalize=True with an initial state needs its z (initial_z)")
    phi, kind = _none_phi, 0
    if feature_map is not None:
        phi, kind = _maps.lookup(_maps.fused_key(feature_map))[1].phi, 1
    elif taylor:
        kind = 2
    c1 = d ** -0.25
    c2 = 1.0 / math.sqrt(2.0 * d)
    dummy = out
    _step_kernel[(B * H,)](
        q, k, v, out,
        initial_kv if has_init else dummy, initial_z if (has_init and normalize) else dummy,
        kv_out if store_state else dummy, z_out if (store_state and normalize) else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T, H, H // Hkv, d, Dk, Dv, eps, scale, c1, c2,
        BD=max(16, next_pow2(d)), BV=max(16, next_pow2(Dv)), MAP=kind, PHI=phi,
        NORMALIZE=normalize, HAS_INIT=has_init, STORE=store_state,
        # Taylor's state, or a [128, 128] one: 8 warps (at 4 the latter spilled 40 bytes a
        # thread offline, sm_90a; 64-wide states keep 4, as timed)
        num_warps=8 if taylor or max(16, next_pow2(d)) * max(16, next_pow2(Dv)) > 64 * 128
        else 4,
    )
    if not store_state:
        return out, None, None
    return out, kv_out, (z_out if normalize else None)


# --------------------------------------------------------------------------- hybrid step
@triton.jit
def _window_rows(a, b, c, P, NC, sa, sb, offs, m):
    """Rows ``c`` ([BW] indices) of the concatenation C = [a (P rows); b], masked to
    ``m`` (columns) and to 0 <= c < NC: a tile [BW, BD] in the inputs' dtype."""
    ina = (c >= 0) & (c < P)
    inb = (c >= P) & (c < NC)
    x = tl.load(a + c[:, None] * sa + offs[None, :], mask=ina[:, None] & m[None, :], other=0.0)
    x += tl.load(b + (c - P)[:, None] * sb + offs[None, :], mask=inb[:, None] & m[None, :],
                 other=0.0)
    return x


@triton.jit
def _window_row(a, b, c, P, sa, sb, offs, m):
    """Row ``c`` (a scalar index below P + T) of C = [a (P rows); b]: [BD] fp32."""
    x = tl.load(a + c * sa + offs, mask=m & (offs * 0 + c < P), other=0.0).to(tl.float32)
    x += tl.load(b + (c - P) * sb + offs, mask=m & (offs * 0 + c >= P), other=0.0).to(tl.float32)
    return x


@triton.jit(do_not_specialize=["T", "P", "E"])
def _hybrid_step_kernel(
    q, k, v, wk, wv, fq, fke, o, kv, z, kv_out, z_out, wk_out, wv_out, fw,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, swkb, swkh, swkt, swvb, swvh, swvt,
    sfqb, sfqh, sfqt, sfkb, sfkh, sfkt, sob, soh, sot, swob, swoh, swot, swvob, swvoh, swvot,
    T, P, E, W, H, HKV, G, D, DK, DV, eps, scale, wscale, f_val,
    BD: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
    FEATS: tl.constexpr, PHI: tl.constexpr, F_PTR: tl.constexpr, MODE: tl.constexpr,
):
    """T <= MAX_T tokens of the hybrid layer against a windowed state.  MODE 0: grid
    (B*Hkv,), a program does a k/v head's G query heads in turn, then moves their window;
    MODE 1: grid (B*H,), one query head each (the window read, not moved); MODE 2: grid
    (B*Hkv,), the window's move alone (after a MODE 1 launch: in place, the move must wait
    for every head of the group to have read the window).

    C = [the P window rows (wk / wv: [B,Hkv,P,D] / [.., Dv]); the T new rows (k / v)]:
    query j (position P + j of C) takes the softmax over C rows (P + j - W, P + j] and the
    linear part over kv / z (fp32 [B*H, Dk, Dv] / [B*H, Dk], the rows before C) plus C rows
    <= P + j - W, folded into the state as they leave the window; the new state is kv / z
    over C rows < E = max(0, P + T - W) and the window C rows E .. P + T - 1, written to
    wk_out / wv_out from row 0 (they may be wk / wv themselves: in place, P + T - E = P).
    Features: PHI(scale * q), PHI(k) in fp32 (PHI the identity without a map), or, FEATS,
    given: fq [B,H,T,Dk] and fke [B,Hkv,E,Dk] (the keys that leave the window).  f: the
    weight of the softmax part, per head (F_PTR: fp32 [H]) or f_val."""
    pid = tl.program_id(0)
    if MODE == 1:
        i_b = (pid // H).to(tl.int64)
        i_h0 = (pid % H).to(tl.int64)
        i_hk = i_h0 // G
        NH = 1
    else:
        i_b = (pid // HKV).to(tl.int64)
        i_hk = (pid % HKV).to(tl.int64)
        i_h0 = i_hk * G
        NH = G
    k_base = head_start(k, i_b, i_hk, skb, skh)
    v_base = head_start(v, i_b, i_hk, svb, svh)
    wk_base = head_start(wk, i_b, i_hk, swkb, swkh)
    wv_base = head_start(wv, i_b, i_hk, swvb, swvh)
    offs_d = tl.arange(0, BD)
    offs_f = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    offs_w = tl.arange(0, BW)
    md = offs_d < D
    mf = offs_f < DK
    mv = offs_v < DV
    NC = P + T
    if MODE != 2:  # the attention: o and the linear state
        for g in range(0, NH):
            i_h = i_h0 + g
            row = i_b * H + i_h
            q_base = head_start(q, i_b, i_h, sqb, sqh)
            o_base = head_start(o, i_b, i_h, sob, soh)
            S = tl.load(kv + row * DK * DV + offs_f[:, None] * DV + offs_v[None, :],
                        mask=mf[:, None] & mv[None, :], other=0.0)
            zz = tl.load(z + row * DK + offs_f, mask=mf, other=0.0)
            if F_PTR:
                f = tl.load(fw + i_h)
            else:
                f = f_val
            for j in range(0, T):
                pos = P + j
                lo = tl.maximum(pos - W + 1, 0)  # the window's first row; rows before it are linear
                # the rows leaving the window at this query: [the previous query's lo, lo),
                # which is [max(pos - W, 0), lo) since P <= W (query 0 has lo <= 1).  (Not a
                # bound carried from the previous query: compiled for the GPU, Triton 3.6 did
                # not carry a reassigned loop bound into the next iteration, so every query
                # folded from row 0 again; the interpreter ran it right.)
                for cf in range(tl.maximum(pos - W, 0), lo):  # (names apart from the tiles')
                    if FEATS:
                        fk = tl.load(fke + i_b * sfkb + i_hk * sfkh + cf * sfkt + offs_f,
                                     mask=mf, other=0.0).to(tl.float32)
                    else:
                        fk = tl.where(mf, PHI(_window_row(wk_base, k_base, cf, P, swkt, skt,
                                                          offs_f, mf)), 0.0)
                    vc = _window_row(wv_base, v_base, cf, P, swvt, svt, offs_v, mv)
                    S += fk[:, None] * vc[None, :]
                    zz += fk
                xq = tl.load(q_base + j * sqt + offs_d, mask=md, other=0.0).to(tl.float32)
                if FEATS:
                    fq_ = tl.load(fq + i_b * sfqb + i_h * sfqh + j * sfqt + offs_f,
                                  mask=mf, other=0.0).to(tl.float32)
                else:
                    fq_ = tl.where(mf, PHI(xq * scale), 0.0)
                num_l = tl.sum(fq_[:, None] * S, axis=0)
                den_l = tl.sum(fq_ * zz, axis=0)
                # the window, flash-style over blocks of BW rows: m, l, acc
                m = tl.max(tl.full([BW], float("-inf"), tl.float32), axis=0)
                l_ = tl.sum(tl.zeros([BW], dtype=tl.float32), axis=0)
                acc = tl.zeros([BV], dtype=tl.float32)
                for c0 in range(lo, pos + 1, BW):
                    c = c0 + offs_w
                    ok = c <= pos
                    kt = _window_rows(wk_base, k_base, c, P, NC, swkt, skt, offs_d, md)
                    a = tl.sum(kt.to(tl.float32) * xq[None, :], axis=1) * wscale
                    a = tl.where(ok, a, float("-inf"))
                    m_new = tl.maximum(m, tl.max(a, axis=0))
                    alpha = tl.exp(m - m_new)
                    p = tl.where(ok, tl.exp(a - m_new), 0.0)
                    vt = _window_rows(wv_base, v_base, c, P, NC, swvt, svt, offs_v, mv)
                    l_ = l_ * alpha + tl.sum(p, axis=0)
                    acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
                    m = m_new
                out = (f * acc + (1.0 - f) * num_l) / (f * l_ + (1.0 - f) * den_l + eps)
                tl.store(o_base + j * sot + offs_v, out.to(o.dtype.element_ty), mask=mv)
            tl.store(kv_out + row * DK * DV + offs_f[:, None] * DV + offs_v[None, :], S,
                     mask=mf[:, None] & mv[None, :])
            tl.store(z_out + row * DK + offs_f, zz, mask=mf)
    if MODE != 1:
        # the new window: C rows E .. P + T - 1 to rows 0 .. of wk_out / wv_out.  In place the
        # rows move towards 0: each block reads rows at or after those it writes, all of them
        # (and the compute above) before the barrier, and no later block reads what it wrote.
        wko = head_start(wk_out, i_b, i_hk, swob, swoh)
        wvo = head_start(wv_out, i_b, i_hk, swvob, swvoh)
        for r0 in range(0, NC - E, BW):
            r = r0 + offs_w
            keep = r < NC - E
            kt = _window_rows(wk_base, k_base, r + E, P, NC, swkt, skt, offs_d, md)
            vt = _window_rows(wv_base, v_base, r + E, P, NC, swvt, svt, offs_v, mv)
            tl.debug_barrier()
            tl.store(wko + r[:, None] * swot + offs_d[None, :], kt, mask=keep[:, None] & md[None, :])
            tl.store(wvo + r[:, None] * swvot + offs_v[None, :], vt, mask=keep[:, None] & mv[None, :])


#: the largest Dqk, Dk and Dv the hybrid step holds (its state [Dk, Dv] in one program)
HYBRID_MAX_DIM = 128


def hybrid_step_unsupported_reason(dqk: int, dk: int, dv: int, T: int) -> Optional[str]:
    """None when the hybrid step kernel runs these dims and T tokens, else why not."""
    if T > MAX_T:
        return f"T={T} is above the step kernel's {MAX_T} tokens (a prefill: chunked kernels)"
    if max(dqk, dk, dv) > HYBRID_MAX_DIM:
        return (f"the hybrid step holds q/k rows of {dqk}, a state [Dk={dk}, Dv={dv}] in one "
                f"program (each at most {HYBRID_MAX_DIM})")
    return None


def hybrid_step(q, k, v, kv, z, window_k, window_v, *, window: int, weight, window_scale: float,
                eps: float, feature_map=None, scale: float = 1.0, fq=None, fk_evict=None,
                kv_out=None, z_out=None, window_k_out=None, window_v_out=None, out=None):
    """T <= MAX_T tokens of the hybrid layer (a softmax over the last ``window`` keys plus
    linear attention before them, one denominator; featattn/hybrid.py) against a windowed
    state, in one launch: decoding.

    Args:
        q: [B, H, T, Dqk] raw queries; k: [B, Hkv, T, Dqk]; v: [B, Hkv, T, Dv] (unit last
            stride).
        kv, z: the linear state, fp32 [B, H, Dk, Dv] / [B, H, Dk] contiguous (the tokens
            before the window).
        window_k, window_v: [B, Hkv, P, Dqk] / [B, Hkv, P, Dv] (unit last stride), the last
            P <= window raw keys and values, q's dtype, or None (P = 0).
        weight: the softmax part's f, a float or fp32 [H]; window_scale: its logit scale.
        feature_map: an elementwise map with a Triton form applied here to ``scale * q`` and
            to k, or None: then ``fq`` [B, H, T, Dk] (the features of ``scale * q``) and
            ``fk_evict`` [B, Hkv, E, Dk] (those of the E = max(0, P + T - window) keys
            leaving the window, C rows 0 .. E - 1 of C = [window_k; k]) may be given (a map
            computed by the caller); neither given: the features are ``scale * q`` and k.
        kv_out, z_out, window_k_out, window_v_out: where the new state goes (kv, z, window_k,
            window_v themselves update in place; the window's only when it keeps its length,
            P = window); None: new tensors.  out: None or [B, H, T, Dv] of q's dtype.

    Returns:
        (o [B, H, T, Dv], kv, z, window_k, window_v): the new state's window holds
        min(window, P + T) rows.  Not differentiable.
    """
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    Dk = kv.shape[2]
    P = 0 if window_k is None else window_k.shape[2]
    E = max(0, P + T - window)
    Pn = P + T - E
    dev = q.device
    feats = fq is not None
    if H % Hkv or tuple(k.shape) != (B, Hkv, T, D) or tuple(v.shape[:3]) != (B, Hkv, T):
        raise ValueError(f"hybrid_step: q [B, H, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv] "
                         f"with H a multiple of Hkv, got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    if (window_k is None) != (window_v is None) or (window_k is not None and (
            tuple(window_k.shape) != (B, Hkv, P, D) or tuple(window_v.shape) != (B, Hkv, P, Dv))):
        got = [None if t is None else list(t.shape) for t in (window_k, window_v)]
        raise ValueError(f"hybrid_step: window_k / window_v must be [B, Hkv, P, D] / [B, Hkv, "
                         f"P, Dv] = [{B}, {Hkv}, P, {D}] / [.., {Dv}] (or both None), got {got}")
    if P > window or window < 1:
        raise ValueError(f"hybrid_step: the window holds at most window = {window} >= 1 keys, "
                         f"got window_k with {P} rows")
    if tuple(kv.shape) != (B, H, Dk, Dv) or tuple(z.shape) != (B, H, Dk):
        raise ValueError(f"hybrid_step: kv / z must be [B, H, Dk, Dv] / [B, H, Dk] = "
                         f"{[B, H, Dk, Dv]} / {[B, H, Dk]}, got {list(kv.shape)} / "
                         f"{list(z.shape)}")
    if not feats and Dk != D:
        raise ValueError(f"hybrid_step: without fq the features are the (elementwise) map of "
                         f"q and k or q and k themselves, of their head dim: kv must be "
                         f"[B, H, {D}, Dv] for D = {D}, got Dk = {Dk} (or give fq / fk_evict)")
    if window_k is not None and (window_k.dtype != k.dtype or window_v.dtype != v.dtype):
        raise ValueError(f"hybrid_step: window_k / window_v must have k / v's dtypes "
                         f"({k.dtype} / {v.dtype}), got {window_k.dtype} / {window_v.dtype}")
    if feats and tuple(fq.shape) != (B, H, T, Dk) or (
            fk_evict is not None and tuple(fk_evict.shape) != (B, Hkv, E, Dk)):
        got = [None if t is None else list(t.shape) for t in (fq, fk_evict)]
        raise ValueError(f"hybrid_step: fq / fk_evict must be [B, H, T, Dk] = {[B, H, T, Dk]} / "
                         f"[B, Hkv, E, Dk] = {[B, Hkv, E, Dk]}, got {got}")
    if isinstance(weight, torch.Tensor) and (tuple(weight.shape) != (H,) or weight.device != dev
                                             or weight.dtype != torch.float32):
        raise ValueError(f"hybrid_step: weight as a tensor must be fp32 [H] = [{H}] on {dev}, "
                         f"got {list(weight.shape)} {weight.dtype} on {weight.device}")
    if (fk_evict is not None and not feats) or (feats and E and fk_evict is None):
        raise ValueError("hybrid_step: give fq and fk_evict together (fk_evict may be None "
                         "only when no key leaves the window)")
    if out is None:
        out = _empty_like_layout(q, B, H, T, Dv, q.dtype)
    kv_out = _alloc((B, H, Dk, Dv), torch.float32, dev) if kv_out is None else kv_out
    z_out = _alloc((B, H, Dk), torch.float32, dev) if z_out is None else z_out
    if window_k_out is None:
        window_k_out = torch.empty(B, Hkv, Pn, D, dtype=k.dtype, device=dev)
    if window_v_out is None:
        window_v_out = torch.empty(B, Hkv, Pn, Dv, dtype=v.dtype, device=dev)
    if (window_k_out is window_k or window_v_out is window_v) and Pn != P:
        raise ValueError(f"hybrid_step: the window grows from {P} to {Pn} rows, so it cannot "
                         f"be updated in place")
    want = {"out": ((B, H, T, Dv), q.dtype), "kv_out": ((B, H, Dk, Dv), torch.float32),
            "z_out": ((B, H, Dk), torch.float32), "window_k_out": ((B, Hkv, Pn, D), k.dtype),
            "window_v_out": ((B, Hkv, Pn, Dv), v.dtype)}
    given = {"out": out, "kv_out": kv_out, "z_out": z_out, "window_k_out": window_k_out,
             "window_v_out": window_v_out}
    for name, t in given.items():
        if tuple(t.shape) != want[name][0] or t.dtype != want[name][1] or t.stride(-1) != 1:
            raise ValueError(f"hybrid_step: {name} must be {list(want[name][0])} "
                             f"{want[name][1]} with a unit last stride, got "
                             f"{list(t.shape)} {t.dtype} strides {t.stride()}")
    for name, t in (("kv", kv), ("z", z), ("kv_out", kv_out), ("z_out", z_out)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"hybrid_step: {name} must be fp32 and contiguous (the state), "
                             f"got {t.dtype}, strides {t.stride()}")
    for name, t in (("q", q), ("k", k), ("v", v), ("window_k", window_k),
                    ("window_v", window_v), ("fq", fq), ("fk_evict", fk_evict)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"hybrid_step: {name} must have a unit last stride (e.g. "
                             f".contiguous()), got strides {t.stride()}")
    wk = window_k if P else k
    wv = window_v if P else v
    phi = _none_phi
    if feature_map is not None:
        phi = _maps.lookup(_maps.fused_key(feature_map))[1].phi
    f_ptr = isinstance(weight, torch.Tensor)
    BK, BV = max(16, next_pow2(Dk)), max(16, next_pow2(Dv))
    fqt = fq if feats else q
    fke = fk_evict if (feats and E) else fqt
    args = (
        q, k, v, wk, wv, fqt, fke, out, kv, z, kv_out, z_out, window_k_out, window_v_out,
        weight if f_ptr else out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), wk.stride(0), wk.stride(1), wk.stride(2),
        wv.stride(0), wv.stride(1), wv.stride(2), fqt.stride(0), fqt.stride(1), fqt.stride(2),
        fke.stride(0), fke.stride(1), fke.stride(2), out.stride(0), out.stride(1), out.stride(2),
        window_k_out.stride(0), window_k_out.stride(1), window_k_out.stride(2),
        window_v_out.stride(0), window_v_out.stride(1), window_v_out.stride(2),
        T, P, E, window, H, Hkv, H // Hkv, D, Dk, Dv, eps, scale, window_scale,
        0.0 if f_ptr else float(weight),
    )
    meta = dict(
        BD=max(16, next_pow2(D)), BK=BK, BV=BV,
        BW=max(16, min(64, next_pow2(min(window, P + T)))), FEATS=feats, PHI=phi, F_PTR=f_ptr,
        # a [128, 128] state: 8 warps (4 spill 400 bytes a thread offline, sm_90a)
        num_warps=8 if BK * BV > 64 * 128 else 4,
    )
    if H == Hkv:  # one query head a k/v head: one launch, the move in the same program
        _hybrid_step_kernel[(B * Hkv,)](*args, MODE=0, **meta)
    else:  # grouped heads: a program a query head, then the window's move
        _hybrid_step_kernel[(B * H,)](*args, MODE=1, **meta)
        _hybrid_step_kernel[(B * Hkv,)](*args, MODE=2, **meta)
    return out, kv_out, z_out, window_k_out, window_v_out


@torch.library.custom_op("featattn::hybrid_step", mutates_args=())
def _hybrid_step_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, z: torch.Tensor,
    window_k: Optional[torch.Tensor], window_v: Optional[torch.Tensor], window: int,
    weight: Optional[torch.Tensor], weight_val: float, window_scale: float, eps: float,
    fmap: str, scale: float, fq: Optional[torch.Tensor], fk_evict: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fm = _maps.lookup(fmap)[0] if fmap else None
    return hybrid_step(q, k, v, kv, z, window_k, window_v, window=window,
                       weight=weight if weight is not None else weight_val,
                       window_scale=window_scale, eps=eps, feature_map=fm, scale=scale, fq=fq,
                       fk_evict=fk_evict)


@_hybrid_step_op.register_fake
def _(q, k, v, kv, z, window_k, window_v, window, weight, weight_val, window_scale, eps, fmap,
      scale, fq, fk_evict):
    B, H, T, D = q.shape
    Hkv, Dv, Dk = k.shape[1], v.shape[-1], kv.shape[2]
    Pn = min(window, (0 if window_k is None else window_k.shape[2]) + T)
    f32 = dict(dtype=torch.float32, device=q.device)
    return (_empty_like_layout(q, B, H, T, Dv, q.dtype, poison=False),
            torch.empty((B, H, Dk, Dv), **f32), torch.empty((B, H, Dk), **f32),
            torch.empty((B, Hkv, Pn, D), dtype=k.dtype, device=q.device),
            torch.empty((B, Hkv, Pn, Dv), dtype=v.dtype, device=q.device))


def hybrid_step_compiled(q, k, v, kv, z, window_k, window_v, *, window: int, weight,
                         window_scale: float, eps: float, feature_map=None, scale: float = 1.0,
                         fq=None, fk_evict=None):
    """:func:`hybrid_step` (new tensors out) as the custom op ``featattn::hybrid_step``, which
    torch.compile keeps as one opaque node (it cannot trace the launch, whose map is a
    constexpr ``@triton.jit`` function); decode_step then copies the new state into the
    caller's tensors."""
    fmap = "" if feature_map is None else _maps.fused_key(feature_map)
    f_t = weight if isinstance(weight, torch.Tensor) else None
    return _hybrid_step_op(q, k, v, kv, z, window_k, window_v, int(window), f_t,
                           0.0 if f_t is not None else float(weight), float(window_scale),
                           float(eps), fmap, float(scale), fq, fk_evict)


@torch.library.custom_op("featattn::recurrent_step_", mutates_args=("kv", "z", "out"))
def _step_inplace_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor,
    z: Optional[torch.Tensor], out: torch.Tensor, normalize: bool, eps: float, fmap: str,
    scale: float, taylor: bool,
) -> None:
    fm = _maps.lookup(fmap)[0] if fmap else None
    recurrent_step(q, k, v, normalize=normalize, eps=eps, initial_kv=kv, initial_z=z,
                   feature_map=fm, scale=scale, taylor=taylor, kv_out=kv, z_out=z, out=out)


@_step_inplace_op.register_fake
def _(q, k, v, kv, z, out, normalize, eps, fmap, scale, taylor):
    return None


def recurrent_step_inplace(q, k, v, kv, z, out, *, normalize: bool, eps: float,
                           feature_map=None, scale: float = 1.0, taylor: bool = False) -> None:
    """:func:`recurrent_step` updating ``kv`` / ``z`` (fp32, contiguous) in place and writing
    ``out``, as the custom op ``featattn::recurrent_step_``: torch.compile keeps it as one
    opaque node that mutates those three buffers (it cannot trace the launch itself, whose
    map is a constexpr ``@triton.jit`` function), so a compiled decoding step, CUDA graphs
    included, runs the same kernel as an eager one."""
    fmap = "" if feature_map is None else _maps.fused_key(feature_map)
    _step_inplace_op(q, k, v, kv, z, out, normalize, float(eps), fmap, float(scale), taylor)
