"""The identity map (plain linear attention on q, k)."""

import torch

from .base import FeatureMap, builtin_triton_form
from .registry import register_feature_map


@register_feature_map("identity")
class IdentityFeatureMap(FeatureMap):
    """phi(x) = x.  Output dim: d.  Default scale: 1.

    Warning: with ``normalize=True`` the denominator ``q_t . sum_s k_s + eps`` can be zero or
    negative, since nothing keeps the features positive.  Use it un-normalised
    (``normalize=False``) or with inputs you know to be positive.
    """

    def output_dim(self, head_dim: int) -> int:
        return head_dim

    def triton_elementwise(self):
        return builtin_triton_form("IDENTITY")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
