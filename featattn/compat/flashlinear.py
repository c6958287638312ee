"""flashy_linear_attention's API on featattn's kernels.

Replace ``from flashlinear import LinearAttention, LinearAttentionSmallVHD`` by
``from featattn.compat.flashlinear import LinearAttention, LinearAttentionSmallVHD`` and the
rest of the code runs unchanged::

    qkv_out = LinearAttention.apply(q, k, v)          # q, k: [B, H, T, Dqk], v: [B, H, T, Dv]
    denom = (q * k.cumsum(-2)).sum(dim=-1, keepdim=True) + eps
    out = qkv_out / denom

``.apply(q, k, v)`` returns the same un-normalised causal product ``tril(q k^T) v`` as the
original (no feature map, no scaling), differentiable in q, k and v, now in linear time, for any
T >= 1 (no multiple-of-64 rule), any q/k and v head dims, fp32/fp16/bf16 (output in the input
dtype; the original cast everything to bf16), and on CPU as well as CUDA.  Both names run the
same dispatcher: it picks the equal-dim or small-value-head-dim kernel from the shapes, so
``LinearAttentionSmallVHD`` is kept only so that old imports work.

The better migration is one call with the normalisation fused into the kernel (no separate
cumsum pass, fp32 denominator)::

    out = featattn.linear_attention(q, k, v, normalize=True, eps=eps)

:data:`BACKEND` selects the ``backend=`` passed to :func:`featattn.linear_attention`
(default ``"auto"``).
"""

from __future__ import annotations

import torch

from ..functional import linear_attention

__all__ = ["LinearAttention", "LinearAttentionSmallVHD", "BACKEND"]

#: backend used by ``.apply`` (see :func:`featattn.select_kernel`)
BACKEND = "auto"


class _FlashyFunction:
    """Stand-in for a ``torch.autograd.Function`` with flashy's ``apply(q, k, v)``."""

    @classmethod
    def apply(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q, k: [B, H, T, Dqk]``, ``v: [B, H, T, Dv]`` -> ``[B, H, T, Dv]`` =
        ``tril(q k^T) v`` (un-normalised causal linear attention), autograd-aware."""
        return linear_attention(q, k, v, normalize=False, backend=BACKEND)

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is used as {type(self).__name__}.apply(q, k, v)")


class LinearAttention(_FlashyFunction):
    """flashlinear.LinearAttention: equal q/k and v head dims (any dims work here)."""


class LinearAttentionSmallVHD(_FlashyFunction):
    """flashlinear.LinearAttentionSmallVHD: q/k head dim larger than the value head dim."""
