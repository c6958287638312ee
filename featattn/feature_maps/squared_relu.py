"""Squared ReLU features (So et al. 2021, Primer; the quadratic map of ReBased without its affine)."""

import torch

from .base import FeatureMap, builtin_triton_form
from .registry import register_feature_map


@register_feature_map("squared_relu")
class SquaredReluFeatureMap(FeatureMap):
    """phi(x) = max(x, 0)^2.  Output dim: d.  Default scale: 1.

    Non-negative like ``relu``, with a sharper (quadratic) kernel; computed in fp32 and cast
    once, because the square of a bf16 value loses half its precision.  As with ``relu``, a
    query and key with no positive coordinates in common score 0, and the normalised output
    is then 0 (denominator eps).
    """

    def output_dim(self, head_dim: int) -> int:
        return head_dim

    def triton_elementwise(self):
        return builtin_triton_form("SQUARED_RELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x.to(torch.promote_types(x.dtype, torch.float32)))
        return (r * r).to(x.dtype)
