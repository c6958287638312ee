"""Elementwise feature maps as Triton functions, and the table the fused chunked kernels use.

``tl.maximum`` / ``tl.minimum`` drop a NaN operand unless told otherwise: every form here passes
``propagate_nan=tl.PropagateNan.ALL``, so a NaN input gives a NaN feature as the PyTorch maps
do (a silent finite answer would hide it).

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

import importlib

from typing import Optional

import torch
import triton
import triton.language as tl

from ..feature_maps.base import ElementwiseTritonForm, FeatureMap, outdated_form_reason
from . import _common
from ._common import cdiv, next_pow2

__all__ = ["ELU", "RELU", "IDENTITY", "SQUARED_RELU", "fused_key", "lookup", "apply_map",
           "map_features"]


@triton.jit
def elu_phi(x):
    # exp(x) of large x overflows to inf in the branch not taken, which tl.where drops (the
    # PyTorch map clamps first because autograd would multiply that inf by 0); NaN gives NaN
    return tl.where(x >= 0, x + 1.0, _common.exp_nonpos(x))


@triton.jit
def elu_dphi(x, y):
    return tl.where(x >= 0, 1.0, y)


@triton.jit
def relu_phi(x):
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


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
    r = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return r * r


@triton.jit
def squared_relu_dphi(x, y):
    return 2.0 * tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


# phi' from the feature y = phi(x) alone (ElementwiseTritonForm.dphi_from_y)
@triton.jit
def elu_dphi_y(y):
    # y >= 1 exactly where x >= 0 (slope 1); below, the slope exp(x) is y itself
    return tl.minimum(y, 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_dphi_y(y):
    return tl.where(y > 0, 1.0, 0.0)


@triton.jit
def identity_dphi_y(y):
    return y * 0.0 + 1.0


@triton.jit
def squared_relu_dphi_y(y):
    return 2.0 * tl.sqrt(y)


ELU = ElementwiseTritonForm(elu_phi, elu_dphi, elu_dphi_y)
RELU = ElementwiseTritonForm(relu_phi, relu_dphi, relu_dphi_y)
IDENTITY = ElementwiseTritonForm(identity_phi, identity_dphi, identity_dphi_y)
SQUARED_RELU = ElementwiseTritonForm(squared_relu_phi, squared_relu_dphi, squared_relu_dphi_y)

_FUSED: dict[str, tuple[FeatureMap, ElementwiseTritonForm]] = {}
#: each map class's key: ``module:qualname``, with ``#2``, ``#3``, ... for a later class of the
#: same name (classes made by a factory function share their qualname)
_KEYS: dict[type, str] = {}


def _class_key(cls: type) -> str:
    key = _KEYS.get(cls)
    if key is None:
        base = key = f"{cls.__module__}:{cls.__qualname__}"
        taken = set(_KEYS.values())
        n = 1
        while key in taken:
            n += 1
            key = f"{base}#{n}"
        _KEYS[cls] = key
    return key


def fused_key(fm: FeatureMap) -> Optional[str]:
    """The string naming ``fm``'s Triton form to the kernel ops, or None when it has none.
    The form is a property of the class (maps with one carry no parameters), so one instance
    stands for all of them; each class has its own key, so a backward finds the form of the
    class its forward ran even when another class of the same name ran in between.

    Under torch.compile the form (a ``@triton.jit`` function) cannot be traced: the key is the
    class's name alone (its filed key once an eager call has filed it), and :func:`lookup`
    files it when the op runs (the caller checked that the map has a form)."""
    if torch.compiler.is_compiling():
        return _KEYS.get(type(fm)) or f"{type(fm).__module__}:{type(fm).__qualname__}"
    form = fm.triton_elementwise()
    if form is None or outdated_form_reason(fm, "triton_elementwise"):
        return None
    key = _class_key(type(fm))
    known = _FUSED.get(key)
    if known is None or known[1] != form:
        _FUSED[key] = (fm, form)
    return key


def lookup(key: str) -> tuple[FeatureMap, ElementwiseTritonForm]:
    """(a map instance, its Triton form) for a key from :func:`fused_key`.  A key first made
    under torch.compile is filed here, with an instance of its class built without
    arguments."""
    hit = _FUSED.get(key)
    if hit is not None:
        return hit
    module, _, qualname = key.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        fm = obj()
    except (ImportError, AttributeError, TypeError) as e:
        raise TypeError(
            f"the feature map class {qualname} met first under torch.compile cannot be found "
            f"or built without arguments ({e}); call the compiled function's map once eagerly first "
            "(any featattn call with it), which files its Triton form") from None
    if fused_key(fm) != key:
        raise TypeError(f"feature map {qualname} has no Triton form (triton_elementwise())")
    return _FUSED[key]


# --------------------------------------------------------------------------- the map as one pass
# The attention kernels can apply a form in registers (FUSED in chunked.py), but on the H200 that
# made the latency-bound chunk loop ~2x slower (docs/benchmarks.md).  On large calls one
# elementwise pass that writes the features (read x, write phi(x): 2 bytes per element each way
# in bf16) costs less GPU time; small calls (host-bound) and calls whose kernel splits T into
# segments take the in-kernel form (featattn.dispatch._triton_map_path).

_BLOCK = 1024


@triton.jit
def _map_fwd_kernel(x, y, N, scale, PHI: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    xv = tl.load(x + offs, mask=m, other=0.0).to(tl.float32) * scale
    tl.store(y + offs, PHI(xv).to(y.dtype.element_ty), mask=m)


@triton.jit
def _map_bwd_kernel(x, g, dx, N, scale, PHI: tl.constexpr, DPHI: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    xv = tl.load(x + offs, mask=m, other=0.0).to(tl.float32) * scale
    gv = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(dx + offs, (gv * DPHI(xv, PHI(xv)) * scale).to(dx.dtype.element_ty), mask=m)


@triton.jit
def _map_rows_kernel(x, g, y, R, H, T, D, sxb, sxh, sxt, sgb, sgh, sgt, sgd, syb, syh, syt, scale,
                     PHI: tl.constexpr, DPHI: tl.constexpr, BWD: tl.constexpr,
                     BR: tl.constexpr, BD: tl.constexpr):
    """The pass over a strided [B, H, T, D] view (unit last stride), BR rows (b, h, t) a
    program: y = PHI(scale * x), or with BWD y = g * DPHI(scale * x) * scale.  g may have
    any strides (an expanded or transposed gradient)."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    m = (r < R)[:, None] & (d < D)[None, :]
    t = r % T
    bh = r // T
    h = bh % H
    b = bh // H
    xv = tl.load(x + (b * sxb + h * sxh + t * sxt)[:, None] + d[None, :], mask=m,
                 other=0.0).to(tl.float32) * scale
    if BWD:
        gv = tl.load(g + (b * sgb + h * sgh + t * sgt)[:, None] + d[None, :] * sgd, mask=m,
                     other=0.0).to(tl.float32)
        out = gv * DPHI(xv, PHI(xv)) * scale
    else:
        out = PHI(xv)
    tl.store(y + (b * syb + h * syh + t * syt)[:, None] + d[None, :],
             out.to(y.dtype.element_ty), mask=m)


def _rows_pass(x, g, form, scale):
    """The pass over a 4-D view whose elements do not fill one block (a slice of a fused
    qkv projection): reads it in place, writes a dense [B, H, T, D] (or [B, T, H, D] order,
    following x) result, so no copy of x is made."""
    from ._common import empty_like_layout

    B, H, T, D = x.shape
    y = empty_like_layout(x, B, H, T, D, x.dtype)
    src = g if g is not None else x
    bd = max(16, next_pow2(D))
    br = max(1, 4096 // bd)
    R = B * H * T
    _map_rows_kernel[(cdiv(R, br),)](
        x, src, y, R, H, T, D, x.stride(0), x.stride(1), x.stride(2),
        src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        y.stride(0), y.stride(1), y.stride(2),
        scale, PHI=form.phi, DPHI=form.dphi, BWD=g is not None, BR=br, BD=bd)
    return y


def _rows_ok(x) -> bool:
    return x.dim() == 4 and x.stride(-1) == 1 and not _is_dense(x)


def _dense(x):
    """x itself when its elements fill one block of memory (any order of dims, e.g. a
    transposed [B, T, H, D] view), else a contiguous copy: the pass walks memory linearly."""
    return x if _is_dense(x) else x.contiguous()


def _is_dense(x) -> bool:
    """Whether x's elements fill numel consecutive slots: its strides, fastest first, are
    the running products of the sizes (dims of size 1 do not count)."""
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _like(x):
    """An output laid out like the dense x (same strides: the pass's linear index means the
    same element in both), NaN-filled under the tests' poisoning switch."""
    from . import _common

    out = torch.empty_like(x)
    if not _same_layout(out, x):  # empty_like keeps a dense tensor's layout; never trust it blind
        out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if _common.POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def map_features(x_in, key: str, scale: float = 1.0):
    """``phi(scale * x)`` in one Triton pass, outside autograd: a tensor laid out as x is
    (dense x), or a dense [B, H, T, D] one (a 4-D view that is not dense, read in place)."""
    form = lookup(key)[1]
    if _rows_ok(x_in):
        return _rows_pass(x_in, None, form, scale)
    x = _dense(x_in)
    y = _like(x)
    n = x.numel()
    _map_fwd_kernel[(cdiv(n, _BLOCK),)](x, y, n, scale, PHI=form.phi, BLOCK=_BLOCK)
    return y


class _MapPass(torch.autograd.Function):
    """phi(scale * x) with the map's Triton form, one pass each way; a differentiable
    backward (create_graph=True) uses the map's PyTorch form instead."""

    @staticmethod
    def forward(ctx, x_in, key, scale):
        # the input itself (not a dense copy): a differentiable backward differentiates it
        ctx.save_for_backward(x_in)
        ctx.key, ctx.scale = key, scale
        return map_features(x_in, key, scale)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the backward is wanted
            fm = lookup(ctx.key)[0]
            up = torch.promote_types(x.dtype, torch.float32)
            y = fm(x.to(up) * ctx.scale)
            return torch.autograd.grad(y, x, g.to(up), create_graph=True)[0].to(x.dtype), None, None
        form = lookup(ctx.key)[1]
        if _rows_ok(x):
            return _rows_pass(x, g, form, ctx.scale), None, None
        x = _dense(x)
        g = _match(g, x)
        dx = _like(x)
        n = x.numel()
        _map_bwd_kernel[(cdiv(n, _BLOCK),)](x, g, dx, n, ctx.scale, PHI=form.phi,
                                                   DPHI=form.dphi, BLOCK=_BLOCK)
        return dx, None, None


def _same_layout(a, b) -> bool:
    """Same strides on every dim that has more than one element (the others never move)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _match(g, x):
    """g laid out like x (same strides), copying only when it is not."""
    if _same_layout(g, x):
        return g
    out = torch.empty_like(x, dtype=g.dtype)
    out.copy_(g)
    return out


def apply_map(x, key: str, scale: float = 1.0):
    """``phi(scale * x)`` for the map filed under ``key`` (:func:`fused_key`), as one Triton pass
    forward and one backward; x is any float tensor, the result has x's dtype and layout."""
    return _MapPass.apply(x, key, float(scale))
