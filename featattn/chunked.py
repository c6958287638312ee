"""O(T) chunked causal linear attention in plain PyTorch (the CPU path and the fallback).

The sequence is cut into chunks of C tokens.  Inside a chunk the causal part is a small
masked product, ``tril(q_c k_c^T) v_c``; everything before the chunk is summarised by the
running state ``S = sum phi(k)^T v`` (and ``z = sum phi(k)``), so

    o_c = tril(q_c k_c^T) v_c + q_c S_{<c}            (numerator)
    d_c = tril(q_c k_c^T) 1   + q_c z_{<c}  + eps     (denominator, when normalising)

Per block of up to ``block_chunks`` chunks the prefix states are an exclusive cumsum of the
per-chunk ``k_c^T v_c`` (vectorised over chunks), and blocks are chained by the carried state,
so memory stays O(block * Dk * Dv) whatever T is.  Cost: O(T * C * (Dk + Dv) + T * Dk * Dv).

Grouped k/v heads: q is viewed as [B, Hkv, G, T, Dk] (no copy) and k/v broadcast over G.  The
state is per query head; without an initial state the G heads of a group share it until the
end, where it is expanded.  Accumulation is fp32 (float64 for float64 inputs), autograd flows
through everything, any T >= 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import compute_dtype

__all__ = ["chunked_linear_attention"]


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
        chunk_size: tokens per chunk C.  block_chunks: chunks vectorised together.

    Returns:
        ``(o, kv, z)``: o ``[B, H, T, Dv]`` in ``q.dtype``; kv ``[B, H, Dk, Dv]`` and z
        ``[B, H, Dk]`` in fp32 (float64 for float64 inputs) or None.
    """
    B, H, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    C = chunk_size
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

    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # Under torch.compile the whole sequence is one block: a Python loop over T, min() or a
    # branch on the padding would specialise T and recompile for every new length.  That
    # block holds O(T / C * Dk * Dv) prefix states; eager calls keep O(block_chunks * Dk * Dv).
    whole = torch.compiler.is_compiling()
    block = C * block_chunks
    outs = []
    for start in ([0] if whole else range(0, T, block)):
        L = T if whole else min(block, T - start)
        n = (L + C - 1) // C
        pad = n * C - L
        qb, kb, vb = (x[..., start : start + L, :] for x in (q5, k5, v5))
        if whole or pad:  # compiled: pad always (by 0 too), as a branch on pad guards on T
            # zero keys/values add nothing to any sum; padded query rows are dropped below
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
        outs.append(num.flatten(3, 4)[..., :L, :])

    out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]
    out = out.flatten(1, 2).to(q.dtype)  # [B, H, T, Dv]
    if not return_state:
        return out, None, None
    kv_out = kv.expand(B, Hkv, G, Dk, Dv).reshape(B, H, Dk, Dv)
    z_out = z.expand(B, Hkv, G, Dk).reshape(B, H, Dk) if normalize else None
    return out, kv_out, z_out


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """cumsum that excludes the current element (prefix *before* each chunk), without the
    cancellation of ``cumsum(x) - x``."""
    n = x.shape[dim]  # n == 1 works too (an empty cumsum); no branch, so n stays symbolic
    head = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat([head, x.narrow(dim, 0, n - 1).cumsum(dim)], dim=dim)
