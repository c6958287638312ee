"""DPFP: Deterministic Parameter-Free Projection (Schlag, Irie & Schmidhuber, 2021, "Linear
Transformers Are Secretly Fast Weight Programmers")."""

from __future__ import annotations

import torch

from ._args import positive_int
from .base import FeatureMap
from .registry import register_feature_map


@register_feature_map("dpfp")
class DPFPFeatureMap(FeatureMap):
    """phi(x)_{(n-1) 2d + i} = r_i * r_{(i + n) mod 2d} with r = [relu(x), relu(-x)] (2d values),
    for n = 1..nu and i = 0..2d-1.  Output dim: ``2 * d * nu``.  Default scale: 1.

    Schlag et al. 2021 (their DPFP section): ``phi_{i nu}(k) = r(k)_i r(k)_{i + nu}`` (indices mod 2d),
    the products of ``r`` with its copies rolled by 1..nu.  The feature order is the paper's
    formula (``r * r.roll(-n)``); the authors' code multiplies by ``r.roll(+n)`` instead, which
    permutes the features and gives the same ``phi(q) . phi(k)``.  ``nu`` must be in
    ``[1, 2d - 1]``: a roll by 2d would multiply r by itself.

    No parameters; features are >= 0 and sparse (each is non-zero only when two coordinates of
    r are), so a query can score 0 against every key and (``normalize=True``) output 0.
    Computed in fp32 (float64 for float64 input) and cast once.
    """

    def __init__(self, nu: int = 1):
        super().__init__()
        self.nu = positive_int("dpfp", "nu", nu, "nu is the number of rolled copies, 1 (the "
                               "default) to 2 * head_dim - 1")

    def _check(self, d: int) -> None:
        if self.nu > 2 * d - 1:
            raise ValueError(
                f"dpfp: nu must be <= 2 * head_dim - 1 = {2 * d - 1} for head_dim {d}, got "
                f"nu={self.nu}; pick a smaller nu (the paper uses 1 to 3)"
            )

    def output_dim(self, head_dim: int) -> int:
        self._check(head_dim)
        return 2 * head_dim * self.nu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"dpfp expects a floating-point torch.Tensor, got {got}")
        self._check(x.shape[-1])
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.cat([torch.relu(xf), torch.relu(-xf)], dim=-1)
        feats = [r * torch.roll(r, shifts=-n, dims=-1) for n in range(1, self.nu + 1)]
        return torch.cat(feats, dim=-1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"nu={self.nu}"
