"""The FeatureMap base class.

A feature map phi turns a query or key vector of size ``d`` into a feature vector of size
``output_dim(d)`` so that linear attention can use ``phi(q_t) . phi(k_s)`` in place of
``exp(q_t . k_s)``.  Shapes: the input is ``[..., d]`` (in practice ``[B, H, T, d]``) and the
output ``[..., output_dim(d)]``; the map acts on the last dimension only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

__all__ = ["FeatureMap", "ElementwiseTritonForm", "ProjectionTritonForm"]


class ElementwiseTritonForm(NamedTuple):
    """How a Triton kernel computes an elementwise map phi (output dim == input dim) in
    registers, so the chunked kernels can read raw q/k and never write the features to memory.

    ``phi(x)`` and ``dphi(x, y)`` are ``@triton.jit`` functions on fp32 tiles: ``phi`` returns
    phi(x); ``dphi`` returns phi'(x), given x and ``y = phi(x)`` (use whichever is cheaper).
    Both must agree with the map's PyTorch ``forward`` (the tests check the built-ins; check
    yours with ``featattn.testing``), and phi must be finite for every finite x.

    ``dphi_from_y(y)`` (optional): phi'(x) from the feature ``y = phi(x)`` alone, for maps
    where the feature determines the slope (elu + 1: ``min(y, 1)``; relu: ``y > 0``;
    softplus: ``1 - exp(-y)``).  With it, when the map runs as a Triton pass before the
    chunked kernels, the backward kernel turns the feature gradients into the inputs' as it
    stores them (from the features it loads anyway) and the map's own backward pass is gone.
    y arrives rounded to the input dtype, so the slope may be off by that rounding.
    """

    phi: Callable
    dphi: Callable
    dphi_from_y: Optional[Callable] = None


class ProjectionTritonForm(NamedTuple):
    """How the chunked Triton kernels compute a map of the "learned projection, then a row-wise
    activation" family in registers, forward and backward (weights' gradients included)::

        l = x W_h + b_h                       # W_h: [d, f] of head h, b_h: [f]
        "softmax_pair" (Hedgehog):  phi(x) = [softmax(l), softmax(-l)]    (2 f features)
        "relu" (T2R):               phi(x) = relu(l)                      (f features)

    ``q_weight``: ``[H, d, f]`` (one per query head), or with ``q_shares_kv_head`` ``[Hkv, d,
    f]`` (query head h uses row ``h // (H // Hkv)``, as T2R); ``k_weight``: ``[Hkv, d, f]``;
    ``q_bias`` / ``k_bias``:
    ``[., f]`` or both None.  The tensors are the map's own parameters (``tie_qk`` maps pass
    the same tensor twice: autograd adds both gradients).  The queries are multiplied by the
    call's ``scale`` before the projection, the keys are not, as with every map.  ``d`` and
    ``f`` up to 128.  ``heads``: the number of query heads the map was built for, when its
    weights do not say it (``q_shares_kv_head``); calls with other head counts then run the
    map in PyTorch, which raises.
    """

    q_weight: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    activation: str
    q_shares_kv_head: bool = False
    heads: Optional[int] = None


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

    def triton_elementwise(self) -> Optional[ElementwiseTritonForm]:
        """The map's :class:`ElementwiseTritonForm`, or None (the default) when it has none.

        A map that returns one is fused into the chunked Triton kernels (forward and backward)
        whenever the dispatcher picks them; ``select_kernel`` reports it.  Only for maps that
        act on each coordinate alone, with ``output_dim(d) == d``, no parameters and the same
        treatment of queries and keys (``forward_query`` / ``forward_key`` not overridden).
        A subclass that redefines ``forward`` must define this again: the form it inherits
        computes its parent's map, so it is not fused.  Return None when triton is not
        installed."""
        return None

    def triton_projection(self) -> Optional[ProjectionTritonForm]:
        """The map's :class:`ProjectionTritonForm` (a learned per-head projection and a
        row-wise activation the kernels know), or None (the default).  A map that returns one
        runs inside the chunked Triton kernels, its parameters' gradients included; its
        :meth:`forward_query` / :meth:`forward_key` must compute the same thing (the tests
        check the built-ins; check yours with ``featattn.testing``)."""
        return None

    def forward_query(self, q: torch.Tensor) -> torch.Tensor:
        """phi applied to (already scaled) queries ``[B, H, T, d]``."""
        return self(q)

    def forward_key(self, k: torch.Tensor) -> torch.Tensor:
        """phi applied to keys ``[B, Hkv, T, d]``."""
        return self(k)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def outdated_form_reason(fm: FeatureMap, declared: str) -> Optional[str]:
    """Why ``fm``'s Triton form (the method ``declared``: "triton_elementwise" or
    "triton_projection") is not its map, or None: a subclass that redefines the PyTorch form
    (forward, forward_query or forward_key) below the class that declares the Triton form
    inherits the form of its parent's map."""
    return _outdated(type(fm), declared)


@torch.compiler.assume_constant_result
def _outdated(cls: type, declared: str) -> Optional[str]:
    def owner(name):
        return next((c for c in cls.__mro__ if name in vars(c)), None)

    form_owner = owner(declared)
    for name in ("forward", "forward_query", "forward_key"):
        o = owner(name)
        if o is not None and form_owner is not None and o is not form_owner \
                and issubclass(o, form_owner):
            return (f"{o.__qualname__} redefines {name} but inherits {declared}() from "
                    f"{form_owner.__qualname__}, whose Triton form computes the parent's map "
                    f"(define {declared}() in {o.__qualname__} to fuse it)")
    return None


def builtin_triton_form(name: str) -> Optional[ElementwiseTritonForm]:
    """A built-in map's Triton form (``featattn.kernels.maps.<NAME>``), None without triton."""
    try:
        from ..kernels import maps
    except ImportError:  # triton is not installed
        return None
    return getattr(maps, name)

