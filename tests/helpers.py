"""Shared test helpers: the correctness harness of featattn.testing (which the GPU
benchmarks use too), re-exported, plus the state hand-over check."""

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
