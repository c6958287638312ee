"""Shared test helpers: the correctness harness of featattn.testing (which the GPU
benchmarks use too), re-exported, plus the state hand-over check."""

import importlib
from pathlib import Path

import torch

from featattn.testing import (  # noqa: F401  (re-exported for the test modules)
    TOLERANCES,
    Run,
    check_close,
    check_run,
    compare_runs,
    kernel_vs_reference,
    rand_features,
    rand_qkv,
    rand_state,
    reference,
    rel_err,
    run_and_grads,
    taylor_dim,
    tolerance,
)


def assert_state_handoff(attn, q, k, v, normalize, cut, eps=1e-6, tol=1e-6):
    """Running [0, cut) then [cut, T) with the state handed over equals one run over [0, T).

    ``attn(q, k, v, *, normalize, eps, initial_kv, initial_z, return_state) -> (o, kv, z)`` is
    a kernel entry point (featattn.kernels.chunked_attention, taylor_attention, ...).
    """
    o, kv, z = attn(q, k, v, normalize=normalize, eps=eps, return_state=True)
    o1, kv1, z1 = attn(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut],
                       normalize=normalize, eps=eps, return_state=True)
    o2, kv2, z2 = attn(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], normalize=normalize,
                       eps=eps, initial_kv=kv1, initial_z=z1, return_state=True)
    check_close("o", torch.cat([o1, o2], 2), o, tol)
    check_close("kv", kv2, kv, tol)
    if normalize:
        check_close("z", z2, z, tol)
    else:
        assert z is None and z2 is None


class DropLastProgram:
    """Wraps a kernel launch (``launch[grid](*args)``, e.g. a TunedLaunch) so it skips the
    last program along grid axis 0 (one (b, h) pair): the buffers that program should write
    keep whatever featattn.kernels._common.alloc gave them (NaN when poisoned).  ``grid`` may
    be a tuple or a function of the launch's meta-parameters."""

    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        def smaller(meta):
            g = grid(meta) if callable(grid) else grid
            return (g[0] - 1, *g[1:])

        return self.launch[smaller]


def load_benchmark(name, monkeypatch):
    """Import benchmarks/<name>.py (its ``from _timing import ...`` needs benchmarks/ on the
    path), so a test can run its correctness check path on CPU."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module(name)


def spy_launches(monkeypatch, kernel, *names):
    """Record the named keyword arguments (constexprs) of every launch of ``kernel`` (a
    ``@triton.jit`` function) for the rest of the test: a list of tuples, or of values when
    one name is given.  The launches still run."""
    seen = []
    real = kernel.run

    def spy(*a, **kw):
        vals = tuple(kw[n] for n in names)
        seen.append(vals[0] if len(names) == 1 else vals)
        return real(*a, **kw)

    monkeypatch.setattr(kernel, "run", spy)
    return seen
