"""The hybrid layer's chunked PyTorch path: a softmax over the last ``window`` keys plus linear
attention over every older key, under one shared denominator (LoLCATs, Zhang et al. 2024).

For query t, window ``S_t = {t - W < s <= t}``, linear part ``L_t = {s <= t - W}``,
``a_ts = scale * q_t . k_s`` and ``m_t = max_{S_t} a_ts``::

    num_t = f sum_{S_t} exp(a_ts - m_t) v_s + (1 - f) sum_{L_t} (phi(q_t) . phi(k_s)) v_s
    den_t = f sum_{S_t} exp(a_ts - m_t)     + (1 - f) sum_{L_t} phi(q_t) . phi(k_s)
    o_t   = num_t / (den_t + eps)

(``m_t`` takes part in the gradient, as in LoLCATs' code.)  The float64 oracle is
:func:`featattn.reference.quadratic_hybrid_attention`; this path computes the same in blocks
of C = max(W, 64) tokens: a query block meets the keys of its own block and the one before
(the window and the youngest linear keys, by two masks) and the state of every block before
those.  O(T C) time and memory, differentiable by autograd.
"""

from __future__ import annotations

import torch

from .state import compute_dtype, no_autocast

__all__ = ["chunked_hybrid_attention"]

#: the shortest block: a window of a few tokens still takes blocks of this many (blocks of W
#: would hold T / W block states of Dk x Dv: W = 1, T = 8192, D = 64 took 818 MB)
MIN_BLOCK = 64


def _expand(x: torch.Tensor, H: int) -> torch.Tensor:
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _blocks(x: torch.Tensor, front: int, back: int, C: int) -> torch.Tensor:
    """[B, H, L, D] padded with ``front`` zero rows before and ``back`` after, as
    [B, H, NB, C, D]."""
    if front or back:
        x = torch.nn.functional.pad(x, (0, 0, front, back))
    return x.unflatten(2, (-1, C))


def _previous(xb: torch.Tensor) -> torch.Tensor:
    """Block n - 1 at index n (zeros at 0)."""
    return torch.cat([torch.zeros_like(xb[:, :, :1]), xb[:, :, :-1]], dim=2)


@no_autocast
def chunked_hybrid_attention(
    q, k, v, fq, fk, *, window, weight, scale, eps, initial_kv=None, initial_z=None,
    return_state=False,
):
    """Same signature and result as :func:`featattn.reference.quadratic_hybrid_attention`:
    ``q [B, H, T, Dqk]`` / ``fq [B, H, T, Dk]`` are the last T of the N positions of
    ``k [B, Hkv, N, Dqk]``, ``fk [B, Hkv, N, Dk]``, ``v [B, Hkv, N, Dv]``; returns
    ``(o [B, H, T, Dv], kv, z)`` with the state over all but the last ``window`` positions
    when ``return_state``."""
    B, H, T, _ = q.shape
    N = k.shape[2]
    W = int(window)
    C = max(W, MIN_BLOCK)  # a query's window lies in its block and the one before (C >= W)
    cd = compute_dtype(q, k, v, fq, fk, initial_kv, initial_z)
    kx, vx, fkx = (_expand(x.to(cd), H) for x in (k, v, fk))
    back = -N % C
    qb = _blocks(q.to(cd), N - T, back, C)  # queries only at the last T positions
    fqb = _blocks(fq.to(cd), N - T, back, C)
    kb, vb, fkb = (_blocks(x, 0, back, C) for x in (kx, vx, fkx))
    NB = kb.shape[2]
    dev = q.device

    # the softmax window over blocks n - 1 and n: key offset d (from block n's start, -C..C-1)
    # with i - W < d <= i for the query at offset i
    i = torch.arange(C, device=dev)[:, None]
    d = torch.arange(2 * C, device=dev)[None, :] - C
    win = (d <= i) & (d > i - W)  # [C, 2C]
    first = win & (d >= 0)  # block 0 has no block before it
    win = torch.stack([first] + [win] * (NB - 1)) if NB > 1 else first[None]  # [NB, C, 2C]
    kcat = torch.cat([_previous(kb), kb], dim=3)
    vcat = torch.cat([_previous(vb), vb], dim=3)
    a = scale * (qb @ kcat.transpose(-1, -2))  # [B, H, NB, C, 2C]
    a = a.masked_fill(~win, float("-inf"))
    m = a.amax(-1, keepdim=True)
    e = torch.exp(a - m)
    win_num, win_den = e @ vcat, e.sum(-1, keepdim=True)

    # the linear part: the keys of blocks n - 1 and n at offsets d <= i - W, and the blocks
    # before those as a state (C == W: block n - 1's alone, at offsets j <= i)
    # (intra [B, H, NB, C, C or 2C]: the linear scores of those keys; v_lin their values)
    fk_prev = _previous(fkb)
    if C == W:  # block n - 1's offsets d + C <= i
        intra = (fqb @ fk_prev.transpose(-1, -2)).masked_fill(d[:, :C] + C > i, 0.0)
        v_lin = vcat[..., :C, :]
    else:
        intra = (fqb @ torch.cat([fk_prev, fkb], dim=3).transpose(-1, -2)).masked_fill(
            d > i - W, 0.0)
        v_lin = vcat
    kv_blocks = fkb.transpose(-1, -2) @ vb  # [B, H, NB, Dk, Dv]
    z_blocks = fkb.sum(-2)  # [B, H, NB, Dk]
    kv_before = _previous(_previous(kv_blocks.cumsum(2)))  # sum over blocks <= n - 2
    z_before = _previous(_previous(z_blocks.cumsum(2)))
    if initial_kv is not None:
        kv_before = kv_before + initial_kv.to(cd).unsqueeze(2)
        z_before = z_before + initial_z.to(cd).unsqueeze(2)
    lin_num = fqb @ kv_before + intra @ v_lin
    lin_den = (fqb * z_before.unsqueeze(-2)).sum(-1, keepdim=True) + intra.sum(-1, keepdim=True)

    f = torch.as_tensor(weight, dtype=cd, device=dev)
    f = f.view(1, -1, 1, 1, 1) if f.dim() == 1 else f
    num = f * win_num + (1 - f) * lin_num
    den = f * win_den + (1 - f) * lin_den
    o = (num / (den + eps)).flatten(2, 3)[:, :, N - T:N].to(q.dtype)
    if not return_state:
        return o, None, None
    old = max(N - W, 0)
    if torch.compiler.is_compiling():
        # the older keys by a mask, not a slice: Inductor (torch 2.13, CPU, dynamic shapes,
        # as when a compiled layer decodes and its window grows) miscompiled
        # x[:, :, :old].mT @ y[:, :, :old] of a concatenation with old = N - min(W, N): kv
        # off by 4e-2 in decoding, garbage in a reduced case; the mask computes it right
        fkx = torch.where(torch.arange(N, device=fkx.device)[:, None] < old, fkx, 0.0)
        kv, z = fkx.transpose(-1, -2) @ vx, fkx.sum(-2)
    else:
        kv = fkx[:, :, :old].transpose(-1, -2) @ vx[:, :, :old]
        z = fkx[:, :, :old].sum(-2)
    if initial_kv is not None:
        kv, z = kv + initial_kv.to(cd), z + initial_z.to(cd)
    return o, kv, z
