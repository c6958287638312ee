import math

import pytest
import torch

from featattn import get_feature_map
from featattn.feature_maps import ReBasedFeatureMap

from zoo_reference import check_against_references


def affine_norm(x, gamma, beta):
    """gamma * norm(x) + beta, norm = (x - mean) / sqrt(biased var + 1e-5) over the head dim."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return gamma[:, None, :] * (x - mean) / torch.sqrt(var + 1e-5) + beta[:, None, :]


def rebased_scores(q, k, fm):
    """Aksenov et al. 2024: sim(q, k) = ((gamma_Q norm(q) + beta_Q)^T (gamma_K norm(k) + beta_K))^2,
    with the authors' 1/sqrt(d) query scale: divided by d."""
    yq = affine_norm(q, fm.q_gamma, fm.q_beta)
    yk = affine_norm(k, fm.k_gamma, fm.k_beta).repeat_interleave(q.shape[1] // k.shape[1], 1)
    return (yq @ yk.transpose(-1, -2)) ** 2 / q.shape[-1]


def make(H=4, Hkv=2, d=4, **kw):
    torch.manual_seed(0)
    fm = get_feature_map("rebased", head_dim=d, heads=H, kv_heads=Hkv, **kw).double()
    with torch.no_grad():  # away from the (1, 0) initialisation, so beta matters
        for p in fm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return fm


@pytest.mark.parametrize("d", [2, 5])
def test_kernel_matches_the_formula(d):
    fm = make(d=d)
    assert isinstance(fm, ReBasedFeatureMap) and fm.output_dim(d) == d * (d + 1) // 2
    q = torch.randn(2, 4, 6, d, dtype=torch.float64) * 3 + 1
    k = torch.randn(2, 2, 6, d, dtype=torch.float64)
    fq, fk = fm.forward_query(q), fm.forward_key(k)
    assert fq.shape == (2, 4, 6, d * (d + 1) // 2) and fk.shape == (2, 2, 6, d * (d + 1) // 2)
    got = fq @ fk.repeat_interleave(2, 1).transpose(-1, -2)
    torch.testing.assert_close(got, rebased_scores(q, k, fm))
    # the diagonal features are the squares of the affine-normalised coordinates
    y = affine_norm(q, fm.q_gamma, fm.q_beta)
    diag = [i * d - i * (i - 1) // 2 for i in range(d)]       # (i, i) in the row-major triangle
    torch.testing.assert_close(fq[..., diag], y * y / math.sqrt(d))


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_and_gradients(normalize):
    fm = make()
    check_against_references(fm, lambda q, k: rebased_scores(q, k, fm),
                             params=list(fm.parameters()), normalize=normalize)


def test_tied_parameters():
    fm = make(H=2, Hkv=2, tie_qk=True)
    assert fm.k_gamma is fm.q_gamma and len(list(fm.parameters())) == 2
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(fm.forward_query(x), fm.forward_key(x))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(head_dim=1), ValueError, r"head_dim must be >= 2 .*got 1; use a larger qk_dim"),
    (dict(head_dim=8, heads=0), ValueError, r"rebased: heads must be an int >= 1, got 0"),
    (dict(head_dim=8, heads=4, kv_heads=2, tie_qk=True), ValueError,
     r"tie_qk=True needs kv_heads == heads, got kv_heads=2, heads=4; pass tie_qk=False"),
    (dict(head_dim=8, tie_qk="yes"), TypeError, r"tie_qk must be a bool, got str"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_feature_map("rebased", **kwargs)


def test_bad_inputs():
    fm = get_feature_map("rebased", head_dim=8, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"rebased expects keys of shape \[B, 2, T, 8\]"):
        fm.forward_key(torch.randn(1, 4, 5, 8))
    with pytest.raises(ValueError, match="built for head_dim=8, got 4"):
        fm.output_dim(4)
