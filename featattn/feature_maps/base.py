"""The FeatureMap base class.

A feature map phi turns a query or key vector of size ``d`` into a feature vector of size
``output_dim(d)`` so that linear attention can use ``phi(q_t) . phi(k_s)`` in place of
``exp(q_t . k_s)``.  Shapes: the input is ``[..., d]`` (in practice ``[B, H, T, d]``) and the
output ``[..., output_dim(d)]``; the map acts on the last dimension only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureMap"]


class FeatureMap(nn.Module):
    """Base class of every feature map.

    Subclasses implement :meth:`forward` (``x: [..., d] -> [..., output_dim(d)]``) and
    :meth:`output_dim`.  They may override :meth:`forward_query` / :meth:`forward_key` when
    queries and keys need different treatment (the default applies :meth:`forward` to both),
    and :meth:`default_scale` when the map expects its input pre-scaled.

    A map is an ``nn.Module`` so it may hold learnable parameters; a map whose constructor
    takes ``head_dim`` (and optionally ``heads``) gets them filled in by
    :class:`featattn.FeatureAttention`.

    Output dtype: the input's dtype.  Maps that are numerically delicate compute in fp32
    internally and cast once.
    """

    #: the registry name, filled in by :func:`featattn.register_feature_map`
    name: str = "custom"

    def output_dim(self, head_dim: int) -> int:
        """Number of features produced for an input of size ``head_dim``."""
        raise NotImplementedError(f"{type(self).__name__} must implement output_dim(head_dim)")

    def default_scale(self, head_dim: int) -> float:
        """The factor ``q`` is multiplied by before the map when ``scale=None``."""
        return 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x)")

    def forward_query(self, q: torch.Tensor) -> torch.Tensor:
        """phi applied to (already scaled) queries ``[B, H, T, d]``."""
        return self(q)

    def forward_key(self, k: torch.Tensor) -> torch.Tensor:
        """phi applied to keys ``[B, Hkv, T, d]``."""
        return self(k)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
