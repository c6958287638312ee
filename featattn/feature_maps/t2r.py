"""T2R: a learned linear map then relu (Kasai et al., 2021, "Finetuning Pretrained
Transformers into RNNs")."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ._args import check_bhtd, head_counts, positive_int
from .base import FeatureMap, ProjectionTritonForm
from .registry import register_feature_map


@register_feature_map("t2r")
class T2RFeatureMap(FeatureMap):
    """phi(x) = relu(x W_g + b_g), one trainable ``W_g: [d, f]``, ``b_g: [f]`` per kv head g.

    T2R (Kasai et al. 2021, "Finetuning Pretrained Transformers into RNNs":
    ``phi(x) = relu(W_phi x + b_phi)``, a single-layer MLP learned per attention head and
    applied to both queries and keys).  Output dim: ``f = feature_dim`` (default ``d``).
    Default scale: 1 (the projection learns any scale it needs).

    Heads: the map is shared by queries and keys, as in the paper.  With grouped-query
    attention (``kv_heads < heads``) query head h uses the map of the kv head it reads,
    ``h // (heads // kv_heads)``, so each score ``phi(q) . phi(k)`` is one head's kernel; with
    ``kv_heads == heads`` that is exactly one map per head.

    Initialisation: as ``nn.Linear(d, f)`` per head (uniform in ``+-1/sqrt(d)`` for W and b);
    in the paper the map is trained (from a pretrained softmax model) with the rest of the
    network.  Features are >= 0; a query whose features share no positive coordinate with
    any key's scores 0 and (with ``normalize=True``) outputs 0, as with ``relu``.
    """

    def __init__(
        self,
        head_dim: int,
        heads: int = 1,
        kv_heads: Optional[int] = None,
        feature_dim: Optional[int] = None,
    ):
        super().__init__()
        head_dim, heads, kv_heads = head_counts("t2r", head_dim, heads, kv_heads)
        f = head_dim if feature_dim is None else positive_int(
            "t2r", "feature_dim", feature_dim, "pass the number of features per head, e.g. "
            "feature_dim=32, or leave it out for feature_dim=head_dim")
        self.head_dim, self.heads, self.kv_heads, self.feature_dim = head_dim, heads, kv_heads, f
        bound = 1.0 / math.sqrt(head_dim)
        self.weight = nn.Parameter(torch.empty(kv_heads, head_dim, f).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(kv_heads, f).uniform_(-bound, bound))

    def output_dim(self, head_dim: int) -> int:
        if head_dim != self.head_dim:
            raise ValueError(
                f"this t2r map was built for head_dim={self.head_dim}, got {head_dim}; build one "
                f"with head_dim={head_dim}"
            )
        return self.feature_dim

    def _features(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, what: str):
        check_bhtd("t2r", x, weight.shape[0], self.head_dim, what)
        cd = torch.promote_types(x.dtype, torch.float32)
        y = torch.einsum("bhtd,hdf->bhtf", x.to(cd), weight.to(cd)) + bias.to(cd)[:, None, :]
        return torch.relu(y).to(x.dtype)

    def triton_projection(self) -> ProjectionTritonForm:
        """Computed inside the chunked kernels (featattn.kernels.projected); query head h
        uses kv head h // group's map there too."""
        return ProjectionTritonForm(self.weight, self.bias, self.weight, self.bias, "relu",
                                    q_shares_kv_head=True, heads=self.heads)

    def forward_query(self, q: torch.Tensor) -> torch.Tensor:
        group = self.heads // self.kv_heads
        w, b = self.weight, self.bias
        if group > 1:
            w, b = w.repeat_interleave(group, 0), b.repeat_interleave(group, 0)
        return self._features(q, w, b, "queries")

    def forward_key(self, k: torch.Tensor) -> torch.Tensor:
        return self._features(k, self.weight, self.bias, "keys")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keys' map for ``[B, kv_heads, T, d]`` input, else the queries' (``[B, heads, T, d]``)."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == self.kv_heads:
            return self.forward_key(x)
        return self.forward_query(x)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"feature_dim={self.feature_dim}")
