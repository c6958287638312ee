"""elu(x) + 1 (Katharopoulos et al., 2020)."""

import torch

from .base import FeatureMap, builtin_triton_form
from .registry import register_feature_map


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 = x + 1 for x >= 0, exp(x) for x < 0.  Output dim: d.

    Computed as ``where(x >= 0, x + 1, exp(x))`` in fp32: ``elu(x) + 1`` in bf16/fp16 cancels
    catastrophically (``exp(x) - 1 + 1``) and rounds to 0 well before ``exp(x)`` does.
    The result is >= 0 and finite for every finite input, and so is its gradient
    (``exp(min(x, 0))`` on the negative side, never ``exp`` of a large positive value).
    Default scale: 1.
    """

    def output_dim(self, head_dim: int) -> int:
        return head_dim

    def triton_elementwise(self):
        return builtin_triton_form("ELU")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # exp of the clamped value: the unused branch of where() must not overflow, or its
        # inf would turn the gradient into NaN (inf * 0).
        y = torch.where(xf >= 0, xf + 1.0, torch.exp(torch.clamp(xf, max=0.0)))
        return y.to(x.dtype)
