"""ReLU features."""

import torch

from .base import FeatureMap, builtin_triton_form
from .registry import register_feature_map


@register_feature_map("relu")
class ReluFeatureMap(FeatureMap):
    """phi(x) = max(x, 0).  Output dim: d.  Default scale: 1.

    Non-negative, so the normalised output is a convex combination of values, but a query
    and key with no positive coordinates in common score exactly 0: with ``normalize=True``
    the denominator is then just ``eps`` and the output 0.
    """

    def output_dim(self, head_dim: int) -> int:
        return head_dim

    def triton_elementwise(self):
        return builtin_triton_form("RELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)
