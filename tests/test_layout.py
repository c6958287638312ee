"""linear_attention(..., layout="bthd"): [B, T, H, D] in and out, the same numbers as the
[B, H, T, D] call, no copies; and the per-name map instance cache."""

from __future__ import annotations

import pytest
import torch

import featattn
from featattn import functional as F_


def _bthd(B, T, H, D, **kw):
    return torch.randn(B, T, H, D, **kw)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("fm", ["elu", "taylor", None])
def test_bthd_matches_bhtd(backend, fm):
    if backend == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    D = 8 if fm == "taylor" else 16
    q, k = _bthd(2, 37, 4, D), _bthd(2, 37, 2, D)
    v = _bthd(2, 37, 2, 24)
    if fm is None:
        q, k = q.abs(), k.abs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, st = featattn.linear_attention(*leaves, feature_map=fm, layout="bthd", backend=backend,
                                      return_state=True)
    assert o.shape == (2, 37, 4, 24)
    o.sum().backward()
    ref = [t.transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
    o2, st2 = featattn.linear_attention(*ref, feature_map=fm, backend=backend, return_state=True)
    o2.sum().backward()
    torch.testing.assert_close(o, o2.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.kv, st2.kv, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_bthd_state_continues_a_bthd_prefix():
    torch.manual_seed(1)
    q, k, v = (_bthd(1, 50, 2, 16) for _ in range(3))
    full = featattn.linear_attention(q, k, v, feature_map="elu", layout="bthd")
    o1, s = featattn.linear_attention(q[:, :20], k[:, :20], v[:, :20], feature_map="elu",
                                      layout="bthd", return_state=True)
    o2 = featattn.linear_attention(q[:, 20:], k[:, 20:], v[:, 20:], feature_map="elu",
                                   layout="bthd", initial_state=s)
    torch.testing.assert_close(torch.cat([o1, o2], 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [("BTHD", "layout must be"), (None, "layout must be")])
def test_bad_layout_is_rejected(bad, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=match):
        featattn.linear_attention(q, q, q, layout=bad)


def test_bthd_needs_4d():
    with pytest.raises(ValueError, match=r"layout='bthd', q must be 4-D \(\[B, T, H, D\]\)"):
        featattn.linear_attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                                  layout="bthd")


def test_named_maps_are_built_once_per_class():
    a = F_._named_map("elu")
    assert F_._named_map("elu") is a

    @featattn.register_feature_map("elu", override=True)
    class Other(type(a)):
        pass

    try:
        assert type(F_._named_map("elu")) is Other  # re-registering a name is seen
    finally:
        featattn.register_feature_map("elu", override=True)(type(a))
    assert type(F_._named_map("elu")) is type(a)
