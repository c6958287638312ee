"""featattn.testing: the one correctness harness of the tests and the GPU benchmarks.

``tests/`` (through ``tests/helpers.py`` and the ``poison_kernel_outputs`` fixture of
``tests/conftest.py``) and the correctness tables of ``benchmarks/gpu_kernels.py`` and
``benchmarks/gpu_taylor.py`` check the kernels with these same pieces, so the two cannot
drift apart again.  (They did: the benchmarks set a ``POISON_OUTPUTS`` attribute on kernel
modules that no longer read it, and their tables stopped catching unwritten outputs.)

The pieces, for ``q [B, H, T, Dqk]``, ``k [B, Hkv, T, Dqk]``, ``v [B, Hkv, T, Dv]`` (Hkv
divides H), a state ``kv [B, H, Dk, Dv]`` / ``z [B, H, Dk]`` (Dk = the feature dim):

* :func:`rand_qkv` / :func:`rand_features` / :func:`rand_state`: fresh random inputs,
  optionally ``[B, T, H, D]``-layout strided views (as a layer passes them);
* :func:`reference`: the float64 oracle on materialised features
  (:func:`featattn.reference.quadratic_linear_attention`, chunked over T when long), with
  a state in and out;
* :func:`run_and_grads`: forward + backward of any ``(o, kv, z)``-returning function with a
  fixed random upstream gradient (also through the returned state), giving a :class:`Run`
  of the outputs and the gradients of q, k, v and the state;
* :func:`rel_err`, :func:`check_close`, :func:`compare_runs`, :func:`check_run` and the
  per-dtype :data:`TOLERANCES` / :func:`tolerance`: every compared tensor must have the
  reference's shape, be finite (a NaN-poisoned element the kernel never wrote fails) and lie
  within the relative error ``||got - want|| / ||want||`` of its tolerance;
* :func:`poisoned_outputs`: **the** ``featattn.kernels._common.poisoned_outputs`` (re-exported
  lazily), which flips the ``_common.POISON_OUTPUTS`` switch that every kernel's buffer
  allocation reads: inside it, each kernel-written buffer starts as NaN.

A kernel check, as the tests and benchmarks run it::

    import torch
    from featattn.kernels import chunked_attention
    from featattn.testing import (check_run, poisoned_outputs, rand_features, rand_state,
                                  reference, run_and_grads, tolerance)

    q, k, v = rand_features(1, 2, 2, 100, 24, 40, torch.float32, normalize=True,
                            layout="bthd", generator=0)
    kv0, z0 = rand_state(1, 2, 24, 40, normalize=True, generator=7)
    with poisoned_outputs():
        got = run_and_grads(chunked_attention, q, k, v, kv0, z0, normalize=True, eps=1e-6,
                            return_state=True)
    want = run_and_grads(reference, q, k, v, kv0, z0, normalize=True, eps=1e-6,
                         return_state=True, dtype=torch.float64)
    check_run(got, want, tolerance(torch.float32, "small"))   # AssertionError on a failure

(:func:`kernel_vs_reference` is those two runs in one call.)  Importing this module needs
torch only: triton and ``featattn.kernels`` are imported on first use of the poisoning.

``FEATATTN_POISON=1`` in the environment turns the poisoning on for a whole process.  The
harness cannot pass silently: tests/kernels/test_kernels.py and tests/kernels/test_taylor_fused.py check
that :func:`poisoned_outputs` is the switch ``_common.alloc`` reads and that a kernel launch
made to skip one (b, h) program fails :func:`check_run` and the benchmarks' tables (their
check paths run on CPU tensors under ``TRITON_INTERPRET=1`` too).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .feature_maps import resolve_feature_map
from .reference import quadratic_linear_attention

__all__ = [
    "rand_qkv", "rand_features", "rand_state", "taylor_dim", "reference", "Run",
    "run_and_grads", "kernel_vs_reference", "rel_err", "check_close", "compare_runs",
    "check_run", "TOLERANCES", "tolerance", "poisoned_outputs", "poisoning_enabled",
]

Generator = Union[None, int, torch.Generator]

#: the reference runs the quadratic form over at most this many steps at once (its
#: [B, H, T, T] scores); longer sequences go through it chunk by chunk, state handed over
REFERENCE_CHUNK = 2048


# --------------------------------------------------------------------------- inputs
def _generator(generator: Generator) -> Optional[torch.Generator]:
    if isinstance(generator, int):
        return torch.Generator(device="cpu").manual_seed(generator)
    return generator


def _draw(shape, dtype, device, gen, positive=False):
    """A float64 (for float64) or float32 draw, on the generator's device (else ``device``)."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    on = gen.device if gen is not None else device
    make = torch.rand if positive else torch.randn
    return make(shape, dtype=draw_dtype, device=on, generator=gen)


def rand_qkv(B, H, Hkv, T, Dqk, Dv, dtype=torch.float64, device="cpu", generator: Generator = None,
             requires_grad=False, *, layout="bhtd", positive=False, q_scale=1.0, k_scale=1.0):
    """Fresh random ``q [B, H, T, Dqk]``, ``k [B, Hkv, T, Dqk]``, ``v [B, Hkv, T, Dv]``.

    ``generator``: a seed (a fresh CPU generator: the same numbers on every device), a
    ``torch.Generator`` (drawn on its device) or None (the global RNG of ``device``).
    Drawn in float64 for float64, else in float32 then cast to ``dtype``.

    ``layout="bhtd"``: contiguous [B, H, T, D] tensors; ``"bthd"``: transposed views of
    [B, T, H, D] tensors (time stride H * D), as a layer passes them.  q and k are N(0, 1)
    (``positive``: uniform in [0.05, 1.05), like a positive feature map's output), times
    ``q_scale`` / ``k_scale``; v is N(0, 1).  ``requires_grad`` makes all three leaves.
    """
    if layout not in ("bhtd", "bthd"):
        raise ValueError(f"layout must be 'bhtd' or 'bthd', got {layout!r}")
    gen = _generator(generator)

    def mk(h, d, pos, scale):
        shape = (B, h, T, d) if layout == "bhtd" else (B, T, h, d)
        x = _draw(shape, dtype, device, gen, pos)
        if pos:
            x = x + 0.05  # keeps a normalised call's denominator away from 0
        if scale != 1.0:
            x = x * scale
        x = x.to(device=device, dtype=dtype)
        x = x if layout == "bhtd" else x.transpose(1, 2)
        return x.requires_grad_(True) if requires_grad else x

    q = mk(H, Dqk, positive, q_scale)
    k = mk(Hkv, Dqk, positive, k_scale)
    v = mk(Hkv, Dv, False, 1.0)
    return q, k, v


def rand_features(B, H, Hkv, T, Dk, Dv, dtype, *, normalize, layout="bhtd",
                  generator: Generator = 0, device="cpu", requires_grad=False):
    """q, k, v for a kernel that takes features (``featattn.kernels.chunked_attention``):
    shapes as :func:`rand_qkv` with Dqk = Dk.  Normalised: positive q, k (a feature map's
    output, denominator away from 0); plain: q, k ~ N(0, 1/Dk), so the scores stay O(1)."""
    if normalize:
        return rand_qkv(B, H, Hkv, T, Dk, Dv, dtype, device, generator, requires_grad,
                        layout=layout, positive=True)
    s = 1.0 / math.sqrt(Dk)
    return rand_qkv(B, H, Hkv, T, Dk, Dv, dtype, device, generator, requires_grad,
                    layout=layout, q_scale=s, k_scale=s)


def taylor_dim(d: int) -> int:
    """Dk = 1 + d + d^2: the Taylor feature dim (and state dim) of a raw head dim d."""
    return 1 + d + d * d


def rand_state(B, H, Dk, Dv, normalize, generator: Generator = 7, device="cpu", *, z_min=0.0):
    """An arbitrary fp32 initial state ``(kv0 [B, H, Dk, Dv], z0 [B, H, Dk] or None)``: kv0
    ~ N(0, 1) (not one any map produces), z0 uniform in [z_min, z_min + 4) (> 0: keeps the
    denominator away from 0); z0 only with ``normalize``.  ``generator`` as in rand_qkv."""
    gen = _generator(generator)
    kv0 = _draw((B, H, Dk, Dv), torch.float32, device, gen).to(device)
    z0 = None
    if normalize:
        z0 = (_draw((B, H, Dk), torch.float32, device, gen, positive=True) * 4 + z_min).to(device)
    return kv0, z0


# --------------------------------------------------------------------------- the oracle
def reference(q, k, v, feature_map=None, *, normalize=True, eps=1e-6, scale=1.0, state=None,
              initial_kv=None, initial_z=None, return_state=True, chunk=None):
    """float64 causal linear attention on materialised features -> ``(o, kv, z)``.

    q [B, H, T, Dqk], k [B, Hkv, T, Dqk], v [B, Hkv, T, Dv] in any float dtype (gradients
    flow back to them); ``feature_map`` (None, a name or a FeatureMap) is applied in float64
    to ``q * scale`` and k.  The state in is ``state`` (a LinearAttentionState) or
    ``initial_kv [B, H, Dk, Dv]`` / ``initial_z [B, H, Dk]``.  o [B, H, T, Dv], kv
    [B, H, Dk, Dv] and z [B, H, Dk] (None without ``normalize``) are float64; kv and z are
    None without ``return_state``.  It is the kernels' call signature, so it can stand in
    for one in :func:`run_and_grads`.

    :func:`featattn.reference.quadratic_linear_attention` over at most ``chunk`` steps at a
    time (default: all of T up to REFERENCE_CHUNK, else 1024), the state handed over.
    """
    fm = resolve_feature_map(feature_map)
    q64, k64, v64 = q.double() * scale, k.double(), v.double()
    if fm is not None:
        q64, k64 = fm(q64), fm(k64)
    if state is not None:
        initial_kv, initial_z = state.kv, state.z
    kv = None if initial_kv is None else initial_kv.double()
    z = None if initial_z is None else initial_z.double()
    T = q.shape[2]
    chunk = chunk or (T if T <= REFERENCE_CHUNK else 1024)
    outs = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, t0 + chunk)
        o, kv, z = quadratic_linear_attention(
            q64[:, :, sl], k64[:, :, sl], v64[:, :, sl], normalize=normalize, eps=eps,
            initial_kv=kv, initial_z=z, return_state=True)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    if not return_state:
        return o, None, None
    return o, kv, (z if normalize else None)


# --------------------------------------------------------------------------- running
class Run(NamedTuple):
    """Outputs and gradients of one :func:`run_and_grads` call (None where absent).

    o [B, H, T, Dv]; kv [B, H, Dk, Dv], z [B, H, Dk] (the returned state); dq, dk, dv (the
    shapes of q, k, v); dkv0, dz0 (the gradients of the initial state)."""

    o: torch.Tensor
    kv: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    dkv0: Optional[torch.Tensor]
    dz0: Optional[torch.Tensor]


def run_and_grads(fn: Callable, q, k, v, initial_kv=None, initial_z=None, *, return_state=False,
                  dtype: Optional[torch.dtype] = None, seed=1, do=None, dkv=None, dz=None,
                  **kwargs) -> Run:
    """Forward ``fn`` and backpropagate a fixed random upstream gradient -> :class:`Run`.

    ``fn(q, k, v, *, initial_kv, initial_z, return_state, **kwargs) -> (o, kv, z)`` (a kernel
    entry point such as ``featattn.kernels.chunked_attention``, or :func:`reference`).  It
    gets fresh leaves: detached copies of q [B, H, T, Dqk], k, v [B, Hkv, T, .] and the
    state (cast to ``dtype`` when given: ``torch.float64`` for the reference), strides kept.

    The loss is ``sum(o * do)`` plus, with ``return_state``, ``sum(kv * dkv) + sum(z * dz)``,
    in float64.  ``do`` [B, H, T, Dv], ``dkv`` [B, H, Dk, Dv], ``dz`` [B, H, Dk] are, unless
    given, float64 N(0, 1) draws in that order from a CPU generator seeded with ``seed``, so
    two runs with the same seed (kernel and reference) see the same ones.
    """
    def leaf(x):
        if x is None:
            return None
        x = x.detach()
        return (x if dtype is None else x.to(dtype)).requires_grad_(True)

    q, k, v, kv0, z0 = (leaf(x) for x in (q, k, v, initial_kv, initial_z))
    o, kv, z = fn(q, k, v, initial_kv=kv0, initial_z=z0, return_state=return_state, **kwargs)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def cotangent(given, like):
        if given is None:
            given = torch.randn(like.shape, generator=g, dtype=torch.float64)
        if tuple(given.shape) != tuple(like.shape):
            raise ValueError(f"upstream gradient {tuple(given.shape)} for an output "
                             f"{tuple(like.shape)}")
        return given.to(device=like.device, dtype=torch.float64)

    loss = (o.double() * cotangent(do, o)).sum()
    if return_state:
        if kv is None:
            raise AssertionError("return_state=True but fn returned no kv")
        loss = loss + (kv.double() * cotangent(dkv, kv)).sum()
        if z is not None:
            loss = loss + (z.double() * cotangent(dz, z)).sum()
    leaves = [x for x in (q, k, v, kv0, z0) if x is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    dq, dk, dv = next(grads), next(grads), next(grads)
    dkv0 = next(grads) if kv0 is not None else None
    dz0 = next(grads) if z0 is not None else None
    return Run(o, kv, z, dq, dk, dv, dkv0, dz0)


def kernel_vs_reference(fn: Callable, q, k, v, initial_kv=None, initial_z=None, *, normalize,
                        eps=1e-6, return_state=False, feature_map=None, seed=1,
                        poison=True) -> tuple[Run, Run]:
    """``(got, want)``: :func:`run_and_grads` of the kernel ``fn`` (forward and backward
    inside :func:`poisoned_outputs` unless ``poison=False``) and of the float64
    :func:`reference` (on ``feature_map`` features of q, k: "taylor" for the fused Taylor
    kernel), same inputs (shapes as there) and upstream gradients.  Compare them with
    :func:`check_run` or :func:`compare_runs`."""
    args = (fn, q, k, v, initial_kv, initial_z)
    kw = dict(normalize=normalize, eps=eps, return_state=return_state, seed=seed)
    if poison:
        from .kernels._common import poisoned_outputs as poisoned

        with poisoned():
            got = run_and_grads(*args, **kw)
    else:
        got = run_and_grads(*args, **kw)
    want = run_and_grads(reference, *args[1:], dtype=torch.float64, feature_map=feature_map,
                         **kw)
    return got, want


# --------------------------------------------------------------------------- checking
#: relative-error tolerances (||got - want|| / ||want|| against the float64 reference) by
#: kind of case and input dtype.  "small": the interpreter-size cases (T ~ 100; CPU and
#: GPU); "chunked" / "taylor": the GPU-size cases (T up to 16384) of
#: featattn.kernels.chunked_attention / taylor_attention; "api": featattn.linear_attention
#: through a feature map, forward and state (tests/test_dispatch.py allows its gradients 5x).
TOLERANCES = {
    "small": {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2},
    "chunked": {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2},
    "taylor": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2},
    "api": {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2},
}


def tolerance(dtype: torch.dtype, kind: str = "small") -> float:
    """The :data:`TOLERANCES` entry for an input dtype (fp32, fp16, bf16) and kind of case."""
    try:
        return TOLERANCES[kind][dtype]
    except KeyError:
        raise KeyError(f"no tolerance for kind={kind!r}, dtype={dtype} (kinds: "
                       f"{', '.join(TOLERANCES)}; dtypes fp32, fp16, bf16)") from None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (any equal shapes); NaN when a has a NaN."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _mismatch(name, got, want, tol) -> tuple[float, Optional[str]]:
    """(rel. error, why ``got`` fails against ``want``, or None when it passes)."""
    if got is None or want is None:
        if got is None and want is None:
            return 0.0, None
        return math.nan, (f"{name}: got {'None' if got is None else 'a tensor'}, the reference "
                          f"{'None' if want is None else 'a tensor'}")
    if tuple(got.shape) != tuple(want.shape):
        return math.nan, f"{name}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    bad = (~torch.isfinite(got.detach())).sum().item()
    err = rel_err(got, want)
    if bad:
        return err, (f"{name}: {bad} of {got.numel()} elements non-finite (unwritten, "
                     "NaN-poisoned?)")
    if not err < tol:
        return err, f"{name}: rel. error {err:.2e} above {tol:.0e}"
    return err, None


def check_close(name: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor],
                tol: float) -> float:
    """Assert ``got`` is ``want`` within ``tol``: same shape, every element finite (an
    element a kernel never wrote is NaN under :func:`poisoned_outputs`), ``rel_err < tol``
    (None matches only None).  Returns the relative error."""
    err, why = _mismatch(name, got, want, tol)
    if why is not None:
        raise AssertionError(why)
    return err


def compare_runs(got: Run, want: Run, tol: float,
                 names: Optional[Sequence[str]] = None) -> tuple[dict, list]:
    """``({name: rel. error}, [failure messages])`` of every field of two :class:`Run` s
    (or those in ``names``), checked as :func:`check_close` does, without raising.  Fields
    None in both are left out of the errors."""
    errs, failures = {}, []
    for name in names or Run._fields:
        a, b = getattr(got, name), getattr(want, name)
        err, why = _mismatch(name, a, b, tol)
        if a is not None or b is not None:
            errs[name] = err
        if why is not None:
            failures.append(why)
    return errs, failures


def check_run(got: Run, want: Run, tol: float, names: Optional[Sequence[str]] = None, *,
              dtype: Optional[torch.dtype] = None) -> dict:
    """Assert every field of ``got`` (or those in ``names``) matches ``want``, as
    :func:`check_close` does; all failures are reported at once.  With ``dtype`` also that
    o is in that dtype and a returned state in fp32 (the kernels' contract).  Returns the
    {name: rel. error} dict."""
    errs, failures = compare_runs(got, want, tol, names)
    if dtype is not None:
        if got.o.dtype != dtype:
            failures.append(f"o: dtype {got.o.dtype}, expected {dtype}")
        for name in ("kv", "z"):
            t = getattr(got, name)
            if t is not None and t.dtype != torch.float32:
                failures.append(f"{name}: dtype {t.dtype}, expected torch.float32")
    if failures:
        table = ", ".join(f"{n}={e:.1e}" for n, e in errs.items())
        raise AssertionError("; ".join(failures) + f" (tol {tol:.0e}; all: {table})")
    return errs


# --------------------------------------------------------------------------- poisoning
def poisoning_enabled() -> bool:
    """Whether kernel-written buffers start as NaN now (``_common.POISON_OUTPUTS``)."""
    from .kernels import _common

    return _common.POISON_OUTPUTS


def __getattr__(name):
    # ``poisoned_outputs`` is featattn.kernels._common.poisoned_outputs itself, imported on
    # first use so that ``import featattn.testing`` needs no triton
    if name == "poisoned_outputs":
        from .kernels._common import poisoned_outputs

        return poisoned_outputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
