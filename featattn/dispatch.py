"""Kernel selection: which implementation runs a given call, and why.

Every implementation is a spec (:class:`Impl`) that declares what it needs and answers
``not_supported_reasons(call) -> list[str]`` for one call's facts (:class:`Call`); the
dispatcher walks them in priority order and returns the first that can run, naming exactly
what runs (and, for the chunked kernel, where an elementwise feature map runs):

===================  =====================================================================
kernel               when (priority order of ``backend="auto"``)
===================  =====================================================================
``recurrent_step``   Triton, T <= 16 tokens against an initial state, no gradient (decoding):
                     one launch, the map (elementwise or Taylor) fused, state in registers;
                     with a window (the hybrid layer) the window's softmax too, any map
``taylor_parallel``  Triton, Taylor map fused, the quadratic parallel form: no state in or
                     out and T <= ``FEATATTN_TAYLOR_PARALLEL_MAX_T`` (2048)
``taylor_chunked``   Triton, Taylor map fused, the chunked O(T) form
``chunked``          Triton chunked kernel on features (any Dk, Dv up to 4096; elementwise
                     maps with a Triton form run in Triton, see ``KernelChoice.map_path``)
``torch_chunked``    the O(T) PyTorch path: CPU, float64, no Triton, or fallback
``reference``        the O(T^2) oracle, only when asked for
===================  =====================================================================

``backend=`` is ``"auto"`` (the first kernel that can run; never fails where the torch path
works; Triton only on CUDA), ``"triton"`` (the first Triton kernel that can run, on CUDA or on
CPU tensors under ``TRITON_INTERPRET=1``; raises with the reasons when none can), ``"torch"``,
``"reference"``, a kernel name, or an alias: ``"equal_dim"`` / ``"small_vhd"`` (the two old
names of ``chunked``, one kernel body) and ``"taylor_fused"`` (either Taylor form).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch

from . import _switches
from .feature_maps import (ElementwiseTritonForm, FeatureMap, ProjectionTritonForm,
                           TaylorFeatureMap, resolve_feature_map)
from .feature_maps.base import builtin_triton_form, outdated_form_reason

__all__ = ["KernelChoice", "KernelUnavailable", "select_kernel", "BACKENDS", "KERNELS",
           "ALIASES", "Call", "Impl", "IMPLS", "needs_grad"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelChoice(NamedTuple):
    """The dispatcher's answer: ``name`` of the kernel that runs (one of :data:`KERNELS`),
    ``reasons`` saying why each faster candidate was not taken (empty when the fastest one
    was), and ``map_path``: where the feature map runs, None without a map (or inside a
    Taylor kernel):

    * ``"triton_pass"``: the map's Triton form in one elementwise pass before the chunked
      kernel (one more read and write of q/k, forward and backward; the choice for maps
      with an :class:`~featattn.ElementwiseTritonForm` on calls of more than
      :data:`FUSE_MAX_ROWS` rows when one program sweeps each head);
    * ``"kernel"``: inside the chunked kernel (raw q/k in, no features in memory; the choice
      for smaller calls, calls without a backward, when the kernel splits T into segments
      because few heads leave SMs idle, or with ``FEATATTN_FUSE_MAPS=kernel``); for a learned projection map (Hedgehog, T2R:
      ``FeatureMap.triton_projection``) ``"triton_pass"`` is its Triton pass (weights'
      gradients included; the default) and ``"kernel"`` its own kernels
      (featattn/kernels/projected.py: less memory, slower);
    * ``"identity"``: the built-in identity map under ``FEATATTN_FUSE_MAPS=auto``: nothing
      to compute, so the kernel reads q and k as given, the call on features (a ``scale > 0``
      folds into ``eps`` when normalised, else multiplies q);
    * ``"torch"``: the map's PyTorch ``forward`` before the kernel; ``reasons`` says why.

    ``map_fused`` is True for the first three (no features made in PyTorch)."""

    name: str
    reasons: tuple
    map_path: Optional[str] = None

    @property
    def map_fused(self) -> bool:
        return self.map_path in ("kernel", "triton_pass", "identity")


class KernelUnavailable(ValueError):
    """A forced ``backend=`` cannot run this call; ``reasons`` lists why, one per kernel
    tried (a ValueError, so ``except ValueError`` keeps working)."""

    def __init__(self, backend: str, reasons: tuple):
        self.backend, self.reasons = backend, tuple(reasons)
        super().__init__(
            f"backend={backend!r} cannot run: {'; '.join(self.reasons)}; use backend='auto' "
            "or 'torch' to fall back to the PyTorch path")


class Call(NamedTuple):
    """One call's facts, validated once by :func:`featattn.linear_attention` (or
    :func:`select_kernel`), which every implementation is asked about.  ``dqk`` is the raw
    q/k head dim, ``dk`` the expanded feature dim (``fm.output_dim(dqk)``); ``stateful``:
    a state is passed in or returned; ``has_init``: a state is passed in; ``needs_grad``:
    autograd will differentiate the call; ``hkv``: the key/value heads (None: not known).
    ``B`` is the tensors' batch: 1 for packed sequences (``packed``), whose T is the total."""

    device: torch.device
    dtype: torch.dtype
    B: int
    H: int
    T: int
    dqk: int
    dk: int
    dv: int
    fm: Optional[FeatureMap]
    stateful: bool
    has_init: bool = False
    needs_grad: bool = False
    window: int = 0
    causal: bool = True
    hkv: Optional[int] = None
    packed: bool = False


def taylor_varlen_mode() -> str:
    """``FEATATTN_TAYLOR_VARLEN``: how packed sequences (``cu_seqlens``) run the Taylor map on
    CUDA: ``"native"`` (the chunked Taylor kernel's packed form, one launch) or ``"loop"``."""
    mode = _switches.read("FEATATTN_TAYLOR_VARLEN")
    if mode not in ("loop", "native"):
        raise ValueError(f"FEATATTN_TAYLOR_VARLEN must be 'native' (the default) or 'loop', got "
                         f"{mode!r}")
    return mode


class Impl:
    """An implementation: its ``name``, whether it is Triton, the ``aliases`` that also
    select it, and :meth:`not_supported_reasons`.  ``applies(call)`` says whether it is a
    candidate worth explaining at all (a Taylor kernel is not, for an elu call)."""

    name: str = ""
    triton: bool = False
    aliases: tuple = ()
    in_auto: bool = True

    def applies(self, call: Call) -> bool:
        return True

    def not_supported_reasons(self, call: Call) -> list:
        return []

    def choice(self, call: Call, reasons: tuple) -> KernelChoice:
        return KernelChoice(self.name, reasons)


def _kernels_module():
    try:
        from . import kernels
    except ImportError:  # pragma: no cover - the package always ships featattn.kernels
        return None
    return kernels


def _triton_reasons(call: Call, auto: bool) -> list:
    kernels = _kernels_module()
    if kernels is None or not getattr(kernels, "TRITON_AVAILABLE", False):
        return ["triton is not installed (pip install triton; Linux only)"]
    kind = call.device.type
    if kind == "cpu":
        if auto:
            return ["backend='auto' uses Triton on CUDA only (the interpreter is for testing)"]
        if not _switches.enabled("TRITON_INTERPRET"):
            return ["tensors are on the CPU: Triton kernels need CUDA (or TRITON_INTERPRET=1 "
                    "for testing)"]
    elif kind != "cuda":
        return [f"tensors are on {kind}: Triton kernels need CUDA"]
    if call.dtype not in _TRITON_DTYPES:
        return [f"dtype {call.dtype} is not supported by the Triton kernels (fp32, fp16, bf16)"]
    if kind == "cpu" and call.dtype == torch.bfloat16:
        return ["the Triton interpreter (TRITON_INTERPRET=1) computes bf16 tl.dot wrong (a Triton "
                "bug): interpret in fp32 or fp16, or run bf16 on CUDA"]
    return []


class RecurrentStep(Impl):
    """featattn/kernels/decode.py: a few tokens against a state, inference only."""

    name = "recurrent_step"
    triton = True

    def applies(self, call):
        return call.has_init and call.T <= _kernels_module().STEP_MAX_T

    def not_supported_reasons(self, call):
        kernels = _kernels_module()
        if not call.has_init:  # said before T is looked at: under torch.compile a test of a
            # symbolic T would guard on it, and a prefill would recompile at T = 16
            return ["no initial state (a prefill: the chunked kernels)"]
        out = []
        if call.needs_grad:
            out.append("autograd needs the call's gradient (the step kernel has no backward)")
        if call.window:  # any map: an elementwise one in the kernel, others in PyTorch
            why = kernels.hybrid_step_unsupported_reason(call.dqk, call.dk, call.dv, call.T)
            return out + ([why] if why else [])
        kind = _step_map_kind(call.fm, call.dqk)
        if kind is None:
            out.append(f"map {call.fm.name!r} is neither elementwise with a Triton form nor "
                       "'taylor'")
        else:
            why = kernels.step_unsupported_reason(kind, call.dqk, call.dv, call.T)
            if why:
                out.append(why)
        return out

    def choice(self, call, reasons):
        kind = _step_map_kind(call.fm, call.dqk)
        if call.window and call.fm is not None and kind != "elementwise":
            return KernelChoice(self.name, reasons + (
                f"map {call.fm.name!r} runs in PyTorch on the new queries and the keys "
                "leaving the window",), "torch")
        return KernelChoice(self.name, reasons, "kernel" if kind == "elementwise" else None)


def _step_map_kind(fm, dqk) -> Optional[str]:
    """How the step kernel applies ``fm``: "none", "elementwise", "taylor", or None (it
    cannot)."""
    if fm is None:
        return "none"
    if type(fm) is TaylorFeatureMap:
        return "taylor"
    return "elementwise" if _unfusable_reason(fm, dqk) is None else None


class _Taylor(Impl):
    triton = True
    aliases = ("taylor_fused",)

    def applies(self, call):
        return type(call.fm) is TaylorFeatureMap

    def not_supported_reasons(self, call):
        if type(call.fm) is not TaylorFeatureMap:
            return ["only for feature_map='taylor'"]
        why = _kernels_module().taylor_unsupported_reason(call.dqk, call.dv)
        return [why.removeprefix("taylor_fused: ")] if why else []


class TaylorParallel(_Taylor):
    name = "taylor_parallel"

    def not_supported_reasons(self, call):
        out = super().not_supported_reasons(call)
        if out:
            return out
        limit = _kernels_module().taylor_parallel_max_t()
        if call.packed and taylor_varlen_mode() == "native":
            out.append("packed sequences (cu_seqlens) run in one launch of the chunked Taylor "
                       "kernel's packed form (FEATATTN_TAYLOR_VARLEN=native)")
        elif call.stateful:
            out.append("a state is passed in or returned (the parallel form keeps none)")
        elif call.T > limit:
            out.append(f"T={call.T} is above FEATATTN_TAYLOR_PARALLEL_MAX_T={limit}, where the "
                       "chunked form is faster")
        return out


class TaylorChunked(_Taylor):
    name = "taylor_chunked"


class Chunked(Impl):
    name = "chunked"
    triton = True
    aliases = ("equal_dim", "small_vhd")

    def not_supported_reasons(self, call):
        limits = getattr(_kernels_module(), "KERNEL_LIMITS", None) or {}
        if not limits:
            return ["this build has no Triton kernels"]
        if call.dk > limits["max_dk"]:
            return [f"feature dim Dk={call.dk} is above the kernels' limit of {limits['max_dk']}"]
        if call.dv > limits["max_dv"]:
            return [f"value dim Dv={call.dv} is above the kernels' limit of {limits['max_dv']}"]
        return []

    def choice(self, call, reasons):
        if call.fm is None:
            return KernelChoice(self.name, reasons)
        proj = call.fm.triton_projection()
        if proj is not None and not isinstance(proj, ProjectionTritonForm):
            return KernelChoice(self.name, reasons + (
                f"map {call.fm.name!r} runs in PyTorch before the kernel: its triton_projection() "
                f"returned a {type(proj).__name__}, not a featattn.ProjectionTritonForm",), "torch")
        if proj is not None:
            why = outdated_form_reason(call.fm, "triton_projection")
            if why:
                why = f"map {call.fm.name!r} runs in PyTorch before the kernel: {why}"
            else:
                why = _projection_reason(call)
            if why is None:
                return KernelChoice(self.name, reasons, _triton_map_path(call, projection=True))
            return KernelChoice(self.name, reasons + (why,), "torch")
        unfused = _unfusable_reason(call.fm, call.dqk)
        if unfused is None and torch.compiler.is_compiling():
            # a Triton launch inside an autograd.Function is opaque to dynamo; the map's
            # PyTorch form is what Inductor fuses into one elementwise kernel itself
            unfused = (f"map {call.fm.name!r} runs as PyTorch operations under torch.compile "
                       "(Inductor fuses them)")
        if unfused is None:
            return KernelChoice(self.name, reasons, _triton_map_path(call))
        return KernelChoice(self.name, reasons + (unfused,), "torch")


class NonCausal(Impl):
    """``causal=False``: two GEMMs per head (``phi(k)^T v`` and ``phi(q)`` times it), which
    PyTorch runs at GEMM speed on any device."""

    name = "noncausal"

    def applies(self, call):
        return not call.causal

    def not_supported_reasons(self, call):
        return ["causal attention (the chunked paths)"] if call.causal else []


class TorchChunked(Impl):
    name = "torch_chunked"
    aliases = ("torch",)

    def not_supported_reasons(self, call):
        return ["causal=False (the noncausal path)"] if not call.causal else []


class Reference(Impl):
    name = "reference"
    in_auto = False


#: Every implementation, fastest first (the order ``backend="auto"`` and ``"triton"`` try).
IMPLS = (RecurrentStep(), TaylorParallel(), TaylorChunked(), Chunked(), NonCausal(),
         TorchChunked(), Reference())
#: every kernel name select_kernel can return
KERNELS = tuple(i.name for i in IMPLS)
#: alias -> the kernel names it selects (tried in order)
ALIASES = {a: tuple(i.name for i in IMPLS if a in i.aliases)
           for i in IMPLS for a in i.aliases}
#: every accepted ``backend=`` value
BACKENDS = tuple(dict.fromkeys(("auto", "torch", "reference", "triton") + KERNELS + tuple(ALIASES)))


#: ``FEATATTN_FUSE_MAPS=auto`` applies an elementwise map inside the chunked kernel when a call
#: has at most this many (batch, head, token) rows, has no backward, or when the kernel splits
#: T into segments because few heads leave SMs idle (the identity map: no map at all).
#: H200, bf16, D = 64 (docs/benchmarks.md): at B*H*T = 2^19 (B8 H16 T4096) the map in the kernel
#: took 0.28 / 1.31 ms fwd / fwd+bwd against 0.47 / 1.81 for the pass (each pass is a launch
#: and an autograd node: host time the kernel's extra GPU work stays under); at 2^21 (B8 H16
#: T16384) 1.05 / 3.71 against 0.83 / 2.78 (the map on the latency-bound chunk loop's critical
#: path costs more GPU time than writing the features).
FUSE_MAX_ROWS = 1 << 20

#: ``FEATATTN_FUSE_MAPS=auto`` runs a learned projection map (Hedgehog, T2R) in its own
#: kernels for calls of at most this many (batch, head, token) rows (host-bound calls, where
#: one launch fewer each way wins), else as its Triton pass before the chunked kernel.
PROJECTION_KERNEL_MAX_ROWS = 1 << 15


def _triton_map_path(call: Call, projection: bool = False) -> str:
    """Where an elementwise map runs: inside the chunked kernel for calls of at most
    :data:`FUSE_MAX_ROWS` rows (host-bound: one launch and one autograd node fewer each way),
    for calls without a backward (no features to keep for it), or when T is split into
    segments (enough programs hide the map, and the features never reach memory); one
    Triton pass before the kernel for larger calls with a backward, where one program
    sweeping each head makes the in-kernel map's backward cost more than writing the
    features.
    A learned projection map (``projection``) runs as its Triton pass under ``auto``, in its
    own kernels for calls of at most :data:`PROJECTION_KERNEL_MAX_ROWS` rows;
    ``FEATATTN_FUSE_MAPS=kernel`` forces its own kernels (features never in memory)."""
    mode = _switches.read("FEATATTN_FUSE_MAPS")
    if mode not in ("auto", "pass", "kernel"):
        raise ValueError(f"FEATATTN_FUSE_MAPS must be 'auto' (the default), 'pass' or 'kernel', "
                         f"got {mode!r}")
    if mode == "auto" and projection:
        # H200, bf16, B8 H16 D64 -> 128 features (docs/benchmarks.md): the pass then the
        # chunked kernel took 0.41 / 1.99 ms fwd / fwd+bwd at T = 4096 and 1.53 / 6.68 at
        # 16384, against 0.87 / 3.25 and 3.42 / 12.8 for the projection kernels (each chunk's
        # two projections and four softmaxes sit on the latency-bound chunk loop); the pass
        # holds the features, 2.5x the kernels' peak memory (2576 vs 1045 MiB at 16384).
        # Small calls (decoding, short prompts) are host-bound: the kernels' fewer launches
        # win there (a patched model's eager generate() took 2x longer per token with the
        # pass at T = 1).
        mode = "kernel" if call.B * call.H * call.T <= PROJECTION_KERNEL_MAX_ROWS else "pass"
    elif mode == "auto" and _is_identity(call.fm):
        # no map at all: the call on features.  H200, B8 H16 T16384 bf16 (docs/benchmarks.md,
        # session 14): the identity as a pass took 0.717 / 2.313 ms fwd / fwd+bwd, in the
        # kernel 0.557 / 2.393, against 0.458 / 1.853 on features.
        return "identity"
    elif mode == "auto":
        small = call.B * call.H * call.T <= FUSE_MAX_ROWS
        # Without a backward (inference, prefill) the map goes in the kernel at every size:
        # H200, B8 H16 T16384 bf16 forward (docs/benchmarks.md, sessions 13-14): 0.642 ms
        # against the pass's 0.714 in two segments, 0.746 vs 0.750 unsplit, and no features
        # in memory.  (Hybrid calls keep the rule below: their forward was not timed so.)
        inference = not call.needs_grad and not call.window
        shape = (call.B, call.H, call.T, call.dk, call.dv, call.dtype, call.device)
        # (packed sequences are never split into segments: chunked._split)
        if not call.packed and _kernels_module().splits_only_as_pass(*shape):  # (Dk tiles)
            mode = "pass"
        else:
            mode = "kernel" if small or inference or (
                not call.packed and _kernels_module().splits_time(*shape)) else "pass"
    return "kernel" if mode == "kernel" else "triton_pass"


def _is_identity(fm) -> bool:
    """Whether ``fm``'s Triton form is the built-in identity's (phi(x) = x)."""
    form = fm.triton_elementwise() if fm is not None else None
    return form is not None and form is builtin_triton_form("IDENTITY")


def _projection_reason(call: Call) -> Optional[str]:
    """None when the chunked kernels compute ``call.fm``'s learned projection map themselves
    (featattn/kernels/projected.py), else why the map runs in PyTorch before the kernel."""
    what = f"map {call.fm.name!r} runs in PyTorch before the kernel"
    if torch.compiler.is_compiling():
        return f"{what} under torch.compile (a Triton launch in an autograd.Function is opaque to dynamo)"
    why = _kernels_module().projection_unsupported_reason(call.fm.triton_projection(), call.dqk,
                                                          call.H, call.hkv)
    return f"{what}: {why}" if why else None


def _unfusable_reason(fm: FeatureMap, dqk: int) -> Optional[str]:
    """None when the chunked kernels can fuse ``fm`` (an elementwise map that declares a
    Triton form), else why not."""
    what = f"map {fm.name!r} runs in PyTorch before the kernel"
    form = fm.triton_elementwise()
    if form is None:
        return f"{what}: it declares no elementwise Triton form (FeatureMap.triton_elementwise)"
    if not isinstance(form, ElementwiseTritonForm):
        return (f"{what}: its triton_elementwise() returned a {type(form).__name__}, not a "
                f"featattn.ElementwiseTritonForm(phi, dphi)")
    if fm.output_dim(dqk) != dqk:
        return f"{what}: output_dim({dqk}) = {fm.output_dim(dqk)} is not elementwise"
    outdated = outdated_form_reason(fm, "triton_elementwise")
    if outdated:
        return f"{what}: {outdated}"
    cls = type(fm)
    if cls.forward_query is not FeatureMap.forward_query or cls.forward_key is not FeatureMap.forward_key:
        return f"{what}: it treats queries and keys differently (forward_query/forward_key)"
    if any(True for _ in fm.parameters()):
        return f"{what}: it has parameters, which a Triton form cannot see"
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
    *,
    initial_state=None,
    return_state: bool = False,
    window: int = 0,
    causal: bool = True,
    cu_seqlens=None,
) -> KernelChoice:
    """The kernel ``linear_attention(q, k, v, feature_map=..., backend=..., initial_state=...,
    return_state=...)`` runs, and why.

    Args:
        q: ``[B, H, T, Dqk]`` raw queries (before the feature map).
        k: ``[B, Hkv, T, Dqk]``.  v: ``[B, Hkv, T, Dv]``.
        feature_map: None, a registered name or a FeatureMap.
        backend: one of :data:`BACKENDS`.
        initial_state, return_state: as for linear_attention (the Taylor parallel form
            keeps no state; the step kernel needs an initial state).  Whether the inputs
            require a gradient matters too (the step kernel is inference only).
        window: as for linear_attention (the hybrid softmax window; > 0 runs in the chunked
            kernel and kernels/window.py, ``chunked``, or with FEATATTN_HYBRID_LINEAR=torch
            in the chunked PyTorch path).
        causal: as for linear_attention (False: every query reads every key, in PyTorch).
        cu_seqlens: as for linear_attention (packed sequences: the state is then [N, ...]).

    Returns:
        :class:`KernelChoice` ``(name, reasons, map_path)``.

    Raises:
        ValueError: unknown backend; :class:`KernelUnavailable` (a ValueError) when a forced
        backend cannot run here (``.reasons`` lists why).
    """
    _check_backend(backend)
    # the call's own input checks (functional imports this module: imported here)
    from .functional import _validate_cu_seqlens, _validate_qkv, _validate_state

    B, H, T, dqk, _, dv = _validate_qkv(q, k, v)
    fm = resolve_feature_map(feature_map)
    dk = fm.output_dim(dqk) if fm is not None else dqk
    if cu_seqlens is not None:
        cu_seqlens = _validate_cu_seqlens(cu_seqlens, q)
    if initial_state is not None:  # (packed sequences: a state per sequence)
        n_states = B if cu_seqlens is None else len(cu_seqlens) - 1
        _validate_state(initial_state, initial_state.z is not None if hasattr(initial_state, "z")
                        else True, n_states, H, dk, dv, q.device)
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no softmax window), got {window!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    call = Call(q.device, q.dtype, B, H, T, dqk, dk, v.shape[-1], fm,
                initial_state is not None or bool(return_state), initial_state is not None,
                needs_grad(q, k, v, initial_state, fm), int(window), bool(causal), k.shape[1],
                cu_seqlens is not None)
    return select(call, backend)


def needs_grad(q, k, v, state=None, fm=None) -> bool:
    """Whether autograd will differentiate a call on these inputs (grad mode on and some
    input, state tensor or map parameter requires a gradient)."""
    if not torch.is_grad_enabled():
        return False
    ts = [q, k, v]
    if state is not None:
        ts += [state.kv, state.z, getattr(state, "window_k", None), getattr(state, "window_v", None)]
    if any(t is not None and t.requires_grad for t in ts):
        return True
    return fm is not None and any(p.requires_grad for p in fm.parameters())


#: hybrid (``window > 0``) calls of at most this many queries (decoding) take the direct
#: O(T N) PyTorch form
HYBRID_DIRECT_MAX_T = 64


def hybrid_direct(T: int, window: int) -> bool:
    """Whether the PyTorch path computes a hybrid call of T queries (a sequence of a packed
    call) in the direct O(T N) form rather than in blocks of W: few queries (decoding), or
    T <= 2 W, where the blocks (padded to whole ones, W x 2W scores each) cost as much as
    the whole score matrix or more (T = W + 1 built 4x the direct form's memory)."""
    return T <= max(HYBRID_DIRECT_MAX_T, 2 * window)


def hybrid_triton_mode() -> str:
    """``FEATATTN_HYBRID_LINEAR``: ``"triton"`` (the default: the linear part in the chunked
    kernel, the window and the shared denominator in kernels/window.py) or ``"torch"``
    (hybrid calls in the chunked PyTorch path)."""
    mode = _switches.read("FEATATTN_HYBRID_LINEAR")
    if mode not in ("torch", "triton"):
        raise ValueError(f"FEATATTN_HYBRID_LINEAR must be 'triton' (the default) or 'torch', "
                         f"got {mode!r}")
    return mode


def _hybrid_refusal(call: Call, impl: Impl) -> Optional[str]:
    """None when ``impl`` runs this hybrid call (the chunked kernel, for both parts), else
    why not."""
    if impl.name == "recurrent_step":  # a few tokens against a state (decoding; whatever
        # FEATATTN_HYBRID_LINEAR says, which picks the form of whole calls; under
        # torch.compile as the custom op featattn::hybrid_step)
        return None
    if hybrid_triton_mode() != "triton":
        return "runs in the chunked PyTorch path (FEATATTN_HYBRID_LINEAR=torch)"
    if impl.name != "chunked":
        return "runs in the chunked kernel (linear part) and kernels/window.py"
    if call.T <= HYBRID_DIRECT_MAX_T:
        return (f"T={call.T} queries (at most {HYBRID_DIRECT_MAX_T}: decoding) take the direct "
                "PyTorch form")
    why = _kernels_module().window_unsupported_reason(call.dqk, call.dv)
    return why


def select(call: Call, backend: str) -> KernelChoice:
    """The first implementation of ``backend``'s candidates that can run ``call``."""
    if backend == "torch" and not call.causal:  # the PyTorch path of a non-causal call
        backend = "noncausal"
    if backend == "auto":
        candidates = [i for i in IMPLS if i.in_auto]
    elif backend == "triton":
        candidates = [i for i in IMPLS if i.triton]
    else:
        names = ALIASES.get(backend, (backend,)) if backend not in KERNELS else (backend,)
        candidates = [i for i in IMPLS if i.name in names]
    auto = backend == "auto"
    reasons = []
    triton_why = None
    for impl in candidates:
        if impl.triton and not call.causal:
            if impl.applies(call) or backend not in ("auto", "triton"):
                reasons.append(f"{impl.name}: causal=False is two GEMMs a head; PyTorch runs it "
                               f"(the noncausal path)")
            continue
        if impl.triton and call.window:
            why = _hybrid_refusal(call, impl)
            if why:
                if impl.applies(call) or backend not in ("auto", "triton"):
                    reasons.append(f"{impl.name}: window={call.window} (the hybrid softmax "
                                   f"window) {why}")
                continue
        if impl.triton:
            if triton_why is None:  # shared by every Triton kernel: said once
                triton_why = _triton_reasons(call, auto)
                if triton_why:
                    reasons.append(f"Triton kernels: {'; '.join(triton_why)}")
            if triton_why:
                continue
        why = impl.not_supported_reasons(call)
        if not why:
            if impl.name == "torch_chunked" and call.window and call.causal and (
                    call.packed or hybrid_direct(call.T, call.window)):
                reasons.append(
                    f"torch_chunked: window={call.window} with "
                    + ("packed sequences: each of at most "
                       f"max({HYBRID_DIRECT_MAX_T}, 2 W) queries" if call.packed else
                       f"T={call.T} queries (at most max({HYBRID_DIRECT_MAX_T}, 2 W))")
                    + " takes the direct O(T N) form (the reference formula), not blocks of W")
            return impl.choice(call, tuple(reasons))
        if impl.applies(call) or backend not in ("auto", "triton"):  # or named by the caller
            reasons.append(f"{impl.name}: {'; '.join(why)}")
    raise KernelUnavailable(backend, tuple(reasons))
