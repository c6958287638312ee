"""Tests of the fused Taylor kernel (featattn.kernels.taylor_fused) against float64 references
on *materialised* Taylor features.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors: small cases, fp32 /
fp16 only (the interpreter multiplies bf16 bit patterns in tl.dot).  Tests marked ``cuda``
(bf16, long T) need a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import featattn  # noqa: E402
from featattn import LinearAttentionState  # noqa: E402
from featattn.kernels import _common  # noqa: E402
from featattn.kernels import taylor_fused as TF  # noqa: E402
from featattn import testing  # noqa: E402
from helpers import (  # noqa: E402  (featattn.testing's harness)
    DropLastProgram, assert_state_handoff, check_close, check_run, kernel_vs_reference,
    load_benchmark, rand_qkv, rand_state, reference, taylor_dim, tolerance,
)

# the interpreter must be on before the kernels are decorated (tests/conftest.py sees to it)
assert torch.cuda.is_available() or _common.INTERPRET, "TRITON_INTERPRET=1 was set too late"

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.cuda
EPS = 1e-6


# every buffer a kernel writes starts as NaN (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


# --------------------------------------------------------------------------- harness
def taylor_reference(q, k, v, normalize, eps=EPS, kv0=None, z0=None):
    """float64 linear attention on materialised Taylor features -> (o, kv_final, z_final)."""
    return reference(q, k, v, "taylor", normalize=normalize, eps=eps, initial_kv=kv0,
                     initial_z=z0)


def make_inputs(B, H, Hkv, T, d, Dv, dtype, layout="bhtd", seed=0, device=DEV, qscale=0.7):
    """Fresh random raw q/k/v (featattn.testing.rand_qkv).  "bthd": the kernel sees
    [B,T,H,D] tensors transposed (time stride H*D); "bhtd": contiguous."""
    return rand_qkv(B, H, Hkv, T, d, Dv, dtype, device, seed, layout=layout, q_scale=qscale)


def random_state(B, H, d, Dv, normalize, seed=7, device=DEV):
    """An arbitrary (not symmetric in (i, j), not produced by the map) fp32 state; z > 1 so
    the denominator stays away from 0."""
    return rand_state(B, H, taylor_dim(d), Dv, normalize, generator=seed, device=device,
                      z_min=1.0)


def run_checked(q, k, v, normalize, kv0, z0, return_state, tol, names=None):
    """taylor_attention against the float64 reference, forward and backward (the same
    random cotangents, also through the returned state), every buffer NaN-poisoned."""
    got, want = kernel_vs_reference(TF.taylor_attention, q, k, v, kv0, z0, normalize=normalize,
                                    eps=EPS, return_state=return_state, feature_map="taylor")
    return check_run(got, want, tol, names, dtype=q.dtype)


# --------------------------------------------------------------------------- interpreter-size cases
# (B, H, Hkv, T, d, Dv, dtype, normalize, initial state, return_state, layout)
CASES = [
    (1, 1, 1, 1, 16, 16, torch.float32, True, True, True, "bhtd"),      # T = 1
    (1, 2, 1, 37, 16, 24, torch.float32, True, True, True, "bthd"),     # grouped, strided, state
    (2, 4, 2, 63, 4, 40, torch.float32, True, False, True, "bhtd"),     # small d, grouped
    (1, 2, 2, 100, 6, 48, torch.float32, False, True, True, "bthd"),    # odd d (padding), plain
    (1, 2, 2, 100, 16, 72, torch.float32, True, False, False, "bhtd"),  # Dv tiled (3 tiles)
    (1, 2, 2, 63, 16, 24, torch.float16, True, True, True, "bhtd"),     # fp16 normalised
    (1, 2, 1, 37, 5, 16, torch.float16, False, False, True, "bthd"),    # fp16 plain, odd d
    (1, 1, 1, 17, 1, 16, torch.float32, True, True, True, "bhtd"),      # d = 1: no pairs i != j
    (1, 1, 1, 33, 2, 16, torch.float32, False, True, True, "bhtd"),     # d = 2: one pair
    (1, 1, 1, 40, 32, 16, torch.float32, True, True, True, "bhtd"),     # d = 32 (3-D fold path)
    (1, 2, 1, 21, 20, 16, torch.float16, False, True, True, "bthd"),    # d = 20 (padded to 32)
]


def _case_id(c):
    B, H, Hkv, T, d, Dv, dt, norm, init, ret, layout = c
    return (f"B{B}-H{H}-Hkv{Hkv}-T{T}-d{d}-Dv{Dv}-{str(dt).split('.')[-1]}"
            f"-{'norm' if norm else 'plain'}{'-init' if init else ''}{'-state' if ret else ''}-{layout}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward_match_float64(case):
    B, H, Hkv, T, d, Dv, dtype, normalize, init, ret, layout = case
    q, k, v = make_inputs(B, H, Hkv, T, d, Dv, dtype, layout, seed=T + d + Dv)
    kv0, z0 = random_state(B, H, d, Dv, normalize, seed=T) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))


def test_only_initial_z_or_only_initial_kv():
    """A normalised call given only one half of the state treats the other as zeros."""
    B, H, T, d, Dv = 1, 2, 40, 4, 16
    q, k, v = make_inputs(B, H, H, T, d, Dv, torch.float32, seed=11)
    kv0, z0 = random_state(B, H, d, Dv, True, seed=12)
    for kv_, z_ in ((kv0, None), (None, z0)):
        o, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS, initial_kv=kv_, initial_z=z_)
        ro, _, _ = taylor_reference(q, k, v, True, EPS,
                                    kv_ if kv_ is not None else torch.zeros_like(kv0),
                                    z_ if z_ is not None else torch.zeros_like(z0))
        check_close("o", o, ro, 1e-5)


def test_matches_public_reference_backend():
    """Equal to featattn.linear_attention(feature_map="taylor", backend="reference") with a
    non-default scale (the caller multiplies q by it before the kernel)."""
    B, H, T, d, Dv = 1, 2, 45, 16, 32
    q, k, v = make_inputs(B, H, H, T, d, Dv, torch.float32, seed=5, qscale=1.0)
    scale = 0.4
    ro = featattn.linear_attention(q, k, v, feature_map="taylor", scale=scale, backend="reference")
    o, _, _ = TF.taylor_attention(q * scale, k, v, normalize=True, eps=1e-6)
    check_close("o", o, ro, 1e-5)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_state_handoff_equals_whole_sequence(normalize):
    """Running [0, T1) then [T1, T) with the state handed over equals one run over [0, T)."""
    B, H, T, T1, d, Dv = 1, 2, 77, 45, 16, 24
    q, k, v = make_inputs(B, H, 1, T, d, Dv, torch.float32, seed=3)
    assert_state_handoff(TF.taylor_attention, q, k, v, normalize, cut=T1)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_cross_backend_handoff(normalize):
    """Prefill on the fused kernel, continue on the torch path (and the reverse): the state
    format is the expanded LinearAttentionState of every backend."""
    B, H, T, T1, d, Dv = 1, 2, 70, 41, 16, 24
    q, k, v = make_inputs(B, H, H, T, d, Dv, torch.float32, seed=9)
    ro, rkv, rz = taylor_reference(q, k, v, normalize, EPS)
    head = (q[:, :, :T1], k[:, :, :T1], v[:, :, :T1])
    tail = (q[:, :, T1:], k[:, :, T1:], v[:, :, T1:])

    o1, kv1, z1 = TF.taylor_attention(*head, normalize=normalize, eps=EPS, return_state=True)
    o2, st2 = featattn.linear_attention(*tail, feature_map="taylor", normalize=normalize, eps=EPS,
                                        backend="torch", return_state=True,
                                        initial_state=LinearAttentionState(kv1, z1))
    check_close("o", torch.cat([o1, o2], 2), ro, 1e-5)
    check_close("kv", st2.kv, rkv, 1e-5)

    o1, st1 = featattn.linear_attention(*head, feature_map="taylor", normalize=normalize, eps=EPS,
                                        backend="torch", return_state=True)
    o2, kv2, z2 = TF.taylor_attention(*tail, normalize=normalize, eps=EPS, initial_kv=st1.kv,
                                      initial_z=st1.z, return_state=True)
    check_close("o", torch.cat([o1, o2], 2), ro, 1e-5)
    check_close("kv", kv2, rkv, 1e-5)
    if normalize:
        check_close("z", z2, rz, 1e-5)


def test_decode_steps_match_prefill():
    """T=1 calls chained through the state (decoding) equal one prefill."""
    B, H, T, d, Dv = 1, 2, 5, 16, 16
    q, k, v = make_inputs(B, H, H, T, d, Dv, torch.float32, seed=21)
    o, kv, z = TF.taylor_attention(q, k, v, normalize=True, eps=EPS, return_state=True)
    kv_, z_ = None, None
    outs = []
    for t in range(T):
        ot, kv_, z_ = TF.taylor_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                          normalize=True, eps=EPS, initial_kv=kv_, initial_z=z_,
                                          return_state=True)
        outs.append(ot)
    check_close("o", torch.cat(outs, 2), o, 1e-6)
    check_close("kv", kv_, kv, 1e-6)
    check_close("z", z_, z, 1e-6)


def test_output_layout_follows_input():
    """A [B,T,H,D] caller gets o as a transposed view of a [B,T,H,Dv] buffer."""
    q, k, v = make_inputs(1, 2, 2, 20, 16, 24, torch.float32, layout="bthd")
    assert not q.is_contiguous()
    o, _, _ = TF.taylor_attention(q, k, v, normalize=False, eps=EPS)
    assert o.shape == (1, 2, 20, 24) and o.transpose(1, 2).is_contiguous()


def test_unsupported_reason_and_errors():
    assert TF.taylor_unsupported_reason(16, 64) is None
    assert TF.taylor_unsupported_reason(32, 256) is None
    assert "d=33" in TF.taylor_unsupported_reason(33, 64)
    assert "Dv=300" in TF.taylor_unsupported_reason(16, 300)
    q, k, v = make_inputs(1, 2, 2, 8, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="initial_kv"):
        TF.taylor_attention(q, k, v, normalize=False, eps=EPS, initial_kv=torch.zeros(1, 2, 16, 16, device=DEV))
    with pytest.raises(ValueError, match="initial_z"):
        TF.taylor_attention(q, k, v, normalize=False, eps=EPS, initial_z=torch.zeros(1, 2, 21, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        TF.taylor_attention(q, k.half(), v, normalize=False, eps=EPS)
    with pytest.raises(ValueError, match="divide"):
        TF.taylor_attention(q, k[:, :1].expand(1, 3, 8, 4)[:, :3], v[:, :1].expand(1, 3, 8, 16),
                            normalize=False, eps=EPS)


# --------------------------------------------------------------------------- GPU (bf16, long T)
GPU_CASES = [
    # (B, H, Hkv, T, d, Dv, dtype, normalize, init)
    (2, 4, 2, 1000, 16, 64, torch.bfloat16, True, True),
    (1, 4, 4, 4096, 16, 64, torch.bfloat16, True, False),
    (1, 2, 2, 16384, 16, 64, torch.bfloat16, True, False),
    (1, 2, 2, 16384, 16, 64, torch.float16, True, False),
    (1, 2, 1, 2047, 16, 128, torch.bfloat16, False, True),
    (1, 2, 2, 777, 32, 64, torch.bfloat16, True, True),
    (1, 2, 2, 515, 16, 64, torch.float32, True, True),
]


@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c + (True, "bthd")) for c in GPU_CASES])
def test_gpu_long_sequences_match_float64(case):
    B, H, Hkv, T, d, Dv, dtype, normalize, init = case
    q, k, v = make_inputs(B, H, Hkv, T, d, Dv, dtype, "bthd", seed=T)
    kv0, z0 = random_state(B, H, d, Dv, normalize, seed=T) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, True, tolerance(dtype, "taylor"))


# --------------------------------------------------------------------------- the parallel form
# taylor_attention runs calls with no state in or out and T <= PARALLEL_MAX_T in the parallel
# (quadratic, FlashAttention-like) form of featattn/kernels/taylor_parallel.py.
from featattn.kernels import taylor_parallel as TP  # noqa: E402

# (B, H, Hkv, T, d, Dv, dtype, normalize, layout)
PAR_CASES = [
    (1, 1, 1, 1, 16, 16, torch.float32, False, "bhtd"),    # T = 1
    (1, 2, 1, 37, 16, 24, torch.float32, True, "bthd"),    # grouped, strided
    (2, 4, 2, 63, 4, 40, torch.float32, True, "bhtd"),     # small d, grouped
    (1, 2, 2, 100, 6, 48, torch.float32, False, "bthd"),   # odd d, plain
    (1, 1, 1, 33, 5, 200, torch.float32, True, "bhtd"),    # Dv 200: one 256-wide value tile
    (1, 2, 2, 50, 16, 24, torch.float16, True, "bhtd"),    # fp16 normalised
    (1, 2, 1, 29, 32, 16, torch.float16, False, "bthd"),   # d = 32, fp16 plain
    (1, 1, 1, 40, 20, 16, torch.float32, True, "bhtd"),    # d = 20 (padded to 32)
]


def _par_id(c):
    B, H, Hkv, T, d, Dv, dt, norm, layout = c
    return f"B{B}-H{H}-Hkv{Hkv}-T{T}-d{d}-Dv{Dv}-{str(dt).split('.')[-1]}-{'norm' if norm else 'plain'}-{layout}"


@pytest.fixture
def parallel_calls(monkeypatch):
    """Counts the calls that take the parallel form."""
    calls = []
    real = TP.parallel_op

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(TP, "parallel_op", spy)
    return calls


@pytest.mark.parametrize("case", PAR_CASES, ids=[_par_id(c) for c in PAR_CASES])
def test_parallel_form_matches_float64(case, parallel_calls):
    B, H, Hkv, T, d, Dv, dtype, normalize, layout = case
    q, k, v = make_inputs(B, H, Hkv, T, d, Dv, dtype, layout, seed=T + d + Dv)
    run_checked(q, k, v, normalize, None, None, False, tolerance(dtype, "small"))
    assert len(parallel_calls) == 1, "a stateless short call must take the parallel form"


def test_state_or_long_sequence_takes_the_chunked_form(parallel_calls, monkeypatch):
    q, k, v = make_inputs(1, 2, 2, 40, 16, 24, torch.float32, seed=2)
    o_par, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS)
    assert len(parallel_calls) == 1
    o_st, kv, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS, return_state=True)
    kv0, z0 = random_state(1, 2, 16, 24, True)
    TF.taylor_attention(q, k, v, normalize=True, eps=EPS, initial_kv=kv0, initial_z=z0)
    monkeypatch.setattr(TP, "PARALLEL_MAX_T", 39)  # T = 40 is now "long"
    o_long, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS)
    assert len(parallel_calls) == 1
    check_close("o (with state)", o_par, o_st, 1e-5)
    check_close("o (chunked form)", o_par, o_long, 1e-5)


def test_chunked_form_without_state_matches_float64(monkeypatch):
    """The chunked form also serves stateless calls (T > PARALLEL_MAX_T)."""
    monkeypatch.setattr(TP, "PARALLEL_MAX_T", 0)
    q, k, v = make_inputs(1, 2, 1, 70, 16, 40, torch.float32, "bthd", seed=4)
    run_checked(q, k, v, True, None, None, False, 1e-5)


def test_parallel_form_rejects_state():
    q, k, v = make_inputs(1, 1, 1, 8, 4, 16, torch.float32)
    with pytest.raises(ValueError, match="no initial state"):
        TP._forward(q, k, v, True, EPS, torch.zeros(1, 1, 21, 16, device=DEV), None, False)


GPU_PAR_CASES = [
    (2, 4, 2, 1000, 16, 64, torch.bfloat16, True, "bthd"),
    (1, 4, 4, 2048, 16, 64, torch.bfloat16, True, "bhtd"),
    (1, 2, 1, 2047, 16, 128, torch.bfloat16, False, "bhtd"),
    (1, 2, 2, 777, 32, 64, torch.bfloat16, True, "bthd"),
    (1, 2, 2, 515, 16, 64, torch.float32, True, "bhtd"),
    (1, 2, 1, 1000, 16, 64, torch.float16, True, "bthd"),
]


@cuda
@pytest.mark.parametrize("case", GPU_PAR_CASES, ids=[_par_id(c) for c in GPU_PAR_CASES])
def test_gpu_parallel_form_matches_float64(case, parallel_calls):
    B, H, Hkv, T, d, Dv, dtype, normalize, layout = case
    q, k, v = make_inputs(B, H, Hkv, T, d, Dv, dtype, layout, seed=T)
    run_checked(q, k, v, normalize, None, None, False, tolerance(dtype, "taylor"))
    assert len(parallel_calls) == 1


# --------------------------------------------------------------------------- the harness catches gaps
def _drop_last_program(monkeypatch, form, launch):
    """Make one launch of the chunked ("TF") or parallel ("TP") form skip a (b, h) pair."""
    if form == "TP":
        monkeypatch.setattr(TP, launch, DropLastProgram(getattr(TP, launch)))
        return
    tuners = (TF._fwd_small, TF._fwd_big) if launch == "_FWD" else (TF._bwd_small, TF._bwd_big)
    for t in tuners:
        monkeypatch.setitem(TF._LAUNCH, t, DropLastProgram(TF._LAUNCH[t]))


@pytest.mark.parametrize("form", ["TF", "TP"])
@pytest.mark.parametrize("launch", ["_FWD", "_BWD"])
def test_unwritten_kernel_output_fails_the_check(form, launch, monkeypatch):
    """A chunked- or parallel-form kernel that forgets one head's outputs or gradients leaves
    NaN-poisoned elements, which the harness reports instead of passing."""
    _drop_last_program(monkeypatch, form, launch)
    q, k, v = make_inputs(1, 2, 2, 20, 4, 16, torch.float32, seed=2)
    got, want = kernel_vs_reference(TF.taylor_attention, q, k, v, normalize=True, eps=EPS,
                                    return_state=form == "TF", feature_map="taylor")
    name = "o" if launch == "_FWD" else "dv"
    assert getattr(got, name)[:, -1].isnan().all(), name
    with pytest.raises(AssertionError, match="non-finite"):
        check_run(got, want, 1.0)


def test_benchmark_check_paths_run_and_catch_unwritten_outputs(monkeypatch):
    """benchmarks/gpu_taylor.py's correctness tables (chunked form, parallel form) run
    through the same harness (here on CPU, tiny): they pass the kernels, and their own
    poisoning (the fixture's is off here) makes them fail a kernel that skips a head."""
    bench = load_benchmark("gpu_taylor", monkeypatch)
    case = (1, 2, 1, 20, 4, 16, torch.float32, True, True, "bthd")
    par_case = (1, 2, 1, 20, 4, 16, torch.float16, False, "bhtd")
    with testing.poisoned_outputs(False):
        errs, failures = bench.check_one(*case)
        assert not failures and set(errs) == {"o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"}
        errs, failures = bench.par_check_one(*par_case)
        assert not failures and set(errs) == {"o", "dq", "dk", "dv"}
        _drop_last_program(monkeypatch, "TF", "_BWD")
        _drop_last_program(monkeypatch, "TP", "_FWD")
        _, failures = bench.check_one(*case)
        assert any(f.startswith("dq: ") and "non-finite" in f for f in failures), failures
        _, failures = bench.par_check_one(*par_case)
        assert any(f.startswith("o: ") and "non-finite" in f for f in failures), failures


def test_tuning_override_fixes_the_config_and_keeps_results():
    """featattn.kernels.tuning: a fixed forward config and a fixed backward Dv tile give the
    same results as the autotuned launch, inside the block only."""
    from featattn.kernels import tuning

    q, k, v = make_inputs(1, 2, 1, 37, 16, 40, torch.float32, seed=6)
    launched = []
    real = TF._fwd_kernel.run

    def spy(*a, **kw):
        launched.append({k_: kw[k_] for k_ in ("BT", "BV") if k_ in kw})
        return real(*a, **kw)

    with tuning.override("taylor_fwd", BT=16, BV=16, num_warps=4, num_stages=1), \
            tuning.override("taylor_bwd", BV=16):
        assert tuning.forced("taylor_bwd") == {"BV": 16}
        TF._fwd_kernel.run = spy
        try:
            run_checked(q, k, v, True, None, None, True, tolerance(torch.float32, "small"))
        finally:
            del TF._fwd_kernel.run
    assert {"BT": 16, "BV": 16} in launched
    assert tuning.forced("taylor_fwd") is None and tuning.forced("taylor_bwd") is None
    # bad kernel names and meta-parameters: tests/kernels/test_tuning.py


def test_explicit_forms(parallel_calls):
    """taylor_attention(form=...) runs the form the dispatcher names; the parallel form
    refuses a state."""
    q, k, v = make_inputs(1, 2, 2, 40, 16, 24, torch.float32, seed=8)
    o_ch, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS, form="chunked")
    assert not parallel_calls
    o_par, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=EPS, form="parallel")
    assert len(parallel_calls) == 1
    check_close("o", o_ch, o_par, 1e-5)
    with pytest.raises(ValueError, match="keeps no state"):
        TF.taylor_attention(q, k, v, normalize=True, eps=EPS, form="parallel", return_state=True)
    with pytest.raises(ValueError, match="form must be"):
        TF.taylor_attention(q, k, v, normalize=True, eps=EPS, form="fast")
