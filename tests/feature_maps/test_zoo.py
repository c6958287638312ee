"""The literature maps through the registry: FeatureAttention builds, trains and decodes them;
building a sized map by name alone says how to size it; the bench can time them."""

import pytest
import torch

import featattn
from featattn import FeatureAttention, get_feature_map, linear_attention
from featattn.cli import main as cli_main

ZOO = {"t2r": {"feature_dim": 6}, "dpfp": {"nu": 2}, "rebased": {}, "performer": {"seed": 0}}


def test_registered():
    assert set(ZOO) <= set(featattn.list_feature_maps())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_layer_trains_and_decodes_exactly(name):
    torch.manual_seed(0)
    layer = FeatureAttention(16, 4, name, kv_heads=2, feature_map_kwargs=ZOO[name]).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = layer(x)
    y1, state = layer(x[:, :5], return_state=True)
    torch.testing.assert_close(torch.cat([y1, layer(x[:, 5:], state=state)], 1), full)
    full.square().sum().backward()
    params = dict(layer.feature_map.named_parameters())
    assert bool(params) == (name in ("t2r", "rebased"))
    for pname, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["t2r", "rebased", "performer"])
def test_sized_map_by_name_alone_says_how_to_build_it(name):
    with pytest.raises(TypeError, match=rf"feature map '{name}' .*missing a required argument: "
                                        rf"'head_dim'.*FeatureAttention\(dim, heads, '{name}'\)"):
        get_feature_map(name)
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match="head_dim"):
        linear_attention(q, q, q, feature_map=name)
    with pytest.raises(TypeError, match=rf"'{name}' .*got an unexpected keyword argument 'bogus'"):
        get_feature_map(name, head_dim=4, bogus=1)


@pytest.mark.parametrize("name", ["t2r", "performer"])
def test_bench_times_a_sized_map(name, tmp_path, capsys):
    rc = cli_main(["bench", "--feature-map", name, "--backends", "torch", "--lengths", "16",
                   "--batch", "1", "--heads", "2", "--dqk", "8", "--dv", "8",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"(Dk=8 after {name})" in out
    row = [line for line in out.splitlines() if line.startswith("| torch")]
    assert len(row) == 1 and "n/a" not in row[0], out
