"""PolySketch: random sketches of the polynomial kernel ``(q . k)^p`` (Kacham, Mirrokni and
Zhong, 2023, "PolySketchFormer: Fast Transformers via Sketching Polynomial Kernels")."""

from __future__ import annotations

from typing import Optional

import torch

from ._args import check_input, positive_int
from .base import FeatureMap
from .performer import _check_seed
from .registry import register_feature_map


@register_feature_map("polysketch")
class PolySketchFeatureMap(FeatureMap):
    """A sketch of the degree-p polynomial kernel, p = 2 or 4 (default 4).

    With ``x~ = x / d^(1/4)`` (so that ``x~ . y~ = x . y / sqrt(d)``, softmax's scaling) and two
    independent Gaussian matrices ``G1, G2: [r, d]`` (``r = sketch_size``, default d), the
    degree-2 sketch ``S(x) = (G1 x~) * (G2 x~) / sqrt(r)`` (element-wise product) is an
    unbiased estimate: ``E[S(x) . S(y)] = (x~ . y~)^2`` (the Gaussian version of TensorSketch).

    * ``degree=2``: ``phi(x) = S(x)``, r features, signed (``phi(q) . phi(k)`` can be negative:
      use ``normalize=False`` or expect a denominator that can vanish).
    * ``degree=4`` (default): ``phi(x) = S(x) (x) S(x)`` (outer product, flattened), r^2
      features, so ``phi(q) . phi(k) = (S(q) . S(k))^2 >= 0``: PolySketchFormer's non-negative
      approximation of ``(q . k)^4`` (biased upwards by the sketch's variance, never negative,
      which keeps normalised attention well defined).

    Output dim: r (degree 2) or r^2 (degree 4).  Default scale 1 (the 1/sqrt(d) is built in,
    as ``d^(-1/4)`` on q and on k).  The paper also learns the sketches and adds local exact
    attention; this map is the random sketch alone (for a local window see ``window=`` in
    docs/hybrid.md).  ``seed`` makes the draw reproducible; the matrices are a buffer
    (``sketch``, ``[2, r, d]``, saved in the state dict); :meth:`redraw` draws new ones.
    """

    def __init__(self, head_dim: int, sketch_size: Optional[int] = None, degree: int = 4,
                 seed: Optional[int] = None):
        super().__init__()
        fix = ("FeatureAttention(dim, heads, 'polysketch') fills head_dim in; by hand: "
               "get_feature_map('polysketch', head_dim=64)")
        self.head_dim = positive_int("polysketch", "head_dim", head_dim, fix)
        r = head_dim if sketch_size is None else positive_int(
            "polysketch", "sketch_size", sketch_size,
            "pass the sketch size r, e.g. sketch_size=16 (degree 4 gives r^2 features)")
        if isinstance(degree, bool) or not isinstance(degree, int) or degree not in (2, 4):
            raise ValueError(f"polysketch: degree must be 2 or 4, got {degree!r}; 4 (the "
                             f"default) gives non-negative features, 2 a signed unbiased sketch")
        self.sketch_size, self.degree = r, degree
        self.seed = _check_seed(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("sketch", torch.empty(2, r, self.head_dim))
        self.redraw()

    @torch.no_grad()
    def redraw(self, seed: Optional[int] = None) -> None:
        """Draw new Gaussian sketches in place (device and dtype kept); ``seed`` as in
        :meth:`featattn.feature_maps.PerformerFeatureMap.redraw`."""
        seed = _check_seed(seed)
        if seed is not None:
            self._generator = torch.Generator().manual_seed(seed)
        g = torch.randn(2, self.sketch_size, self.head_dim, generator=self._generator,
                        dtype=torch.float64)
        self.sketch.copy_(g.to(self.sketch.dtype))

    def output_dim(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(
                f"this polysketch map was built for head_dim={self.head_dim}, got {head_dim}; "
                f"build one with head_dim={head_dim}"
            )
        return self.sketch_size ** (self.degree // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("polysketch", x, self.head_dim)
        cd = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(cd) * self.head_dim ** -0.25
        g = self.sketch.to(device=x.device, dtype=cd)
        s = (xs @ g[0].T) * (xs @ g[1].T) * self.sketch_size ** -0.5  # [..., r]
        if self.degree == 4:
            s = (s.unsqueeze(-1) * s.unsqueeze(-2)).flatten(-2)  # [..., r^2]
        return s.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, sketch_size={self.sketch_size}, "
                f"degree={self.degree}, seed={self.seed}")
