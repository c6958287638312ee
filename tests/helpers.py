"""Shared test helpers."""

import torch

from featattn.feature_maps import resolve_feature_map
from featattn.reference import quadratic_linear_attention


def rand_qkv(B, H, Hkv, T, Dqk, Dv, dtype=torch.float64, device="cpu", generator=None, requires_grad=False):
    q = torch.randn(B, H, T, Dqk, dtype=dtype, device=device, generator=generator)
    k = torch.randn(B, Hkv, T, Dqk, dtype=dtype, device=device, generator=generator)
    v = torch.randn(B, Hkv, T, Dv, dtype=dtype, device=device, generator=generator)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def reference(q, k, v, feature_map=None, normalize=True, eps=1e-6, scale=1.0, state=None):
    """float64 quadratic oracle on materialised features."""
    fm = resolve_feature_map(feature_map)
    q64, k64, v64 = q.double() * scale, k.double(), v.double()
    if fm is not None:
        q64, k64 = fm(q64), fm(k64)
    kv0 = z0 = None
    if state is not None:
        kv0 = state.kv.double()
        z0 = None if state.z is None else state.z.double()
    o, kv, z = quadratic_linear_attention(
        q64, k64, v64, normalize=normalize, eps=eps, initial_kv=kv0, initial_z=z0, return_state=True
    )
    return o, kv, z


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


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
    assert rel_err(torch.cat([o1, o2], 2), o) < tol
    assert rel_err(kv2, kv) < tol
    if normalize:
        assert rel_err(z2, z) < tol
    else:
        assert z is None and z2 is None
