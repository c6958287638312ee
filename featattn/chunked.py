"""O(T) chunked causal linear attention in plain PyTorch (the CPU path and the fallback).

The sequence is cut into chunks of C tokens.  Inside a chunk the causal part is a small
masked product, ``tril(q_c k_c^T) v_c``; everything before the chunk is summarised by the
running state ``S = sum phi(k)^T v`` (and ``z = sum phi(k)``), so

    o_c = tril(q_c k_c^T) v_c + q_c S_{<c}            (numerator)
    d_c = tril(q_c k_c^T) 1   + q_c z_{<c}  + eps     (denominator, when normalising)

Per block of up to ``block_chunks`` chunks the prefix states are an exclusive cumsum of the
per-chunk ``k_c^T v_c`` (vectorised over chunks), and blocks are chained by the carried state,
so memory stays O(block * Dk * Dv) whatever T is.  Cost: O(T * C * (Dk + Dv) + T * Dk * Dv).
Under ``torch.compile`` the whole sequence is one block (no Python loop or branch on T, so one
graph serves every T; memory O(T/C * Dk * Dv) per head for the prefix states).

Grouped k/v heads: q is viewed as [B, Hkv, G, T, Dk] (no copy) and k/v broadcast over G.  The
state is per query head; without an initial state the G heads of a group share it until the
end, where it is expanded.  Accumulation is fp32 (float64 for float64 inputs), autograd flows
through everything, any T >= 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .state import compute_dtype, no_autocast

__all__ = ["chunked_linear_attention"]


@no_autocast
def chunked_linear_attention(
    q,
    k,
    v,
    *,
    normalize,
    eps,
    initial_kv=None,
    initial_z=None,
    return_state=False,
    chunk_size: int = 64,
    block_chunks: int = 64,
):
    """Chunked linear attention on features.

    Args:
        q: ``[B, H, T, Dk]`` query features.  k: ``[B, Hkv, T, Dk]``.  v: ``[B, Hkv, T, Dv]``.
        normalize, eps: divide by ``q_t . sum_{s<=t} k_s + eps`` when ``normalize``.
        initial_kv: ``[B, H, Dk, Dv]``; initial_z: ``[B, H, Dk]`` (normalised only).
        return_state: also return the final ``kv`` / ``z``.
        chunk_size: tokens per chunk C.  block_chunks: chunks vectorised together in eager
            mode (under ``torch.compile`` the whole sequence is one block, see below).

    Returns:
        ``(o, kv, z)``: o ``[B, H, T, Dv]`` in ``q.dtype``; kv ``[B, H, Dk, Dv]`` and z
        ``[B, H, Dk]`` in fp32 (float64 for float64 inputs) or None.
    """
    B, H, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    # a call shorter than a chunk (decoding: T = 1) is one chunk of its own length, not a
    # padded C x C one (eager only: under torch.compile C must not depend on T)
    C = chunk_size if torch.compiler.is_compiling() else min(chunk_size, T)
    cd = compute_dtype(q, k, v, initial_kv, initial_z)

    q5 = q.unflatten(1, (Hkv, G)).to(cd)  # [B, Hkv, G, T, Dk]
    k5 = k.to(cd).unsqueeze(2)  # [B, Hkv, 1, T, Dk]
    v5 = v.to(cd).unsqueeze(2)  # [B, Hkv, 1, T, Dv]

    if initial_kv is not None:
        kv = initial_kv.to(cd).unflatten(1, (Hkv, G))
    else:
        kv = q5.new_zeros(B, Hkv, 1, Dk, Dv)
    z = None
    if normalize:
        if initial_z is not None:
            z = initial_z.to(cd).unflatten(1, (Hkv, G))
        else:
            z = q5.new_zeros(B, Hkv, 1, Dk)

    if T == 1 and not torch.compiler.is_compiling():  # one decoding step: the recurrence
        kv = kv + k5.transpose(-1, -2) @ v5  # [B, Hkv, 1, Dk, Dv] (G > 1: broadcast below)
        out = q5 @ kv  # [B, Hkv, G, 1, Dv]
        if normalize:
            z = z + k5.squeeze(-2)
            out = out / ((q5 @ z.unsqueeze(-1)) + eps)
    else:
        out, kv, z = _chunks(q5, k5, v5, kv, z, C, normalize, eps, block_chunks)

    out = out.flatten(1, 2).to(q.dtype)  # [B, H, T, Dv]
    if not return_state:
        return out, None, None
    kv_out = kv.expand(B, Hkv, G, Dk, Dv).reshape(B, H, Dk, Dv)
    z_out = z.expand(B, Hkv, G, Dk).reshape(B, H, Dk) if normalize else None
    return out, kv_out, z_out


def _chunks(q5, k5, v5, kv, z, C, normalize, eps, block_chunks):
    """The whole sequence in blocks of ``block_chunks`` chunks (one block under
    torch.compile): ``(o [B, Hkv, G, T, Dv], kv, z)``."""
    T = q5.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=q5.device).tril()
    if torch.compiler.is_compiling():
        # A Python loop over blocks (or any branch on T) makes dynamo specialise T and
        # recompile for every new length, so compiled code runs the whole sequence as one
        # block, with only symbolic arithmetic on T.  The price is memory: the per-chunk
        # prefix states are O(T/C * Dk * Dv) per head instead of O(block_chunks * Dk * Dv).
        out, kv, z = _block(q5, k5, v5, kv, z, mask, C, normalize, eps, spare_chunk=True)
    else:
        block = C * block_chunks
        outs = []
        for start in range(0, T, block):
            L = min(block, T - start)
            o, kv, z = _block(
                *(x[..., start : start + L, :] for x in (q5, k5, v5)), kv, z, mask, C, normalize, eps
            )
            outs.append(o)
        out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    return out, kv, z


def _block(qb, kb, vb, kv, z, mask, C, normalize, eps, spare_chunk=False):
    """One block of L tokens (any L >= 1) on top of the carried state ``kv`` / ``z``; returns
    ``(o [B, Hkv, G, L, Dv], kv, z)`` with the state advanced past the block.

    No Python branch depends on L, so L may be symbolic under ``torch.compile``.
    """
    L = qb.shape[-2]
    n = (L + C - 1) // C
    if spare_chunk:
        # Every broadcast of a size-n dim asks "n == 1?"; for a symbolic n that could be 1
        # (L <= C) dynamo answers with a guard, i.e. one graph for L <= C and another for
        # L > C.  One always-padded chunk makes n >= 2 provable, so no guard is needed.
        n = n + 1
    # zero keys/values add nothing to any sum; padded query rows are dropped below
    pad = n * C - L
    if spare_chunk or pad:  # spare_chunk first: pad > 0 then, and `if pad` would guard on L % C
        qb, kb, vb = (F.pad(x, (0, 0, 0, pad)) for x in (qb, kb, vb))
    qc = qb.unflatten(-2, (n, C))  # [B, Hkv, G, n, C, Dk]
    kc = kb.unflatten(-2, (n, C))  # [B, Hkv, 1, n, C, Dk]
    vc = vb.unflatten(-2, (n, C))  # [B, Hkv, 1, n, C, Dv]

    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)  # [B, Hkv, G, n, C, C]
    chunk_kv = kc.transpose(-1, -2) @ vc  # [B, Hkv, 1, n, Dk, Dv]
    prefix_kv = _exclusive_cumsum(chunk_kv, dim=3) + kv.unsqueeze(3)
    num = scores @ vc + qc @ prefix_kv
    kv = kv + chunk_kv.sum(3)
    if normalize:
        chunk_z = kc.sum(-2)  # [B, Hkv, 1, n, Dk]
        prefix_z = _exclusive_cumsum(chunk_z, dim=3) + z.unsqueeze(3)
        den = scores.sum(-1) + (qc @ prefix_z.unsqueeze(-1)).squeeze(-1)
        num = num / (den + eps).unsqueeze(-1)
        z = z + chunk_z.sum(3)
    return num.flatten(3, 4)[..., :L, :], kv, z


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """cumsum that excludes the current element (prefix *before* each chunk), without the
    cancellation of ``cumsum(x) - x``.  Sizes stay n (never n - 1, which dynamo would
    specialise on being 1) and nothing branches on n."""
    n = x.shape[dim]
    head = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([head, x], dim=dim).cumsum(dim).narrow(dim, 0, n)
