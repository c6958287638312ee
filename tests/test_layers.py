import copy

import pytest
import torch
from torch import nn

from featattn import FeatureAttention, linear_attention


@pytest.mark.parametrize("fm", ["elu", "taylor", "relu", "identity"])
def test_sequential_forward_backward(fm):
    torch.manual_seed(0)
    model = nn.Sequential(
        FeatureAttention(32, 4, fm, normalize=fm != "identity"),
        nn.LayerNorm(32),
        FeatureAttention(32, 4, fm, kv_heads=2, normalize=fm != "identity"),
    )
    x = torch.randn(2, 33, 32, requires_grad=True)
    y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_taylor_defaults_to_16_dim_qk():
    layer = FeatureAttention(128, 2, "taylor")
    assert layer.qk_dim == 16 and layer.head_dim == 64 and layer.feature_dim == 273
    assert FeatureAttention(128, 2, "elu").qk_dim == 64
    assert FeatureAttention(128, 2, "taylor", qk_dim=8).feature_dim == 73


@pytest.mark.parametrize("fm,kv_heads", [("taylor", None), ("elu", 2), ("relu", 1)])
def test_stateful_decode_equals_full_forward(fm, kv_heads):
    torch.manual_seed(1)
    layer = FeatureAttention(32, 4, fm, kv_heads=kv_heads).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    full = layer(x)
    # chunked prefill of 17 tokens, then one token at a time
    y0, state = layer(x[:, :17], return_state=True)
    ys = [y0]
    for t in range(17, 40):
        y, state = layer(x[:, t : t + 1], state=state, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-10)
    assert state.kv.shape == (2, 4, layer.feature_dim, 8)
    # a fresh zero state is the same as no state
    torch.testing.assert_close(layer(x, state=layer.init_state(2, device=x.device).to(torch.float64)), full)


def test_layer_equals_functional_on_projections():
    torch.manual_seed(2)
    layer = FeatureAttention(24, 3, "elu", head_dim=5, qk_dim=6, kv_heads=1).double()
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    w = layer.qkv_proj.weight  # rows: q (3 heads x 6), k (1 x 6), v (1 x 5)
    q = (x @ w[:18].T).view(1, 9, 3, 6).transpose(1, 2)
    k = (x @ w[18:24].T).view(1, 9, 1, 6).transpose(1, 2)
    v = (x @ w[24:].T).view(1, 9, 1, 5).transpose(1, 2)
    o = linear_attention(q, k, v, feature_map="elu", backend="reference")
    expected = layer.o_proj(o.transpose(1, 2).reshape(1, 9, 15))
    torch.testing.assert_close(layer(x), expected)


def test_checkpoint_with_separate_projections_loads():
    """A state dict from before the q/k/v projections were fused (q_proj, k_proj, v_proj)
    loads into qkv_proj and gives the same outputs."""
    torch.manual_seed(4)
    layer = FeatureAttention(24, 3, "elu", head_dim=5, qk_dim=6, kv_heads=1, bias=True).double()
    sd = layer.state_dict()
    old = {k: v for k, v in sd.items() if not k.startswith("qkv_proj")}
    for p in ("weight", "bias"):
        for name, part in zip("qkv", sd[f"qkv_proj.{p}"].split([18, 6, 5])):
            old[f"{name}_proj.{p}"] = part.clone()
    fresh = FeatureAttention(24, 3, "elu", head_dim=5, qk_dim=6, kv_heads=1, bias=True).double()
    fresh.load_state_dict(old)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_decode_in_place_equals_full_forward(backend):
    """update_state=True advances the state in place (the step kernel under the interpreter
    with backend='triton', the copy-back path on the torch backend) and gives the full
    forward's outputs; it refuses to run without a state."""
    torch.manual_seed(5)
    layer = FeatureAttention(16, 2, "elu", kv_heads=1, backend=backend)
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        full = layer(x)
        y0, state = layer(x[:, :5], return_state=True)
        kv = state.kv
        ys = [y0] + [layer(x[:, t:t + 1], state, update_state=True) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-5, atol=1e-5)
    assert state.kv is kv or not kv.is_contiguous()  # the same tensors advanced, where writable
    with pytest.raises(ValueError, match="update_state=True needs a state"):
        layer(x[:, :1], update_state=True)


def test_packed_sequences_equal_each_alone():
    """forward(x [1, total_T, dim], cu_seqlens=...) attends each packed sequence alone; the
    returned state is per sequence."""
    torch.manual_seed(6)
    layer = FeatureAttention(16, 2, "elu", kv_heads=1).double()
    lens = [3, 1, 9]
    x = torch.randn(1, sum(lens), 16, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 13])
    y, state = layer(x, cu_seqlens=cu, return_state=True)
    alone = [layer(x[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    torch.testing.assert_close(y, torch.cat(alone, 1))
    assert state.kv.shape[0] == 3
    with pytest.raises(ValueError, match="packed sequences"):
        layer(x, state, update_state=True, cu_seqlens=cu)


@pytest.mark.parametrize("kw", [dict(window=2), dict(causal=False), dict(window=2, backend="reference"),
                                dict(), dict(feature_map="hedgehog", window=3)],
                         ids=["window", "noncausal", "window-reference", "plain", "hedgehog-window"])
def test_state_stays_fp32_under_autocast(kw):
    """Under torch.autocast the attention's sums and the returned state stay fp32 (autocast
    would run their matmuls in bf16: a bf16 state the next call refused), and a chunked
    prefill under autocast continues from it; the result matches the same layer run with
    autocast off on the autocast's bf16 projections, to bf16 rounding."""
    torch.manual_seed(0)
    layer = FeatureAttention(16, 4, **kw)
    x = torch.randn(2, 6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = layer(x[:, :4], return_state=True)
        assert s.kv.dtype == torch.float32 and s.z.dtype == torch.float32
        if kw.get("causal", True):
            y2, s2 = layer(x[:, 4:], s, return_state=True)
            assert s2.kv.dtype == torch.float32
            y_whole = layer(x)
            torch.testing.assert_close(torch.cat([y, y2], 1).float(), y_whole.float(),
                                       rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        ref = layer(x[:, :4])
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def test_state_to_follows_the_layer_dtype():
    """state.to(dtype) after layer.to(dtype): the window's keys and values take the inputs'
    dtype, kv and z their accumulation dtype (fp32 for fp16 / bf16 inputs, float64 for
    float64), so decoding continues; a non-float dtype is refused."""
    torch.manual_seed(0)
    layer = FeatureAttention(16, 4, window=2)
    x = torch.randn(1, 6, 16)
    _, s = layer(x[:, :4], return_state=True)
    with torch.no_grad():
        want = layer(x[:, 4:5], s.clone())
    for dt in (torch.float16, torch.float64):
        moved = s.clone().to(dt)  # (.to, like Tensor.to, may share storage: kv stays fp32)
        acc = torch.float64 if dt == torch.float64 else torch.float32
        assert moved.kv.dtype == moved.z.dtype == acc
        assert moved.window_k.dtype == moved.window_v.dtype == dt
        assert moved.offset is None or moved.offset.dtype == s.offset.dtype
        with torch.no_grad():
            got = copy.deepcopy(layer).to(dt)(x[:, 4:5].to(dt), moved, update_state=True)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    assert s.to("cpu").window_k.dtype == s.window_k.dtype  # a device alone keeps the dtypes
    with pytest.raises(TypeError, match="floating point dtype"):
        s.to(torch.int64)
