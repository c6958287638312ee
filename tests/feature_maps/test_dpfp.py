import pytest
import torch

import featattn
from featattn import get_feature_map
from featattn.feature_maps import DPFPFeatureMap

from zoo_reference import check_against_references, dot_scores


def dpfp_formula(x, nu):
    """Schlag et al. 2021: r = [relu(x), relu(-x)], phi_{i nu}(x) = r_i r_{i + nu}
    (indices mod 2d), nu = 1..nu, feature index (nu - 1) * 2d + i; written as plain loops."""
    d = x.shape[-1]
    r = torch.cat([x.clamp(min=0), (-x).clamp(min=0)], -1)
    cols = [r[..., i] * r[..., (i + n) % (2 * d)] for n in range(1, nu + 1) for i in range(2 * d)]
    return torch.stack(cols, -1)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_forward_matches_the_formula(nu):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    fm = get_feature_map("dpfp", nu=nu)
    assert isinstance(fm, DPFPFeatureMap) and fm.output_dim(4) == 2 * 4 * nu
    torch.testing.assert_close(fm(x), dpfp_formula(x, nu))
    # the authors' code rolls the other way (r * r.roll(+n)): same kernel, features permuted
    y = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    r = lambda t: torch.cat([t.relu(), (-t).relu()], -1)  # noqa: E731
    theirs = lambda t: torch.cat([r(t) * r(t).roll(n, -1) for n in range(1, nu + 1)], -1)  # noqa: E731
    torch.testing.assert_close((fm(x) * fm(y)).sum(-1), (theirs(x) * theirs(y)).sum(-1))


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_and_gradients(normalize):
    fm = get_feature_map("dpfp", nu=2)
    check_against_references(fm, lambda q, k: dot_scores(dpfp_formula(q, 2), dpfp_formula(k, 2)),
                             normalize=normalize)


def test_by_name_and_in_a_layer():
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    o = featattn.linear_attention(q, q, q, feature_map="dpfp")
    want = featattn.linear_attention(q, q, q, feature_map=DPFPFeatureMap(nu=1), backend="reference")
    torch.testing.assert_close(o, want)
    layer = featattn.FeatureAttention(16, 2, "dpfp", feature_map_kwargs={"nu": 3})
    assert layer.feature_dim == 2 * 8 * 3 and layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


@pytest.mark.parametrize("nu,exc,match", [
    (0, ValueError, r"dpfp: nu must be an int >= 1, got 0; nu is the number"),
    (1.5, TypeError, r"nu must be an int >= 1, got float 1.5"),
    (True, TypeError, r"nu must be an int >= 1, got bool True"),
])
def test_bad_nu(nu, exc, match):
    with pytest.raises(exc, match=match):
        get_feature_map("dpfp", nu=nu)


def test_nu_too_large_for_the_head_dim():
    fm = get_feature_map("dpfp", nu=4)
    assert fm.output_dim(3) == 24
    with pytest.raises(ValueError, match=r"nu must be <= 2 \* head_dim - 1 = 3 for head_dim 2, got nu=4"):
        fm.output_dim(2)
    with pytest.raises(ValueError, match="head_dim 2"):
        fm(torch.randn(3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        fm(torch.ones(3, 4, dtype=torch.int64))
