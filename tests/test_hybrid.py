"""The hybrid layer (window > 0): a softmax over the last W keys plus linear attention over the
older ones under one denominator (featattn/hybrid.py, the oracle in featattn/reference.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featattn
from featattn.dispatch import KernelUnavailable
from featattn.feature_maps import resolve_feature_map
from featattn.reference import quadratic_hybrid_attention


def loop_oracle(q, k, v, fm, W, f, eps=1e-6):
    """The LoLCATs formula token by token, straight from its definition (float64)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    phi = (lambda x: x) if fm is None else fm
    fq = phi(q) if fm is None else fm.forward_query(q)
    fk = phi(kk) if fm is None else fm.forward_key(k).repeat_interleave(G, 1)
    f = torch.as_tensor(f, dtype=q.dtype).expand(H).view(1, H, 1)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        win = list(range(max(0, t - W + 1), t + 1))
        old = list(range(0, max(0, t - W + 1)))
        a = (q[:, :, t:t + 1] @ kk[:, :, win].transpose(-1, -2)).squeeze(2) / math.sqrt(D)
        e = torch.exp(a - a.amax(-1, keepdim=True))
        num = f * (e.unsqueeze(-1) * vv[:, :, win]).sum(2)
        den = f * e.sum(-1, keepdim=True)
        if old:
            lin = (fq[:, :, t:t + 1] @ fk[:, :, old].transpose(-1, -2)).squeeze(2)
            num = num + (1 - f) * (lin.unsqueeze(-1) * vv[:, :, old]).sum(2)
            den = den + (1 - f) * lin.sum(-1, keepdim=True)
        out[:, :, t] = num / (den + eps)
    return out


def _map(name, D, H, Hkv):
    if name is None:
        return None
    if name == "hedgehog":
        torch.manual_seed(3)
        fm = featattn.get_feature_map("hedgehog", head_dim=D, heads=H, kv_heads=Hkv).double()
        with torch.no_grad():
            for p in fm.parameters():
                p.add_(0.2 * torch.randn_like(p))
        return fm
    return resolve_feature_map(name)


def _inputs(B, H, Hkv, T, D, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, T, D), mk(B, Hkv, T, D), mk(B, Hkv, T, Dv)


def _triton_hybrid(fm, monkeypatch):
    """FEATATTN_HYBRID_LINEAR=triton, and the map path a test case names: "elu-pass" is elu
    as a Triton pass before the kernels (not in them).  Returns the map's name."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    if fm == "elu-pass":
        monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
        return "elu"
    return fm


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), W=st.integers(1, 48), G=st.sampled_from([1, 2]),
       fm=st.sampled_from([None, "elu", "taylor", "hedgehog", "relu"]),
       backend=st.sampled_from(["auto", "reference"]), seed=st.integers(0, 1000))
def test_hybrid_equals_the_formula_token_by_token(T, W, G, fm, backend, seed):
    """Both backends against the definition, W >= T included, float64."""
    H, D, Dv = 2 * G, 4, 3
    q, k, v = _inputs(1, H, H // G, T, D, Dv, seed)
    m = _map(fm, D, H, H // G)
    if fm == "relu":  # keep the linear part's denominator away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    f = torch.rand(H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.8 + 0.1
    got = featattn.linear_attention(q, k, v, feature_map=m, window=W, window_weight=f,
                                    backend=backend)
    want = loop_oracle(q, k, v, resolve_feature_map(m) if m is not None else None, W, f)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fm", ["elu", "hedgehog", "taylor"])
@pytest.mark.parametrize("T,W", [(150, 8), (131, 64), (70, 16), (100, 1)])
def test_chunked_gradients_equal_the_oracle(fm, T, W, monkeypatch):
    """q, k, v, the learnable weight f, the map's parameters and the initial state, with a
    state passed in (window keys included) and returned; T > max(64, 2 W), so the blocks
    of the PyTorch path run (shorter calls take the direct form, the oracle's own)."""
    from featattn import hybrid

    ran = []
    real = hybrid.chunked_hybrid_attention
    monkeypatch.setattr(hybrid, "chunked_hybrid_attention",
                        lambda *a, **kw: ran.append(1) or real(*a, **kw))
    H, Hkv, D, Dv = 4, 2, 4, 5
    q, k, v = _inputs(2, H, Hkv, T, D, Dv, seed=T + W)
    m = _map(fm, D, H, Hkv)
    prev = _inputs(2, H, Hkv, 11, D, Dv, seed=99)
    logit = torch.randn(H, dtype=torch.float64)
    with torch.no_grad():
        _, state0 = featattn.linear_attention(*prev, feature_map=m, window=W, return_state=True)
    runs = []
    for backend in ("torch", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, logit, state0.kv, state0.z)]
        params = list(m.parameters()) if isinstance(m, torch.nn.Module) else []
        st0 = featattn.LinearAttentionState(leaves[4], leaves[5], state0.window_k, state0.window_v)
        o, s = featattn.linear_attention(*leaves[:3], feature_map=m, window=W,
                                         window_weight=torch.sigmoid(leaves[3]),
                                         initial_state=st0, return_state=True, backend=backend)
        loss = (o * o).sum() + (s.kv * 0.3).sum() + s.z.sum() + s.window_v.sum()
        grads = torch.autograd.grad(loss, leaves + params)
        runs.append([o, s.kv, s.z, s.window_k, s.window_v, *grads])
    assert ran == [1]  # the torch backend's call, in blocks
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_select_kernel_says_when_the_pytorch_path_takes_the_direct_form(monkeypatch):
    """T <= max(64, 2 W) queries take the direct O(T N) form (blocks of W would pad T = W + 1
    to 2W x 2W scores, 4x the direct form's memory); select_kernel says so, and it is the
    form that runs."""
    from featattn import hybrid

    ran = []
    real = hybrid.chunked_hybrid_attention
    monkeypatch.setattr(hybrid, "chunked_hybrid_attention",
                        lambda *a, **kw: ran.append(1) or real(*a, **kw))
    q, k, v = _inputs(1, 2, 2, 100, 4, 4)
    for W, direct in ((64, True), (8, False), (1, False)):
        ran.clear()
        choice = featattn.select_kernel(q, k, v, "elu", "torch", window=W)
        assert choice.name == "torch_chunked"
        assert any("direct O(T N) form" in r for r in choice.reasons) == direct, choice
        got = featattn.linear_attention(q, k, v, feature_map="elu", window=W, backend="torch")
        assert ran == ([] if direct else [1])
        want = featattn.linear_attention(q, k, v, feature_map="elu", window=W,
                                         backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_stay_close(dtype):
    q, k, v = _inputs(1, 2, 2, 70, 8, 8, seed=1)
    want = featattn.linear_attention(q, k, v, feature_map="elu", window=16, backend="reference")
    got = featattn.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), feature_map="elu",
                                    window=16)
    assert got.dtype == dtype
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype], err


def test_decoding_500_tokens_equals_the_prefill():
    """The layer's state hands the window over exactly: prefill 37, then 463 single tokens
    through update_state=True, against one call on all 500."""
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(32, 4, "hedgehog", kv_heads=2, window=16).double()
    with torch.no_grad():
        layer.window_logit.normal_()
    x = torch.randn(2, 500, 32, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
        y0, state = layer(x[:, :37], return_state=True)
        outs = [y0] + [layer(x[:, t:t + 1], state, update_state=True) for t in range(37, 500)]
    torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-9, atol=1e-11)
    assert state.window_k.shape == (2, 2, 16, 8)
    # constant size once the window is full
    assert state.nbytes() == state.kv.numel() * 8 + state.z.numel() * 8 \
        + 2 * state.window_k.numel() * 8


def test_layer_weight_trains():
    layer = featattn.FeatureAttention(16, 2, "elu", window=4)
    x = torch.randn(1, 9, 16)
    layer(x).square().sum().backward()
    assert layer.window_logit.grad is not None and layer.window_logit.grad.abs().sum() > 0
    assert "window=4" in repr(layer)


def test_state_helpers_carry_the_window():
    q, k, v = _inputs(1, 2, 2, 6, 4, 4)
    _, s = featattn.linear_attention(q, k, v, feature_map="elu", window=3, return_state=True)
    for t in (s.clone(), s.detach(), s.index_select(0, torch.tensor([0])), s.to("cpu")):
        assert t.windowed and torch.equal(t.window_k, s.window_k)
    # a dtype is the inputs' new dtype: the raw keys take it, kv stays in its accumulation dtype
    to32 = s.to(torch.float32)
    assert to32.window_k.dtype == to32.window_v.dtype == torch.float32
    assert to32.kv.dtype == torch.float32 and s.kv.dtype == torch.float64


def test_window_zero_matches_plain_and_select_kernel_says_why(monkeypatch):
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "torch")
    q, k, v = _inputs(1, 2, 2, 12, 4, 4)
    assert torch.equal(featattn.linear_attention(q, k, v, feature_map="elu", window=0),
                       featattn.linear_attention(q, k, v, feature_map="elu"))
    choice = featattn.select_kernel(q, k, v, "elu", window=8)
    assert choice.name == "torch_chunked"
    with pytest.raises(KernelUnavailable, match="window=8.*chunked PyTorch path.*FEATATTN_HYBRID_LINEAR=torch"):
        featattn.select_kernel(q, k, v, "elu", backend="chunked", window=8)
    # the default: both parts in Triton (never the interpreter under backend='auto')
    monkeypatch.delenv("FEATATTN_HYBRID_LINEAR")
    q, k, v = _inputs(1, 2, 2, 80, 4, 4, dtype=torch.float32)
    assert featattn.select_kernel(q, k, v, "elu", backend="auto", window=8).name == "torch_chunked"
    assert featattn.select_kernel(q, k, v, "elu", backend="chunked", window=8).name == "chunked"


def test_bad_window_input_is_explained():
    q, k, v = _inputs(1, 2, 2, 6, 4, 4)
    la = featattn.linear_attention
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        la(q, k, v, window=-1)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        la(q, k, v, window=True)
    with pytest.raises(ValueError, match="needs normalize=True"):
        la(q, k, v, window=4, normalize=False)
    with pytest.raises(ValueError, match=r"window_weight must be in \(0, 1\)"):
        la(q, k, v, window=4, window_weight=1.0)
    with pytest.raises(ValueError, match=r"float \[H\] = \[2\]"):
        la(q, k, v, window=4, window_weight=torch.full((3,), 0.5))
    with pytest.raises(TypeError, match="window_weight must be None"):
        la(q, k, v, window=4, window_weight="half")
    with pytest.raises(ValueError, match="only apply with window > 0"):
        la(q, k, v, window_weight=0.3)
    with pytest.raises(ValueError, match="window_scale must be a positive"):
        la(q, k, v, window=4, window_scale=0.0)
    _, s = la(q, k, v, feature_map="elu", window=4, return_state=True)
    with pytest.raises(ValueError, match="came from a call with window > 0"):
        la(q, k, v, feature_map="elu", initial_state=s)
    with pytest.raises(ValueError, match="0 < P <= window = 2"):
        la(q, k, v, feature_map="elu", window=2, initial_state=s)
    with pytest.raises(ValueError, match="sequences \\[0\\] are shorter"):
        la(q[:1], k[:1], v[:1], window=4, cu_seqlens=torch.tensor([0, 2, 6]), return_state=True)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        featattn.FeatureAttention(16, 2, "elu", window=-3)
    with pytest.raises(ValueError, match="needs normalize=True"):
        featattn.FeatureAttention(16, 2, "elu", window=3, normalize=False)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_key_padding_mask_attends_each_rows_real_tokens(backend, monkeypatch):
    """key_padding_mask with a window: each row's real tokens as one sequence (right and
    left padding, and a hole, where the window counts real keys), 0 at padded positions,
    gradients through; the layer takes it too; a row with no real token is an error."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    dt = torch.float32 if backend == "triton" else torch.float64
    B, H, T, D, W = 3, 2, 80, 4, 8
    q, k, v = (t.requires_grad_() for t in _inputs(B, H, 1, T, D, D, seed=2, dtype=dt))
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 70:] = False  # right padding
    keep[1, :15] = False  # left padding
    keep[2, 30:33] = False  # a hole
    o = featattn.linear_attention(q, k, v, feature_map="elu", window=W, key_padding_mask=keep,
                                  backend=backend)
    g = torch.autograd.grad(o.square().sum(), [q, k, v])
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        idx = keep[b].nonzero().flatten()
        want[b, :, idx] = featattn.linear_attention(
            qr[b:b + 1, :, idx], kr[b:b + 1, :, idx], vr[b:b + 1, :, idx], feature_map="elu",
            window=W, backend="reference")[0]
    g_want = torch.autograd.grad(want.square().sum(), [qr, kr, vr])
    tol = 1e-10 if dt == torch.float64 else 2e-5
    for a, b in zip([o, *g], [want, *g_want]):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
    assert torch.all(o[~keep[:, None, :, None].expand_as(o)] == 0)
    full = torch.ones(B, T, dtype=torch.bool)  # nothing padded: the batched call, exactly
    assert torch.equal(featattn.linear_attention(q, k, v, feature_map="elu", window=W,
                                                 key_padding_mask=full, backend=backend),
                       featattn.linear_attention(q, k, v, feature_map="elu", window=W,
                                                 backend=backend))
    layer = featattn.FeatureAttention(8, 2, "elu", window=W)
    x = torch.randn(B, T, 8)
    y = layer(x, key_padding_mask=keep)
    torch.testing.assert_close(y[0, :70], layer(x[:1, :70])[0])
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        featattn.linear_attention(q, k, v, feature_map="elu", window=W,
                                  key_padding_mask=keep & torch.tensor([True, False, True])[:, None])


def test_oracle_state_is_the_linear_part_before_the_window():
    """The returned kv/z cover exactly the tokens older than the last W."""
    q, k, v = _inputs(1, 2, 2, 10, 4, 4)
    fk = torch.nn.functional.elu(k) + 1
    _, kv, z = quadratic_hybrid_attention(q, k, v, torch.nn.functional.elu(q) + 1, fk,
                                          window=3, weight=0.5, scale=0.5, eps=1e-6,
                                          return_state=True)
    torch.testing.assert_close(kv, fk[:, :, :7].transpose(-1, -2) @ v[:, :, :7])
    torch.testing.assert_close(z, fk[:, :, :7].sum(2))


@pytest.mark.parametrize("lengths,window", [((5, 1, 9), 3), ((4, 6), 4), ((7, 2, 3), 8)])
def test_packed_sequences_equal_each_sequence_alone(lengths, window):
    """window with cu_seqlens: each sequence alone (the window never crosses a boundary),
    forward and gradients, against the float64 oracle; with return_state, the stacked states
    (every sequence at least W long) carry on as each sequence's own."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v = _inputs(1, 4, 2, T, 6, 5)
    w = torch.tensor([0.3, 0.6, 0.5, 0.45], dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = featattn.linear_attention(*leaves, feature_map="elu", window=window, window_weight=w,
                                  cu_seqlens=cu)
    g = torch.autograd.grad(o.square().sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts.append(featattn.linear_attention(
            *(t[:, :, a:b] for t in ref), feature_map="elu", window=window, window_weight=w,
            backend="reference"))
    o_ref = torch.cat(parts, 2)
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    assert torch.allclose(o, o_ref, atol=1e-10)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-9)
    if min(lengths) < window:
        return
    _, s = featattn.linear_attention(q, k, v, feature_map="elu", window=window, window_weight=w,
                                     cu_seqlens=cu, return_state=True)
    q2, k2, v2 = _inputs(1, 4, 2, 2 * len(lengths), 6, 5, seed=3)
    cu2 = torch.arange(0, 2 * len(lengths) + 1, 2)
    o2 = featattn.linear_attention(q2, k2, v2, feature_map="elu", window=window,
                                   window_weight=w, cu_seqlens=cu2, initial_state=s)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(2 * n, 2 * n + 2)
        whole = featattn.linear_attention(
            torch.cat([q[:, :, a:b], q2[:, :, sl]], 2), torch.cat([k[:, :, a:b], k2[:, :, sl]], 2),
            torch.cat([v[:, :, a:b], v2[:, :, sl]], 2), feature_map="elu", window=window,
            window_weight=w, backend="reference")
        assert torch.allclose(o2[:, :, sl], whole[:, :, -2:], atol=1e-10)


def test_a_window_longer_than_the_call_costs_only_the_call():
    """window >= every key: the same answer as window = T, computed on T keys (a window of a
    billion tokens once padded a call to W x 2W blocks and ran out of memory)."""
    q, k, v = _inputs(1, 2, 2, 70, 8, 8)
    huge = featattn.linear_attention(q, k, v, feature_map="elu", window=10**9)
    exact = featattn.linear_attention(q, k, v, feature_map="elu", window=70, backend="reference")
    assert torch.allclose(huge, exact, atol=1e-12)


@pytest.mark.parametrize("fm,dtype,G", [("elu", torch.float32, 2), ("hedgehog", torch.float32, 1),
                                        (None, torch.float32, 1), ("relu", torch.float16, 2),
                                        ("elu-pass", torch.float32, 2), ("taylor", torch.float32, 1),
                                        ("elu-segments", torch.float32, 2)])
@pytest.mark.parametrize("T,W", [(150, 8), (80, 64), (70, 3)])
def test_hybrid_in_triton_equals_the_oracle(fm, dtype, G, T, W, monkeypatch):
    """FEATATTN_HYBRID_LINEAR=triton: the linear part through the chunked Triton kernel with
    its keys shifted by the window, the window's softmax and the shared denominator through
    featattn/kernels/window.py (under the interpreter on CPU; W above and below the kernels'
    32-key tiles, grouped heads), with a state passed in (window keys included) and
    returned: output, states and every gradient (the mixing weight's too) against the
    float64 oracle; the PyTorch blocks never ran."""
    from featattn import hybrid
    import featattn.kernels as kernels

    fm = _triton_hybrid(fm, monkeypatch)
    if fm == "elu-segments":  # the chunked kernels split T (their key shift in the segment sums)
        monkeypatch.setenv("FEATATTN_SEGMENT", "64")
        fm = "elu"
    ran = []
    real = kernels.hybrid_attention
    monkeypatch.setattr(kernels, "hybrid_attention",
                        lambda *a, **kw: ran.append("triton") or real(*a, **kw))
    q0, k0, v0 = _inputs(1, 2, 1, T, 4, 5, dtype=torch.float32)
    assert featattn.select_kernel(q0, k0, v0, "elu", "triton", window=W).name == "chunked"

    def boom(*a, **kw):
        raise AssertionError("the PyTorch blocks ran")

    monkeypatch.setattr(hybrid, "chunked_hybrid_attention", boom)
    H, D, Dv = 2 * G, 4, 5
    q, k, v = _inputs(1, H, H // G, T, D, Dv, seed=T + W)
    m = _map(fm, D, H, H // G)
    if fm in ("relu", None):  # keep the linear part's denominator away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    prev = _inputs(1, H, H // G, 11, D, Dv, seed=5)
    if fm is None:
        prev = (prev[0].abs() + 0.1, prev[1].abs() + 0.1, prev[2])
    logit = torch.randn(H, dtype=torch.float64)
    with torch.no_grad():
        _, state0 = featattn.linear_attention(*prev, feature_map=m, window=W, return_state=True)
    runs = []
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        mm = m if not isinstance(m, torch.nn.Module) else m.to(
            torch.float32 if backend == "triton" else torch.float64)
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)] + [
            t.clone().requires_grad_() for t in (logit, state0.kv, state0.z)]
        st0 = featattn.LinearAttentionState(leaves[4], leaves[5], state0.window_k.to(dt),
                                            state0.window_v.to(dt))
        o, s = featattn.linear_attention(*leaves[:3], feature_map=mm, window=W,
                                         window_weight=torch.sigmoid(leaves[3]),
                                         initial_state=st0, return_state=True, backend=backend)
        loss = (o.double() ** 2).sum() + (s.kv * 0.3).sum() + s.z.sum()
        grads = torch.autograd.grad(loss, leaves)
        runs.append([o, s.kv, s.z, *grads])
    assert ran == ["triton"], ran
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    names = ["o", "kv", "z", "dq", "dk", "dv", "dlogit", "dkv0", "dz0"]
    for name, a, b in zip(names, *runs):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < tol, (name, err)



@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_hybrid_in_triton_takes_strided_and_packed_inputs(layout, monkeypatch):
    """The Triton hybrid on packed sequences (each a slice along T of the packed row, which
    is not dense in [B, H, T, D]) and on [B, H, T, D] views of [B, T, H, D] storage: outputs
    and gradients equal the float64 oracle per sequence."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    lens, W = [70, 90], 8
    q, k, v = _inputs(1, 4, 2, sum(lens), 8, 6, seed=11)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    if layout == "bthd":  # [B, H, T, D] views of [B, T, H, D] storage
        leaves = [t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    else:
        leaves = [t.float() for t in (q, k, v)]
    leaves = [t.requires_grad_() for t in leaves]
    o = featattn.linear_attention(*leaves, feature_map="elu", window=W, cu_seqlens=cu,
                                  backend="triton")
    g = torch.autograd.grad(o.square().sum(), leaves)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = torch.cat([featattn.linear_attention(*(t[:, :, a:b] for t in ref), feature_map="elu",
                                                 window=W, backend="reference")
                       for a, b in ((0, lens[0]), (lens[0], sum(lens)))], dim=2)
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    for a, b in zip([o, *g], [o_ref, *g_ref]):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-5

@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
@pytest.mark.parametrize("fm", ["elu", "elu-pass", None])
def test_hybrid_in_triton_adds_the_window_gradients_in_place(layout, fm, monkeypatch):
    """One query head a k/v head: the window kernels add their gradients into the linear
    part's buffers (one tensor a gradient at the backward's peak), for inputs laid out as
    [B, H, T, D] or as views of [B, T, H, D] storage, each map path (in the kernel, a pass,
    no map); gradients still equal the float64 oracle, and dq / dk / dv are laid out as q /
    k / v are."""
    from featattn.kernels import window

    fm = _triton_hybrid(fm, monkeypatch)
    reused = []
    real = window._in_place
    monkeypatch.setattr(window, "_in_place",
                        lambda part, like: reused.append(real(part, like) is part) or
                        real(part, like))
    q, k, v = _inputs(2, 2, 2, 90, 8, 8, seed=4)
    if fm is None:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    if layout == "bthd":
        leaves = [t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    else:
        leaves = [t.float() for t in (q, k, v)]
    leaves = [t.requires_grad_() for t in leaves]
    o = featattn.linear_attention(*leaves, feature_map=fm, window=8, backend="triton")
    g = torch.autograd.grad((o * o.detach().cos()).sum(), leaves)
    assert reused == [True, True, True], reused
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = featattn.linear_attention(*ref, feature_map=fm, window=8, backend="reference")
    g_ref = torch.autograd.grad((o_ref * o.detach().double().cos()).sum(), ref)
    for a, b in zip([o, *g], [o_ref, *g_ref]):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-5
    for grad, leaf in zip(g, leaves):
        assert grad.stride() == leaf.stride()


def test_autotuning_restores_the_gradients_the_window_adds_into(monkeypatch):
    """On the GPU the autotuner runs every config of a new key many times on the call's own
    tensors, and the dq and dk/dv kernels add into the linear part's gradients in place: the
    window module's launches restore those buffers after each trial.  Two configs and a
    timer that runs each twice stand in for it here: the tuning backward and the cached one
    both equal the float64 oracle."""
    import triton

    from featattn.kernels import window

    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")

    def timer(call, quantiles=None, **kw):
        call()
        call()
        return [1.0, 1.0, 1.0]

    configs = [triton.Config({"BT": 32, "BK": 32}, num_warps=4, num_stages=1),
               triton.Config({"BT": 16, "BK": 16}, num_warps=4, num_stages=1)]
    for name, launch in zip(["_FWD", "_DQ", "_DKDV"], window._launches(configs, timer)):
        monkeypatch.setattr(window, name, launch)
    q, k, v = _inputs(1, 2, 2, 70, 8, 8, seed=6)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = featattn.linear_attention(*ref, feature_map="elu", window=8, backend="reference")
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    for _ in ("tuning", "cached"):
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*leaves, feature_map="elu", window=8, backend="triton")
        g = torch.autograd.grad(o.square().sum(), leaves)
        for a, b in zip([o, *g], [o_ref, *g_ref]):
            assert ((a.double() - b).norm() / b.norm()).item() < 2e-5


_SHORT, _LONG = ([70, 1, 90, 33], 8), ([70, 100], 64)  # (sequence lengths, window)


# (fp16 only with the short window: with W = 64 this data's dq is 1.1e-2 off in fp16, all
# of it in one row whose two largest scores are 3e-4 apart, where m_t's gradient went to
# the other key; the same call one sequence at a time gives the same dq bit for bit)
@pytest.mark.parametrize("fm,dtype,G,lens,W", [
    ("elu", torch.float32, 2, *_SHORT), ("elu", torch.float32, 2, *_LONG),
    ("elu-pass", torch.float32, 1, *_SHORT), ("elu-pass", torch.float32, 1, *_LONG),
    ("hedgehog", torch.float32, 2, *_SHORT), ("hedgehog", torch.float32, 2, *_LONG),
    (None, torch.float32, 1, *_SHORT), (None, torch.float32, 1, *_LONG),
    ("relu", torch.float16, 2, *_SHORT)])
def test_packed_hybrid_in_triton_is_one_call(fm, dtype, G, lens, W, monkeypatch):
    """Packed sequences (cu_seqlens) in Triton: one call of the kernels for all of them (not
    one per sequence), sequences shorter than the window and of one token included, with a
    linear state per sequence in and (when every sequence fills its window) the states
    out: outputs, states and every gradient (the mixing weight's and the initial states'
    too) against the float64 oracle run per sequence."""
    import featattn.kernels as kernels

    fm = _triton_hybrid(fm, monkeypatch)
    calls = []
    real = kernels.hybrid_attention
    monkeypatch.setattr(kernels, "hybrid_attention",
                        lambda *a, **kw: calls.append(kw.get("cu_seqlens")) or real(*a, **kw))
    H, D, Dv, T, S = 2 * G, 4, 5, sum(lens), len(lens)
    q, k, v = _inputs(1, H, H // G, T, D, Dv, seed=T + W)
    m = _map(fm, D, H, H // G)
    if fm in ("relu", None):  # keep the linear part's denominator away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    Dk = 2 * D if fm == "hedgehog" else D
    g = torch.Generator().manual_seed(7)
    kv0 = torch.rand(S, H, Dk, Dv, generator=g, dtype=torch.float64)
    z0 = torch.rand(S, H, Dk, generator=g, dtype=torch.float64) + 1.0
    logit = torch.randn(H, generator=g, dtype=torch.float64)
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    ret = min(lens) >= W

    def run(backend, dt, leaves):
        mm = m if not isinstance(m, torch.nn.Module) else m.to(
            torch.float32 if backend == "triton" else torch.float64)
        f = torch.sigmoid(leaves[3])
        if backend == "triton":
            st0 = featattn.LinearAttentionState(leaves[4].float(), leaves[5].float())
            res = featattn.linear_attention(
                *leaves[:3], feature_map=mm, window=W, window_weight=f.float(),
                initial_state=st0, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
                return_state=ret, backend="triton")
            return (res[0], res[1].kv, res[1].z) if ret else (res, None, None)
        outs, kvs, zs = [], [], []  # the oracle, one sequence at a time
        for n in range(S):
            sl = slice(bounds[n], bounds[n + 1])
            st0 = featattn.LinearAttentionState(leaves[4][n:n + 1], leaves[5][n:n + 1])
            o_n, s_n = featattn.linear_attention(*(t[:, :, sl] for t in leaves[:3]),
                                                 feature_map=mm, window=W, window_weight=f,
                                                 initial_state=st0, return_state=True,
                                                 backend="reference")
            outs.append(o_n), kvs.append(s_n.kv), zs.append(s_n.z)
        return torch.cat(outs, 2), (torch.cat(kvs) if ret else None), \
            (torch.cat(zs) if ret else None)

    runs = []
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)] + [
            t.clone().requires_grad_() for t in (logit, kv0, z0)]
        o, s_kv, s_z = run(backend, dt, leaves)
        loss = (o.double() ** 2).sum()
        if ret:
            loss = loss + (s_kv.double() * 0.3).sum() + s_z.double().sum()
        grads = torch.autograd.grad(loss, leaves)
        runs.append([o, *grads] + ([s_kv, s_z] if ret else []))
    assert len(calls) == 1 and calls[0] is not None, calls  # one call, packed
    if W == 64:  # the kernel API checks max_len against cu_seqlens (0: read from it)
        args = [t.to(dtype) for t in (q, k, v)]
        f = torch.full((H,), 0.5)
        cu = torch.tensor(bounds, dtype=torch.int32)
        kw = dict(weight=f, window=W, window_scale=0.5, eps=1e-6, cu_seqlens=cu,
                  features=(args[0], args[1]) if fm == "hedgehog" else None)
        with pytest.raises(ValueError, match="max_len = 50 is below the longest"):
            real(*args, max_len=50, **kw)
        torch.testing.assert_close(real(*args, max_len=0, **kw)[0],
                                   real(*args, max_len=max(lens), **kw)[0])
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    names = ["o", "dq", "dk", "dv", "dlogit", "dkv0", "dz0", "kv", "z"]
    for name, a, b in zip(names, *runs):
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < tol, (name, err)


def test_packed_hybrid_in_triton_returns_each_sequences_window(monkeypatch):
    """return_state on packed sequences in Triton: each sequence's last W keys and values,
    as one call per sequence gives them; a state holding window keys still runs per
    sequence, and continuing from it equals the whole sequences."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    lens, W = [30, 45, 20], 16
    q, k, v = _inputs(1, 2, 2, sum(lens), 4, 4, seed=3, dtype=torch.float32)
    cu = torch.tensor([0, 30, 75, 95], dtype=torch.int32)
    with torch.no_grad():
        o, s = featattn.linear_attention(q, k, v, feature_map="elu", window=W, cu_seqlens=cu,
                                         return_state=True, backend="triton")
        for n, (a, b) in enumerate(((0, 30), (30, 75), (75, 95))):
            _, s_n = featattn.linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                               feature_map="elu", window=W, return_state=True,
                                               backend="reference")
            assert torch.equal(s.window_k[n], s_n.window_k[0].float())
            assert torch.equal(s.window_v[n], s_n.window_v[0].float())
            torch.testing.assert_close(s.kv[n], s_n.kv[0].float(), rtol=1e-5, atol=1e-5)
        q2, k2, v2 = _inputs(1, 2, 2, 3 * 30, 4, 4, seed=4, dtype=torch.float32)
        cu2 = torch.tensor([0, 30, 60, 90], dtype=torch.int32)
        o2 = featattn.linear_attention(q2, k2, v2, feature_map="elu", window=W, cu_seqlens=cu2,
                                       initial_state=s, backend="triton")
        for n, ((a, b), (c, d)) in enumerate(zip(((0, 30), (30, 75), (75, 95)),
                                                 ((0, 30), (30, 60), (60, 90)))):
            whole = featattn.linear_attention(
                *(torch.cat([x[:, :, a:b], y[:, :, c:d]], 2).double()
                  for x, y in ((q, q2), (k, k2), (v, v2))),
                feature_map="elu", window=W, backend="reference")
            torch.testing.assert_close(o2[:, :, c:d].double(), whole[:, :, -30:], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,W", [(1000, 64), (515, 128)])
def test_gpu_hybrid_in_triton_bf16(T, W, monkeypatch):
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    q, k, v = (t.cuda() for t in _inputs(2, 4, 2, T, 64, 64, seed=T))
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    o = featattn.linear_attention(*leaves, feature_map="elu", window=W)
    g = torch.autograd.grad(o.float().square().sum(), leaves)
    ref = [t.requires_grad_() for t in (q, k, v)]
    o_ref = featattn.linear_attention(*ref, feature_map="elu", window=W, backend="reference")
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    for a, b in zip([o, *g], [o_ref, *g_ref]):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 2e-2, err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
def test_gpu_packed_hybrid_bf16(fm, monkeypatch):
    """Packed sequences of 1000, 37 and 515 tokens (window 64) in one Triton call, bf16:
    outputs and gradients against the float64 oracle run per sequence on the same
    bf16-rounded inputs.  (Against the unrounded inputs, the rounding alone moves Hedgehog's
    dq by 2.1e-2 with a window, 4.9e-3 without: the test measured that floor, not the
    kernels; H200, session 18.)"""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    lens, W = [1000, 37, 515], 64
    bounds = [0, 1000, 1037, 1552]
    q, k, v = (t.cuda() for t in _inputs(1, 4, 2, sum(lens), 64, 64, seed=9))
    m = _map(fm, 64, 4, 2)
    m32 = m.cuda().float() if isinstance(m, torch.nn.Module) else m
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    o = featattn.linear_attention(*leaves, feature_map=m32, window=W,
                                  cu_seqlens=torch.tensor(bounds, device="cuda",
                                                          dtype=torch.int32))
    g = torch.autograd.grad(o.float().square().sum(), leaves)
    m64 = copy.deepcopy(m32).double() if isinstance(m, torch.nn.Module) else m
    ref = [t.detach().double().requires_grad_() for t in leaves]
    o_ref = torch.cat([featattn.linear_attention(*(t[:, :, a:b] for t in ref), feature_map=m64,
                                                 window=W, backend="reference")
                       for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    for a, b in zip([o, *g], [o_ref, *g_ref]):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 2e-2, err


def test_the_triton_hybrid_follows_backend(monkeypatch):
    """FEATATTN_HYBRID_LINEAR=triton makes the chunked kernel a candidate for hybrid calls;
    backend='torch' still runs PyTorch, 'auto' never picks the interpreter on CPU, and a
    decoding-size call (T <= 64) takes the direct form, each said by select_kernel."""
    import featattn.kernels as kernels

    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    monkeypatch.setattr(kernels, "hybrid_attention", lambda *a, **kw: pytest.fail("Triton ran"))
    q, k, v = _inputs(1, 2, 2, 80, 4, 4, dtype=torch.float32)
    for backend in ("torch", "auto"):
        assert featattn.select_kernel(q, k, v, "elu", backend, window=8).name == "torch_chunked"
        featattn.linear_attention(q, k, v, feature_map="elu", window=8, backend=backend)
    short = [t[:, :, :40] for t in (q, k, v)]
    with pytest.raises(KernelUnavailable, match="T=40 queries"):
        featattn.select_kernel(*short, "elu", "triton", window=8)
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "yes")
    with pytest.raises(ValueError, match="FEATATTN_HYBRID_LINEAR must be"):
        featattn.select_kernel(q, k, v, "elu", "triton", window=8)


def test_hybrid_in_triton_splits_the_max_gradient_between_tied_keys(monkeypatch):
    """Keys repeated in pairs tie for many rows' window maximum: the Triton kernels (the
    second pass over the key tiles that sums the tied keys) match the oracle, whose
    torch.amax shares m's gradient equally between ties."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    q, k, v = _inputs(1, 2, 2, 90, 4, 4, seed=21)
    # quarters: every q . k is exact in fp32 whatever order a matmul sums in, so tied keys
    # tie exactly (with random floats a BLAS that sums columns differently breaks the ties)
    q, k = (t.mul(4).round().div(4) for t in (q, k))
    k[:, :, 1::2] = k[:, :, 0::2]
    runs = []
    for backend, dt in (("triton", torch.float32), ("reference", torch.float64)):
        leaves = [t.to(dt).clone().requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*leaves, feature_map="elu", window=6, backend=backend)
        runs.append([o, *torch.autograd.grad((o.double() ** 2).sum(), leaves)])
    for name, a, b in zip(["o", "dq", "dk", "dv"], *runs):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 2e-5, (name, err)


@pytest.mark.parametrize("fm", ["elu", "identity"])  # the features made before it; none
def test_the_triton_hybrid_under_torch_compile_is_one_custom_op(fm, monkeypatch):
    """torch.compile(fullgraph=True) of a hybrid layer keeps the Triton form, as the custom
    op featattn::hybrid_fwd (dynamo cannot trace the launches themselves): one graph, the
    same outputs and gradients as eager; a windowed decoding step takes the PyTorch path
    there, and select_kernel says so."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(16, 4, fm, kv_heads=2, window=8, backend="triton")
    x = torch.randn(2, 70, 16, requires_grad=True)
    ref = layer(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, layer.window_logit])
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True, backend=backend)(x)
    g = torch.autograd.grad(out.square().sum(), [x, layer.window_logit])
    assert any("hybrid_fwd" in t for t in seen), seen
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # AOTAutograd with the fake implementations: the backward op's graph too
    torch._dynamo.reset()
    out2 = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    g2 = torch.autograd.grad(out2.square().sum(), [x, layer.window_logit])
    torch.testing.assert_close(out2, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g2, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    q, k, v = _inputs(1, 2, 2, 80, 4, 4, dtype=torch.float32)
    if fm == "identity":  # no map at all (q, k are the features), with a state out
        def call(q, k, v):
            o, s = featattn.linear_attention(q, k, v, window=8, return_state=True,
                                             backend="triton")
            return o.square().sum() + s.kv.sum()

        leaves = [t.abs().add(0.1).requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(call(*leaves), leaves)
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(call, fullgraph=True, backend="aot_eager")(
            *leaves), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        _, st = featattn.linear_attention(q, k, v, feature_map="elu", window=8, return_state=True)
    one = (q[:, :, :1], k[:, :, :1], v[:, :, :1])
    assert featattn.select_kernel(*one, "elu", "triton", window=8, initial_state=st).name \
        == "recurrent_step"
    with monkeypatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        assert featattn.select_kernel(q, k, v, "elu", backend="triton", window=8).name == \
            "chunked"
        assert featattn.select_kernel(*one, "elu", "triton", window=8,
                                      initial_state=st).name == "recurrent_step"
    # a compiled windowed decode step: the custom op featattn::hybrid_step, then the new
    # state copied into the caller's tensors; equal to the eager step
    m = _map("hedgehog", 4, 2, 2).float() if fm == "identity" else "elu"
    if isinstance(m, torch.nn.Module):
        m.requires_grad_(False)
    with torch.no_grad():
        _, st_m = featattn.linear_attention(q, k, v, feature_map=m, window=8, return_state=True)
    eager, comp = st_m.clone(), st_m.clone()
    ptr = comp.window_k.data_ptr()
    seen.clear()

    def step(q1, k1, v1, s):
        return featattn.decode_step(q1, k1, v1, s, feature_map=m, window=8, backend="triton")

    with torch.no_grad():
        want = step(*one, eager)
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend=backend)(*one, comp)
    assert any("hybrid_step" in t for t in seen), seen
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(comp._tensors()[:4], eager._tensors()[:4]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert comp.window_k.data_ptr() == ptr  # the full window updated in place (copied into)


@pytest.mark.parametrize("fm,dtype,T,W,f", [
    ("hedgehog", torch.float32, 90, 8, 0.3),   # features, no state: N == T
    ("elu", torch.float32, 70, 128, 0.5),      # the window holds every key
    ("elu", torch.float32, 70, 8, 0.0),        # only the linear part
    ("elu", torch.float32, 70, 8, 1.0),        # only the window
    (None, torch.float16, 80, 8, 0.5),         # signed features, l = 0 on some rows
])
def test_hybrid_in_triton_edge_cases(fm, dtype, T, W, f, monkeypatch):
    """The Triton hybrid without a state (and the feature gradients' N == T branch), with a
    window covering every key, with f exactly 0 or 1 (a tensor weight may saturate there),
    and in fp16 with features whose linear denominator is 0 on some rows (the linear part's
    normalised output must not overflow): output and gradients against float64, under the
    NaN-poisoned outputs of the tests' switch."""
    from featattn.kernels._common import poisoned_outputs

    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "triton")
    q, k, v = _inputs(1, 4, 2, T, 8, 6, seed=T)
    if fm is None:  # keys in +/- pairs: the linear denominator sums to 0 after every pair
        q = torch.full_like(q, 0.5)
        k = k.clone()
        k[:, :, 1::2] = -k[:, :, 0::2]
    m = _map(fm, 8, 4, 2)
    runs = []
    for backend, dt in (("triton", dtype), ("reference", torch.float64)):
        mm = m if not isinstance(m, torch.nn.Module) else m.to(
            torch.float32 if backend == "triton" else torch.float64)
        # the oracle reads the same rounded inputs: the signed case cancels, which would
        # otherwise magnify fp16's input rounding
        leaves = [t.to(dtype).to(dt).clone().requires_grad_() for t in (q, k, v)]
        weight = torch.full((4,), f, dtype=torch.float64)
        with poisoned_outputs():
            o = featattn.linear_attention(*leaves, feature_map=mm, window=W, window_weight=weight,
                                          backend=backend)
            runs.append([o, *torch.autograd.grad((o.double() ** 2).sum(), leaves)])
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    # the signed fp16 case's gradients (through l = 0) pass fp16's range: its output only
    names = ["o"] if dtype == torch.float16 else ["o", "dq", "dk", "dv"]
    for name, a, b in zip(names, *runs):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, (name, err)


def test_hybrid_attention_checks_its_inputs():
    """featattn.kernels.hybrid_attention (public, below linear_attention's checks) refuses a
    window that leaves keys before the first query's window, and a weight that is not an fp32
    [H] tensor, with errors that say what to pass."""
    from featattn.kernels import hybrid_attention

    q, k, v = (t.float() for t in _inputs(1, 2, 2, 40, 4, 4))
    k60, v60 = torch.cat([k, k[:, :, :20]], 2), torch.cat([v, v[:, :, :20]], 2)
    f = torch.full((2,), 0.5)
    kw = dict(window_scale=0.5, eps=1e-6)
    with pytest.raises(ValueError, match="N - T.*window=8 with N = 60 keys and T = 40"):
        hybrid_attention(q, k60, v60, weight=f, window=8, **kw)
    with pytest.raises(ValueError, match=r"fp32 \[H\] = \[2\].*got \(\(\), torch.float32"):
        hybrid_attention(q, k, v, weight=torch.tensor(0.5), window=8, **kw)
    with pytest.raises(ValueError, match="got float"):
        hybrid_attention(q, k, v, weight=0.5, window=8, **kw)
    o, _, _ = hybrid_attention(q, k60, v60, weight=f, window=20, **kw)
    assert o.shape == (1, 2, 40, 4)
