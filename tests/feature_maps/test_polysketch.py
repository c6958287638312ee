"""polysketch: the Gaussian sketch of the polynomial kernel, against float64 formulas."""

import pytest
import torch

import featattn
from featattn.feature_maps import PolySketchFeatureMap


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_forward_is_the_sketch_formula():
    fm = PolySketchFeatureMap(6, sketch_size=5, degree=4, seed=1).double()
    x = _x(3, 6)
    g1, g2 = fm.sketch
    xs = x / 6 ** 0.25
    s = (xs @ g1.T) * (xs @ g2.T) / 5 ** 0.5
    want = torch.stack([torch.outer(row, row).flatten() for row in s])
    torch.testing.assert_close(fm(x), want)
    assert fm.output_dim(6) == 25 and (fm(x) @ fm(_x(4, 6, seed=2)).T >= 0).all()
    fm2 = PolySketchFeatureMap(6, sketch_size=5, degree=2, seed=1).double()
    torch.testing.assert_close(fm2(x), s)
    assert fm2.output_dim(6) == 5


def test_degree_two_sketch_is_unbiased():
    """Averaged over many draws, S(x) . S(y) estimates (x . y / sqrt(d))^2."""
    d = 4
    x, y = _x(d, seed=3), _x(d, seed=4)
    want = (x @ y / d ** 0.5) ** 2
    fm = PolySketchFeatureMap(d, sketch_size=64, degree=2, seed=0).double()
    est = []
    for i in range(400):
        fm.redraw(seed=i)
        est.append((fm(x) @ fm(y)).item())
    est = torch.tensor(est, dtype=torch.float64)
    assert abs(est.mean() - want) < 4 * est.std() / len(est) ** 0.5 + 1e-12


def test_through_linear_attention_and_the_layer():
    q, k, v = _x(1, 2, 9, 4, seed=5), _x(1, 2, 9, 4, seed=6), _x(1, 2, 9, 3, seed=7)
    fm = PolySketchFeatureMap(4, sketch_size=3, seed=2).double()
    runs = []
    for backend in ("auto", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*leaves, feature_map=fm, backend=backend)
        runs.append([o, *torch.autograd.grad(o.square().sum(), leaves)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    layer = featattn.FeatureAttention(16, 2, "polysketch", feature_map_kwargs={"sketch_size": 4})
    assert layer.feature_dim == 16 and layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_seed_redraw_and_state_dict():
    a, b = PolySketchFeatureMap(4, seed=3), PolySketchFeatureMap(4, seed=3)
    assert torch.equal(a.sketch, b.sketch)
    before = a.sketch.clone()
    a.redraw()
    assert not torch.equal(a.sketch, before)
    c = PolySketchFeatureMap(4, seed=9)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.sketch, a.sketch)


def test_bad_arguments():
    with pytest.raises(ValueError, match="degree must be 2 or 4"):
        PolySketchFeatureMap(4, degree=3)
    with pytest.raises(TypeError, match="sketch_size must be an int"):
        PolySketchFeatureMap(4, sketch_size=2.5)
    with pytest.raises(ValueError, match="built for head_dim=4"):
        PolySketchFeatureMap(4)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="seed must be None or an int"):
        PolySketchFeatureMap(4, seed="x")
