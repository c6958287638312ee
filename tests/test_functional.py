"""linear_attention on the PyTorch paths vs the float64 oracles."""

import pytest
import torch
from hypothesis import given, strategies as st

import featattn
from featattn import LinearAttentionState, linear_attention
from featattn.chunked import chunked_linear_attention
from featattn.feature_maps import resolve_feature_map
from featattn.reference import quadratic_linear_attention, recurrent_linear_attention

from helpers import rand_qkv, reference, rel_err

FMAPS = [None, "elu", "taylor", "relu", "identity"]


def _features(q, k, fm, scale=1.0):
    fm = resolve_feature_map(fm)
    q = q * scale
    return (fm(q), fm(k)) if fm is not None else (q, k)


shapes = st.fixed_dictionaries(
    {
        "B": st.integers(1, 2),
        "Hkv": st.integers(1, 2),
        "G": st.integers(1, 3),
        "T": st.integers(1, 300),
        "Dqk": st.integers(1, 6),
        "Dv": st.integers(1, 9),
        "fm": st.sampled_from(FMAPS),
        "normalize": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


@given(shapes)
def test_chunked_equals_quadratic_equals_recurrent(s):
    g = torch.Generator().manual_seed(s["seed"])
    q, k, v = rand_qkv(s["B"], s["Hkv"] * s["G"], s["Hkv"], s["T"], s["Dqk"], s["Dv"], generator=g)
    normalize = s["normalize"] and s["fm"] not in (None, "identity")  # phi >= 0 keeps den > 0
    fq, fk = _features(q, k, s["fm"])
    kw = dict(normalize=normalize, eps=1e-6, return_state=True)
    o_q, kv_q, z_q = quadratic_linear_attention(fq, fk, v, **kw)
    o_r, kv_r, z_r = recurrent_linear_attention(fq, fk, v, **kw)
    o_c, kv_c, z_c = chunked_linear_attention(fq, fk, v, chunk_size=16, block_chunks=4, **kw)
    for o in (o_r, o_c):
        torch.testing.assert_close(o, o_q, rtol=1e-9, atol=1e-9)
    for kv in (kv_r, kv_c):
        torch.testing.assert_close(kv, kv_q, rtol=1e-9, atol=1e-9)
    if normalize:
        for z in (z_r, z_c):
            torch.testing.assert_close(z, z_q, rtol=1e-9, atol=1e-9)
    else:
        assert z_c is None and z_r is None


@given(shapes, st.data())
def test_split_and_resume_equals_whole(s, data):
    g = torch.Generator().manual_seed(s["seed"])
    T = max(s["T"], 2)
    q, k, v = rand_qkv(s["B"], s["Hkv"] * s["G"], s["Hkv"], T, s["Dqk"], s["Dv"], generator=g)
    fm = s["fm"] or "elu"
    normalize = s["normalize"]
    cut = data.draw(st.integers(1, T - 1), label="cut")
    backend = data.draw(st.sampled_from(["torch", "reference"]), label="backend")
    whole, st_whole = linear_attention(q, k, v, feature_map=fm, normalize=normalize,
                                       return_state=True, backend=backend)
    a, st_a = linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], feature_map=fm,
                               normalize=normalize, return_state=True, backend=backend)
    b, st_b = linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], feature_map=fm,
                               normalize=normalize, initial_state=st_a, return_state=True,
                               backend=backend)
    torch.testing.assert_close(torch.cat([a, b], dim=2), whole, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st_b.kv, st_whole.kv, rtol=1e-9, atol=1e-9)
    assert st_b.normalized == normalize


@given(shapes)
def test_normalised_output_is_convex_combination(s):
    g = torch.Generator().manual_seed(s["seed"])
    H = s["Hkv"] * s["G"]
    q, k, v = rand_qkv(s["B"], H, s["Hkv"], s["T"], s["Dqk"], s["Dv"], generator=g)
    fm = s["fm"] if s["fm"] in ("elu", "taylor") else "elu"  # strictly positive maps
    # replacing v by the identity (one-hot per position) exposes the attention weights
    T = s["T"]
    eye = torch.eye(T, dtype=torch.float64).expand(s["B"], s["Hkv"], T, T)
    w = linear_attention(q, k, eye, feature_map=fm, eps=1e-12, backend="torch")  # [B, H, T, T]
    assert (w >= -1e-12).all()
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), rtol=1e-9, atol=1e-9)
    assert torch.all(w.triu(1).abs() < 1e-12)  # causal
    o = linear_attention(q, k, v, feature_map=fm, eps=1e-12, backend="torch")
    vmax = v.repeat_interleave(s["G"], 1).cummax(2).values
    vmin = -(-v.repeat_interleave(s["G"], 1)).cummax(2).values
    assert (o <= vmax + 1e-9).all() and (o >= vmin - 1e-9).all()


@pytest.mark.parametrize("fm", ["elu", "taylor", "identity"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_functional_matches_oracle(fm, normalize, backend):
    q, k, v = rand_qkv(2, 4, 2, 37, 5, 3)
    if fm == "identity" and normalize:
        q, k = q.abs(), k.abs()
    o = linear_attention(q, k, v, feature_map=fm, normalize=normalize, scale=0.7, backend=backend)
    ref, _, _ = reference(q, k, v, fm, normalize=normalize, scale=0.7)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(T, dtype):
    q, k, v = (t.to(dtype) for t in rand_qkv(1, 2, 1, T, 8, 12, dtype=torch.float32))
    o, state = linear_attention(q, k, v, feature_map="elu", return_state=True)
    assert o.dtype == dtype and o.shape == (1, 2, T, 12)
    assert state.kv.dtype == torch.float32 and state.z.dtype == torch.float32
    ref, _, _ = reference(q, k, v, "elu")
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(o, ref) < tol


def test_strided_views_and_gqa():
    B, T, H, Hkv, D = 2, 50, 4, 2, 8
    x = torch.randn(B, T, H * D + 2 * Hkv * D, dtype=torch.float64)
    q = x[..., : H * D].unflatten(-1, (H, D)).transpose(1, 2)
    k = x[..., H * D : H * D + Hkv * D].unflatten(-1, (Hkv, D)).transpose(1, 2)
    v = x[..., H * D + Hkv * D :].unflatten(-1, (Hkv, D)).transpose(1, 2)
    assert not q.is_contiguous()
    o = linear_attention(q, k, v, feature_map="elu", backend="torch")
    # grouped heads == explicitly repeated heads
    o_rep = linear_attention(q.contiguous(), k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                             feature_map="elu", backend="reference")
    torch.testing.assert_close(o, o_rep, rtol=1e-10, atol=1e-10)


def test_scale_default_and_explicit():
    q, k, v = rand_qkv(1, 1, 1, 20, 4, 4)
    fm = featattn.get_feature_map("taylor")
    assert fm.default_scale(4) == 1.0
    o1 = linear_attention(q, k, v, feature_map="taylor")
    o2 = linear_attention(q, k, v, feature_map="taylor", scale=1.0)
    torch.testing.assert_close(o1, o2)
    o3 = linear_attention(q, k, v, feature_map="taylor", scale=0.5)
    o4 = linear_attention(q * 0.5, k, v, feature_map="taylor")
    torch.testing.assert_close(o3, o4)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck_chunked(normalize, with_state):
    g = torch.Generator().manual_seed(0)
    q, k, v = rand_qkv(1, 2, 1, 11, 3, 2, generator=g, requires_grad=True)
    inputs = [q, k, v]
    if with_state:
        kv0 = torch.rand(1, 2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
        z0 = torch.rand(1, 2, 3, dtype=torch.float64, generator=g, requires_grad=True) if normalize else None
        inputs += [kv0] + ([z0] if normalize else [])

    def f(q, k, v, *st):
        state = LinearAttentionState(st[0], st[1] if normalize else None) if with_state else None
        o, s = linear_attention(q, k, v, feature_map="elu", normalize=normalize, initial_state=state,
                                return_state=True, backend="torch")
        return (o, s.kv) + ((s.z,) if normalize else ())

    # tiny chunks so the intra- and inter-chunk paths are both differentiated
    import inspect

    import featattn.chunked as ch
    defaults = inspect.unwrap(ch.chunked_linear_attention).__kwdefaults__  # (under no_autocast)
    orig = defaults["chunk_size"]
    defaults["chunk_size"] = 4
    try:
        assert torch.autograd.gradcheck(f, tuple(inputs))
    finally:
        defaults["chunk_size"] = orig


def test_gradients_match_reference():
    q, k, v = rand_qkv(2, 2, 1, 70, 4, 5, requires_grad=True)
    go = torch.randn(2, 2, 70, 5, dtype=torch.float64)
    grads = []
    for backend in ("torch", "reference"):
        o = linear_attention(q, k, v, feature_map="taylor", backend=backend)
        grads.append(torch.autograd.grad(o, (q, k, v), go))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_select_kernel_cpu_is_torch():
    q, k, v = rand_qkv(1, 2, 2, 8, 16, 64, dtype=torch.float32)
    choice = featattn.select_kernel(q, k, v, feature_map="taylor")
    assert choice.name == "torch_chunked"
    assert isinstance(choice.reasons, tuple) and choice.reasons
    assert featattn.select_kernel(q, k, v, backend="reference").name == "reference"
    assert featattn.select_kernel(q.double(), k.double(), v.double()).name == "torch_chunked"


def test_return_type_follows_return_state():
    """Static types: linear_attention is overloaded on return_state (a tensor, or a tensor and
    a LinearAttentionState), so type checkers see each call's result."""
    import typing

    hints = typing.get_type_hints(featattn.linear_attention)
    assert hints["return"] == typing.Union[torch.Tensor,
                                           typing.Tuple[torch.Tensor, featattn.LinearAttentionState]]
    if hasattr(typing, "get_overloads"):  # Python >= 3.11 records them
        returns = {typing.get_type_hints(f)["return"] for f in typing.get_overloads(featattn.linear_attention)}
        assert returns == {torch.Tensor, typing.Tuple[torch.Tensor, featattn.LinearAttentionState]}


@pytest.mark.parametrize("heads", [(2, 2), (4, 2)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("T", [1, 3])
def test_torch_path_short_calls_match_the_reference(heads, normalize, T):
    """The PyTorch path's one-token recurrence (T = 1) and one short chunk (T < 64): output,
    state and gradients against the float64 reference, with a state in."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, H, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
    st = featattn.LinearAttentionState(
        torch.rand(2, H, 8, 5, generator=g, dtype=torch.float64),
        torch.rand(2, H, 8, generator=g, dtype=torch.float64) if normalize else None)
    runs = []
    for backend in ("torch", "reference"):
        o, s = featattn.linear_attention(q, k, v, feature_map="elu", normalize=normalize,
                                         initial_state=st, return_state=True, backend=backend)
        grads = torch.autograd.grad(o.square().sum() + s.kv.sum(), (q, k, v))
        runs.append([o, s.kv, *grads] + ([s.z] if normalize else []))
    for a, b in zip(*runs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
