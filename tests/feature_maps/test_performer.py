import math

import pytest
import torch

import featattn
from featattn import get_feature_map
from featattn.feature_maps import PerformerFeatureMap

from zoo_reference import causal_attention, check_against_references, dot_scores


def favor_formula(x, w):
    """Choromanski et al. 2021 (FAVOR+, positive random features): with the softmax input
    scaling x -> x / d^(1/4), phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), no stabiliser."""
    d, m = x.shape[-1], w.shape[0]
    xs = x / d ** 0.25
    return torch.exp(xs @ w.T - (xs * xs).sum(-1, keepdim=True) / 2) / math.sqrt(m)


def test_forward_matches_the_formula():
    fm = get_feature_map("performer", head_dim=8, num_features=12, seed=0).double()
    assert isinstance(fm, PerformerFeatureMap) and fm.output_dim(8) == 12
    assert fm.stabilizer() == 0              # |w_i|^2 / 2 is far below 80 at d = 8
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(fm(x), favor_formula(x, fm.projection))
    # a token's features do not depend on the other tokens (no sequence-wide stabiliser)
    torch.testing.assert_close(fm(x[:, :, :2]), fm(x)[:, :, :2])


def test_orthogonal_rows_with_gaussian_norms():
    fm = get_feature_map("performer", head_dim=6, num_features=15, seed=3).double()
    w = fm.projection
    for block in (w[:6], w[6:12], w[12:]):   # blocks of d orthogonal rows, the last one cut
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(torch.diagonal(gram)),
                                   torch.zeros_like(gram), atol=1e-5, rtol=0)
    assert len(set(w.norm(dim=1).round(decimals=4).tolist())) == 15   # chi(d) norms, not all 1


def test_unbiased_estimate_of_the_softmax_kernel():
    # E[phi(q) . phi(k)] = exp(q . k / sqrt(d)): the mean over 400 draws of 64 features has a
    # relative standard error of ~0.5% here (fixed data and seeds: deterministic); dropping
    # the |x|^2 / 2 term or the d^(1/4) scaling is off by 10% and more
    d = 4
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(6, d, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    est = torch.stack([
        (lambda fm: (fm(q) * fm(k)).sum(-1))(get_feature_map("performer", head_dim=d,
                                                             num_features=64, seed=s).double())
        for s in range(400)
    ]).mean(0)
    want = torch.exp((q * k).sum(-1) / math.sqrt(d))
    assert ((est - want).abs() / want).max() < 0.03, (est, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_and_gradients(normalize):
    fm = get_feature_map("performer", head_dim=4, num_features=6, seed=1).double()
    check_against_references(
        fm, lambda q, k: dot_scores(favor_formula(q, fm.projection), favor_formula(k, fm.projection)),
        normalize=normalize)


def test_stabiliser_is_a_constant_and_prevents_overflow():
    d = 160
    fm = get_feature_map("performer", head_dim=d, seed=0)
    w = fm.projection.double()
    c = fm.stabilizer(torch.float64)
    assert c == (w.square().sum(-1).max() / 2 - 80) and c > 0
    x = torch.randn(1, 1, 7, d, dtype=torch.float64)
    torch.testing.assert_close(fm.double()(x), favor_formula(x, w) * torch.exp(-c))
    # the worst input for feature i is x / d^(1/4) = w_i: unstabilised it overflows fp32
    worst = (w * d ** 0.25).float()[None, None]
    assert torch.isinf(favor_formula(worst.double(), w).float()).any()
    feats = fm.float()(worst)
    assert torch.isfinite(feats).all() and feats.max() <= math.exp(80) / math.sqrt(d) * 1.001
    # the constant cancels in normalised attention
    v = torch.randn(1, 1, 7, 3, dtype=torch.float64)
    o = featattn.linear_attention(x / 2, x / 2, v, feature_map=fm.double(), eps=1e-300)
    s = dot_scores(favor_formula(x / 2, w), favor_formula(x / 2, w))
    torch.testing.assert_close(o, causal_attention(s, v, True, eps=0.0))


def test_seed_and_redraw():
    a = get_feature_map("performer", head_dim=4, seed=7)
    b = get_feature_map("performer", head_dim=4, seed=7)
    assert torch.equal(a.projection, b.projection)
    first = a.projection.clone()
    a.redraw()
    assert not torch.equal(a.projection, first)
    b.redraw()
    assert torch.equal(a.projection, b.projection)         # seeded: the same sequence of draws
    a.redraw(seed=11)
    assert torch.equal(a.projection, get_feature_map("performer", head_dim=4, seed=11).projection)
    torch.manual_seed(5)
    c = get_feature_map("performer", head_dim=4)
    torch.manual_seed(5)
    assert torch.equal(c.projection, get_feature_map("performer", head_dim=4).projection)


def test_state_dict_round_trip():
    a = get_feature_map("performer", head_dim=4, seed=1)
    b = get_feature_map("performer", head_dim=4, seed=2)
    x = torch.randn(2, 3, 5, 4)
    assert not torch.equal(a(x), b(x))
    assert set(a.state_dict()) == {"projection"}
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    # in a layer: the draw travels with the model
    la = featattn.FeatureAttention(16, 2, "performer", feature_map_kwargs={"seed": 1})
    lb = featattn.FeatureAttention(16, 2, "performer", feature_map_kwargs={"seed": 2})
    assert "feature_map.projection" in la.state_dict()
    lb.load_state_dict(la.state_dict())
    y = torch.randn(1, 6, 16)
    torch.testing.assert_close(lb(y), la(y))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(head_dim=0), ValueError, r"performer: head_dim must be an int >= 1, got 0; FeatureAttention"),
    (dict(head_dim=4, num_features=0), ValueError, r"num_features must be an int >= 1, got 0; pass"),
    (dict(head_dim=4, num_features=2.0), TypeError, r"num_features must be an int >= 1, got float"),
    (dict(head_dim=4, seed="a"), TypeError, r"seed must be None or an int, got str 'a'; e.g. seed=0"),
    (dict(head_dim=4, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\), got -1"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_feature_map("performer", **kwargs)


def test_bad_redraw_and_inputs():
    fm = get_feature_map("performer", head_dim=4, seed=0)
    with pytest.raises(TypeError, match="seed must be None or an int, got float"):
        fm.redraw(seed=1.5)
    with pytest.raises(ValueError, match=r"built for head_dim=4, got input of shape \(2, 5\)"):
        fm(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        fm(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="built for head_dim=4, got 8"):
        fm.output_dim(8)
