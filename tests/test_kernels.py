"""Tests of the Triton kernels (featattn.kernels) against a float64 torch reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors: the cases are
small, fp32 / fp16 only (the interpreter multiplies bf16 bit patterns in tl.dot).
Tests marked ``cuda`` (bf16, long T, the flashy_linear_attention shapes) need a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from featattn import kernels as K  # noqa: E402
from featattn.kernels import _common  # noqa: E402
from helpers import assert_state_handoff  # noqa: E402
from helpers import rel_err as rel  # noqa: E402
from featattn.kernels import chunked as C  # noqa: E402

# the interpreter must be on before the kernels are decorated (tests/conftest.py sees to it)
assert torch.cuda.is_available() or _common.INTERPRET, "TRITON_INTERPRET=1 was set too late"

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.cuda
EPS = 1e-6


# every buffer a kernel writes starts as NaN (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


# --------------------------------------------------------------------------- reference
def reference(q, k, v, normalize, eps, kv0=None, z0=None, chunk=512):
    """float64 causal linear attention, chunked (chunk >= T gives the quadratic masked
    form).  q [B,H,T,Dk], k [B,Hkv,T,Dk], v [B,Hkv,T,Dv] -> (o, kv_final, z_final)."""
    B, H, T, Dk = q.shape
    G = H // k.shape[1]
    q = q.double()
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    S = kv0.double() if kv0 is not None else q.new_zeros(B, H, Dk, v.shape[-1])
    z = z0.double() if z0 is not None else q.new_zeros(B, H, Dk)
    outs = []
    for t0 in range(0, T, chunk):
        qc, kc, vc = q[:, :, t0:t0 + chunk], k[:, :, t0:t0 + chunk], v[:, :, t0:t0 + chunk]
        A = (qc @ kc.transpose(-1, -2)).tril()
        num = A @ vc + qc @ S
        if normalize:
            den = A.sum(-1) + (qc * z[:, :, None]).sum(-1) + eps
            num = num / den[..., None]
            z = z + kc.sum(2)
        outs.append(num)
        S = S + kc.transpose(-1, -2) @ vc
    return torch.cat(outs, 2), S, (z if normalize else None)




def make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout="bhtd", seed=0, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def mk(h, d, positive):
        x = torch.rand(B, T, h, d, generator=g) if positive else torch.randn(B, T, h, d, generator=g)
        if normalize and positive:
            x = x + 0.05  # feature-mapped values are positive; keeps den away from 0
        x = x.to(device=device, dtype=dtype)
        # "bthd": the kernel sees a transposed view with the time stride = H * D
        return x.transpose(1, 2) if layout == "bthd" else x.transpose(1, 2).contiguous()

    q = mk(H, Dk, True) if normalize else mk(H, Dk, False) / Dk ** 0.5
    k = mk(Hkv, Dk, True) if normalize else mk(Hkv, Dk, False) / Dk ** 0.5
    v = mk(Hkv, Dv, False)
    return q, k, v


def run_and_grads(q, k, v, normalize, kv0, z0, return_state, seed=1):
    """Forward through the kernel and the reference, backprop the same random cotangents
    (also through the returned state) and return (outputs, grads) for both."""
    leaves = [q, k, v] + [x for x in (kv0, z0) if x is not None]
    leaves = [x.detach().requires_grad_() for x in leaves]
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    it, rit = iter(leaves[3:]), iter(ref_leaves[3:])
    kv0_, z0_ = (next(it) if kv0 is not None else None), (next(it) if z0 is not None else None)
    rkv0, rz0 = (next(rit) if kv0 is not None else None), (next(rit) if z0 is not None else None)

    o, kv, z = K.chunked_attention(*leaves[:3], normalize=normalize, eps=EPS,
                                   initial_kv=kv0_, initial_z=z0_, return_state=return_state)
    ro, rkv, rz = reference(*ref_leaves[:3], normalize, EPS, rkv0, rz0)

    g = torch.Generator(device="cpu").manual_seed(seed)
    do = torch.randn(ro.shape, generator=g, dtype=torch.float64).to(ro.device)
    loss, rloss = (o.double() * do).sum(), (ro * do).sum()
    if return_state:
        assert kv.dtype == torch.float32 and kv.shape == rkv.shape
        dkv = torch.randn(rkv.shape, generator=g, dtype=torch.float64).to(ro.device)
        loss, rloss = loss + (kv.double() * dkv).sum(), rloss + (rkv * dkv).sum()
        if normalize:
            assert z.dtype == torch.float32 and z.shape == rz.shape
            dz = torch.randn(rz.shape, generator=g, dtype=torch.float64).to(ro.device)
            loss, rloss = loss + (z.double() * dz).sum(), rloss + (rz * dz).sum()
        else:
            assert z is None
    else:
        assert kv is None and z is None
    grads = torch.autograd.grad(loss, leaves)
    rgrads = torch.autograd.grad(rloss, ref_leaves)
    return (o, kv, z), (ro, rkv, rz), grads, rgrads


def check(out, ref, grads, rgrads, tol, names=("dq", "dk", "dv", "dkv0", "dz0")):
    o, kv, z = out
    ro, rkv, rz = ref
    assert o.shape == ro.shape
    assert torch.isfinite(o).all(), "unwritten (NaN-poisoned) or non-finite output"
    assert rel(o, ro) < tol, f"o: rel err {rel(o, ro):.2e}"
    if kv is not None:
        assert rel(kv, rkv) < tol, f"kv: rel err {rel(kv, rkv):.2e}"
    if z is not None:
        assert rel(z, rz) < tol, f"z: rel err {rel(z, rz):.2e}"
    for name, a, b in zip(names, grads, rgrads):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite"
        assert rel(a, b) < tol, f"{name}: rel err {rel(a, b):.2e}"


# --------------------------------------------------------------------------- interpreter-size cases
# (B, H, Hkv, T, Dk, Dv, dtype, normalize, initial state, return_state, layout)
CASES = [
    (1, 1, 1, 1, 16, 16, torch.float32, True, True, True, "bhtd"),       # T = 1
    (2, 4, 2, 63, 40, 24, torch.float32, True, False, True, "bhtd"),     # Dk > Dv, grouped
    (1, 2, 2, 100, 24, 40, torch.float16, False, True, True, "bhtd"),    # Dk < Dv, fp16
    (1, 2, 1, 70, 130, 24, torch.float32, True, True, True, "bhtd"),     # Dk tiled (2 tiles)
    (1, 2, 2, 50, 20, 136, torch.float32, True, True, True, "bthd"),     # Dv tiled, strided
    (1, 2, 2, 100, 32, 32, torch.float16, True, True, False, "bthd"),    # fp16 normalised
    (1, 2, 1, 40, 136, 130, torch.float32, False, False, True, "bhtd"),  # both tiled, grouped
    (1, 1, 1, 1, 300, 8, torch.float32, True, True, True, "bhtd"),       # T = 1, 3 Dk tiles
    (1, 3, 1, 64, 8, 20, torch.float16, True, False, True, "bthd"),      # T = chunk multiple
]


def _case_id(c):
    B, H, Hkv, T, Dk, Dv, dt, norm, init, ret, layout = c
    return (f"B{B}-H{H}-Hkv{Hkv}-T{T}-Dk{Dk}-Dv{Dv}-{str(dt).split('.')[-1]}"
            f"-{'norm' if norm else 'plain'}{'-init' if init else ''}{'-state' if ret else ''}-{layout}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_backward_match_float64(case):
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T + Dk)
    g = torch.Generator(device="cpu").manual_seed(7)
    kv0 = torch.randn(B, H, Dk, Dv, generator=g).to(DEV) if init else None
    z0 = (torch.rand(B, H, Dk, generator=g) * 4).to(DEV) if (init and normalize) else None
    out, ref, grads, rgrads = run_and_grads(q, k, v, normalize, kv0, z0, ret)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert out[0].dtype == dtype
    check(out, ref, grads, rgrads, tol)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_state_handoff_equals_whole_sequence(normalize):
    """Running [0, T1) then [T1, T) with the state handed over equals one run over [0, T)."""
    B, H, T, T1, Dk, Dv = 1, 2, 77, 45, 24, 40
    q, k, v = make_inputs(B, H, H, T, Dk, Dv, torch.float32, normalize, seed=3)
    assert_state_handoff(K.chunked_attention, q, k, v, normalize, cut=T1)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_gradient_through_final_state_only(normalize):
    """A loss on the returned state alone (o unused: its gradient arrives as None)."""
    q, k, v = make_inputs(1, 2, 2, 45, 24, 16, torch.float32, normalize, seed=5)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    _, kv, z = K.chunked_attention(*leaves, normalize=normalize, eps=EPS, return_state=True)
    loss = kv.pow(2).sum() + (z.pow(2).sum() if normalize else 0)
    grads = torch.autograd.grad(loss, leaves)
    rl = [x.detach().double().requires_grad_() for x in (q, k, v)]
    _, rkv, rz = reference(*rl, normalize, EPS)
    rloss = rkv.pow(2).sum() + (rz.pow(2).sum() if normalize else 0)
    rgrads = torch.autograd.grad(rloss, rl, allow_unused=True)
    assert rgrads[0] is None  # q does not reach the state
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() == 0
    for name, a, b in zip(("dk", "dv"), grads[1:], rgrads[1:]):
        assert rel(a, b) < 1e-5, name


def test_output_layout_follows_input_and_no_copy_of_strided_inputs():
    """A [B,T,H,D] caller gets o as a transposed view of a [B,T,H,Dv] buffer."""
    q, k, v = make_inputs(1, 2, 2, 33, 16, 24, torch.float32, False, layout="bthd")
    assert not q.is_contiguous()
    o, _, _ = K.chunked_attention(q, k, v, normalize=False, eps=EPS)
    assert o.shape == (1, 2, 33, 24) and o.transpose(1, 2).is_contiguous()
    ro, _, _ = reference(q, k, v, False, EPS)
    assert rel(o, ro) < 1e-5


def test_input_errors_are_explained():
    q, k, v = make_inputs(1, 4, 4, 8, 16, 16, torch.float32, True)
    with pytest.raises(ValueError, match="divide"):
        K.chunked_attention(q, k[:, :3], v[:, :3], normalize=True, eps=EPS)
    with pytest.raises(ValueError, match="initial_z"):
        K.chunked_attention(q, k, v, normalize=False, eps=EPS, initial_z=torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="initial_kv"):
        K.chunked_attention(q, k, v, normalize=True, eps=EPS, initial_kv=torch.zeros(1, 4, 16, 8))
    with pytest.raises(TypeError, match="dtype"):
        K.chunked_attention(q, k.half(), v, normalize=True, eps=EPS)
    with pytest.raises(ValueError, match="4-D"):
        K.chunked_attention(q[0], k[0], v[0], normalize=True, eps=EPS)


def test_kernel_name_and_limits():
    assert K.TRITON_AVAILABLE
    assert K.kernel_name(64, 64) == "equal_dim"
    assert K.kernel_name(32, 128) == "equal_dim"
    assert K.kernel_name(273, 64) == "small_vhd"
    assert K.KERNEL_LIMITS["max_dk"] >= 1024 and K.KERNEL_LIMITS["max_dv"] >= 256


# --------------------------------------------------------------------------- GPU
def _gpu_check(B, H, Hkv, T, Dk, Dv, dtype, normalize, tol, init=False, ret=False, seed=0):
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, seed=seed)
    kv0 = torch.randn(B, H, Dk, Dv, device=DEV) if init else None
    z0 = torch.rand(B, H, Dk, device=DEV) * 4 if (init and normalize) else None
    out, ref, grads, rgrads = run_and_grads(q, k, v, normalize, kv0, z0, ret)
    check(out, ref, grads, rgrads, tol)


GPU_CASES = [
    # (B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret)
    (2, 4, 4, 1000, 64, 64, torch.bfloat16, True, True, True),
    (2, 4, 2, 1000, 64, 64, torch.bfloat16, False, True, True),
    (1, 2, 2, 777, 128, 128, torch.bfloat16, True, False, False),
    (1, 2, 2, 513, 273, 64, torch.bfloat16, True, True, True),   # Taylor features of d=16
    (1, 2, 2, 300, 32, 128, torch.bfloat16, True, False, True),
    (1, 2, 2, 300, 1024, 256, torch.bfloat16, False, False, True),
    (1, 2, 2, 1000, 64, 64, torch.float16, True, True, True),
    (1, 2, 2, 1000, 64, 64, torch.float32, True, True, True),
    (1, 2, 2, 300, 273, 64, torch.float32, True, True, True),
]


@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[_case_id(c + ("bhtd",)) for c in GPU_CASES])
def test_gpu_matches_float64(case):
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret = case
    tol = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
    _gpu_check(B, H, Hkv, T, Dk, Dv, dtype, normalize, tol, init, ret)


@cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_gpu_long_sequence_bf16(normalize):
    _gpu_check(1, 2, 2, 16384, 64, 64, torch.bfloat16, normalize, 1e-2, ret=True)


def _flashy_combos(n=6, seed=0):
    """Random draws from the flashy_linear_attention test grid."""
    import random

    rng = random.Random(seed)
    combos = []
    for i in range(n):
        b, nh, sq = rng.randint(1, 3), rng.randint(1, 31), rng.randint(64, 2048)
        if i % 2 == 0:
            dk = dv = rng.choice([32, 64, 128])
        else:  # small value head dim: q/k 32..128, v 16/32
            dk, dv = rng.randint(32, 128), rng.choice([16, 32])
        combos.append((b, nh, sq, dk, dv))
    return combos


@cuda
@pytest.mark.parametrize("combo", _flashy_combos(), ids=lambda c: "b{}-nh{}-sq{}-dk{}-dv{}".format(*c))
def test_gpu_flashy_shapes_bf16(combo):
    b, nh, sq, dk, dv = combo
    _gpu_check(b, nh, nh, sq, dk, dv, torch.bfloat16, False, 1e-2)
