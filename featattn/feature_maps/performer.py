"""Performer's FAVOR+ positive orthogonal random features (Choromanski et al., 2021,
"Rethinking Attention with Performers")."""

from __future__ import annotations

from typing import Optional

import torch

from ._args import check_input, positive_int
from .base import FeatureMap
from .registry import register_feature_map

#: the stabiliser keeps every exponent <= EXP_CAP, so a feature is at most
#: e^80 / sqrt(m) ~ 5.5e34 / sqrt(m): finite in fp32 and bf16 (max ~3.4e38 = e^88.7)
EXP_CAP = 80.0


def orthogonal_gaussian(m: int, d: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[m, d]`` float64: rows drawn in blocks of d mutually orthogonal directions (Haar: QR
    of a Gaussian matrix with R's diagonal made positive), each row then given the norm of a
    d-dim standard Gaussian vector (chi(d)), so every row alone is distributed as N(0, I_d)
    (FAVOR+'s orthogonal random features; the last block is cut to m rows)."""
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        qm = qm * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        blocks.append(qm.T)
    dirs = torch.cat(blocks, 0)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return dirs * norms[:, None]


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"performer: seed must be None or an int, got {type(seed).__name__} "
                        f"{seed!r}; e.g. seed=0 (None draws from torch's global RNG)")
    if not 0 <= seed < 2**63:
        raise ValueError(f"performer: seed must be in [0, 2**63), got {seed}; e.g. seed=0")
    return seed


@register_feature_map("performer")
class PerformerFeatureMap(FeatureMap):
    """phi(x) = exp(W x~ - |x~|^2 / 2 - c) / sqrt(m),  x~ = x / d^(1/4).

    FAVOR+ (Choromanski et al. 2021, Lemma 1: positive random features
    ``exp(w^T x - |x|^2/2) / sqrt(m)`` with orthogonal w): ``E[phi(q) . phi(k)] =
    e^(-2c) exp(q . k / sqrt(d))`` -- an unbiased estimate of softmax's kernel up to the
    constant ``e^(-2c)``.  ``W: [m, d]`` holds m orthogonal random rows (blocks of d
    orthogonal directions, each row scaled to a chi(d) norm), ``m = num_features`` (default
    ``d``).  Output dim: m.  Default scale: 1 (the ``1/sqrt(d)`` of softmax is built in, as
    ``d^(-1/4)`` on both q and k, as in the authors' code); a non-default ``scale`` multiplies
    q, estimating ``exp(scale q . k / sqrt(d))``.

    Stabiliser: ``c = max(0, max_i |w_i|^2 / 2 - 80)``, a constant of the drawn W, the same for
    every token (queries and keys).  Since ``w . x - |x|^2/2 <= |w|^2/2`` for every x, no
    exponent exceeds 80 and no feature overflows fp32/bf16, whatever the input.  Common
    implementations subtract instead the max over each query's features and, for keys, the
    max over the whole sequence: in causal attention that max reads future keys (and
    differs between a prefill and token-by-token decoding), and a per-key max would reweight
    the keys.  A constant changes ``phi(q) . phi(k)`` by the factor ``e^(-2c)`` only, which
    cancels with ``normalize=True`` (up to ``eps``); ``c`` is 0 unless some ``|w_i|^2 > 160``
    (in practice head dims of ~100 and more).  fp16 inputs give fp16 features, which overflow
    above 65504 (an exponent of 11): use bf16 or fp32.

    Randomness: ``seed`` (an int) makes the draw reproducible; None draws from torch's global
    RNG.  ``W`` is a buffer (saved in the state dict, moved by ``.to()``, no gradient).
    :meth:`redraw` draws a new W (the map never redraws by itself: a redraw changes the
    kernel, so a recurrent state built before it is no longer valid).
    """

    def __init__(self, head_dim: int, num_features: Optional[int] = None,
                 seed: Optional[int] = None):
        super().__init__()
        fix = ("FeatureAttention(dim, heads, 'performer') fills head_dim in; by hand: "
               "get_feature_map('performer', head_dim=64)")
        self.head_dim = positive_int("performer", "head_dim", head_dim, fix)
        m = head_dim if num_features is None else positive_int(
            "performer", "num_features", num_features,
            "pass the number of random features m, e.g. num_features=128, or leave it out for "
            "m = head_dim")
        self.num_features = m
        self.seed = _check_seed(seed)
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.empty(m, self.head_dim))
        self.redraw()

    @torch.no_grad()
    def redraw(self, seed: Optional[int] = None) -> None:
        """Draw a new projection W in place (its device and dtype are kept).

        ``seed=None`` continues the map's own generator (seeded maps give the same sequence of
        draws every run) or torch's global RNG (unseeded maps); an int restarts the generator
        from that seed.  Call it between training steps, never in the middle of a sequence
        that a state carries over."""
        seed = _check_seed(seed)
        if seed is not None:
            self._generator = torch.Generator().manual_seed(seed)
        w = orthogonal_gaussian(self.num_features, self.head_dim, self._generator)
        self.projection.copy_(w.to(self.projection.dtype))

    def stabilizer(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``c = max(0, max_i |w_i|^2 / 2 - 80)`` (a 0-dim tensor)."""
        w = self.projection.to(dtype)
        return torch.clamp(w.square().sum(-1).max() / 2 - EXP_CAP, min=0.0)

    def output_dim(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(
                f"this performer map was built for head_dim={self.head_dim}, got {head_dim}; "
                f"build one with head_dim={head_dim}"
            )
        return self.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("performer", x, self.head_dim)
        cd = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(cd) * self.head_dim ** -0.25
        w = self.projection.to(device=x.device, dtype=cd)
        expo = xs @ w.T - xs.square().sum(-1, keepdim=True) / 2 - self.stabilizer(cd)
        return (torch.exp(expo) * self.num_features ** -0.5).to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, seed={self.seed}"
