import pytest
import torch

from featattn import get_feature_map
from featattn.feature_maps import T2RFeatureMap

from zoo_reference import check_against_references, dot_scores


def t2r_formula(x, weight, bias, heads_of):
    """relu(W_phi x + b_phi) per head (Kasai et al. 2021); head h of x uses map heads_of(h)."""
    out = []
    for h in range(x.shape[1]):
        W = weight[heads_of(h)].T          # [f, d], the paper's W_phi
        b = bias[heads_of(h)]
        out.append(torch.relu(torch.einsum("fd,btd->btf", W, x[:, h]) + b))
    return torch.stack(out, 1)


def make(H=4, Hkv=2, d=4, f=6):
    torch.manual_seed(0)
    return get_feature_map("t2r", head_dim=d, heads=H, kv_heads=Hkv, feature_dim=f).double()


def test_forward_matches_the_formula():
    fm = make()
    assert isinstance(fm, T2RFeatureMap) and fm.output_dim(4) == 6
    q, k = torch.randn(2, 4, 5, 4, dtype=torch.float64), torch.randn(2, 2, 5, 4, dtype=torch.float64)
    # grouped heads: query head h shares the map of kv head h // 2
    torch.testing.assert_close(fm.forward_query(q), t2r_formula(q, fm.weight, fm.bias, lambda h: h // 2))
    torch.testing.assert_close(fm.forward_key(k), t2r_formula(k, fm.weight, fm.bias, lambda h: h))
    assert (fm.forward_query(q) == 0).any() and (fm.forward_query(q) > 0).any()  # relu is active


@pytest.mark.parametrize("normalize", [True, False])
def test_attention_and_gradients(normalize):
    fm = make()

    def scores(q, k):
        return dot_scores(t2r_formula(q, fm.weight, fm.bias, lambda h: h // 2),
                          t2r_formula(k, fm.weight, fm.bias, lambda h: h))

    check_against_references(fm, scores, params=[fm.weight, fm.bias], normalize=normalize)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(head_dim=0), ValueError, r"t2r: head_dim must be an int >= 1, got 0; FeatureAttention"),
    (dict(head_dim=8, feature_dim="8"), TypeError, r"feature_dim must be an int >= 1, got str '8'"),
    (dict(head_dim=8, feature_dim=0), ValueError, r"feature_dim must be an int >= 1, got 0; pass"),
    (dict(head_dim=8, heads=4, kv_heads=3), ValueError, r"kv_heads must divide heads.*heads=4, kv_heads=3"),
    (dict(head_dim=8.0), TypeError, r"head_dim must be an int >= 1, got float 8.0"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        get_feature_map("t2r", **kwargs)


def test_bad_inputs():
    fm = get_feature_map("t2r", head_dim=8, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match=r"t2r expects queries of shape \[B, 4, T, 8\].*got \(1, 3, 5, 8\)"):
        fm.forward_query(torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"keys of shape \[B, 2, T, 8\].*got \(1, 2, 5, 7\)"):
        fm.forward_key(torch.randn(1, 2, 5, 7))
    with pytest.raises(ValueError, match="built for head_dim=8, got 16"):
        fm.output_dim(16)
