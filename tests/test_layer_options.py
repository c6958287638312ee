"""FeatureAttention's layer options: rotary, qk_norm, output_norm, output_gate, dropout.

Each is checked against a plain-torch float64 forward written here (projections, RMSNorm,
a pairwise rotary rotation at explicit positions, the elu + 1 map, the quadratic masked
attention, the gate, the output projection), then through the stateful paths (chunked
prefill, decoding with return_state and update_state, packed sequences) with every option on.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from featattn import FeatureAttention, LinearAttentionState

EPS = 1e-6  # the layer's attention eps (default) and the options' RMSNorm eps

ALL = dict(rotary=True, qk_norm=True, output_norm="rmsnorm", output_gate=True)


def _rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _rope(x, pos, theta):
    """Rotate dims (i, i + D/2) of ``x [B, H, T, D]`` by ``pos * theta**(-2i/D)`` (``pos
    [B or 1, T]``), one pair at a time."""
    D = x.shape[-1]
    half = D // 2
    out = x.clone()
    for i in range(half):
        a = pos.to(torch.float64)[:, None, :] * theta ** (-2.0 * i / D)
        c, s = torch.cos(a), torch.sin(a)
        x1, x2 = x[..., i], x[..., i + half]
        out[..., i] = x1 * c - x2 * s
        out[..., i + half] = x2 * c + x1 * s
    return out


def reference(layer, x, pos=None, key_mask=None):
    """The layer's forward in plain float64 torch (elu map; window or not; causal or not)."""
    B, T, _ = x.shape
    H, Hkv, Dq, Dv = layer.heads, layer.kv_heads, layer.qk_dim, layer.head_dim
    W = layer.qkv_proj.weight
    b = layer.qkv_proj.bias
    qkv = x @ W.T + (0 if b is None else b)
    q = qkv[..., :H * Dq].reshape(B, T, H, Dq).transpose(1, 2)
    k = qkv[..., H * Dq:(H + Hkv) * Dq].reshape(B, T, Hkv, Dq).transpose(1, 2)
    v = qkv[..., (H + Hkv) * Dq:].reshape(B, T, Hkv, Dv).transpose(1, 2)
    if layer.qk_norm:
        q, k = _rms(q, layer.q_norm.weight), _rms(k, layer.k_norm.weight)
    if layer.rotary:
        pos = torch.arange(T)[None] if pos is None else pos
        q, k = _rope(q, pos, layer.rope_theta), _rope(k, pos, layer.rope_theta)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    t = torch.arange(T)
    allowed = (t[None, :] <= t[:, None]) if layer.causal else torch.ones(T, T, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    lin = (fq @ fk.transpose(-1, -2)) * allowed
    if layer.window:
        win = allowed & (t[None, :] > t[:, None] - layer.window)
        lin = lin * ~win
        a = (q @ k.transpose(-1, -2)) / math.sqrt(Dq)
        a = a.masked_fill(~win, float("-inf"))
        e = torch.exp(a - a.amax(-1, keepdim=True))
        f = torch.sigmoid(layer.window_logit).view(1, H, 1, 1)
        o = (f * (e @ v) + (1 - f) * (lin @ v)) / (
            f * e.sum(-1, keepdim=True) + (1 - f) * lin.sum(-1, keepdim=True) + EPS)
    else:
        o = (lin @ v) / (lin.sum(-1, keepdim=True) + EPS)
    if layer.output_norm:
        o = _rms(o, layer.o_norm.weight)
    o = o.transpose(1, 2).reshape(B, T, H * Dv)
    if layer.output_gate:
        g = x @ layer.g_proj.weight.T + (0 if layer.g_proj.bias is None else layer.g_proj.bias)
        o = o * (g * torch.sigmoid(g))
    return o @ layer.o_proj.weight.T + (0 if layer.o_proj.bias is None else layer.o_proj.bias)


def make(seed=0, dim=24, heads=4, **kw):
    torch.manual_seed(seed)
    kw.setdefault("kv_heads", 2)
    layer = FeatureAttention(dim, heads, "elu", **kw).double()
    with torch.no_grad():  # norm weights and the window mix away from their 1 / 0 inits
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            if name == "window_logit":
                p.copy_(torch.randn_like(p))
    return layer.eval()


OPTIONS = {
    "plain": {},
    "rotary": dict(rotary=True),
    "rotary-theta": dict(rotary=True, rope_theta=37.0),
    "qk_norm": dict(qk_norm=True),
    "output_norm": dict(output_norm="rmsnorm"),
    "output_gate": dict(output_gate=True),
    "all": ALL,
    "all-bias": dict(ALL, bias=True),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_matches_the_reference(name):
    layer = make(**OPTIONS[name])
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-9, atol=1e-9)


def test_options_change_the_output():
    """Each option does something (a reference that ignored one would still pass above only
    if the layer ignored it too)."""
    x = torch.randn(1, 9, 24, dtype=torch.float64)
    plain = make()(x)
    for name in ("rotary", "qk_norm", "output_norm", "output_gate"):
        y = make(**OPTIONS[name])(x)
        assert (y - plain).abs().max() > 1e-3, name


def test_rotary_at_explicit_positions():
    layer = make(rotary=True, qk_norm=True)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 2, 4, 6, 8, 10, 12]])
    torch.testing.assert_close(layer(x, positions=pos), reference(layer, x, pos=pos))
    torch.testing.assert_close(layer(x, positions=torch.arange(5, 12)),
                               reference(layer, x, pos=torch.arange(5, 12)[None]))
    # the returned state continues after the last given position
    _, st = layer(x, positions=pos, return_state=True)
    assert st.offset.tolist() == [10, 13]


def test_window_with_rotary_matches_the_reference():
    layer = make(window=3, **ALL)
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-9, atol=1e-9)


def test_noncausal_with_options_and_a_key_padding_mask():
    layer = make(causal=False, **ALL)
    x = torch.randn(2, 8, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-9, atol=1e-9)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    y = layer(x, key_padding_mask=mask)
    pos = (mask.long().cumsum(1) - 1).clamp_min(0)  # real tokens numbered, padding repeats
    torch.testing.assert_close(y, reference(layer, x, pos=pos, key_mask=mask), rtol=1e-9,
                               atol=1e-9)
    # right padding: the real tokens keep their positions and equal the unpadded run
    torch.testing.assert_close(y[1:, :5], layer(x[1:, :5]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [0, 3])
def test_rotary_numbers_a_padded_rows_real_tokens(window):
    """With a key_padding_mask the rotary positions count real tokens only: a left-padded
    row, a right-padded one and one with a hole give what each row alone gives (the map is
    not relative, so positions shifted by the padding gave other outputs), and the state
    continues after each row's last real token."""
    layer = make(rotary=True, qk_norm=True, window=window).eval()
    T, extra = 9, 3
    x = torch.randn(3, T + extra, 24, dtype=torch.float64)
    keep = torch.ones(3, T, dtype=torch.bool)
    keep[0, :4] = False  # left padding
    keep[1, 6:] = False  # right padding
    keep[2, 2:4] = False  # a hole
    with torch.no_grad():
        y, st = layer(x[:, :T], key_padding_mask=keep, return_state=True)
        steps = torch.cat([layer(x[:, T + t:T + t + 1], st, update_state=True)
                           for t in range(extra)], 1)
        for b in range(3):
            alone = torch.cat([x[b:b + 1, :T][:, keep[b]], x[b:b + 1, T:]], 1)
            want = layer(alone)
            n = int(keep[b].sum())
            torch.testing.assert_close(y[b:b + 1][:, keep[b]], want[:, :n], rtol=1e-9,
                                       atol=1e-9)
            torch.testing.assert_close(steps[b:b + 1], want[:, n:], rtol=1e-9, atol=1e-9)
        assert st.offset.tolist() == [5 + extra, 6 + extra, 7 + extra]
        if not window:  # a row of padding only saw no token (a window refuses such rows)
            empty = keep.clone()
            empty[1] = False
            _, st = layer(x[:, :T], key_padding_mask=empty, return_state=True)
            assert st.offset.tolist() == [5, 0, 7]
        with pytest.raises(ValueError, match="takes no key_padding_mask"):
            layer(x[:, T:T + 1], st, update_state=True, key_padding_mask=keep[:, :1])


def test_gradients_reach_the_new_parameters():
    layer = make(bias=True, window=2, **ALL).train()
    x = torch.randn(2, 9, 24, dtype=torch.float64, requires_grad=True)
    layer(x).square().mean().backward()
    for name in ("q_norm.weight", "k_norm.weight", "o_norm.weight", "g_proj.weight",
                 "g_proj.bias", "qkv_proj.weight", "window_logit"):
        g = dict(layer.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name
    assert x.grad.abs().max() > 0


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_prefill_and_decoding_equal_the_full_forward(window, kv_heads):
    """Every option on (dropout in eval mode): a chunked prefill, then one token at a time
    through return_state=True and through update_state=True, gives the full forward; the
    rotary positions continue from the state's token count."""
    layer = make(kv_heads=kv_heads, window=window, dropout=0.3, **ALL)
    x = torch.randn(2, 20, 24, dtype=torch.float64)
    full = layer(x)
    torch.testing.assert_close(full, reference(layer, x), rtol=1e-9, atol=1e-9)
    y0, st = layer(x[:, :6], return_state=True)
    y1, st = layer(x[:, 6:11], st, return_state=True)  # a second chunk
    ys = [y0, y1]
    for t in range(11, 20):
        y, st = layer(x[:, t:t + 1], st, return_state=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-9, atol=1e-9)
    assert st.offset.tolist() == [20, 20]
    with torch.no_grad():
        y0, st = layer(x[:, :7], return_state=True)
        ys = [y0] + [layer(x[:, t:t + 1], st, update_state=True) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-9, atol=1e-9)
    assert st.offset.tolist() == [20, 20]
    # from init_state (offset 0), the same
    with torch.no_grad():
        st = layer.init_state(2).to(torch.float64)
        assert st.offset.dtype == torch.int64
        ys = [layer(x[:, t:t + 1], st, update_state=True) for t in range(20)]
    torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-9, atol=1e-9)


def test_packed_sequences_equal_each_alone_with_options():
    """Positions restart at each packed sequence; the per-sequence state continues each one."""
    layer = make(**ALL)
    lens = [3, 1, 6]
    x = torch.randn(1, sum(lens), 24, dtype=torch.float64)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    y, st = layer(x, cu_seqlens=cu, return_state=True)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    torch.testing.assert_close(y, torch.cat([layer(x[:, a:b]) for a, b in bounds], 1))
    assert st.offset.tolist() == lens
    # one more token per sequence, decoded as a batch from the packed state
    nxt = torch.randn(3, 1, 24, dtype=torch.float64)
    with torch.no_grad():
        y_next = layer(nxt, st, update_state=True)
    for n, (a, b) in enumerate(bounds):
        whole = layer(torch.cat([x[:, a:b], nxt[n:n + 1]], 1))
        torch.testing.assert_close(y_next[n], whole[0, -1:], rtol=1e-9, atol=1e-9)
    # a packed call continuing from a packed state: positions continue per sequence
    more = torch.randn(1, 4, 24, dtype=torch.float64)
    _, st = layer(x, cu_seqlens=cu, return_state=True)
    y2 = layer(more, st, cu_seqlens=torch.tensor([0, 2, 3, 4]))
    a, b = bounds[0]
    whole = layer(torch.cat([x[:, a:b], more[:, :2]], 1))
    torch.testing.assert_close(y2[:, :2], whole[:, -2:], rtol=1e-9, atol=1e-9)


def test_dropout_after_the_output_projection_in_training_only():
    layer = make(dropout=0.25)
    x = torch.randn(2, 30, 24, dtype=torch.float64)
    clean = layer(x)
    torch.testing.assert_close(clean, reference(layer, x))  # eval: no dropout
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    dropped = y == 0
    # whole output features are zeroed (after o_proj), the rest scaled by 1 / (1 - p)
    torch.testing.assert_close(y[~dropped], clean[~dropped] / 0.75)
    assert 0.15 < dropped.double().mean() < 0.35


def test_a_checkpoint_without_the_options_still_loads():
    layer = make()
    sd = layer.state_dict()
    assert set(sd) == {"qkv_proj.weight", "o_proj.weight"}  # the options add nothing when off
    fresh = FeatureAttention(24, 4, "elu", kv_heads=2).double()
    fresh.load_state_dict(sd)
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), layer(x))
    # into a layer with options on (fine-tuning from it): only the new parameters are missing
    opt = FeatureAttention(24, 4, "elu", kv_heads=2, **ALL).double()
    missing, unexpected = opt.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["g_proj.weight", "k_norm.weight", "o_norm.weight",
                               "q_norm.weight"] and not unexpected
    # with rotary only (no parameters) the old checkpoint loads strictly
    FeatureAttention(24, 4, "elu", kv_heads=2, rotary=True).double().load_state_dict(sd)


def test_state_helpers_keep_the_offset():
    layer = make(rotary=True, window=2)
    _, st = layer(torch.randn(3, 5, 24, dtype=torch.float64), return_state=True)
    assert st.offset.tolist() == [5, 5, 5]
    st.offset = torch.tensor([5, 6, 7])
    assert st.index_select(0, torch.tensor([2, 0])).offset.tolist() == [7, 5]
    assert st.map(lambda t: t.repeat_interleave(2, dim=0)).offset.tolist() == [5, 5, 6, 6, 7, 7]
    assert st.to(torch.float32).offset.dtype == torch.int64
    assert st.clone().offset.tolist() == [5, 6, 7] and st.detach().offset is not None
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in
                              (st.kv, st.z, st.window_k, st.window_v, st.offset))
    assert LinearAttentionState(st.kv).offset is None


def test_extra_repr_lists_the_options():
    r = repr(FeatureAttention(16, 2, "elu", dropout=0.1, rope_theta=500.0, **ALL))
    for part in ("rotary=True, rope_theta=500", "qk_norm=True", "output_norm='rmsnorm'",
                 "output_gate=True", "dropout=0.1"):
        assert part in r
    assert "rotary" not in repr(FeatureAttention(16, 2, "elu"))


@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(rotary=1), TypeError, "rotary must be a bool"),
    (dict(qk_norm="yes"), TypeError, "qk_norm must be a bool"),
    (dict(output_gate=None), TypeError, "output_gate must be a bool"),
    (dict(rope_theta="1e4"), TypeError, "rope_theta must be a float > 0"),
    (dict(rope_theta=0.0), ValueError, "rope_theta must be a finite float > 0"),
    (dict(rope_theta=float("inf")), ValueError, "got inf"),
    (dict(output_norm="layernorm"), ValueError, "pass output_norm='rmsnorm'"),
    (dict(output_norm=True), TypeError, "output_norm must be None or one of"),
    (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
    (dict(dropout=-0.1), ValueError, "got -0.1"),
    (dict(dropout="0.1"), TypeError, "dropout must be a float"),
    (dict(rotary=True, qk_dim=5), ValueError, "pass an even qk_dim"),
])
def test_bad_arguments_raise_clearly(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        FeatureAttention(16, 2, "elu", **kwargs)


def test_bad_forward_arguments_raise_clearly():
    layer = make(rotary=True)
    x = torch.randn(2, 4, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match="positions= only applies to a layer with rotary"):
        make()(x, positions=torch.arange(4))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        layer(x, positions=torch.arange(4.0))
    with pytest.raises(ValueError, match=r"positions must be \[T\] or \[B, T\]"):
        layer(x, positions=torch.arange(5))
    with pytest.raises(ValueError, match="this state has none"):
        layer(x, LinearAttentionState(torch.zeros(2, 4, 6, 6, dtype=torch.float64),
                                      torch.zeros(2, 4, 6, dtype=torch.float64)))
    with pytest.raises(ValueError, match="needs positions="):
        layer(x, cp_group=object())
    with pytest.raises(ValueError, match="cu_seqlens must end at the total length"):
        layer(x[:1], cu_seqlens=torch.tensor([0, 2, 5]))
    _, st = layer(x, return_state=True)
    with pytest.raises(ValueError, match=r"state.offset must be \[2\]"):
        layer(x, LinearAttentionState(st.kv, st.z, offset=st.offset[:1]))
