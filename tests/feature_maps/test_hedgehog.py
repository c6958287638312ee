import pytest
import torch

import featattn
from featattn import FeatureAttention, get_feature_map, linear_attention
from featattn.feature_maps import HedgehogFeatureMap

from helpers import reference


def test_registered_and_shapes():
    fm = get_feature_map("hedgehog", head_dim=8, heads=4, kv_heads=2, feature_dim=6)
    assert isinstance(fm, HedgehogFeatureMap) and fm.output_dim(8) == 12
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    fq, fk = fm.forward_query(q), fm.forward_key(k)
    assert fq.shape == (2, 4, 5, 12) and fk.shape == (2, 2, 5, 12)
    assert (fq > 0).all() and (fk > 0).all()
    # each half is a softmax: sums to one
    torch.testing.assert_close(fq[..., :6].sum(-1), torch.ones(2, 4, 5))
    torch.testing.assert_close(fq[..., 6:].sum(-1), torch.ones(2, 4, 5))


def test_identity_initialisation():
    fm = get_feature_map("hedgehog", head_dim=5, heads=3)
    x = torch.randn(1, 3, 7, 5, dtype=torch.float64)
    expected = torch.cat([x.softmax(-1), (-x).softmax(-1)], -1)
    torch.testing.assert_close(fm(x), expected)


def test_wrong_heads_or_dim_raise():
    fm = get_feature_map("hedgehog", head_dim=8, heads=4)
    with pytest.raises(ValueError, match=r"\[B, 4, T, 8\]"):
        fm(torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="head_dim=8"):
        fm.output_dim(16)
    with pytest.raises(ValueError, match="tie_qk"):
        get_feature_map("hedgehog", head_dim=8, heads=4, kv_heads=2, tie_qk=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_and_trains(normalize):
    torch.manual_seed(0)
    fm = get_feature_map("hedgehog", head_dim=4, heads=4, kv_heads=2, feature_dim=3).double()
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = torch.randn(2, 4, 40, 4).double(), torch.randn(2, 2, 40, 4).double(), torch.randn(2, 2, 40, 5).double()
    o = linear_attention(q, k, v, feature_map=fm, normalize=normalize, backend="torch")
    fq, fk = fm.forward_query(q), fm.forward_key(k)
    ref, _, _ = reference(fq, fk, v, None, normalize=normalize)
    torch.testing.assert_close(o, ref)
    o.square().sum().backward()
    for p in fm.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_in_layer_with_grouped_heads_decodes_exactly():
    torch.manual_seed(0)
    layer = FeatureAttention(32, 4, "hedgehog", kv_heads=2, feature_map_kwargs={"feature_dim": 6}).double()
    assert layer.feature_map.q_weight.shape == (4, 8, 6)
    assert layer.feature_map.k_weight.shape == (2, 8, 6)
    assert layer.feature_dim == 12
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = layer(x)
    y1, s = layer(x[:, :13], return_state=True)
    y2 = layer(x[:, 13:], state=s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    assert "hedgehog" in featattn.list_feature_maps()
