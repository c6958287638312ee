"""Packed sequences (``cu_seqlens``): a packed batch equals each sequence run alone.

The Triton chunked kernel takes them natively (one program row per sequence and head); the
other backends run the sequences one after another.  Under the interpreter on CPU (fp32/fp16),
``cuda`` tests in bf16.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import featattn
from featattn import LinearAttentionState, linear_attention
from helpers import check_close, rand_qkv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def _cu(lens, device=DEV, dtype=torch.int32):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=dtype, device=device)


def _dk(fm, d):
    return 1 + d + d * d if fm == "taylor" else d


def _run(fn_backend, q, k, v, fm, cu, kv0, z0, dtype_up=None):
    """(o, kv, z, grads of q, k, v, kv0, z0) of a packed call (``cu``) or, with cu=None, of
    each sequence alone in float64 through the reference."""
    leaves = [t.detach().clone() for t in (q, k, v, kv0, z0)]
    if dtype_up is not None:
        leaves = [t.to(dtype_up) for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    if cu is not None:
        o, s = linear_attention(*leaves[:3], feature_map=fm, backend=fn_backend, cu_seqlens=cu,
                                initial_state=LinearAttentionState(leaves[3], leaves[4]),
                                return_state=True)
        kv, z = s.kv, s.z
    else:
        bounds = fn_backend
        outs, kvs, zs = [], [], []
        for n in range(len(bounds) - 1):
            sl = slice(bounds[n], bounds[n + 1])
            o_n, s_n = linear_attention(
                leaves[0][:, :, sl], leaves[1][:, :, sl], leaves[2][:, :, sl], feature_map=fm,
                backend="reference", return_state=True,
                initial_state=LinearAttentionState(leaves[3][n:n + 1], leaves[4][n:n + 1]))
            outs.append(o_n)
            kvs.append(s_n.kv)
            zs.append(s_n.z)
        o, kv, z = torch.cat(outs, 2), torch.cat(kvs), torch.cat(zs)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=g).to(o.device)
    loss = (o.double() * wo.double()).sum() + kv.double().sum() * 0.1 + z.double().sum() * 0.1
    return (o, kv, z, *torch.autograd.grad(loss, leaves))


def _check(lens, fm, backend, dtype, H=2, Hkv=1, d=8, Dv=12, seed=0, tol=2e-5):
    T = sum(lens)
    q, k, v = rand_qkv(1, H, Hkv, T, d, Dv, dtype, DEV, generator=seed, positive=fm is None)
    g = torch.Generator().manual_seed(seed + 1)
    kv0 = torch.randn(len(lens), H, _dk(fm, d), Dv, generator=g).to(DEV)
    z0 = (torch.rand(len(lens), H, _dk(fm, d), generator=g) + 1).to(DEV)
    cu = _cu(lens)
    got = _run(backend, q, k, v, fm, cu, kv0, z0)
    want = _run(cu.tolist(), q, k, v, fm, None, kv0, z0, dtype_up=torch.float64)
    for name, a, b in zip(("o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"), got, want):
        check_close(name, a, b, tol)


@pytest.mark.parametrize("fm,backend,dtype,lens", [
    ("elu", "triton", torch.float32, [1, 63, 70, 5]),      # native kernel: boundaries inside chunks
    ("relu", "triton", torch.float32, [40, 1]),
    (None, "triton", torch.float16, [33, 64, 2]),          # features, fp16
    ("taylor", "triton", torch.float32, [20, 3]),          # Taylor kernels, one sequence at a time
    ("elu", "torch", torch.float32, [7, 1, 30]),
], ids=lambda x: str(x) if not isinstance(x, list) else "-".join(map(str, x)))
def test_packed_equals_each_sequence_alone(fm, backend, dtype, lens):
    _check(lens, fm, backend, dtype, tol=2e-5 if dtype == torch.float32 else 2e-3)


try:  # a user's elementwise map whose Triton form has no dphi_from_y
    from user_maps import SoftplusXSlope
except ImportError:  # pragma: no cover (no Triton: the test skips)
    SoftplusXSlope = None


@pytest.mark.parametrize("fm", ["elu", "test_softplus_no_y"])
def test_packed_with_the_map_pass_equals_each_sequence_alone(fm, monkeypatch):
    """The map as a Triton pass (large calls' path): with dphi_from_y the slope applied by
    the backward kernel, without it the pass's own backward; states per sequence."""
    if SoftplusXSlope is None:
        pytest.skip("needs triton")
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
    if fm == "test_softplus_no_y":
        featattn.register_feature_map(fm, override=True)(SoftplusXSlope)
    _check([1, 63, 70, 5], fm, "triton", torch.float32)


@given(lens=st.lists(st.integers(1, 90), min_size=1, max_size=5))
def test_packed_equals_alone_any_lengths_torch(lens):
    """Any number of sequences and lengths (1 included, not multiples of the chunk), on the
    PyTorch path."""
    _check(lens, "elu", "torch", torch.float32, H=2, Hkv=2, d=4, Dv=4)


@pytest.mark.parametrize("dtype,lens", [(torch.float32, [1, 20, 37, 3]), (torch.float16, [33, 2])],
                         ids=["fp32", "fp16"])
def test_native_taylor_kernel_packed_equals_each_sequence_alone(dtype, lens, monkeypatch):
    """FEATATTN_TAYLOR_VARLEN=native: one launch of the chunked Taylor kernel over every
    sequence (boundaries inside chunks, a one-token sequence, grouped heads), forward, states
    and every gradient against each sequence alone in float64; the per-sequence fallback is
    never entered."""
    from featattn import functional

    def boom(*a, **kw):
        raise AssertionError("the packed call fell back to one sequence at a time")

    monkeypatch.setenv("FEATATTN_TAYLOR_VARLEN", "native")
    monkeypatch.setattr(functional, "_per_sequence", boom)
    _check(lens, "taylor", "triton", dtype, H=4, Hkv=2, d=4, Dv=8,
           tol=2e-5 if dtype == torch.float32 else 3e-3)


def test_taylor_varlen_switch_is_checked(monkeypatch):
    monkeypatch.setenv("FEATATTN_TAYLOR_VARLEN", "nativ")
    q, k, v = rand_qkv(1, 2, 2, 10, 4, 4, torch.float32, DEV, generator=3)
    with pytest.raises(ValueError, match="FEATATTN_TAYLOR_VARLEN must be"):
        linear_attention(q, k, v, feature_map="taylor", cu_seqlens=_cu([4, 6]))


@pytest.mark.parametrize("mode,expected", [("native", "taylor_chunked"), ("loop", "taylor_parallel")])
def test_select_kernel_names_the_packed_taylor_kernel(mode, expected, monkeypatch):
    """select_kernel with cu_seqlens says what runs: the chunked Taylor kernel's packed form
    under FEATATTN_TAYLOR_VARLEN=native (the default) even where a lone call of that length
    would take the parallel form, and the per-sequence parallel form under ``loop``."""
    from featattn import select_kernel

    monkeypatch.setenv("FEATATTN_TAYLOR_VARLEN", mode)
    q, k, v = rand_qkv(1, 2, 2, 40, 4, 4, torch.float32, DEV, generator=3)
    choice = select_kernel(q, k, v, "taylor", "triton", cu_seqlens=_cu([15, 25]))
    assert choice.name == expected, choice
    if mode == "native":
        assert any("packed" in r for r in choice.reasons), choice.reasons
    assert select_kernel(q, k, v, "taylor", "triton").name == "taylor_parallel"


@pytest.mark.parametrize("fm", ["hedgehog", "elu"])
@pytest.mark.parametrize("with_state", [False, True])
def test_select_kernel_says_what_a_packed_call_runs(fm, with_state, monkeypatch):
    """select_kernel and the call agree on the map's path for packed sequences, with and
    without initial states: both count the rows of the packed tensors (H x total T), not the
    number of sequences times that (100 sequences of 2 tokens: the map's path depends on the
    rows); and select_kernel checks cu_seqlens as the call does."""
    from featattn import functional, select_kernel

    seen = []
    select = functional.select

    def spy(call, backend):
        seen.append(select(call, backend))
        return seen[-1]

    monkeypatch.setattr(functional, "select", spy)
    H, T, N = 2, 200, 100
    fmap = featattn.feature_maps.HedgehogFeatureMap(8, heads=H) if fm == "hedgehog" else fm
    q, k, v = rand_qkv(1, H, H, T, 8, 4, torch.float32, DEV, generator=5)
    q.requires_grad_()
    cu = torch.arange(0, T + 1, T // N, device=DEV)
    state = None
    if with_state:
        d = fmap.output_dim(8) if fm == "hedgehog" else 8
        state = LinearAttentionState(torch.zeros(N, H, d, 4, device=DEV),
                                     torch.zeros(N, H, d, device=DEV))
    want = select_kernel(q, k, v, fmap, "triton", cu_seqlens=cu, initial_state=state)
    linear_attention(q, k, v, feature_map=fmap, backend="triton", cu_seqlens=cu,
                     initial_state=state)
    assert (seen[0].name, seen[0].map_path) == (want.name, want.map_path), (seen[0], want)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        select_kernel(q, k, v, fmap, "triton", cu_seqlens=[0, 100, 200])
    with pytest.raises(ValueError, match="strictly increasing"):
        select_kernel(q, k, v, fmap, "triton", cu_seqlens=torch.tensor([0, 150, 100, 200],
                                                                        device=DEV))


def test_native_kernel_takes_packed_sequences(monkeypatch):
    """The chunked kernel runs the packed batch itself: the one-sequence-at-a-time fallback
    is never entered, and the result equals the second sequence run alone."""
    from featattn import functional

    def boom(*a, **kw):
        raise AssertionError("the packed call fell back to one sequence at a time")

    monkeypatch.setattr(functional, "_per_sequence", boom)
    q, k, v = rand_qkv(1, 2, 2, 50, 8, 8, torch.float32, DEV, generator=3)
    with torch.no_grad():
        o = linear_attention(q, k, v, feature_map="elu", backend="triton", cu_seqlens=_cu([20, 30]))
        alone = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], feature_map="elu",
                                 backend="triton")
    check_close("o", o[:, :, 20:], alone, 1e-6)


def test_bad_cu_seqlens_are_explained():
    q, k, v = rand_qkv(1, 2, 2, 10, 4, 4, torch.float32, "cpu", generator=4)
    cases = [
        ([1, 10], "must start at 0"),
        ([0, 6, 6, 10], "strictly increasing"),
        ([0, 5, 9], "must end at the total length T = 10"),
    ]
    for bounds, msg in cases:
        with pytest.raises(ValueError, match=msg):
            linear_attention(q, k, v, cu_seqlens=torch.tensor(bounds))
    with pytest.raises(TypeError, match="int32 or int64"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        linear_attention(q, k, v, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="batch of one"):
        q2, k2, v2 = rand_qkv(2, 2, 2, 10, 4, 4, torch.float32, "cpu", generator=4)
        linear_attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"initial_state.kv must have shape \[B, H, Dk, Dv\] = \[2, 2, 4, 4\]"):
        linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 10]),
                         initial_state=LinearAttentionState.zeros(1, 2, 4, 4))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cu_seqlens is on cpu but q is on cuda"):
            qc, kc, vc = (t.cuda() for t in (q, k, v))
            linear_attention(qc, kc, vc, cu_seqlens=torch.tensor([0, 10]))


@pytest.mark.cuda
@pytest.mark.parametrize("fm,varlen", [("elu", "loop"), ("taylor", "loop"), ("taylor", "native")])
def test_gpu_packed_bf16(fm, varlen, monkeypatch):
    monkeypatch.setenv("FEATATTN_TAYLOR_VARLEN", varlen)
    _check([1, 500, 1000, 37], fm, "auto", torch.bfloat16, H=4, Hkv=2, d=16, Dv=64, tol=2e-2)


@pytest.mark.parametrize("normalize", [True, False])
def test_native_taylor_packed_without_states_several_value_tiles(normalize, monkeypatch):
    """The packed Taylor kernel with no state in, an odd head dim, Dv over one tile and
    normalize on/off: output and gradients equal each sequence alone in float64."""
    monkeypatch.setenv("FEATATTN_TAYLOR_VARLEN", "native")
    lens = [5, 1, 26]
    q, k, v = rand_qkv(1, 2, 1, sum(lens), 5, 70, torch.float32, DEV, generator=7)
    cu = _cu(lens)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = linear_attention(*leaves, feature_map="taylor", backend="triton", cu_seqlens=cu,
                         normalize=normalize)
    g = torch.autograd.grad(o.square().sum(), leaves)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    b = cu.tolist()
    o_ref = torch.cat([linear_attention(*(t[:, :, b[n]:b[n + 1]] for t in ref),
                                        feature_map="taylor", backend="reference",
                                        normalize=normalize) for n in range(len(lens))], 2)
    g_ref = torch.autograd.grad(o_ref.square().sum(), ref)
    check_close("o", o, o_ref, 2e-5)
    for name, a, b_ in zip(("dq", "dk", "dv"), g, g_ref):
        check_close(name, a, b_, 2e-5)
