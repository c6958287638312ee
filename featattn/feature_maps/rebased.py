"""ReBased: learnable affine after layer normalisation, then the quadratic kernel (Aksenov et
al., 2024, "Linear Transformers with Learnable Kernel Functions are Better In-Context Models")."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._args import check_bhtd, head_counts
from .base import FeatureMap
from .registry import register_feature_map

#: layer-norm epsilon (torch.nn.LayerNorm's default, which the authors' code uses)
LN_EPS = 1e-5


def _ln(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, biased variance (nn.LayerNorm, no affine)."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=LN_EPS)


@register_feature_map("rebased")
class ReBasedFeatureMap(FeatureMap):
    """phi(q) . phi(k) = (y_q . y_k)^2 / d  with  y = gamma * LN(x) + beta.

    ReBased (Aksenov et al. 2024): ``sim(q, k) = ((gamma_Q norm(q) + beta_Q)^T
    (gamma_K norm(k) + beta_K))^2`` -- Based's Taylor kernel ``1 + s + s^2/2`` reduced to its
    square term, with a learnable per-dimension affine after a layer norm so that the kernel can
    reach 0.  ``LN`` is layer normalisation over the head dim without its own affine
    (eps 1e-5); ``gamma``/``beta`` are per head and per dim, separate for queries
    (``[heads, d]``) and keys (``[kv_heads, d]``), initialised to 1 and 0.

    Features: the square is written as the symmetric outer product of y, so the map is exact
    (``phi(q) . phi(k)`` equals the formula):
    ``[y_i^2 for i] + [sqrt(2) y_i y_j for i < j]``, divided by ``sqrt(d)``.
    Output dim: ``d (d + 1) / 2`` (136 for d = 16, the authors' head size; 2080 for d = 64).
    The ``1/d`` is the ``1/sqrt(d)`` query scale of the authors' kernel (``(q . k / sqrt(d))^2``).

    Default scale: 1.  ``scale`` multiplies q *before* the layer norm, which removes it (up to
    the norm's eps): the learnable gamma sets the kernel's sharpness instead.
    With grouped-query attention (``kv_heads < heads``) queries have ``heads`` gammas/betas and
    keys ``kv_heads``; ``tie_qk=True`` shares one set between queries and keys (needs
    ``kv_heads == heads``).
    Computed in fp32 (float64 for float64 input) and cast once.  ``head_dim`` must be >= 2:
    the layer norm of a single coordinate is always 0.

    Differences from the authors' code: it normalises q (and k) over all heads at once
    (``LayerNorm(heads * d)`` before splitting heads); a feature map sees one head, so here
    each head is normalised on its own.
    """

    def __init__(
        self,
        head_dim: int,
        heads: int = 1,
        kv_heads: Optional[int] = None,
        tie_qk: bool = False,
    ):
        super().__init__()
        head_dim, heads, kv_heads = head_counts("rebased", head_dim, heads, kv_heads)
        if head_dim < 2:
            raise ValueError(
                f"rebased: head_dim must be >= 2 (the layer norm of one coordinate is always 0), "
                f"got {head_dim}; use a larger qk_dim"
            )
        if not isinstance(tie_qk, bool):
            raise TypeError(f"rebased: tie_qk must be a bool, got {type(tie_qk).__name__}")
        if tie_qk and kv_heads != heads:
            raise ValueError(
                f"rebased: tie_qk=True needs kv_heads == heads, got kv_heads={kv_heads}, "
                f"heads={heads}; pass tie_qk=False"
            )
        self.head_dim, self.heads, self.kv_heads, self.tie_qk = head_dim, heads, kv_heads, tie_qk
        self.q_gamma = nn.Parameter(torch.ones(heads, head_dim))
        self.q_beta = nn.Parameter(torch.zeros(heads, head_dim))
        if tie_qk:
            self.k_gamma, self.k_beta = self.q_gamma, self.q_beta
        else:
            self.k_gamma = nn.Parameter(torch.ones(kv_heads, head_dim))
            self.k_beta = nn.Parameter(torch.zeros(kv_heads, head_dim))
        iu = torch.triu_indices(head_dim, head_dim, offset=0)
        self.register_buffer("_rows", iu[0], persistent=False)
        self.register_buffer("_cols", iu[1], persistent=False)

    def output_dim(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(
                f"this rebased map was built for head_dim={self.head_dim}, got {head_dim}; build "
                f"one with head_dim={head_dim}"
            )
        return head_dim * (head_dim + 1) // 2

    def _features(self, x, gamma, beta, what):
        check_bhtd("rebased", x, gamma.shape[0], self.head_dim, what)
        cd = torch.promote_types(x.dtype, torch.float32)
        y = _ln(x.to(cd)) * gamma.to(cd)[:, None, :] + beta.to(cd)[:, None, :]
        # the weights are made in the compute dtype on each call: a float32 buffer would carry
        # its rounding of sqrt(2) into a float64 map
        d = self.head_dim
        weights = torch.full(self._rows.shape, math.sqrt(2.0 / d), dtype=cd, device=y.device)
        weights[self._rows == self._cols] = d ** -0.5
        feats = y[..., self._rows] * y[..., self._cols] * weights
        return feats.to(x.dtype)

    def forward_query(self, q: torch.Tensor) -> torch.Tensor:
        return self._features(q, self.q_gamma, self.q_beta, "queries")

    def forward_key(self, k: torch.Tensor) -> torch.Tensor:
        return self._features(k, self.k_gamma, self.k_beta, "keys")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Query features (``forward_key`` uses the keys' gamma/beta)."""
        return self.forward_query(x)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"tie_qk={self.tie_qk}")
