"""Kernel selection: which implementation runs a given call, and why.

The decision depends on the device, the dtype, the *expanded* q/k feature dim Dk (after the
feature map), the value dim Dv, the feature map and the ``backend=`` override:

==================  ==========================================================
kernel              when
==================  ==========================================================
``taylor_fused``    Triton; Taylor map fused into the kernel (raw q/k, d <= 32)
``equal_dim``       Triton chunked kernel, Dk <= Dv
``small_vhd``       Triton chunked kernel, Dk > Dv (Dk split into blocks)
``torch_chunked``   the O(T) PyTorch path: CPU, float64, no Triton, or fallback
``reference``       the O(T^2) oracle, only when asked for
==================  ==========================================================

``backend="auto"`` takes the first kernel that can run, and never fails where the torch path
works.  ``backend="triton"`` forces a Triton kernel (on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1``) and raises with the reasons when none can run.  A kernel name forces
that kernel.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _switches
from .feature_maps import FeatureMap, TaylorFeatureMap, resolve_feature_map

__all__ = ["KernelChoice", "select_kernel", "BACKENDS", "KERNELS"]

#: every kernel name select_kernel can return
KERNELS = ("taylor_fused", "equal_dim", "small_vhd", "torch_chunked", "reference")
#: every accepted ``backend=`` value
BACKENDS = ("auto", "torch", "reference", "triton", "equal_dim", "small_vhd", "taylor_fused")

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelChoice(NamedTuple):
    """The dispatcher's answer: ``name`` of the kernel that runs, ``reasons`` saying why
    each faster candidate was not taken (empty when the fastest one was), and ``map_path``:
    where the feature map runs, None without a map (or inside ``taylor_fused``):

    * ``"triton_pass"``: the map's Triton form in one elementwise pass before the chunked
      kernel (one more read and write of q/k, forward and backward; the choice for maps
      with an :class:`~featattn.ElementwiseTritonForm` when one program sweeps each head);
    * ``"kernel"``: inside the chunked kernel (raw q/k in, no features in memory; the choice
      when the kernel splits T into segments, or with ``FEATATTN_FUSE_MAPS=kernel``);
    * ``"torch"``: the map's PyTorch ``forward`` before the kernel; ``reasons`` says why.

    ``map_fused`` is True for the first two (the map runs in Triton)."""

    name: str
    reasons: tuple
    map_path: Optional[str] = None

    @property
    def map_fused(self) -> bool:
        return self.map_path in ("kernel", "triton_pass")


def _triton_map_path(kernels, shape, dk: int, dv: int, dtype, device) -> str:
    """Where an elementwise map runs: the pass is cheaper when one program sweeps each head
    (the map on the latency-bound chunk loop's critical path costs more than writing the
    features), the kernel when T is split into segments (enough programs hide it, and the
    features never reach memory).  H200 numbers: docs/benchmarks.md."""
    mode = _switches.read("FEATATTN_FUSE_MAPS")
    if mode not in ("auto", "pass", "kernel"):
        raise ValueError(f"FEATATTN_FUSE_MAPS must be 'auto' (the default), 'pass' or 'kernel', "
                         f"got {mode!r}")
    if mode == "auto":
        split = shape is not None and kernels.splits_time(*shape, dk, dv, dtype, device)
        mode = "kernel" if split else "pass"
    return "kernel" if mode == "kernel" else "triton_pass"


def _unfusable_reason(fm: FeatureMap, dqk: int) -> Optional[str]:
    """None when the chunked kernels can fuse ``fm`` (an elementwise map that declares a
    Triton form), else why not."""
    what = f"map {fm.name!r} runs in PyTorch before the kernel"
    if fm.triton_elementwise() is None:
        return f"{what}: it declares no elementwise Triton form (FeatureMap.triton_elementwise)"
    if fm.output_dim(dqk) != dqk:
        return f"{what}: output_dim({dqk}) = {fm.output_dim(dqk)} is not elementwise"
    cls = type(fm)
    if cls.forward_query is not FeatureMap.forward_query or cls.forward_key is not FeatureMap.forward_key:
        return f"{what}: it treats queries and keys differently (forward_query/forward_key)"
    if any(True for _ in fm.parameters()):
        return f"{what}: it has parameters, which a Triton form cannot see"
    return None


def _kernels_module():
    try:
        from . import kernels
    except ImportError:  # pragma: no cover - the package always ships featattn.kernels
        return None
    return kernels


def _triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    kernels = _kernels_module()
    if kernels is None or not getattr(kernels, "TRITON_AVAILABLE", False):
        return "triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        pass
    elif device.type == "cpu":
        if not _switches.enabled("TRITON_INTERPRET"):
            return "tensors are on the CPU: Triton kernels need CUDA (or TRITON_INTERPRET=1 for testing)"
    else:
        return f"tensors are on {device.type}: Triton kernels need CUDA"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported by the Triton kernels (fp32, fp16, bf16)"
    return None


def _kernel_shape_reason(kernels, dk: int, dv: int) -> Optional[str]:
    limits = getattr(kernels, "KERNEL_LIMITS", None)
    if not limits:
        return "this build has no Triton kernels"
    if dk > limits["max_dk"]:
        return f"feature dim Dk={dk} is above the kernels' limit of {limits['max_dk']}"
    if dv > limits["max_dv"]:
        return f"value dim Dv={dv} is above the kernels' limit of {limits['max_dv']}"
    return None


def _check_backend(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def select_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map=None,
    backend: str = "auto",
) -> KernelChoice:
    """Pick the kernel for ``linear_attention(q, k, v, feature_map=..., backend=...)``.

    Args:
        q: ``[B, H, T, Dqk]`` raw queries (before the feature map).
        k: ``[B, Hkv, T, Dqk]``.  v: ``[B, Hkv, T, Dv]``.
        feature_map: None, a registered name or a FeatureMap.
        backend: one of :data:`BACKENDS`.

    Returns:
        :class:`KernelChoice` ``(name, reasons)``.

    Raises:
        ValueError: unknown backend, or a forced backend that cannot run here (the message
        lists why).
    """
    _check_backend(backend)
    fm = resolve_feature_map(feature_map)
    return _select(q.device, q.dtype, q.shape[-1], v.shape[-1], fm, backend, tuple(q.shape[:3]))


def _select(device, dtype, dqk: int, dv: int, fm: Optional[FeatureMap], backend: str,
            shape: Optional[tuple] = None) -> KernelChoice:
    """``shape``: q's (B, H, T), which decides where an elementwise map runs (None: the
    pass)."""
    dk = fm.output_dim(dqk) if fm is not None else dqk
    if backend == "torch":
        return KernelChoice("torch_chunked", ("backend='torch' was requested",))
    if backend == "reference":
        return KernelChoice("reference", ("backend='reference' was requested",))

    reasons = []
    kernels = _kernels_module()
    triton_why = _triton_unavailable_reason(device, dtype)
    if backend == "auto" and triton_why is None and device.type != "cuda":
        triton_why = "backend='auto' uses Triton on CUDA only (the interpreter is for testing)"

    # 1. the fused Taylor kernel
    if backend in ("auto", "triton", "taylor_fused"):
        why = triton_why
        if why is None:
            if fm is None or type(fm) is not TaylorFeatureMap:
                why = "taylor_fused: only for feature_map='taylor'"
            elif not hasattr(kernels, "taylor_attention"):
                why = "taylor_fused: this build has no fused Taylor kernel"
            else:
                why = kernels.taylor_unsupported_reason(dqk, dv)
        elif not why.startswith("taylor_fused"):
            why = f"taylor_fused: {why}"
        if why is None:
            return KernelChoice("taylor_fused", tuple(reasons))
        if backend == "taylor_fused":
            raise ValueError(f"backend='taylor_fused' cannot run: {why}")
        if type(fm) is TaylorFeatureMap:
            reasons.append(why)

    # 2. the chunked Triton kernels on materialised features
    if backend in ("auto", "triton", "equal_dim", "small_vhd"):
        name = "equal_dim" if dk <= dv else "small_vhd"
        why = triton_why
        if why is None:
            why = _kernel_shape_reason(kernels, dk, dv)
        if why is None and backend in ("equal_dim", "small_vhd") and backend != name:
            why = f"Dk={dk}, Dv={dv} is a {name} shape"
        if why is None:
            if fm is None:
                return KernelChoice(name, tuple(reasons))
            unfused = _unfusable_reason(fm, dqk)
            if unfused is None and torch.compiler.is_compiling():
                # a Triton launch inside an autograd.Function is opaque to dynamo; the map's
                # PyTorch form is what Inductor fuses into one elementwise kernel itself
                unfused = (f"map {fm.name!r} runs as PyTorch operations under torch.compile "
                           "(Inductor fuses them)")
            if unfused is None:
                return KernelChoice(name, tuple(reasons),
                                    _triton_map_path(kernels, shape, dk, dv, dtype, device))
            return KernelChoice(name, tuple(reasons) + (unfused,), "torch")
        if backend != "auto":
            raise ValueError(
                f"backend={backend!r} cannot run: {name}: {why}"
                + (f"; also {'; '.join(reasons)}" if reasons else "")
                + "; use backend='auto' or 'torch' to fall back to the PyTorch path"
            )
        reasons.append(f"{name}: {why}")

    return KernelChoice("torch_chunked", tuple(reasons))
