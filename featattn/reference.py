"""Torch-only oracles: the quadratic masked form and the token-by-token recurrent form.

Both take *features* (the feature map already applied) and share the signature of every
backend::

    o, kv, z = fn(q, k, v, *, normalize, eps, initial_kv=None, initial_z=None, return_state=False)

    q: [B, H, T, Dk]     k: [B, Hkv, T, Dk]     v: [B, Hkv, T, Dv]     (Hkv divides H)
    initial_kv: [B, H, Dk, Dv]    initial_z: [B, H, Dk]
    o: [B, H, T, Dv] in q.dtype; kv, z: the final state (None unless return_state)

They compute in float64 when given float64 and in fp32 otherwise.  They are slow on purpose
(O(T^2) memory for the quadratic form, a Python loop over T for the recurrent one): they
exist to be obviously right, and every test compares against them.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["quadratic_linear_attention", "recurrent_linear_attention", "quadratic_hybrid_attention"]


def no_autocast(fn):
    """Run ``fn`` with autocast off, so its casts to the compute dtype hold (the oracle's own
    copy of featattn.state.no_autocast)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32.  The oracle's own copy of the rule
    (featattn.state.compute_dtype): it imports nothing of the package it checks."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def _expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


@no_autocast
def quadratic_linear_attention(
    q, k, v, *, normalize, eps, initial_kv=None, initial_z=None, return_state=False,
    causal=True,
):
    """O(T^2) masked form: ``o = tril(q k^T) v (+ q kv0)``, divided by the row sums
    (``causal=False``: every query reads every key, no ``tril``)."""
    B, H, T, Dk = q.shape
    cd = _compute_dtype(q, k, v, initial_kv, initial_z)
    qf = q.to(cd)
    kf = _expand_kv_heads(k.to(cd), H)
    vf = _expand_kv_heads(v.to(cd), H)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        mask = mask.tril()
    scores = (qf @ kf.transpose(-1, -2)).masked_fill(~mask, 0.0)  # [B, H, T, T]
    num = scores @ vf
    if initial_kv is not None:
        num = num + qf @ initial_kv.to(cd)
    out = num
    if normalize:
        den = scores.sum(-1)
        if initial_z is not None:
            den = den + (qf @ initial_z.to(cd).unsqueeze(-1)).squeeze(-1)
        out = num / (den + eps).unsqueeze(-1)
    kv = z = None
    if return_state:
        kv = kf.transpose(-1, -2) @ vf
        if initial_kv is not None:
            kv = kv + initial_kv.to(cd)
        if normalize:
            z = kf.sum(-2)
            if initial_z is not None:
                z = z + initial_z.to(cd)
    return out.to(q.dtype), kv, z


@no_autocast
def recurrent_linear_attention(
    q, k, v, *, normalize, eps, initial_kv=None, initial_z=None, return_state=False
):
    """Token-by-token recurrence: ``kv += k_t^T v_t; z += k_t; o_t = q_t kv / (q_t . z + eps)``.

    This is exactly what one decoding step does.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    cd = _compute_dtype(q, k, v, initial_kv, initial_z)
    qf = q.to(cd)
    kf = _expand_kv_heads(k.to(cd), H)
    vf = _expand_kv_heads(v.to(cd), H)
    kv = initial_kv.to(cd) if initial_kv is not None else q.new_zeros(B, H, Dk, Dv, dtype=cd)
    z = initial_z.to(cd) if initial_z is not None else q.new_zeros(B, H, Dk, dtype=cd)
    outs = []
    for t in range(T):
        kt, vt, qt = kf[:, :, t], vf[:, :, t], qf[:, :, t]
        kv = kv + kt.unsqueeze(-1) * vt.unsqueeze(-2)
        num = (qt.unsqueeze(-2) @ kv).squeeze(-2)
        if normalize:
            z = z + kt
            num = num / ((qt * z).sum(-1, keepdim=True) + eps)
        outs.append(num)
    out = torch.stack(outs, dim=2).to(q.dtype)
    if not return_state:
        return out, None, None
    return out, kv, (z if normalize else None)


@no_autocast
def quadratic_hybrid_attention(
    q, k, v, fq, fk, *, window, weight, scale, eps, initial_kv=None, initial_z=None,
    return_state=False,
):
    """O(T^2) masked form of the hybrid layer (LoLCATs): a softmax over the last ``window``
    keys and linear attention over every older key, under one denominator.

    ``q [B, H, T, Dqk]`` raw queries and ``fq [B, H, T, Dk]`` their features are the last T of
    N positions; ``k [B, Hkv, N, Dqk]``, ``fk [B, Hkv, N, Dk]`` and ``v [B, Hkv, N, Dv]`` hold
    all N (the first N - T are earlier tokens still inside the window).  ``weight``: f in
    (0, 1), a float or ``[H]``.  ``initial_kv`` / ``initial_z`` summarise tokens before the N
    (all older than any window).  For query t, window ``S_t = {t - W < s <= t}``, linear part
    ``L_t = {s <= t - W}``, ``a_ts = scale * q_t . k_s``, ``m_t = max_{S_t} a_ts``::

        num_t = f sum_{S_t} exp(a_ts - m_t) v_s + (1 - f) (sum_{L_t} (fq_t . fk_s) v_s + fq_t kv0)
        den_t = f sum_{S_t} exp(a_ts - m_t)     + (1 - f) (sum_{L_t} fq_t . fk_s + fq_t . z0)
        o_t   = num_t / (den_t + eps)

    Returns ``(o, kv, z)``: the state over the positions older than the last ``window``
    (plus the initial one) when ``return_state``, else None.
    """
    B, H, T, _ = q.shape
    N = k.shape[2]
    cd = _compute_dtype(q, k, v, fq, fk, initial_kv, initial_z)
    qf, fqf = q.to(cd), fq.to(cd)
    kf, vf, fkf = (_expand_kv_heads(x.to(cd), H) for x in (k, v, fk))
    t = torch.arange(N - T, N, device=q.device)[:, None]
    s = torch.arange(N, device=q.device)[None, :]
    in_window = (s <= t) & (s > t - window)
    linear = s <= t - window
    a = scale * (qf @ kf.transpose(-1, -2))  # [B, H, T, N]
    a = a.masked_fill(~in_window, float("-inf"))
    m = a.amax(-1, keepdim=True)
    e = torch.exp(a - m)  # exactly 0 outside the window
    f = torch.as_tensor(weight, dtype=cd, device=q.device)
    f = f.view(1, -1, 1, 1) if f.dim() == 1 else f
    lin = (fqf @ fkf.transpose(-1, -2)).masked_fill(~linear, 0.0)
    lin_num, lin_den = lin @ vf, lin.sum(-1, keepdim=True)
    if initial_kv is not None:
        lin_num = lin_num + fqf @ initial_kv.to(cd)
        lin_den = lin_den + fqf @ initial_z.to(cd).unsqueeze(-1)
    num = f * (e @ vf) + (1 - f) * lin_num
    den = f * e.sum(-1, keepdim=True) + (1 - f) * lin_den
    out = (num / (den + eps)).to(q.dtype)
    if not return_state:
        return out, None, None
    old = max(N - window, 0)
    if torch.compiler.is_compiling():  # (see featattn.hybrid: an Inductor miscompile)
        fkf = torch.where(torch.arange(N, device=fkf.device)[:, None] < old, fkf, 0.0)
        kv, z = fkf.transpose(-1, -2) @ vf, fkf.sum(-2)
    else:
        kv = fkf[:, :, :old].transpose(-1, -2) @ vf[:, :, :old]
        z = fkf[:, :, :old].sum(-2)
    if initial_kv is not None:
        kv, z = kv + initial_kv.to(cd), z + initial_z.to(cd)
    return out, kv, z
