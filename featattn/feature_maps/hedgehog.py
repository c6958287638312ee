"""Hedgehog: a learnable feature map trained to mimic softmax attention (Zhang et al., 2024)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._args import head_counts, positive_int
from .base import FeatureMap, ProjectionTritonForm
from .registry import register_feature_map


@register_feature_map("hedgehog")
class HedgehogFeatureMap(FeatureMap):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))], a trainable W_h per head.

    Shapes: queries ``[B, H, T, d]`` use ``W_q: [H, d, f]``, keys ``[B, Hkv, T, d]`` use
    ``W_k: [Hkv, d, f]`` (separate maps for queries and keys, as in Hedgehog/LoLCATs; pass
    ``tie_qk=True`` to share one when ``H == Hkv``).  Output dim: ``2 f`` (``f = feature_dim``,
    default ``d``).

    Initialisation: ``W = I`` (padded/cut to ``f`` columns) and ``b = 0``, so an untrained map is
    ``[softmax(x), softmax(-x)]``: positive features whose dot product grows with ``q . k`` —
    a sensible start that attention transfer (:func:`featattn.hf.transfer_attention`) then fits
    to the softmax weights.

    Scaling: the softmax normalises each half to sum 1, so ``phi(q) . phi(k)`` lies in (0, 2]
    whatever the input scale; the input scale only sets how peaked the features are.  The
    default ``scale`` is 1; HF patching passes the model's own attention scaling
    (``1/sqrt(d)``) so the projection sees the same logits softmax attention saw.
    """

    def __init__(
        self,
        head_dim: int,
        heads: int = 1,
        kv_heads: Optional[int] = None,
        feature_dim: Optional[int] = None,
        tie_qk: bool = False,
    ):
        super().__init__()
        head_dim, heads, kv_heads = head_counts("hedgehog", head_dim, heads, kv_heads)
        f = head_dim if feature_dim is None else positive_int(
            "hedgehog", "feature_dim", feature_dim, "pass the projection width per head, e.g. "
            "feature_dim=32 (2 * feature_dim features), or leave it out for feature_dim=head_dim")
        if not isinstance(tie_qk, bool):
            raise TypeError(f"hedgehog: tie_qk must be a bool, got {type(tie_qk).__name__}")
        if tie_qk and kv_heads != heads:
            raise ValueError(f"tie_qk=True needs kv_heads == heads, got {kv_heads} and {heads}")
        self.head_dim, self.heads, self.kv_heads, self.feature_dim = head_dim, heads, kv_heads, f
        self.tie_qk = tie_qk
        self.q_weight = nn.Parameter(self._identity(heads, head_dim, f))
        self.q_bias = nn.Parameter(torch.zeros(heads, f))
        if tie_qk:
            self.k_weight, self.k_bias = self.q_weight, self.q_bias
        else:
            self.k_weight = nn.Parameter(self._identity(kv_heads, head_dim, f))
            self.k_bias = nn.Parameter(torch.zeros(kv_heads, f))

    @staticmethod
    def _identity(heads: int, d: int, f: int) -> torch.Tensor:
        w = torch.zeros(heads, d, f)
        n = min(d, f)
        w[:, torch.arange(n), torch.arange(n)] = 1.0
        return w

    def output_dim(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(
                f"this hedgehog map was built for head_dim={self.head_dim}, got {head_dim}"
            )
        return 2 * self.feature_dim

    def _features(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != weight.shape[0] or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"hedgehog expects [B, {weight.shape[0]}, T, {self.head_dim}] inputs (one projection "
                f"per head), got {tuple(x.shape)}"
            )
        cd = torch.promote_types(x.dtype, torch.float32)
        logits = torch.einsum("bhtd,hdf->bhtf", x.to(cd), weight.to(cd)) + bias.to(cd)[:, None, :]
        # both softmaxes in fp32: the features are probabilities and must stay > 0
        return torch.cat([logits.softmax(-1), (-logits).softmax(-1)], dim=-1).to(x.dtype)

    def triton_projection(self) -> ProjectionTritonForm:
        """Computed inside the chunked kernels (featattn.kernels.projected)."""
        return ProjectionTritonForm(self.q_weight, self.q_bias, self.k_weight, self.k_bias,
                                    "softmax_pair")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Query features (``forward_key`` uses the key projection)."""
        return self._features(x, self.q_weight, self.q_bias)

    def forward_query(self, q: torch.Tensor) -> torch.Tensor:
        return self._features(q, self.q_weight, self.q_bias)

    def forward_key(self, k: torch.Tensor) -> torch.Tensor:
        return self._features(k, self.k_weight, self.k_bias)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
            f"feature_dim={self.feature_dim}, tie_qk={self.tie_qk}"
        )
