import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

import featattn
from featattn import FeatureMap, get_feature_map, list_feature_maps, register_feature_map
from featattn.feature_maps import registry


def test_builtin_maps_registered():
    assert {"elu", "taylor", "identity", "relu"} <= set(list_feature_maps())


@pytest.mark.parametrize("name,d,expected", [("elu", 8, 8), ("identity", 5, 5), ("relu", 3, 3),
                                             ("taylor", 16, 273), ("taylor", 64, 4161)])
def test_output_dim(name, d, expected):
    fm = get_feature_map(name)
    assert fm.output_dim(d) == expected
    assert fm(torch.randn(2, 3, 4, d)).shape == (2, 3, 4, expected)


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown feature map 'nope'.*elu.*identity.*relu.*taylor"):
        get_feature_map("nope")


def test_duplicate_registration_raises_unless_override():
    class A(FeatureMap):
        def output_dim(self, d):
            return d

        def forward(self, x):
            return x + 1

    class B(A):
        def forward(self, x):
            return x + 2

    register_feature_map("_dup_test")(A)
    try:
        with pytest.raises(ValueError, match="already registered.*override=True"):
            register_feature_map("_dup_test")(B)
        register_feature_map("_dup_test", override=True)(B)
        assert isinstance(get_feature_map("_dup_test"), B)
    finally:
        registry._REGISTRY.pop("_dup_test", None)


def test_register_rejects_non_featuremap():
    with pytest.raises(TypeError, match="FeatureMap subclasses"):
        register_feature_map("_bad")(object)


def test_register_rejects_an_incomplete_map():
    """A map class without output_dim or forward is refused when registered (not at its
    first call, with a NotImplementedError); forward_query and forward_key together stand
    for forward."""
    class NoDim(FeatureMap):
        def forward(self, x):
            return x

    class NoForward(FeatureMap):
        def output_dim(self, d):
            return d

    class QueryKeyOnly(NoForward):
        def forward_query(self, q):
            return q

        def forward_key(self, k):
            return k

    with pytest.raises(TypeError, match="does not implement output_dim"):
        register_feature_map("_nodim")(NoDim)
    with pytest.raises(TypeError, match="does not implement forward"):
        register_feature_map("_noforward")(NoForward)
    try:
        register_feature_map("_qk_only")(QueryKeyOnly)
    finally:
        registry._REGISTRY.pop("_qk_only", None)
    assert "_nodim" not in registry._REGISTRY and "_noforward" not in registry._REGISTRY


def test_a_map_without_features_is_refused():
    class Empty(FeatureMap):
        def output_dim(self, d):
            return 0

        def forward(self, x):
            return x[..., :0]

    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(TypeError, match=r"output_dim\(4\) must be an int >= 1, got 0"):
        featattn.linear_attention(q, q, q, feature_map=Empty())


def test_learnable_map_through_registry_trains_in_layer():
    @register_feature_map("_learned_test")
    class Learned(FeatureMap):
        def __init__(self, head_dim, feature_dim=6):
            super().__init__()
            self.proj = nn.Linear(head_dim, feature_dim)

        def output_dim(self, d):
            return self.proj.out_features

        def forward(self, x):
            return torch.nn.functional.softplus(self.proj(x))

    try:
        layer = featattn.FeatureAttention(32, 4, "_learned_test", feature_map_kwargs={"feature_dim": 6})
        assert layer.feature_map.proj.in_features == 8  # head_dim filled in by the layer
        assert layer.feature_dim == 6
        y = layer(torch.randn(2, 10, 32))
        y.sum().backward()
        assert layer.feature_map.proj.weight.grad is not None
        assert layer.feature_map.proj.weight.grad.abs().sum() > 0
    finally:
        registry._REGISTRY.pop("_learned_test", None)


@given(
    d=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    mag=st.floats(0.01, 5.0),
)
def test_taylor_identity(d, seed, mag):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, d, generator=g, dtype=torch.float64) * mag
    y = torch.randn(7, d, generator=g, dtype=torch.float64) * mag
    fm = get_feature_map("taylor")
    s = (x * y).sum(-1) / math.sqrt(d)
    torch.testing.assert_close((fm(x) * fm(y)).sum(-1), 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@given(vals=st.lists(st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False), min_size=1, max_size=64))
def test_elu_half_precision_safe(dtype, vals):
    x = torch.tensor(vals, dtype=torch.float32).to(dtype)
    x = torch.cat([x, torch.tensor([-6e4, -1e4, -100.0, -30.0, -0.0, 0.0], dtype=dtype)])
    x.requires_grad_(True)
    y = get_feature_map("elu")(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all() and (y >= 0).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad >= 0).all()


def test_elu_matches_definition_in_fp32():
    x = torch.linspace(-10, 10, 101, dtype=torch.float64)
    torch.testing.assert_close(get_feature_map("elu")(x), torch.nn.functional.elu(x) + 1)


def test_elu_beats_naive_in_bf16():
    # elu(x)+1 in bf16 cancels to 0 long before exp(x) underflows
    x = torch.full((4,), -6.0, dtype=torch.bfloat16)
    exact = math.exp(-6.0)
    ours = get_feature_map("elu")(x).float()
    assert abs(ours[0].item() - exact) / exact < 1e-2


def test_taylor_rejects_an_empty_head_dim():
    # it divided by d ** 0.25: ZeroDivisionError for d = 0
    with pytest.raises(ValueError, match=r"head dim >= 1 .*got x of shape \(2, 3, 0\)"):
        get_feature_map("taylor")(torch.randn(2, 3, 0))
