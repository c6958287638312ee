"""Elementwise feature maps as Triton functions, and the table the fused chunked kernels use.

A map fused into the kernels is named to the torch.library ops by a string (custom ops take
no Python objects): :func:`fused_key` files the map under its class's qualified name, and
:func:`lookup` gives the kernels its :class:`~featattn.feature_maps.base.ElementwiseTritonForm`
(and the double backward its PyTorch form) back.

The built-in forms (phi in fp32, as the PyTorch maps compute it before rounding once):

=================  =============================  =============================
map                phi(x)                          phi'(x)
=================  =============================  =============================
``elu``            x + 1 (x >= 0), exp(x) (x < 0)  1 (x >= 0), exp(x) = phi (x < 0)
``relu``           max(x, 0)                       1 (x > 0), 0 otherwise
``identity``       x                               1
``squared_relu``   max(x, 0)^2                     2 max(x, 0)
=================  =============================  =============================
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

from ..feature_maps.base import ElementwiseTritonForm, FeatureMap

__all__ = ["ELU", "RELU", "IDENTITY", "SQUARED_RELU", "fused_key", "lookup"]


@triton.jit
def elu_phi(x):
    # exp of the clamped value: the unused branch must not overflow (see EluFeatureMap)
    return tl.where(x >= 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def elu_dphi(x, y):
    return tl.where(x >= 0, 1.0, y)


@triton.jit
def relu_phi(x):
    return tl.maximum(x, 0.0)


@triton.jit
def relu_dphi(x, y):
    # torch.relu's gradient at 0 is 0
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def identity_phi(x):
    return x


@triton.jit
def identity_dphi(x, y):
    return x * 0.0 + 1.0


@triton.jit
def squared_relu_phi(x):
    r = tl.maximum(x, 0.0)
    return r * r


@triton.jit
def squared_relu_dphi(x, y):
    return 2.0 * tl.maximum(x, 0.0)


ELU = ElementwiseTritonForm(elu_phi, elu_dphi)
RELU = ElementwiseTritonForm(relu_phi, relu_dphi)
IDENTITY = ElementwiseTritonForm(identity_phi, identity_dphi)
SQUARED_RELU = ElementwiseTritonForm(squared_relu_phi, squared_relu_dphi)

_FUSED: dict[str, tuple[FeatureMap, ElementwiseTritonForm]] = {}


def fused_key(fm: FeatureMap) -> Optional[str]:
    """The string naming ``fm``'s Triton form to the kernel ops, or None when it has none.
    The form is a property of the class (maps with one carry no parameters), so one instance
    stands for all of them."""
    form = fm.triton_elementwise()
    if form is None:
        return None
    key = f"{type(fm).__module__}.{type(fm).__qualname__}"
    known = _FUSED.get(key)
    if known is None or known[1] != form:
        _FUSED[key] = (fm, form)
    return key


def lookup(key: str) -> tuple[FeatureMap, ElementwiseTritonForm]:
    """(a map instance, its Triton form) for a key from :func:`fused_key`."""
    return _FUSED[key]
