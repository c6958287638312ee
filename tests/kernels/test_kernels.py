"""Tests of the Triton kernels (featattn.kernels) against a float64 torch reference.

Without CUDA the kernels run in the Triton interpreter on CPU tensors: the cases are
small, fp32 / fp16 only (the interpreter multiplies bf16 bit patterns in tl.dot).
Tests marked ``cuda`` (bf16, long T, the flashy_linear_attention shapes) need a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from featattn import kernels as K  # noqa: E402
from featattn import testing  # noqa: E402
from featattn.kernels import _common  # noqa: E402
from featattn.kernels import chunked as C  # noqa: E402
from helpers import (  # noqa: E402  (featattn.testing's harness)
    DropLastProgram, assert_state_handoff, check_close, check_run, kernel_vs_reference,
    load_benchmark, rand_features, rand_state, reference, spy_launches, tolerance,
)

# the interpreter must be on before the kernels are decorated (tests/conftest.py sees to it)
assert torch.cuda.is_available() or _common.INTERPRET, "TRITON_INTERPRET=1 was set too late"

DEV = "cuda" if torch.cuda.is_available() else "cpu"
cuda = pytest.mark.cuda
EPS = 1e-6


# every buffer a kernel writes starts as NaN (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout="bhtd", seed=0, device=DEV):
    """Feature-like q, k, v (featattn.testing.rand_features): positive when normalising."""
    return rand_features(B, H, Hkv, T, Dk, Dv, dtype, normalize=normalize, layout=layout,
                         generator=seed, device=device)


def run_checked(q, k, v, normalize, kv0, z0, return_state, tol, names=None):
    """chunked_attention against the float64 reference, forward and backward (the same
    random cotangents, also through the returned state), every buffer NaN-poisoned."""
    got, want = kernel_vs_reference(K.chunked_attention, q, k, v, kv0, z0, normalize=normalize,
                                    eps=EPS, return_state=return_state)
    return check_run(got, want, tol, names, dtype=q.dtype)


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
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=7, device=DEV) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))


# T split into segments swept in parallel (FEATATTN_SEGMENT): boundaries inside and at the
# end of a chunk, a last segment shorter than the others, T shorter than one segment.
SEG_CASES = [
    (1, 2, 1, 200, 16, 24, torch.float32, True, True, True, "bhtd"),     # 4 segments, grouped
    (1, 2, 2, 130, 24, 16, torch.float16, False, True, True, "bthd"),    # fp16 plain, strided
    (2, 2, 2, 129, 20, 136, torch.float32, True, False, True, "bhtd"),   # Dv tiled, 1-token tail
    (1, 2, 1, 65, 130, 24, torch.float32, True, True, False, "bhtd"),    # Dk tiled
    (1, 1, 1, 1, 16, 16, torch.float32, True, True, True, "bhtd"),       # T = 1
]


@pytest.mark.parametrize("case", SEG_CASES, ids=[_case_id(c) for c in SEG_CASES])
def test_segments_match_float64(case, monkeypatch):
    """Segments of 64 tokens: forward, returned state and every gradient (initial state
    included) as the float64 reference, with every buffer (the segment sums too) poisoned."""
    monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    assert C.segments(B * H, T, torch.device(DEV)) == (triton.cdiv(T, 64), 64)
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T + Dv)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=9, device=DEV) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))


# The normalised forward's denominators as a tensor-core tile (chunked.DEN_IN_MMA, the
# default for key tiles <= 64 wide; the width limit lifted here), or as row reductions:
# fp16 here (bf16 on the GPU; fp32 keeps the reductions): one Dk tile, Dk tiled (partial
# denominators), Dv tiled, grouped heads, states in and out, segments.
DEN_CASES = [
    (1, 2, 2, 100, 32, 32, torch.float16, True, True, True, "bthd"),
    (1, 3, 1, 64, 8, 20, torch.float16, True, False, True, "bthd"),
    (1, 2, 1, 70, 130, 24, torch.float16, True, True, True, "bhtd"),     # Dk tiled
    (1, 2, 2, 50, 20, 136, torch.float16, True, True, True, "bhtd"),     # Dv tiled
    (1, 2, 1, 100, 32, 64, torch.float16, True, True, True, "bhtd"),     # den tile < value tile
    (1, 2, 1, 70, 130, 64, torch.float16, True, False, True, "bthd"),    # the same, Dk tiled
]


@pytest.mark.parametrize("seg,blocks", [("128", 2), ("192", 3), ("192", 2)])
@pytest.mark.parametrize("case", SEG_CASES[:3], ids=[_case_id(c) for c in SEG_CASES[:3]])
def test_segment_sums_in_blocks_match_float64(case, seg, blocks, monkeypatch):
    """chunked.SEG_SUM_BLOCKS: each segment's sums made by several programs (blocks of 64
    tokens and more) and added up; a block count that does not divide the segment falls
    back to the largest one that does (192 tokens: 3 blocks, or 1 where 2 was asked)."""
    monkeypatch.setenv("FEATATTN_SEGMENT", seg)
    monkeypatch.setattr(C, "SEG_SUM_BLOCKS", blocks)
    used = []
    real = C._seg_sum_blocks
    monkeypatch.setattr(C, "_seg_sum_blocks", lambda *a: used.append(real(*a)) or used[-1])
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    T = T + int(seg)  # at least two segments, the last one short
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T + Dk)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=2, device=DEV) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    want = blocks if int(seg) // 64 % blocks == 0 else 1
    assert used and set(used) == {want}, used


def _den_inputs(case, monkeypatch, segments, generator):
    """(q, k, v, kv0, z0, normalize, return_state, dtype) of a DEN_CASES case (bf16 on the
    GPU), with T split into ``segments``."""
    monkeypatch.setenv("FEATATTN_SEGMENT", segments)
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    if DEV == "cuda":
        dtype = torch.bfloat16
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T + Dk + generator)
    kv0, z0 = (rand_state(B, H, Dk, Dv, normalize, generator=generator, device=DEV) if init
               else (None, None))
    return q, k, v, kv0, z0, normalize, ret, dtype


@pytest.mark.parametrize("den", ["mma", "rows"])
@pytest.mark.parametrize("segments", ["off", "64"])
@pytest.mark.parametrize("case", DEN_CASES, ids=[_case_id(c) for c in DEN_CASES])
def test_denominators_on_the_tensor_cores_match_float64(case, segments, den, monkeypatch):
    """den: a tile as wide as the value tile (chunked.DEN_IN_MMA), or rows."""
    monkeypatch.setattr(C, "DEN_IN_MMA", den != "rows")
    monkeypatch.setattr(C, "DEN_IN_MMA_MAX_BK", 1024)
    q, k, v, kv0, z0, normalize, ret, dtype = _den_inputs(case, monkeypatch, segments, 7)
    seen = spy_launches(monkeypatch, C._fwd_kernel, "DEN_DOT")
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    assert seen and all(dot == (den != "rows") for dot in seen), seen


# chunked.FULL_TILES: the kernels with constant masks when every tile is full; the other
# shapes must keep their masks (odd T, a Dk / Dv tile with padding, packed sequences).
FULL_CASES = [
    ((1, 2, 2, 128, 32, 32, torch.float16, True, True, True, "bthd"), True),
    ((1, 3, 1, 192, 64, 32, torch.float32, False, True, False, "bhtd"), True),  # grouped
    ((1, 2, 2, 100, 32, 32, torch.float16, True, True, True, "bthd"), False),   # odd T
    ((1, 2, 1, 128, 24, 32, torch.float16, True, False, True, "bhtd"), False),  # Dk pads
    ((1, 2, 1, 128, 32, 40, torch.float16, True, False, True, "bhtd"), False),  # Dv pads
    ((1, 2, 1, 128, 256, 32, torch.float16, True, True, True, "bhtd"), True),   # Dk tiled
    ((1, 2, 2, 64, 32, 256, torch.float32, True, True, True, "bhtd"), True),    # Dv tiled
]


@pytest.mark.parametrize("segments", ["off", "64"])
@pytest.mark.parametrize("case,full", FULL_CASES, ids=[_case_id(c) for c, _ in FULL_CASES])
def test_full_tiles_match_float64(case, full, segments, monkeypatch):
    """Forward and backward, states in and out, T split or not."""
    monkeypatch.setattr(C, "FULL_TILES", True)
    q, k, v, kv0, z0, normalize, ret, dtype = _den_inputs(case, monkeypatch, segments, 3)
    seen = spy_launches(monkeypatch, C._fwd_kernel, "FULL")
    seen_bwd = spy_launches(monkeypatch, C._bwd_kernel, "FULL")
    seen_seg = spy_launches(monkeypatch, C._seg_kernel, "FULL")
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    assert seen and all(x == full for x in seen), seen
    assert seen_bwd and all(x == full for x in seen_bwd), seen_bwd
    split = segments == "64" and case[3] > 64
    assert bool(seen_seg) == split and all(x == full for x in seen_seg), seen_seg


@pytest.mark.parametrize("path", ["kernel", "pass"])
def test_full_tiles_with_a_map_match_float64(path, monkeypatch):
    """FULL_TILES with the elu map in the kernel (its features keep their row masks) and as
    a pass (the backward applies the slope as it stores, EPI_DPHI)."""
    import featattn

    monkeypatch.setattr(C, "FULL_TILES", True)
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
    seen = spy_launches(monkeypatch, C._fwd_kernel, "FULL")
    seen_bwd = spy_launches(monkeypatch, C._bwd_kernel, "FULL")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=g).to(DEV, dtype).requires_grad_()
               for _ in range(3))
    o = featattn.linear_attention(q, k, v, feature_map="elu", backend="triton", scale=0.5)
    do = torch.randn_like(o)
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro = featattn.linear_attention(*r, feature_map="elu", backend="reference", scale=0.5)
    want = [ro, *torch.autograd.grad(ro, r, do.double())]
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() < tolerance(dtype, "small")
    # (on the GPU the autotuner launches every config: each launch counts)
    assert set(seen) == {True} and set(seen_bwd) == {True}, (set(seen), set(seen_bwd))


@pytest.mark.parametrize("ksum", [True, False])
@pytest.mark.parametrize("delta_in_kernel", [True, False])
@pytest.mark.parametrize("segments", ["off", "64"])
@pytest.mark.parametrize("case", DEN_CASES, ids=[_case_id(c) for c in DEN_CASES])
def test_backward_switches_match_float64(case, segments, delta_in_kernel, ksum, monkeypatch):
    """chunked.BWD_KSUM_DOT (the default): the normalised backward's dq sweep sums z as
    k^T @ ones (initial state and earlier segments' sums included), or by row reductions.
    The same cases as the forward's denominators."""
    monkeypatch.setattr(C, "BWD_KSUM_DOT", ksum)
    monkeypatch.setattr(C, "DELTA_IN_KERNEL", delta_in_kernel)
    q, k, v, kv0, z0, normalize, ret, dtype = _den_inputs(case, monkeypatch, segments, 8)
    seen = spy_launches(monkeypatch, C._bwd_kernel, "KSUM_DOT")
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    assert seen and all(x == ksum for x in seen), seen


def test_denominators_on_the_tensor_cores_only_for_narrow_key_tiles(monkeypatch):
    # 128-wide key tiles keep the row reductions (measured slower with the tile)
    seen = spy_launches(monkeypatch, C._fwd_kernel, "BK", "DEN_DOT")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    for Dk in (32, 128):
        q, k, v = make_inputs(1, 1, 1, 40, Dk, 16, dtype, True, "bhtd", seed=Dk)
        C.chunked_attention(q, k, v, normalize=True, eps=1e-6)
    # (on the GPU the autotuner launches every config: each launch's tile decides)
    assert seen and all((bk <= C.DEN_IN_MMA_MAX_BK) == dot for bk, dot in seen), set(seen)
    assert {dot for _, dot in seen} == {True, False}, set(seen)


# The backward with narrower Dk tiles than the forward (chunked.BWD_MAX_BK): each Dk tile a
# program of its own, dv summed from fp32 partials.
BWD_TILE_CASES = [
    (2, 4, 2, 63, 40, 24, torch.float32, True, True, True, "bhtd"),     # grouped, 3 Dk tiles
    (1, 2, 2, 100, 48, 40, torch.float16, False, True, True, "bthd"),    # fp16 plain, strided
]


@pytest.mark.parametrize("segments", ["off", "64"])
@pytest.mark.parametrize("case", BWD_TILE_CASES, ids=[_case_id(c) for c in BWD_TILE_CASES])
def test_backward_with_narrower_dk_tiles_matches_float64(case, segments, monkeypatch):
    monkeypatch.setattr(C, "BWD_MAX_BK", 32 if DEV == "cuda" else 16)
    monkeypatch.setenv("FEATATTN_SEGMENT", segments)
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    if DEV == "cuda":
        dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T + Dk)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=7, device=DEV) if init else (None, None)
    tiles = {}
    for name in ("_fwd_kernel", "_bwd_kernel"):
        real = getattr(C, name).run

        def spy(*a, _real=real, _name=name, **kw):
            tiles[_name] = kw["BK"]
            return _real(*a, **kw)

        monkeypatch.setattr(getattr(C, name), "run", spy, raising=False)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    assert tiles["_bwd_kernel"] == C.BWD_MAX_BK < tiles["_fwd_kernel"], tiles


def test_segment_policy(monkeypatch):
    """Automatic: no split on CPU or when the grid fills the GPU; a bad switch value is
    explained."""
    assert C.segments(4, 4096, torch.device("cpu")) == (1, 4096)
    cuda = torch.device("cuda")  # (no GPU needed: the SM count is given)
    monkeypatch.setitem(C._SM_COUNT, cuda, 132)
    assert C.segments(16, 16384, cuda) == (16, 1024)        # B1 H16: up to 16 segments
    assert C.segments(64, 16384, cuda) == (5, 3328)         # half the SMs: ~2 programs each
    assert C.segments(16, 8192, cuda) == (1, 8192)          # too short to pay for the pass
    assert C.segments(300, 16384, cuda) == (1, 16384)       # the grid fills the GPU
    assert C.segments(128, 16384, cuda) == (2, 8192)         # full grids: two segments
    assert C.segments(128, 16384, cuda, full_grid=False) == (1, 16384)  # (the hybrid's)
    monkeypatch.setattr(C, "AUTO_SPLIT_FULL_GRID", 0)
    assert C.segments(128, 16384, cuda) == (1, 16384)       # full grids unsplit when 0
    monkeypatch.setattr(C, "AUTO_SPLIT_FULL_GRID", 4)
    assert C.segments(128, 16384, cuda) == (4, 4096)        # full grids: N segments
    assert C.segments(256, 16384, cuda) == (4, 4096)        # (the backward's two sweeps)
    assert C.segments(300, 16384, cuda) == (1, 16384)
    assert C.segments(128, 16384, cuda, full_grid=False) == (1, 16384)
    assert not C.splits_time(8, 16, 16384, 64, 64, torch.bfloat16, cuda)  # map: still a pass
    assert C.splits_time(1, 16, 16384, 64, 64, torch.bfloat16, cuda)
    monkeypatch.setenv("FEATATTN_SEGMENT", "off")
    assert C.segments(1, 1000, torch.device("cpu")) == (1, 1024)
    monkeypatch.setenv("FEATATTN_SEGMENT", "100")
    with pytest.raises(ValueError, match="multiple of 64"):
        C.segments(1, 1000, torch.device("cpu"))


def test_segment_sum_blocks_policy(monkeypatch):
    """SEG_SUM_PROGRAMS_PER_SM: the blocks a segment's sums are cut into aim at that many
    programs an SM, as a divisor of the segment's 64-token units; off (0) or on the CPU, one."""
    cuda = torch.device("cuda")  # (no GPU needed: the SM count is given)
    monkeypatch.setitem(C._SM_COUNT, cuda, 132)
    monkeypatch.setattr(C, "SEG_SUM_PROGRAMS_PER_SM", 0)
    assert C._seg_sum_blocks(128, 8192, cuda) == 1           # off
    monkeypatch.setattr(C, "SEG_SUM_PROGRAMS_PER_SM", 4)
    assert C._seg_sum_blocks(128, 8192, cuda) == 4           # B8 H16, two segments: 512
    assert C._seg_sum_blocks(16, 8192, cuda) == 32           # 528 // 16 = 33 -> 32 | 128
    assert C._seg_sum_blocks(128, 192, cuda) == 3            # 3 units: 3 divides them
    assert C._seg_sum_blocks(1024, 8192, cuda) == 1          # enough programs already
    assert C._seg_sum_blocks(128, 8192, torch.device("cpu")) == 1


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
    _, rkv, rz = reference(*rl, normalize=normalize, eps=EPS)
    rloss = rkv.pow(2).sum() + (rz.pow(2).sum() if normalize else 0)
    rgrads = torch.autograd.grad(rloss, rl, allow_unused=True)
    assert rgrads[0] is None  # q does not reach the state
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() == 0
    for name, a, b in zip(("dk", "dv"), grads[1:], rgrads[1:]):
        check_close(name, a, b, 1e-5)


def test_output_layout_follows_input_and_no_copy_of_strided_inputs():
    """A [B,T,H,D] caller gets o as a transposed view of a [B,T,H,Dv] buffer."""
    q, k, v = make_inputs(1, 2, 2, 33, 16, 24, torch.float32, False, layout="bthd")
    assert not q.is_contiguous()
    o, _, _ = K.chunked_attention(q, k, v, normalize=False, eps=EPS)
    assert o.shape == (1, 2, 33, 24) and o.transpose(1, 2).is_contiguous()
    ro, _, _ = reference(q, k, v, normalize=False, eps=EPS)
    check_close("o", o, ro, 1e-5)


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_gradients_follow_input_layout(layout):
    """With one writer per gradient element (single Dk / Dv tiles, no grouped heads) dq, dk,
    dv come back laid out as q, k, v: a [B,T,H,D] caller's transposes back are free (a
    layer's backward then copies none of them)."""
    q, k, v = make_inputs(2, 2, 2, 37, 16, 24, torch.float32, True, layout=layout, seed=11)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o, _, _ = K.chunked_attention(*leaves, normalize=True, eps=EPS)
    do = torch.randn_like(o)
    o.backward(do)
    rl = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, _, _ = reference(*rl, normalize=True, eps=EPS)
    ro.backward(do.double())
    for name, x, r in zip(("dq", "dk", "dv"), leaves, rl):
        assert x.grad.stride() == x.stride(), (name, x.grad.stride(), x.stride())
        check_close(name, x.grad, r.grad, 1e-4)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["delta-in-kernel", "delta-kernel"])
@pytest.mark.parametrize("case", [
    (1, 2, 2, 63, 24, 40, torch.float32, True, True, True, "bthd"),
    (2, 2, 2, 100, 16, 16, torch.float16, True, False, False, "bhtd"),
    (1, 4, 2, 70, 20, 24, torch.float32, True, True, True, "bhtd"),    # grouped: fp32 partials
], ids=_case_id)
def test_delta_in_kernel_or_not_match_float64(case, in_kernel, monkeypatch):
    """The normalised backward's delta = do . o, computed inside the backward kernel (one Dv
    tile, no segments) or by the delta kernel beforehand: both as the float64 reference."""
    monkeypatch.setattr(C, "DELTA_IN_KERNEL", in_kernel)
    B, H, Hkv, T, Dk, Dv, dtype, normalize, init, ret, layout = case
    calls = []
    real = _common.row_dot
    monkeypatch.setattr(C, "row_dot", lambda *a: calls.append(1) or real(*a))
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, seed=T)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=5, device=DEV) if init else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tolerance(dtype, "small"))
    assert bool(calls) != in_kernel


def test_input_errors_are_explained():
    q, k, v = make_inputs(1, 4, 4, 8, 16, 16, torch.float32, True)
    with pytest.raises(ValueError, match="divide"):
        K.chunked_attention(q, k[:, :3], v[:, :3], normalize=True, eps=EPS)
    with pytest.raises(ValueError, match="initial_z"):
        K.chunked_attention(q, k, v, normalize=False, eps=EPS, initial_z=torch.zeros(1, 4, 16, device=DEV))
    with pytest.raises(ValueError, match="initial_kv"):
        K.chunked_attention(q, k, v, normalize=True, eps=EPS, initial_kv=torch.zeros(1, 4, 16, 8, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        K.chunked_attention(q, k.half(), v, normalize=True, eps=EPS)
    with pytest.raises(ValueError, match="4-D"):
        K.chunked_attention(q[0], k[0], v[0], normalize=True, eps=EPS)


def test_kernel_limits():
    assert K.TRITON_AVAILABLE
    assert K.KERNEL_LIMITS["max_dk"] >= 1024 and K.KERNEL_LIMITS["max_dv"] >= 256


# --------------------------------------------------------------------------- GPU
def _gpu_check(B, H, Hkv, T, Dk, Dv, dtype, normalize, tol, init=False, ret=False, seed=0):
    q, k, v = make_inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, seed=seed)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=seed + 7, device=DEV) if init \
        else (None, None)
    run_checked(q, k, v, normalize, kv0, z0, ret, tol)


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
    _gpu_check(B, H, Hkv, T, Dk, Dv, dtype, normalize, tolerance(dtype, "chunked"), init, ret)


@cuda
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
def test_gpu_long_sequence_bf16(normalize):
    _gpu_check(1, 2, 2, 16384, 64, 64, torch.bfloat16, normalize,
               tolerance(torch.bfloat16, "chunked"), ret=True)


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
    _gpu_check(b, nh, nh, sq, dk, dv, torch.bfloat16, False, tolerance(torch.bfloat16, "chunked"))


# --------------------------------------------------------------------------- the harness itself
# featattn.testing must not pass silently: its poisoning is the switch the kernels read, and
# an element a kernel leaves unwritten fails its checks.
def test_poisoning_is_the_switch_the_kernels_read():
    assert testing.poisoned_outputs is _common.poisoned_outputs
    assert _common.POISON_OUTPUTS and testing.poisoning_enabled()  # the fixture's doing
    assert _common.alloc((3, 5), torch.float32, DEV).isnan().all()
    assert _common.empty_like_layout(torch.zeros(1, 2, 4, 3), 1, 2, 4, 6, torch.float16).isnan().all()
    with testing.poisoned_outputs(False):
        assert not _common.POISON_OUTPUTS and not testing.poisoning_enabled()
        with testing.poisoned_outputs():
            assert _common.alloc((2, 2), torch.float32, DEV).isnan().all()
        assert not _common.POISON_OUTPUTS
    assert _common.POISON_OUTPUTS


def test_kernel_vs_reference_poisons_the_kernel_run():
    seen = []

    def spy(*args, **kwargs):
        seen.append(testing.poisoning_enabled())
        return K.chunked_attention(*args, **kwargs)

    q, k, v = make_inputs(1, 1, 1, 8, 16, 16, torch.float32, True, seed=1)
    with testing.poisoned_outputs(False):
        got, want = kernel_vs_reference(spy, q, k, v, normalize=True, eps=EPS)
        assert seen == [True] and not testing.poisoning_enabled()
    check_run(got, want, tolerance(torch.float32))


@pytest.mark.parametrize("launch", ["_FWD", "_BWD"])
def test_unwritten_kernel_output_fails_the_check(launch, monkeypatch):
    """A kernel that forgets one head's outputs (forward) or gradients (backward) leaves
    NaN-poisoned elements, which the harness reports instead of passing."""
    monkeypatch.setattr(C, launch, DropLastProgram(getattr(C, launch)))
    q, k, v = make_inputs(1, 2, 2, 20, 16, 16, torch.float32, True, seed=2)
    got, want = kernel_vs_reference(K.chunked_attention, q, k, v, normalize=True, eps=EPS,
                                    return_state=True)
    unwritten = ("o", "kv", "z") if launch == "_FWD" else ("dq", "dk", "dv")
    for name in unwritten:
        assert getattr(got, name)[:, -1].isnan().all(), name
    with pytest.raises(AssertionError, match="non-finite"):
        check_run(got, want, 1.0)


def test_benchmark_check_path_runs_and_catches_unwritten_outputs(monkeypatch):
    """benchmarks/gpu_kernels.py's correctness table runs through the same harness (here on
    CPU, tiny): it passes a correct kernel, and its own poisoning (the fixture's is off here)
    makes it fail one that leaves a head unwritten."""
    bench = load_benchmark("gpu_kernels", monkeypatch)
    case = (1, 2, 1, 20, 16, 24, torch.float32, True, True, "bthd")
    with testing.poisoned_outputs(False):
        errs, failures = bench.check_one(*case)
        assert not failures and set(errs) == set(bench.COLUMNS)
        monkeypatch.setattr(C, "_FWD", DropLastProgram(C._FWD))
        _, failures = bench.check_one(*case)
    assert any("non-finite" in f for f in failures), failures


def test_benchmarks_name_the_configs_the_autotuner_chose(monkeypatch):
    """benchmarks/_timing.py's tuned_configs (gpu_ab.py --configs): each named autotuned
    launch with the config it chose per key, the key's values named."""
    timing = load_benchmark("_timing", monkeypatch)
    monkeypatch.setattr(C._FWD, "best", {})
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    q, k, v = make_inputs(1, 2, 2, 40, 16, 24, dtype, True, "bhtd", seed=5)
    C.chunked_attention(q, k, v, normalize=True, eps=1e-6)
    rows = timing.tuned_configs()["chunked_fwd"]
    assert len(rows) == 1 and "BT" in rows[0] and "/w" in rows[0] and "DK=16" in rows[0], rows


def test_check_close_rejects_unwritten_missing_and_misshapen():
    want = torch.randn(2, 3, 4, dtype=torch.float64)
    assert check_close("o", want.float(), want, 1e-6) < 1e-6
    partly = want.clone()
    partly[1, 2, 3] = float("nan")  # one element never written
    for bad, why in [(partly, "1 of 24 elements non-finite"),
                     (torch.full_like(want, float("nan")), "non-finite"),
                     (None, "got None"), (want[:, :2], "shape"), (want * 1.1, "above")]:
        with pytest.raises(AssertionError, match=why):
            check_close("o", bad, want, 1e-2)
    check_close("z", None, None, 1e-6)


def test_tolerance_table_covers_every_dtype():
    for kind in testing.TOLERANCES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert 0 < tolerance(dtype, kind) < 0.05
    with pytest.raises(KeyError, match="float64"):
        tolerance(torch.float64)


def test_reference_chunks_exactly():
    """The reference's chunked form (long T) equals its quadratic form."""
    q, k, v = make_inputs(1, 2, 1, 50, 8, 6, torch.float64, True, seed=4)
    kv0, z0 = rand_state(1, 2, 8, 6, True, generator=5, device=DEV)
    whole = reference(q, k, v, initial_kv=kv0, initial_z=z0)
    parts = reference(q, k, v, initial_kv=kv0, initial_z=z0, chunk=16)
    for name, a, b in zip(("o", "kv", "z"), parts, whole):
        check_close(name, a, b, 1e-12)


def test_harness_imports_without_triton():
    """featattn.testing imports triton only for the poisoning, so it works where triton
    does not (and a benchmark's check path imports on any machine)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now fails
        "import featattn.testing as T\n"
        "assert 'featattn.kernels._common' not in sys.modules\n"
        "q, k, v = T.rand_qkv(1, 2, 1, 5, 3, 4, generator=0, layout='bthd', requires_grad=True)\n"
        "ref = T.run_and_grads(T.reference, q, k, v, normalize=True, eps=1e-6, dtype=q.dtype)\n"
        "T.check_run(ref, ref, 1e-12)\n"
        "try:\n    T.poisoned_outputs\nexcept ImportError:\n    print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_key_shifted_calls_split_full_grids_only_when_asked(monkeypatch):
    """chunked.SPLIT_KEY_SHIFTED: the hybrid's key-shifted sweeps keep full grids whole
    unless it is on (pure linear calls split them either way)."""
    cuda = torch.device("cuda")  # (no GPU needed: the SM count is given)
    monkeypatch.setitem(C._SM_COUNT, cuda, 132)
    monkeypatch.setenv("FEATATTN_SEGMENT", "auto")
    assert C._split(128, 16384, cuda, 0, False, False, 1)[0] == C.AUTO_SPLIT_FULL_GRID > 1
    assert C._split(128, 16384, cuda, 64, False, False, 1)[0] == 1
    monkeypatch.setattr(C, "SPLIT_KEY_SHIFTED", True)
    assert C._split(128, 16384, cuda, 64, False, False, 1)[0] == C.AUTO_SPLIT_FULL_GRID
    assert C._split(128, 16384, cuda, 64, True, False, 1)[0] == 1  # packed: never
    assert C._split(128, 16384, cuda, 0, False, True, 2)[0] == 1  # map in kernel, Dk tiled
