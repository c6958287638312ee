"""Second-order Taylor expansion of exp (the Based / Hedgehog 'taylor' map)."""

import math

import torch

from .base import FeatureMap
from .registry import register_feature_map


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., d] -> [..., 1 + d + d*d]``, computed in fp32 (float64 for float64 input) and
    cast to ``x.dtype``.

    Layout (the order the fused kernel and the recurrent state use):
    ``[1, x / d**0.25, vec(x x^T) / sqrt(2 d)]`` with ``vec`` row-major (index ``i*d + j``).

    The result is a view whose rows are stored with a stride rounded up to a multiple of 16
    elements (288 for the 273 features of d = 16): kernels reading it can then use aligned,
    vectorised loads, which a 273-element (546-byte) row stride rules out.
    """
    d = x.shape[-1]
    if d < 1:
        # the map divides by d ** 0.25; an empty head would raise ZeroDivisionError
        raise ValueError(
            f"the taylor feature map needs a q/k head dim >= 1 (the last dim), got x of shape "
            f"{tuple(x.shape)}"
        )
    D = 1 + d + d * d
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    lin = xf * (d ** -0.25)
    quad = (xf.unsqueeze(-1) * xf.unsqueeze(-2)).flatten(-2) * (1.0 / math.sqrt(2.0 * d))
    stride = -(-D // 16) * 16
    out = x.new_empty(x.shape[:-1] + (stride,))[..., :D]
    out[..., :1] = 1.0
    out[..., 1 : 1 + d] = lin
    out[..., 1 + d :] = quad
    return out


@register_feature_map("taylor")
class TaylorFeatureMap(FeatureMap):
    """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d).

    The second-order Taylor expansion of ``exp(s)``, always > 0 (its minimum over s is 1/2).
    Output dim: ``1 + d + d^2`` (273 for d = 16; 4161 for d = 64, which is why
    :class:`featattn.FeatureAttention` defaults to a 16-dim q/k for this map).

    Scaling: the ``1/sqrt(d)`` of softmax attention is built into the map, so the default
    ``scale`` is 1; a non-default ``scale`` multiplies ``q`` first, giving
    ``1 + scale*s + (scale*s)^2/2``.
    """

    def output_dim(self, head_dim: int) -> int:
        return 1 + head_dim + head_dim * head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return taylor_features(x)
