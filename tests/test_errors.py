"""Bad input gets a clear ValueError/TypeError saying what was expected and what arrived."""

import pytest
import torch

import featattn
from featattn import FeatureAttention, LinearAttentionState, linear_attention, select_kernel


def qkv(B=1, H=2, Hkv=2, T=5, D=4, Dv=3, dtype=torch.float32):
    return (torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype),
            torch.randn(B, Hkv, T, Dv, dtype=dtype))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 2, 5, 4), *qkv()[1:]), ValueError, "batch sizes differ"),
        (lambda: (torch.randn(1, 2, 6, 4), *qkv()[1:]), ValueError, "sequence lengths differ"),
        (lambda: (torch.randn(1, 2, 5, 7), *qkv()[1:]), ValueError, "head dims differ"),
        (lambda: (torch.randn(1, 3, 5, 4), *qkv()[1:]), ValueError, "multiple of the key/value heads"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 1, 5, 3)), ValueError, "same number of heads"),
        (lambda: (torch.randn(2, 5, 4), *qkv()[1:]), ValueError, r"4-D \(\[B, H, T, D\]\)"),
        (lambda: (torch.ones(1, 2, 5, 4, dtype=torch.int64), *qkv()[1:]), TypeError, "floating-point"),
        (lambda: (qkv()[0].half(), *qkv()[1:]), TypeError, "share one dtype"),
        (lambda: ([1.0], *qkv()[1:]), TypeError, "must be a torch.Tensor"),
        (lambda: (torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 3)),
         ValueError, "T must be >= 1"),
    ],
    ids=["batch", "time", "head_dim", "heads_divide", "kv_heads", "rank", "int", "mixed_dtype",
         "not_tensor", "empty_T"],
)
def test_bad_tensors(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        linear_attention(q, k, v)


def test_mixed_devices():
    q, k, v = qkv()
    k = k.to("meta")
    with pytest.raises(ValueError, match="one device"):
        linear_attention(q, k, v)


@pytest.mark.parametrize("eps,exc", [(0.0, ValueError), (-1e-6, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), (True, TypeError), ("1e-6", TypeError)])
def test_bad_eps(eps, exc):
    with pytest.raises(exc, match="eps"):
        linear_attention(*qkv(), eps=eps)


@pytest.mark.parametrize("scale,exc", [(True, TypeError), (float("inf"), ValueError),
                                       (float("nan"), ValueError), ("2", TypeError)])
def test_bad_scale(scale, exc):
    with pytest.raises(exc, match="scale"):
        linear_attention(*qkv(), scale=scale)


def test_bad_normalize_flag():
    with pytest.raises(TypeError, match="normalize must be a bool"):
        linear_attention(*qkv(), normalize=1)


def test_unknown_feature_map_and_backend():
    with pytest.raises(ValueError, match="unknown feature map 'softmax'.*known feature maps: dpfp, elu"):
        linear_attention(*qkv(), feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map must be None"):
        linear_attention(*qkv(), feature_map=3)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, torch, reference, triton"):
        linear_attention(*qkv(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        select_kernel(*qkv(), backend="fast")


def test_forced_triton_unavailable_raises_with_reasons(monkeypatch):
    # Triton reads TRITON_INTERPRET when a kernel is decorated: import the kernels first, or
    # they would be built for a GPU and fail every later interpreter test of this process
    import featattn.kernels  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run: .*(CPU|not installed)"):
        select_kernel(*qkv(), backend="triton")


def test_bad_states():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention(q, k, v, initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)))
    bad_shape = LinearAttentionState(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"kv must have shape \[B, H, Dk, Dv\] = \[1, 2, 4, 3\]"):
        linear_attention(q, k, v, initial_state=bad_shape)
    # with a feature map the state's Dk is the expanded dim: 1 + 4 + 16 = 21 for taylor
    wrong_dk = LinearAttentionState(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"\[1, 2, 21, 3\]"):
        linear_attention(q, k, v, feature_map="taylor", initial_state=wrong_dk)
    no_z = LinearAttentionState(torch.zeros(1, 2, 4, 3), None)
    with pytest.raises(ValueError, match="no z.*normalize=True"):
        linear_attention(q, k, v, initial_state=no_z)
    with_z = LinearAttentionState(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="carries z.*normalize=False"):
        linear_attention(q, k, v, normalize=False, initial_state=with_z)
    bad_z = LinearAttentionState(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match=r"z must have shape"):
        linear_attention(q, k, v, initial_state=bad_z)
    half = LinearAttentionState(torch.zeros(1, 2, 4, 3, dtype=torch.half), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="float32"):
        linear_attention(q, k, v, initial_state=half)


def test_layer_errors():
    with pytest.raises(ValueError, match="not divisible by heads"):
        FeatureAttention(30, 4, "elu")
    with pytest.raises(ValueError, match="kv_heads"):
        FeatureAttention(32, 4, "elu", kv_heads=3)
    with pytest.raises(ValueError, match="unknown feature map"):
        FeatureAttention(32, 4, "nope")
    layer = FeatureAttention(32, 4, "elu")
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        layer(torch.randn(2, 5, 16))


# --------------------------------------------------------------------------- found by fuzzing
def test_hedgehog_constructor_checks_its_arguments():
    get = featattn.get_feature_map
    with pytest.raises(TypeError, match="head_dim must be an int"):
        get("hedgehog", head_dim="8")
    with pytest.raises(TypeError, match="feature_dim must be an int"):
        get("hedgehog", head_dim=8, feature_dim=2.5)
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        get("hedgehog", head_dim=8, heads=4, kv_heads=3)
    with pytest.raises(TypeError, match="tie_qk must be a bool"):
        get("hedgehog", head_dim=8, tie_qk="yes")
    with pytest.raises(ValueError, match="degree must be 2 or 4, got 4.0"):
        get("polysketch", head_dim=8, degree=4.0)


def test_windowed_states_are_checked_whole():
    q, k, v = torch.randn(3, 1, 2, 6, 4)
    _, s = featattn.linear_attention(q, k, v, feature_map="elu", window=3, return_state=True)
    LAS = featattn.LinearAttentionState
    with pytest.raises(ValueError, match="torch.float32 on cpu / torch.float64 on cpu"):
        featattn.linear_attention(q, k, v, feature_map="elu", window=3,
                                  initial_state=LAS(s.kv, s.z, s.window_k, s.window_v.double()))
    with pytest.raises(TypeError, match="must be tensors, got list"):
        featattn.linear_attention(q, k, v, feature_map="elu", window=3,
                                  initial_state=LAS(s.kv, s.z, [1], s.window_v))
    with pytest.raises(ValueError, match="only one of window_k / window_v"):
        featattn.linear_attention(q, k, v, feature_map="elu", window=3,
                                  initial_state=LAS(s.kv, s.z, None, s.window_v))
    with pytest.raises(ValueError, match=r"pass the same window to decode_step"):
        featattn.decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], s, feature_map="elu")


def test_layer_says_which_dtype_it_holds():
    layer = featattn.FeatureAttention(32, 4, "elu")
    with pytest.raises(TypeError, match="holds torch.float32 weights but x is torch.float64"):
        layer(torch.randn(1, 5, 32, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the layer
        assert layer(torch.randn(1, 5, 32)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"expects a floating-point x .* got torch.int64"):
        layer(torch.ones(1, 5, 32, dtype=torch.long))


def test_a_map_built_for_other_heads_is_refused_when_the_layer_is_built():
    hh = featattn.get_feature_map("hedgehog", head_dim=8, heads=2)
    with pytest.raises(ValueError, match="built for heads=2, but the attention has heads=4"):
        featattn.FeatureAttention(32, 4, hh)
    with pytest.raises(ValueError, match="built for head_dim=4, but the attention has head_dim=8"):
        featattn.FeatureAttention(32, 4, featattn.get_feature_map("hedgehog", head_dim=4, heads=4))
    with pytest.raises(ValueError, match="feature_map_kwargs must not set head_dim"):
        featattn.FeatureAttention(32, 4, "hedgehog", feature_map_kwargs={"head_dim": 4})


def test_select_kernel_checks_the_call_like_linear_attention():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="sequence lengths differ"):
        select_kernel(q, q[:, :, :3], q)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        select_kernel([1], q, q)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        select_kernel(q, q, q, window="3")
    with pytest.raises(TypeError, match="causal must be a bool"):
        select_kernel(q, q, q, causal="no")
    with pytest.raises(TypeError, match="initial_state must be a featattn.LinearAttentionState"):
        select_kernel(q, q, q, initial_state=(1, 2))


def test_a_tensor_window_weight_is_range_checked_on_cpu():
    q = torch.randn(1, 2, 5, 4)
    for bad in (torch.full((2,), 1.5), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match=r"window_weight must be in \[0, 1\] for every head"):
            linear_attention(q, q, q, feature_map="elu", window=3, window_weight=bad)


def test_zero_state_sizes_are_checked():
    with pytest.raises(ValueError, match="batch must be an int >= 1, got int -1"):
        LinearAttentionState.zeros(-1, 2, 4, 4)
    with pytest.raises(ValueError, match="key_dim must be an int >= 1, got float 4.0"):
        LinearAttentionState.zeros(1, 2, 4.0, 4)


def test_calls_the_kernels_would_get_wrong_are_refused():
    """bf16 under the Triton interpreter (its tl.dot is wrong there), an expanded out buffer,
    and a map whose triton_elementwise() returns something else than a form."""
    import os

    q = torch.randn(1, 2, 5, 4)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="interpreter .* computes bf16 tl.dot wrong"):
            select_kernel(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="triton")
    state = LinearAttentionState.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="out has a zero stride"):
        featattn.decode_step(q[:, :, :1], q[:, :, :1], q[:, :, :1], state, feature_map="elu",
                             out=torch.zeros(1, 1, 1, 4).expand(1, 2, 1, 4))

    class Odd(featattn.FeatureMap):
        def output_dim(self, d):
            return d

        def forward(self, x):
            return x.relu()

        def triton_elementwise(self):
            return "relu"

    c = select_kernel(q, q, q, Odd(), backend="triton") if os.environ.get("TRITON_INTERPRET") \
        == "1" else None
    if c is not None:
        assert c.map_path == "torch" and any("not a featattn.ElementwiseTritonForm" in r
                                             for r in c.reasons), c


def test_review_fixes_accept_what_is_valid():
    """A saturated sigmoid weight (exactly 1.0 in fp32), numpy ints for window, a packed
    call's per-sequence state in select_kernel, and a user map whose attributes named `heads`
    / `head_dim` mean something else (its constructor does not take them)."""
    import numpy as np

    layer = featattn.FeatureAttention(32, 4, "elu", window=4)
    with torch.no_grad():
        layer.window_logit.fill_(17.0)  # sigmoid(17) == 1.0 in fp32
    layer(torch.randn(1, 6, 32))
    q = torch.randn(1, 2, 6, 4)
    select_kernel(q, q, q, window=np.int64(3))
    cu = torch.tensor([0, 2, 6])
    packed = LinearAttentionState.zeros(2, 2, 4, 4)
    select_kernel(q, q, q, initial_state=packed, cu_seqlens=cu)

    class Scales(featattn.FeatureMap):
        def __init__(self):
            super().__init__()
            self.heads, self.head_dim = 3, 16  # not attention sizes

        def output_dim(self, d):
            return 2 * d

        def forward(self, x):
            return torch.cat([x.relu(), (-x).relu()], -1)

    featattn.FeatureAttention(32, 4, Scales())


def test_kernels_check_packed_states():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the direct kernel calls need the interpreter on CPU")
    from featattn.kernels import chunked_attention, taylor_attention

    q = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=r"initial_kv must be \[N, H, Dk, Dv\] = \(2, 2, 4, 4\)"):
        chunked_attention(q, q, q, normalize=True, eps=1e-6, cu_seqlens=cu,
                          initial_kv=torch.zeros(1, 2, 4, 4), initial_z=torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"initial_kv must be \[N, H, Dk, Dv\] = \(2, 2, 21, 4\)"):
        taylor_attention(q, q, q, normalize=True, eps=1e-6, cu_seqlens=cu,
                         initial_kv=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="initial_z is only meaningful with normalize=True"):
        taylor_attention(q, q, q, normalize=False, eps=1e-6, cu_seqlens=cu,
                         initial_z=torch.zeros(2, 2, 21))
