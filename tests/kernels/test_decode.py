"""The recurrent step kernel (featattn/kernels/decode.py) and featattn.decode_step.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), fp32/fp16; the
``cuda`` tests run it in bf16 and capture it in a CUDA graph.
"""

from __future__ import annotations

import copy

import pytest
import torch

triton = pytest.importorskip("triton")

import featattn  # noqa: E402
from featattn import LinearAttentionState, decode_step, select_kernel  # noqa: E402
from featattn.kernels import decode as D  # noqa: E402
from helpers import check_close, rand_qkv, rand_state, reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def _dk(fm, d):
    return 1 + d + d * d if fm == "taylor" else d


# (feature map, B, H, Hkv, T, d, Dv, dtype, normalize, layout, scale)
CASES = [
    ("elu", 2, 4, 2, 1, 16, 24, torch.float32, True, "bhtd", 0.7),      # one token, grouped
    ("relu", 1, 2, 2, 3, 8, 16, torch.float32, False, "bthd", 1.0),     # plain, strided
    ("squared_relu", 1, 2, 1, 5, 40, 100, torch.float16, True, "bhtd", 1.0),  # odd dims, fp16
    ("identity", 1, 2, 2, 2, 16, 16, torch.float32, False, "bhtd", 0.5),
    ("taylor", 2, 2, 1, 3, 4, 8, torch.float32, True, "bthd", 1.0),     # Taylor, grouped
    ("taylor", 1, 1, 1, 1, 16, 64, torch.float16, True, "bhtd", 0.8),   # d = 16 (273 rows)
    (None, 1, 3, 1, 4, 20, 12, torch.float32, True, "bhtd", 1.0),       # features given
]


def _id(c):
    fm, B, H, Hkv, T, d, Dv, dt, norm, lay, s = c
    return f"{fm}-B{B}-H{H}-Hkv{Hkv}-T{T}-d{d}-Dv{Dv}-{str(dt)[6:]}-{'norm' if norm else 'plain'}-{lay}-s{s}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_step_matches_float64_and_updates_in_place(case):
    fm, B, H, Hkv, T, d, Dv, dtype, normalize, layout, scale = case
    q, k, v = rand_qkv(B, H, Hkv, T, d, Dv, dtype, DEV, generator=T + d, layout=layout,
                       positive=fm is None)
    kv0, z0 = rand_state(B, H, _dk(fm, d), Dv, normalize, generator=3, device=DEV, z_min=1.0)
    want_o, want_kv, want_z = reference(q, k, v, fm, normalize=normalize, scale=scale,
                                        initial_kv=kv0, initial_z=z0)
    state = LinearAttentionState(kv0.clone(), None if z0 is None else z0.clone())
    kv_ptr = state.kv.data_ptr()
    assert select_kernel(q, k, v, fm, "triton", initial_state=state).name == "recurrent_step"
    with torch.no_grad():
        o = decode_step(q, k, v, state, feature_map=fm, normalize=normalize, scale=scale,
                        backend="triton")
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    check_close("o", o, want_o, tol)
    check_close("kv", state.kv, want_kv, 1e-5)
    if normalize:
        check_close("z", state.z, want_z, 1e-5)
    assert state.kv.data_ptr() == kv_ptr  # the caller's tensors were updated, not replaced
    assert o.shape == (B, H, T, Dv) and o.dtype == dtype


def test_linear_attention_with_a_state_takes_the_step_and_leaves_the_state_alone():
    """The dispatcher picks the step for a short call with a state and no gradient, names
    the fused map, and linear_attention returns a new state (the caller's is untouched)."""
    q, k, v = rand_qkv(1, 2, 2, 2, 16, 16, torch.float32, DEV, generator=1)
    kv0, z0 = rand_state(1, 2, 16, 16, True, device=DEV, z_min=1.0)
    st = LinearAttentionState(kv0.clone(), z0.clone())
    choice = select_kernel(q, k, v, "elu", "triton", initial_state=st)
    assert (choice.name, choice.map_path) == ("recurrent_step", "kernel")
    with torch.no_grad():
        o, new = featattn.linear_attention(q, k, v, feature_map="elu", initial_state=st,
                                           return_state=True, backend="triton")
    assert torch.equal(st.kv, kv0) and torch.equal(st.z, z0)
    want_o, want_kv, _ = reference(q, k, v, "elu", initial_kv=kv0, initial_z=z0)
    check_close("o", o, want_o, 2e-5)
    check_close("kv", new.kv, want_kv, 1e-5)


def test_step_is_not_taken_with_gradients_long_t_or_other_maps():
    q, k, v = rand_qkv(1, 2, 2, 3, 8, 8, torch.float32, DEV, generator=2)
    st = LinearAttentionState(*rand_state(1, 2, 8, 8, True, device=DEV))
    qg = q.clone().requires_grad_()
    c = select_kernel(qg, k, v, "elu", "triton", initial_state=st)
    assert c.name == "chunked" and any("no backward" in r for r in c.reasons)
    long = rand_qkv(1, 2, 2, D.MAX_T + 1, 8, 8, torch.float32, DEV, generator=2)
    c = select_kernel(*long, "elu", "triton", initial_state=st)  # a prefill: not a candidate
    assert c.name == "chunked" and not any(r.startswith("recurrent_step") for r in c.reasons)
    with pytest.raises(featattn.dispatch.KernelUnavailable, match="above the step kernel's 16"):
        select_kernel(*long, "elu", "recurrent_step", initial_state=st)
    hh = featattn.get_feature_map("hedgehog", head_dim=8, heads=2, kv_heads=2)
    st16 = LinearAttentionState(*rand_state(1, 2, 16, 8, True, device=DEV))
    with torch.no_grad():  # (its parameters require gradients)
        c = select_kernel(q, k, v, hh, "triton", initial_state=st16)
    assert c.name == "chunked" and any(r.startswith("recurrent_step: map 'hedgehog'") for r in c.reasons)
    # without a state the step is not a candidate worth explaining
    assert not any(r.startswith("recurrent_step") for r in select_kernel(q, k, v, "elu", "triton").reasons)


def test_thousand_decoded_tokens_equal_the_prefill():
    """1000 tokens decoded one at a time (fp32 state, in place, o written into a given
    buffer) give the outputs and final state of one prefill over the same sequence."""
    T, d, Dv = 1000, 8, 8
    q, k, v = rand_qkv(1, 2, 1, T, d, Dv, torch.float32, DEV, generator=5)
    want, want_st = featattn.linear_attention(q, k, v, feature_map="elu", return_state=True,
                                              backend="torch")
    state = LinearAttentionState.zeros(1, 2, d, Dv, device=DEV)
    out = torch.empty(1, 2, 1, Dv, device=DEV)
    got = torch.empty(1, 2, T, Dv, device=DEV)
    with torch.no_grad():
        for t in range(T):
            o = decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                            feature_map="elu", out=out, backend="triton")
            assert o is out
            got[:, :, t] = out[:, :, 0]
    check_close("o", got, want, 1e-5)
    check_close("kv", state.kv, want_st.kv, 1e-5)
    check_close("z", state.z, want_st.z, 1e-5)


def test_decode_step_falls_back_and_copies_on_other_paths():
    """Where the step kernel cannot run (the torch backend here, a map without a Triton
    form), decode_step gives the same result through the usual path and still updates the
    caller's tensors."""
    q, k, v = rand_qkv(1, 2, 2, 3, 8, 8, torch.float64, "cpu", generator=4)
    hh = featattn.get_feature_map("hedgehog", head_dim=8, heads=2, kv_heads=2).double()
    kv0, z0 = (t.double() for t in rand_state(1, 2, 16, 8, True, z_min=1.0))
    st = LinearAttentionState(kv0.clone(), z0.clone())
    ptr = st.kv.data_ptr()
    with torch.no_grad():
        o = decode_step(q, k, v, st, feature_map=hh)
        want_o, want_st = featattn.linear_attention(q, k, v, feature_map=hh, return_state=True,
                                                    initial_state=LinearAttentionState(kv0, z0))
    check_close("o", o, want_o, 1e-12)
    check_close("kv", st.kv, want_st.kv, 1e-12)
    assert st.kv.data_ptr() == ptr


def test_decode_step_errors_are_explained():
    q, k, v = rand_qkv(1, 2, 2, 1, 8, 8, torch.float32, "cpu", generator=6)
    st = LinearAttentionState.zeros(1, 2, 8, 8)
    with pytest.raises(TypeError, match="state must be a featattn.LinearAttentionState"):
        decode_step(q, k, v, None)
    with pytest.raises(ValueError, match="in place.*torch.no_grad"):
        decode_step(q.requires_grad_(), k, v, st, feature_map="elu")
    with pytest.raises(ValueError, match=r"out must be shaped like the result, \[B, H, T, Dv\] = \[1, 2, 1, 8\]"):
        with torch.no_grad():
            decode_step(q, k, v, st, feature_map="elu", out=torch.empty(1, 2, 1, 4))
    with pytest.raises(ValueError, match="initial_state.kv must have shape"):
        with torch.no_grad():
            decode_step(q, k, v, LinearAttentionState.zeros(1, 2, 4, 8), feature_map="elu")


def test_step_limits_are_explained():
    assert D.step_unsupported_reason("elementwise", 64, 64, 1) is None
    assert "17" in D.step_unsupported_reason("elementwise", 64, 64, 17)
    assert "does not fit" in D.step_unsupported_reason("taylor", 32, 64, 1)
    assert "does not fit" in D.step_unsupported_reason("none", 256, 64, 1)


# --------------------------------------------------------------------------- the hybrid step
def _hybrid_want(q, k, v, wk, wv, kv0, z0, fm, W, f, scale, wscale):
    """float64 (o, kv, z, window_k, window_v) of the hybrid formula on C = [window; new]."""
    from featattn.reference import quadratic_hybrid_attention

    K = torch.cat([wk, k], 2) if wk is not None else k
    V = torch.cat([wv, v], 2) if wv is not None else v
    qd, Kd, Vd = q.double(), K.double(), V.double()
    m = featattn.feature_maps.resolve_feature_map(fm)
    if isinstance(m, torch.nn.Module):
        m = m.double()
    fq = m.forward_query(qd * scale) if m is not None else qd * scale
    fk = m.forward_key(Kd) if m is not None else Kd
    f = f.double() if isinstance(f, torch.Tensor) else f
    o, kv, z = quadratic_hybrid_attention(qd, Kd, Vd, fq, fk, window=W, weight=f, scale=wscale,
                                          eps=1e-6, initial_kv=kv0.double(),
                                          initial_z=z0.double(), return_state=True)
    keep = min(W, K.shape[2])
    return o, kv, z, K[:, :, -keep:], V[:, :, -keep:]


# (map, B, H, Hkv, T, P window rows held, W, d, Dv, dtype, f a tensor)
HYBRID_CASES = [
    ("elu", 2, 4, 2, 1, 8, 8, 16, 24, torch.float32, True),    # one token, full window, grouped
    ("elu", 1, 2, 2, 5, 3, 8, 16, 16, torch.float32, False),   # the window still filling
    ("relu", 1, 2, 1, 16, 4, 4, 20, 12, torch.float32, True),  # T > W: new keys leave too
    (None, 1, 2, 1, 3, 0, 8, 8, 16, torch.float32, False),     # no window rows yet, no map
    ("elu", 1, 2, 2, 2, 70, 70, 16, 16, torch.float16, True),  # W > 64: window in blocks
    ("hedgehog", 1, 4, 2, 3, 6, 6, 8, 8, torch.float32, True),  # a map made in PyTorch
]


def _hid(c):
    fm, B, H, Hkv, T, P, W, d, Dv, dt, ft = c
    return f"{fm}-B{B}-H{H}-Hkv{Hkv}-T{T}-P{P}-W{W}-d{d}-Dv{Dv}-{str(dt)[6:]}-{'fH' if ft else 'f'}"


@pytest.mark.parametrize("case", HYBRID_CASES, ids=_hid)
def test_hybrid_step_matches_float64(case):
    """The hybrid step kernel against the hybrid formula (float64) on the window's rows plus
    the new ones: o, the linear state with the keys that left the window, the new window."""
    fm, B, H, Hkv, T, P, W, d, Dv, dtype, f_tensor = case
    g = torch.Generator().manual_seed(T + P + W)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, k, v = rnd(B, H, T, d), rnd(B, Hkv, T, d), rnd(B, Hkv, T, Dv)
    if T == 5:  # [B, T, H, D] memory (layout="bthd" calls); below, odd window layouts
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    wk, wv = (rnd(B, Hkv, P, d), rnd(B, Hkv, P, Dv)) if P else (None, None)
    if T == 5:  # the window's keys a slice of a wider buffer (row stride 2d), its values
        # column-major (a non-unit last stride: copied before the kernel)
        wk = torch.cat([wk, rnd(B, Hkv, P, d)], 3)[..., :d]
        wv = wv.transpose(2, 3).contiguous().transpose(2, 3)
    m = fm
    if fm == "hedgehog":
        m = featattn.get_feature_map("hedgehog", head_dim=d, heads=H, kv_heads=Hkv).to(DEV)
        m.requires_grad_(False)
    Dk = 2 * d if fm == "hedgehog" else d
    kv0, z0 = rand_state(B, H, Dk, Dv, True, generator=3, device=DEV, z_min=1.0)
    f = (torch.rand(H, generator=g) * 0.8 + 0.1).to(DEV) if f_tensor else 0.3
    st = LinearAttentionState(kv0.clone(), z0.clone(), wk, wv)
    with torch.no_grad():
        choice = select_kernel(q, k, v, m, "triton", initial_state=st, window=W)
        assert choice.name == "recurrent_step"
        assert choice.map_path == {"elu": "kernel", "relu": "kernel", None: None,
                                   "hedgehog": "torch"}[fm]
        o, new = featattn.linear_attention(q, k, v, feature_map=m, scale=0.7, window=W,
                                           window_weight=f, initial_state=st,
                                           return_state=True, backend="triton")
        want = _hybrid_want(q, k, v, wk, wv, kv0, z0, m, W, f, 0.7, 1 / d ** 0.5)
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    check_close("o", o, want[0], tol)
    check_close("kv", new.kv, want[1], 1e-5)
    check_close("z", new.z, want[2], 1e-5)
    assert torch.equal(new.window_k, want[3].to(dtype)) and torch.equal(new.window_v, want[4].to(dtype))
    assert torch.equal(st.kv, kv0)  # linear_attention leaves the caller's state alone


@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
def test_hybrid_decode_step_equals_the_prefill_and_updates_in_place(fm):
    """Tokens decoded in steps of 1 to 16 after a 2-token prefill equal one call on all of
    them; once the window is full the state's own tensors (kv, z, the window's keys and
    values) are updated, never replaced."""
    B, H, Hkv, d, Dv, W, N = 2, 4, 2, 8, 12, 8, 40
    q, k, v = rand_qkv(B, H, Hkv, N, d, Dv, torch.float32, DEV, generator=11)
    m = fm
    if fm == "hedgehog":
        m = featattn.get_feature_map("hedgehog", head_dim=d, heads=H, kv_heads=Hkv).to(DEV)
        m.requires_grad_(False)
    f = torch.linspace(0.2, 0.8, H, device=DEV)
    with torch.no_grad():
        want = featattn.linear_attention(q, k, v, feature_map=m, window=W, window_weight=f,
                                         backend="reference")
        outs, st = featattn.linear_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2],
                                             feature_map=m, window=W, window_weight=f,
                                             return_state=True)
        outs, t, full = [outs], 2, None
        for step in (1, 1, 3, 1, 5, 1, 16, 1, 16):
            step = min(step, N - t)
            o = decode_step(q[:, :, t:t + step], k[:, :, t:t + step], v[:, :, t:t + step], st,
                            feature_map=m, window=W, window_weight=f, backend="triton")
            outs.append(o)
            t += step
            ptrs = [x.data_ptr() for x in (st.kv, st.z, st.window_k, st.window_v)]
            if full is not None:
                assert ptrs == full
            elif st.window_k.shape[2] == W:
                full = ptrs
    assert t == N and full is not None
    check_close("o", torch.cat(outs, 2), want, 2e-5)


def test_hybrid_decode_step_leaves_the_callers_tensors_alone(monkeypatch):
    """A prefill's state holds copies of its last W keys and values, not views of the
    caller's k / v: decoding in place then writes the state's own tensors (the caller's k,
    v are unchanged) and the state does not keep the whole prefill alive.  The step kernel
    runs whatever FEATATTN_HYBRID_LINEAR says (it picks the form of whole calls)."""
    monkeypatch.setenv("FEATATTN_HYBRID_LINEAR", "torch")
    q, k, v = rand_qkv(1, 2, 1, 12, 4, 4, torch.float32, DEV, generator=14)
    k0, v0 = k.clone(), v.clone()
    with torch.no_grad():
        _, st = featattn.linear_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10],
                                          feature_map="elu", window=4, return_state=True)
        assert st.window_k.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
        assert select_kernel(q[:, :, 10:11], k[:, :, 10:11], v[:, :, 10:11], "elu", "triton",
                             window=4, initial_state=st).name == "recurrent_step"
        ptr = st.window_k.data_ptr()
        for t in (10, 11):
            decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st,
                        feature_map="elu", window=4, backend="triton")
    assert st.window_k.data_ptr() == ptr  # the full window moved in place
    assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(st.window_k, k[:, :, 8:12]) and torch.equal(st.window_v, v[:, :, 8:12])


def test_hybrid_step_checks_its_buffers():
    q, k, v = rand_qkv(1, 2, 1, 1, 4, 4, torch.float32, DEV, generator=15)
    kv, z = rand_state(1, 2, 4, 4, True, device=DEV)
    wk, wv = torch.randn(1, 1, 3, 4, device=DEV), torch.randn(1, 1, 3, 4, device=DEV)
    kw = dict(window=4, weight=0.5, window_scale=0.5, eps=1e-6)
    with pytest.raises(ValueError, match="cannot be updated in place"):
        D.hybrid_step(q, k, v, kv, z, wk, wv, window_v_out=wv, **kw)
    with pytest.raises(ValueError, match=r"out must be \[1, 2, 1, 4\]"):
        D.hybrid_step(q, k, v, kv, z, wk, wv, out=torch.empty(1, 2, 1, 5, device=DEV), **kw)
    with pytest.raises(ValueError, match="kv must be fp32 and contiguous"):
        D.hybrid_step(q, k, v, kv.transpose(2, 3), z, wk, wv, **kw)
    with pytest.raises(ValueError, match="window_k must have a unit last stride"):
        D.hybrid_step(q, k, v, kv, z, wk.transpose(2, 3).contiguous().transpose(2, 3), wv, **kw)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        D.hybrid_step(q.repeat(1, 2, 1, 1)[:, :3], k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1),
                      kv.repeat(1, 2, 1, 1)[:, :3], z.repeat(1, 2, 1)[:, :3],
                      wk.repeat(1, 2, 1, 1), wv.repeat(1, 2, 1, 1), **kw)
    with pytest.raises(ValueError, match=r"window_k / window_v must be"):
        D.hybrid_step(q, k, v, kv, z, wk, wv[:, :, :2], **kw)
    with pytest.raises(ValueError, match=r"weight as a tensor must be fp32 \[H\] = \[2\]"):
        D.hybrid_step(q, k, v, kv, z, wk, wv, **{**kw, "weight": torch.full((3,), 0.5)})
    # the state's shapes (read past their ends before), the window's length and dtypes
    with pytest.raises(ValueError, match=r"kv / z must be \[B, H, Dk, Dv\]"):
        D.hybrid_step(q, k, v, kv[:, :1].contiguous(), z, wk, wv, **kw)
    with pytest.raises(ValueError, match=r"kv / z must be \[B, H, Dk, Dv\]"):
        D.hybrid_step(q, k, v, kv, z[..., :3].contiguous(), wk, wv, **kw)
    with pytest.raises(ValueError, match="holds at most window = 2"):
        D.hybrid_step(q, k, v, kv, z, wk, wv, **{**kw, "window": 2})
    with pytest.raises(ValueError, match="must have k / v's dtypes"):
        D.hybrid_step(q, k, v, kv, z, wk.double(), wv, **kw)
    kv8, z8 = rand_state(1, 2, 8, 4, True, device=DEV)
    for fm in (featattn.get_feature_map("elu"), None):
        with pytest.raises(ValueError, match="without fq the features are"):
            D.hybrid_step(q, k, v, kv8, z8, wk, wv, feature_map=fm, **kw)
    # decode_step refuses an out it could not write in place (a non-unit last stride)
    st = LinearAttentionState(kv.clone(), z.clone(), wk.clone(), wv.clone())
    bad = torch.empty(1, 2, 4, 2, device=DEV)[..., :1].transpose(2, 3)  # strides (16, 8, 1, 2)
    with pytest.raises(ValueError, match="out must have a unit last stride"):
        with torch.no_grad():
            decode_step(q, k, v, st, feature_map="elu", window=4, out=bad)


def test_hybrid_decode_step_on_the_torch_path_updates_the_state_too():
    """Where the step kernel cannot run (CPU under backend='auto': the PyTorch path), the
    windowed decode_step gives the same outputs and the state object the new tensors."""
    q, k, v = rand_qkv(1, 2, 1, 12, 4, 4, torch.float64, "cpu", generator=12)
    with torch.no_grad():
        want = featattn.linear_attention(q, k, v, feature_map="elu", window=3)
        outs, st = featattn.linear_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1],
                                             feature_map="elu", window=3, return_state=True)
        outs = [outs]
        for t in range(1, 12):
            outs.append(decode_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st,
                                    feature_map="elu", window=3))
    check_close("o", torch.cat(outs, 2), want, 1e-12)
    assert st.window_k.shape == (1, 1, 3, 4)
    torch.testing.assert_close(st.window_v, v[:, :, -3:], rtol=0, atol=0)


def test_hybrid_decode_step_errors_are_explained():
    q, k, v = rand_qkv(1, 2, 2, 6, 4, 4, torch.float32, DEV, generator=13)
    with torch.no_grad():
        _, st = featattn.linear_attention(q, k, v, feature_map="elu", window=4,
                                          return_state=True)
    one = (q[:, :, :1], k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match=r"pass the same window to decode_step"):
        with torch.no_grad():
            decode_step(*one, st, feature_map="elu")
    w = torch.full((2,), 0.5, requires_grad=True, device=DEV)
    with pytest.raises(ValueError, match="in place.*torch.no_grad"):
        decode_step(*one, st, feature_map="elu", window=4, window_weight=w)
    # a weight that needs a gradient keeps linear_attention off the step kernel (which has
    # no backward); the PyTorch path differentiates it
    assert select_kernel(*one, "elu", "triton", initial_state=st, window=4).name \
        == "recurrent_step"
    with pytest.raises(featattn.dispatch.KernelUnavailable, match="needs the call's gradient"):
        featattn.linear_attention(*one, feature_map="elu", window=4, window_weight=w,
                                  initial_state=st, backend="triton")
    o = featattn.linear_attention(*one, feature_map="elu", window=4, window_weight=w,
                                  initial_state=st)
    o.sum().backward()
    assert w.grad is not None
    assert "at most 128" in D.hybrid_step_unsupported_reason(256, 256, 64, 1)
    assert "above the step kernel's 16" in D.hybrid_step_unsupported_reason(64, 64, 64, 17)


# --------------------------------------------------------------------------- GPU
cuda = pytest.mark.cuda


@cuda
@pytest.mark.parametrize("fm,d", [("elu", 64), ("taylor", 16), ("relu", 64)])
def test_gpu_captured_step_equals_eager_bf16(fm, d):
    """bf16 q/k/v, fp32 state: the step against float64, and a CUDA graph of it replayed on
    new inputs equals the eager step (and needs no allocation inside the graph)."""
    B, H, Dv = 4, 16, 64
    q, k, v = rand_qkv(B, H, H, 1, d, Dv, torch.bfloat16, "cuda", generator=7)
    kv0, z0 = rand_state(B, H, _dk(fm, d), Dv, True, device="cuda", z_min=1.0)
    want_o, want_kv, _ = reference(q, k, v, fm, initial_kv=kv0, initial_z=z0)
    st = LinearAttentionState(kv0.clone(), z0.clone())
    out = torch.empty(B, H, 1, Dv, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        decode_step(q, k, v, st, feature_map=fm, out=out)
    check_close("o", out, want_o, 1e-2)
    check_close("kv", st.kv, want_kv, 1e-5)
    # capture one step on static buffers, replay it on new inputs
    sq, sk, sv = q.clone(), k.clone(), v.clone()
    gst = LinearAttentionState(kv0.clone(), z0.clone())
    with torch.no_grad():
        decode_step(sq, sk, sv, gst, feature_map=fm, out=out)  # warm-up (compiles)
        gst.kv.copy_(kv0)
        gst.z.copy_(z0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            decode_step(sq, sk, sv, gst, feature_map=fm, out=out)
    q2, k2, v2 = rand_qkv(B, H, H, 1, d, Dv, torch.bfloat16, "cuda", generator=8)
    gst.kv.copy_(kv0)
    gst.z.copy_(z0)
    sq.copy_(q2), sk.copy_(k2), sv.copy_(v2)
    g.replay()
    eager = LinearAttentionState(kv0.clone(), z0.clone())
    with torch.no_grad():
        o_eager = decode_step(q2, k2, v2, eager, feature_map=fm)
    torch.cuda.synchronize()
    assert torch.equal(out, o_eager) and torch.equal(gst.kv, eager.kv) and torch.equal(gst.z, eager.z)


@cuda
@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
@pytest.mark.parametrize("Hkv", [4, 16])  # two launches (a program a query head, the move); one
def test_gpu_hybrid_step_bf16_in_place_and_captured(fm, Hkv):
    """bf16, B4 H16 d64 W64: 80 tokens decoded in place (steps of 1 to 16 tokens) after a
    100-token prefill equal one call on all 180 (within bf16), and a CUDA graph of one in-place step (the window's rows
    moving in their own buffers) replays to the eager step."""
    B, H, d, W, N, P0 = 4, 16, 64, 64, 180, 100
    q, k, v = rand_qkv(B, H, Hkv, N, d, d, torch.bfloat16, "cuda", generator=21)
    m = fm
    if fm == "hedgehog":
        m = featattn.get_feature_map("hedgehog", head_dim=d, heads=H, kv_heads=Hkv).cuda()
        m.requires_grad_(False)
    f = torch.linspace(0.2, 0.8, H, device="cuda")
    kw = dict(feature_map=m, window=W, window_weight=f)
    m64 = copy.deepcopy(m).double() if fm == "hedgehog" else m
    k_in, v_in = k.clone(), v.clone()
    with torch.no_grad():
        want = featattn.linear_attention(q.double(), k.double(), v.double(), feature_map=m64,
                                         window=W, window_weight=f.double(), backend="reference")
        o0, st = featattn.linear_attention(q[:, :, :P0], k[:, :, :P0], v[:, :, :P0],
                                           return_state=True, **kw)
        ptrs = [x.data_ptr() for x in (st.kv, st.z, st.window_k, st.window_v)]
        # steps of several tokens too: each folds several keys leaving the window (a loop
        # bound Triton once failed to carry from one query to the next, GPU only)
        outs, t = [o0], P0
        for n in [1, 3, 16, 2, 7, 1, 5] * 12:
            n = min(n, N - t)
            if n:
                outs.append(decode_step(q[:, :, t:t + n], k[:, :, t:t + n], v[:, :, t:t + n],
                                        st, **kw))
            t += n
        assert ptrs == [x.data_ptr() for x in (st.kv, st.z, st.window_k, st.window_v)]
    assert torch.equal(k, k_in) and torch.equal(v, v_in)  # the state's own window moved
    check_close("o", torch.cat(outs, 2), want, 1e-2)
    # one captured in-place step against the same step run eagerly
    sq, sk, sv = (x[:, :, N - 1:].clone() for x in (q, k, v))
    out = torch.empty(B, H, 1, d, device="cuda", dtype=torch.bfloat16)
    keep = st.clone()
    with torch.no_grad():
        decode_step(sq, sk, sv, st, out=out, **kw)  # warm-up (compiles)
        for a, b in zip(st._tensors()[:4], keep._tensors()[:4]):
            a.copy_(b)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            decode_step(sq, sk, sv, st, out=out, **kw)
        for a, b in zip(st._tensors()[:4], keep._tensors()[:4]):
            a.copy_(b)
        g.replay()
        eager = keep.clone()
        o_eager = decode_step(sq, sk, sv, eager, **kw)
    torch.cuda.synchronize()
    assert torch.equal(out, o_eager)
    for a, b in zip(st._tensors()[:4], eager._tensors()[:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fm,normalize,return_state",
                         [("elu", True, False), ("taylor", True, True), (None, False, True)])
def test_compiled_step_is_one_inplace_op_equal_to_the_eager_step(fm, normalize, return_state):
    """Under torch.compile(fullgraph=True) the step is the custom op featattn::recurrent_step_
    (dynamo cannot trace the launch itself): decode_step updates the state's own buffers in
    place, a linear_attention call returning a state leaves the initial state alone, and both
    equal the eager step."""
    B, H, Hkv, T, d, Dv = 1, 2, 1, 2, 4, 8
    q, k, v = rand_qkv(B, H, Hkv, T, d, Dv, torch.float32, DEV, generator=5, positive=fm is None)
    kv0, z0 = rand_state(B, H, _dk(fm, d), Dv, normalize, generator=6, device=DEV, z_min=1.0)
    eager = LinearAttentionState(kv0.clone(), None if z0 is None else z0.clone())
    comp = LinearAttentionState(kv0.clone(), None if z0 is None else z0.clone())
    ptr = comp.kv.data_ptr()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        if return_state:
            def f(q, k, v, s):
                return featattn.linear_attention(q, k, v, feature_map=fm, normalize=normalize,
                                                 initial_state=s, return_state=True,
                                                 backend="recurrent_step")
            want_o, want_s = f(q, k, v, eager)
            o, s = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, comp)
            check_close("kv", s.kv, want_s.kv, 1e-6)
            assert torch.equal(comp.kv, kv0)  # the initial state is left alone
        else:
            def f(q, k, v, s):
                return decode_step(q, k, v, s, feature_map=fm, normalize=normalize,
                                   backend="recurrent_step")
            want_o = f(q, k, v, eager)
            o = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, comp)
            check_close("kv in place", comp.kv, eager.kv, 1e-6)
            check_close("z in place", comp.z, eager.z, 1e-6)
            assert comp.kv.data_ptr() == ptr
    check_close("o", o, want_o, 1e-6)
    assert any("recurrent_step_" in t for t in seen), seen


def test_a_map_first_met_under_compile_is_filed_when_the_op_runs(monkeypatch):
    """Under torch.compile the map's key names its class (its @triton.jit form cannot be
    traced); the op files it when it runs, from an instance built without arguments, and a
    class that needs arguments is explained."""
    from featattn.feature_maps import resolve_feature_map
    from featattn.kernels import maps

    monkeypatch.setattr(maps, "_FUSED", {})
    fm = resolve_feature_map("elu")
    key = f"{type(fm).__module__}:{type(fm).__qualname__}"
    inst, form = maps.lookup(key)
    assert type(inst) is type(fm) and form == fm.triton_elementwise()

    class NeedsArgs(type(fm)):
        def __init__(self, width):
            super().__init__()

    monkeypatch.setattr(maps, "NeedsArgs", NeedsArgs, raising=False)
    with pytest.raises(TypeError, match="once eagerly first"):
        maps.lookup("featattn.kernels.maps:NeedsArgs")
