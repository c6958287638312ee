"""Elementwise feature maps fused into the chunked Triton kernels (FeatureMap.triton_elementwise).

Every fused map, and a map a user registers with a Triton form, against the float64 reference
applying the map's PyTorch form: forward, state, and the gradients of raw q, k, v and of the
initial state.  Under the interpreter in fp32/fp16 (small shapes); ``cuda`` cases in bf16.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import featattn  # noqa: E402
from featattn import kernels as K  # noqa: E402
from featattn.kernels import maps as M  # noqa: E402
from helpers import (  # noqa: E402
    check_run, rand_qkv, rand_state, reference, run_and_grads, spy_launches, tolerance,
    compare_runs,
)
from user_maps import Softplus, SoftplusXSlope, softplus_dphi, softplus_dphi_y, softplus_phi  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")
BUILTIN = ("elu", "relu", "identity", "squared_relu")


@triton.jit
def _wrong_dphi(x, y):
    return tl.where(x > 15.0, 1.0, 0.5)


@triton.jit
def _wrong_dphi_y(y):
    return y * 0.0 + 0.5


class WrongSoftplus(Softplus):
    """The same map with a wrong derivative in its Triton form: the checks must catch it."""

    def triton_elementwise(self):
        return featattn.ElementwiseTritonForm(softplus_phi, _wrong_dphi, softplus_dphi_y)


class WrongSoftplusY(Softplus):
    """A right dphi(x, y) and a wrong dphi_from_y (what the pass's backward kernel uses)."""

    def triton_elementwise(self):
        return featattn.ElementwiseTritonForm(softplus_phi, softplus_dphi, _wrong_dphi_y)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    featattn.register_feature_map("test_softplus", override=True)(Softplus)
    featattn.register_feature_map("test_softplus_x_slope", override=True)(SoftplusXSlope)
    featattn.register_feature_map("test_wrong_softplus", override=True)(WrongSoftplus)
    featattn.register_feature_map("test_wrong_softplus_y", override=True)(WrongSoftplusY)
    yield


def _fused(q, k, v, *, fm, scale, **kw):
    return K.chunked_attention(q, k, v, feature_map=featattn.get_feature_map(fm), scale=scale,
                               **kw)


def _via_op(q, k, v, *, fm, scale, initial_kv, initial_z, return_state, **kw):
    """featattn.linear_attention with the map's name (the caller picks the map's path)."""
    state = None if initial_kv is None else featattn.LinearAttentionState(initial_kv, initial_z)
    o, st = featattn.linear_attention(q, k, v, feature_map=fm, scale=scale, backend="triton",
                                      initial_state=state, return_state=True, **kw)
    return o, st.kv, st.z


def _check(fm, B, H, Hkv, T, D, Dv, dtype, normalize, state, layout, scale, fn=_fused):
    q, k, v = rand_qkv(B, H, Hkv, T, D, Dv, dtype, DEV, generator=T + D, layout=layout,
                       positive=(fm == "identity" and normalize))
    kv0 = z0 = None
    if state:
        kv0, z0 = rand_state(B, H, D, Dv, normalize, device=DEV)
    kw = dict(normalize=normalize, eps=1e-6, return_state=True)
    got = run_and_grads(functools.partial(fn, fm=fm, scale=scale), q, k, v, kv0, z0, **kw)
    want = run_and_grads(reference, q, k, v, kv0, z0, dtype=torch.float64, feature_map=fm,
                         scale=scale, **kw)
    return got, want


# (B, H, Hkv, T, D, Dv, dtype, normalize, initial state, layout, scale)
CASES = [
    (2, 4, 2, 63, 16, 24, torch.float32, True, False, "bhtd", 0.5),    # grouped, Dk != Dv
    (1, 2, 2, 100, 24, 16, torch.float16, True, True, "bthd", 1.0),    # fp16, strided, state
    (1, 2, 1, 37, 40, 40, torch.float32, False, True, "bthd", 1.3),    # plain, grouped
    (1, 1, 1, 1, 16, 16, torch.float32, False, True, "bhtd", 1.0),     # T = 1
    (1, 2, 2, 50, 136, 24, torch.float32, True, False, "bhtd", 1.0),   # Dk split in 2 tiles
]


def _case_id(c):
    B, H, Hkv, T, D, Dv, dt, norm, st, lay, s = c
    return (f"B{B}-H{H}-Hkv{Hkv}-T{T}-D{D}-Dv{Dv}-{str(dt)[6:]}-{'norm' if norm else 'plain'}"
            f"{'-state' if st else ''}-{lay}-s{s}")


@pytest.mark.parametrize("path", ["kernel", "pass"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("fm", BUILTIN + ("test_softplus",))
def test_fused_map_matches_float64(fm, case, path, monkeypatch):
    """In the kernel (chunked_attention(feature_map=...)) and as a pass before it
    (linear_attention with FEATATTN_FUSE_MAPS=pass, the default for large calls; the slope
    then applied by the backward kernel from the features): forward, state, every gradient."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
    got, want = _check(fm, *case, fn=_fused if path == "kernel" else _via_op)
    check_run(got, want, tolerance(case[6], "small") * 3, dtype=case[6])


# The map in the kernel with the denominators on the tensor cores (chunked.DEN_IN_MMA, the
# default for these narrow tiles) or as row reductions (wider key tiles; fp16 here, bf16 on
# the GPU): full Dk tiles (no column masks, EVEN_K), padded ones, Dk
# split in two tiles (partial denominators), grouped heads, a state, 64-token segments (not
# for the Dk-split case, which never splits T with the map inside: chunked._split).
DEN_FUSED_CASES = [
    (2, 4, 2, 63, 16, 24, torch.float16, True, True, "bhtd", 0.5),     # full Dk tile
    (1, 2, 2, 100, 24, 16, torch.float16, True, False, "bthd", 1.0),   # padded Dk tile
    (1, 2, 1, 130, 136, 24, torch.float16, True, True, "bhtd", 1.0),   # Dk split, grouped
]


@pytest.mark.parametrize("segments", ["off", "64"])
@pytest.mark.parametrize("in_mma,ksum", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("case", DEN_FUSED_CASES, ids=_case_id)
@pytest.mark.parametrize("fm", ("elu", "test_softplus"))
def test_fused_map_with_denominators_on_the_tensor_cores(fm, case, in_mma, ksum, segments,
                                                         monkeypatch):
    """in_mma: the forward's denominators on the tensor cores (chunked.DEN_IN_MMA) or by row
    reductions (as for key tiles wider than DEN_IN_MMA_MAX_BK); ksum: the backward's z on
    the tensor cores too (chunked.BWD_KSUM_DOT, the default) or by row reductions."""
    from featattn.kernels import chunked as C

    monkeypatch.setattr(C, "BWD_KSUM_DOT", ksum)
    monkeypatch.setattr(C, "DEN_IN_MMA", in_mma)
    monkeypatch.setattr(C, "DEN_IN_MMA_MAX_BK", 1024)
    monkeypatch.setenv("FEATATTN_SEGMENT", segments)
    if DEV == "cuda":
        case = case[:6] + (torch.bfloat16,) + case[7:]
    seen = spy_launches(monkeypatch, C._fwd_kernel, "FUSED", "DEN_DOT", "EVEN_K")
    seen_bwd = spy_launches(monkeypatch, C._bwd_kernel, "KSUM_DOT")
    got, want = _check(fm, *case, fn=_fused)
    check_run(got, want, tolerance(case[6], "small") * 3, dtype=case[6])
    even = case[4] % C._tiles(case[4], case[5], case[6])[0] == 0
    assert seen and all(f and d == in_mma and e == even for f, d, e in seen), seen
    assert seen_bwd and all(x == ksum for x in seen_bwd), seen_bwd


@pytest.mark.parametrize("ksum", [True, False])
def test_both_map_paths_backward_follow_bwd_ksum_dot(ksum, monkeypatch):
    """BWD_KSUM_DOT: the map-pass path's backward (the slope applied as dq / dk are stored,
    EPI_DPHI) and the map in the kernel both sum z on the tensor cores, or both by rows."""
    from featattn.kernels import chunked as C

    monkeypatch.setattr(C, "BWD_KSUM_DOT", ksum)
    seen = spy_launches(monkeypatch, C._bwd_kernel, "EPI_DPHI", "FUSED", "KSUM_DOT")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    for path in ("pass", "kernel"):
        monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
        g = torch.Generator().manual_seed(len(path))
        q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEV, dtype).requires_grad_()
                   for _ in range(3))
        o = featattn.linear_attention(q, k, v, feature_map="elu", backend="triton")
        do = torch.randn_like(o)
        got = torch.autograd.grad(o, (q, k, v), do)
        r = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ro = featattn.linear_attention(*r, feature_map="elu", backend="reference")
        for a, b in zip(got, torch.autograd.grad(ro, r, do.double())):
            assert ((a.double() - b).norm() / b.norm()).item() < tolerance(dtype, "small"), path
    assert set(seen) == {(True, False, ksum), (False, True, ksum)}, set(seen)



SEG_CASES = [
    (1, 2, 1, 150, 16, 24, torch.float32, True, True, "bhtd", 0.5),    # 3 segments, grouped
    CASES[1],                                                          # fp16, strided, 2 segments
]


@pytest.mark.parametrize("case", SEG_CASES, ids=_case_id)
def test_fused_map_in_segments_matches_float64(case, monkeypatch):
    """The map in the kernel with T split into 64-token segments: the segment sums apply it
    too (to k forward, to the scaled q backward)."""
    monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    got, want = _check("elu", *case, fn=_fused)
    check_run(got, want, tolerance(case[6], "small") * 3, dtype=case[6])


def test_map_runs_in_the_kernel_on_small_calls_or_split_t(monkeypatch):
    """FEATATTN_FUSE_MAPS=auto: the kernel for calls of at most FUSE_MAX_ROWS rows, without a
    backward, or when the chunked kernel splits T into segments, else the pass; the switch
    forces either."""
    from featattn import dispatch

    q = torch.randn(1, 2, 200, 16, device=DEV, requires_grad=True)
    path = lambda: featattn.select_kernel(q, q, q, feature_map="elu", backend="triton").map_path  # noqa: E731
    monkeypatch.setenv("FEATATTN_SEGMENT", "off")
    assert path() == "kernel"  # 400 rows
    monkeypatch.setattr(dispatch, "FUSE_MAX_ROWS", 399)
    assert path() == "triton_pass"
    with torch.no_grad():  # no backward: the kernel at any size
        assert path() == "kernel"
    x = q.detach()
    assert featattn.select_kernel(x, x, x, feature_map="elu", backend="triton").map_path == "kernel"
    assert featattn.select_kernel(x, x, x, feature_map="elu", backend="triton",
                                  window=8).map_path == "triton_pass"  # hybrid: as before
    monkeypatch.setattr(dispatch, "FUSE_MAX_ROWS", 400)
    assert path() == "kernel"  # the bound is inclusive
    monkeypatch.setattr(dispatch, "FUSE_MAX_ROWS", 0)
    monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    assert path() == "kernel"  # T split
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
    assert path() == "triton_pass"
    monkeypatch.setenv("FEATATTN_SEGMENT", "off")
    monkeypatch.setattr(dispatch, "FUSE_MAX_ROWS", 1 << 20)
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "kernel")
    assert path() == "kernel"


@pytest.mark.parametrize("fm,path", [("test_wrong_softplus", "kernel"),
                                     ("test_wrong_softplus_y", "pass")])
def test_fused_map_with_wrong_triton_form_is_caught(fm, path, monkeypatch):
    """A Triton form whose derivative disagrees with the PyTorch map fails the same check:
    dphi in the kernel, dphi_from_y after the pass."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
    got, want = _check(fm, *CASES[0], fn=_fused if path == "kernel" else _via_op)
    errs, failures = compare_runs(got, want, tolerance(torch.float32, "small") * 3)
    assert any(f.startswith("dq") for f in failures), errs
    assert any(f.startswith("dk") for f in failures), errs
    assert errs["o"] < 1e-5  # the forward form is right


@pytest.mark.parametrize("mode,path", [(None, "kernel"), ("pass", "triton_pass")])
@pytest.mark.parametrize("fm", BUILTIN + ("test_softplus", "test_softplus_x_slope"))
def test_linear_attention_fuses_the_map(fm, mode, path, monkeypatch):
    """Through featattn.linear_attention, both Triton paths (inside the kernel, the default at
    this size; one elementwise pass before the kernel with FEATATTN_FUSE_MAPS=pass): the map's PyTorch
    forward never runs and the result matches the float64 reference, for a strided
    [B, T, H, D] view too."""
    if mode:
        monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    q, k, v = rand_qkv(1, 2, 2, 45, 16, 16, torch.float32, DEV, generator=3, layout="bthd",
                       positive=fm == "identity")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    choice = featattn.select_kernel(q, k, v, feature_map=fm, backend="triton")
    if fm == "identity" and mode is None:
        path = "identity"  # nothing to compute: the call on features (test below)
    assert choice.name == "chunked" and choice.map_path == path and choice.map_fused, choice
    cls = type(featattn.get_feature_map(fm))

    def boom(self, x):
        raise AssertionError("the PyTorch form ran on the fused path")

    with monkeypatch.context() as m:
        m.setattr(cls, "forward", boom)
        o = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton", scale=0.7)
    o.sum().backward()
    r = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ro = featattn.linear_attention(*r, feature_map=fm, backend="reference", scale=0.7)
    ro.sum().backward()
    for a, b in ((o, ro), (q.grad, r[0].grad), (k.grad, r[1].grad), (v.grad, r[2].grad)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
@pytest.mark.parametrize("mode", [None, "kernel"])
def test_identity_map_runs_the_features_kernel(mode, normalize, monkeypatch):
    """FEATATTN_FUSE_MAPS=auto: the identity map is no map at all (map_path "identity"): the
    chunked kernel gets q, k as given (no pass, FUSED off; a scale folds into eps when
    normalised), and matches the float64 reference for grouped heads and a scale != 1;
    FEATATTN_FUSE_MAPS=kernel still runs the identity's Triton form in the kernel."""
    from featattn.kernels import chunked as C

    if mode:
        monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    seen = spy_launches(monkeypatch, C._fwd_kernel, "FUSED")
    passes = [spy_launches(monkeypatch, M._map_fwd_kernel, "PHI"),
              spy_launches(monkeypatch, M._map_rows_kernel, "PHI")]
    q, k, v = rand_qkv(1, 4, 2, 45, 16, 24, torch.float32, DEV, generator=5, positive=normalize)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kw = dict(feature_map="identity", normalize=normalize, scale=0.6, eps=0.5)
    choice = featattn.select_kernel(q, k, v, feature_map="identity", backend="triton")
    assert choice.map_path == ("kernel" if mode else "identity") and choice.map_fused, choice
    o = featattn.linear_attention(q, k, v, backend="triton", **kw)
    o.sum().backward()
    assert seen and all(f == bool(mode) for f in seen) and not any(passes), (seen, passes)
    r = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ro = featattn.linear_attention(*r, backend="reference", **kw)
    ro.sum().backward()
    for a, b in ((o, ro), (q.grad, r[0].grad), (k.grad, r[1].grad), (v.grad, r[2].grad)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("fm,own_backward", [("elu", False), ("squared_relu", False),
                                              ("test_softplus", False),
                                              ("test_softplus_x_slope", True)])
def test_map_pass_backward_runs_only_without_dphi_from_y(fm, own_backward, monkeypatch):
    """On the pass path the map's backward pass (maps._map_bwd_kernel / the strided rows
    pass) runs only for maps without dphi_from_y: the others' slope is applied by the
    chunked backward kernel, with the same gradients."""
    from featattn.kernels import _common

    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
    monkeypatch.setattr(_common, "EAGER_CUSTOM_OP", False)  # (that switch keeps the pass apart)
    launches = []
    for kernel in (M._map_bwd_kernel, M._map_rows_kernel):
        real = kernel.run

        def spy(*a, _real=real, **kw):
            if kw.get("BWD", True):  # the rows kernel runs both ways; BWD marks the backward
                launches.append(kw)
            return _real(*a, **kw)

        monkeypatch.setattr(kernel, "run", spy, raising=False)
    q, k, v = rand_qkv(1, 2, 2, 45, 16, 16, torch.float32, DEV, generator=5)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton", scale=0.7)
    assert not launches  # the forward's pass is not a backward
    o.sum().backward()
    assert bool(launches) == own_backward, launches
    r = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    featattn.linear_attention(*r, feature_map=fm, backend="reference", scale=0.7).sum().backward()
    for a, b in ((q.grad, r[0].grad), (k.grad, r[1].grad), (v.grad, r[2].grad)):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-5


def test_select_kernel_says_why_a_map_is_not_fused():
    q = k = v = torch.randn(1, 2, 8, 16, device=DEV)
    dpfp = featattn.select_kernel(q, k, v, feature_map="dpfp", backend="triton")
    assert not dpfp.map_fused and any("no elementwise Triton form" in r for r in dpfp.reasons)
    assert not featattn.select_kernel(q, k, v, backend="triton").map_fused  # no map at all
    assert featattn.select_kernel(q, k, v, feature_map="elu", backend="triton").map_fused
    # the PyTorch path never "fuses"
    assert not featattn.select_kernel(q, k, v, feature_map="elu", backend="torch").map_fused


@triton.jit
def _sq_phi(x):
    return x * x + 1.0


@triton.jit
def _sq_dphi(x, y):
    return 2.0 * x


@triton.jit
def _exp_phi(x):
    return tl.exp(x)


@triton.jit
def _exp_dphi(x, y):
    return y


def _map_class(phi, dphi, torch_fn):
    """One FeatureMap class per call: every class it makes has the same qualname."""

    class ElementwiseMap(featattn.FeatureMap):
        def output_dim(self, d):
            return d

        def forward(self, x):
            return torch_fn(x)

        def triton_elementwise(self):
            return featattn.ElementwiseTritonForm(phi, dphi)

    return ElementwiseMap


@pytest.mark.parametrize("path", ["kernel", "pass"])
def test_maps_of_one_class_name_keep_their_own_forms(path, monkeypatch):
    """Two map classes from one factory share module and qualname; a forward of the second
    between the first's forward and backward must not give the first the second's form."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
    Sq = _map_class(_sq_phi, _sq_dphi, lambda x: x * x + 1.0)
    Exp = _map_class(_exp_phi, _exp_dphi, torch.exp)
    q, k, v = rand_qkv(1, 2, 2, 9, 16, 8, torch.float32, DEV, generator=3)
    q, k, v = q * 0.5, k * 0.5, v
    qa = q.detach().requires_grad_()
    o = featattn.linear_attention(qa, k, v, feature_map=Sq(), backend="triton")
    featattn.linear_attention(q, k, v, feature_map=Exp(), backend="triton")  # another layer
    o.sum().backward()
    qr = q.detach().double().requires_grad_()
    o_ref = featattn.linear_attention(qr, k.double(), v.double(), feature_map=Sq(),
                                      backend="reference")
    o_ref.sum().backward()
    assert ((o.double() - o_ref).norm() / o_ref.norm()).item() < 1e-5
    assert ((qa.grad.double() - qr.grad).norm() / qr.grad.norm()).item() < 1e-5


class _ShiftedElu(featattn.feature_maps.EluFeatureMap):
    """Redefines the PyTorch form below the class that declares the Triton form."""

    def forward(self, x):
        return super().forward(x) + 1.0


class _ShiftedHedgehog(featattn.feature_maps.HedgehogFeatureMap):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_a_subclass_that_redefines_the_map_is_not_fused(monkeypatch):
    """A subclass of a fused map that changes forward must not run its parent's Triton form
    (elementwise or projection): select_kernel says why, and the result is the subclass's."""
    q, k, v = rand_qkv(1, 2, 2, 9, 16, 8, torch.float32, DEV, generator=5)
    for fm in (_ShiftedElu(), _ShiftedHedgehog(16, heads=2)):
        choice = featattn.select_kernel(q, k, v, feature_map=fm, backend="triton")
        assert not choice.map_fused
        assert any("redefines forward" in r for r in choice.reasons), choice.reasons
        o = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton")
        fm64 = copy.deepcopy(fm).double()
        o_ref = featattn.linear_attention(q.double(), k.double(), v.double(), feature_map=fm64,
                                          backend="reference")
        assert ((o.double() - o_ref).norm() / o_ref.norm()).item() < 1e-5
    assert M.fused_key(_ShiftedElu()) is None
    with pytest.raises(ValueError, match="redefines forward"):
        K.chunked_attention(q, k, v, normalize=True, eps=1e-6, feature_map=_ShiftedElu())
    # a decode step takes the map's PyTorch form too
    step = featattn.select_kernel(q[:, :, :1], k[:, :, :1], v[:, :, :1], feature_map=_ShiftedElu(),
                                  backend="triton",
                                  initial_state=featattn.LinearAttentionState(
                                      torch.zeros(1, 2, 16, 8, device=DEV),
                                      torch.zeros(1, 2, 16, device=DEV)))
    assert not step.map_fused


def test_chunked_attention_rejects_unfusable_maps():
    q = k = v = torch.randn(1, 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="no elementwise Triton form"):
        K.chunked_attention(q, k, v, normalize=True, eps=1e-6,
                            feature_map=featattn.get_feature_map("taylor"))
    with pytest.raises(ValueError, match="only applied with a fused feature_map"):
        K.chunked_attention(q, k, v, normalize=True, eps=1e-6, scale=2.0)


@pytest.mark.parametrize("mode", ["pass", "kernel"])
def test_fused_map_double_backward_matches_torch_path(mode, monkeypatch):
    """create_graph=True through a fused map: the backward recomputes with the map in PyTorch."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float32, device=DEV, requires_grad=True)
               for _ in range(3))

    def penalty(backend):
        o = featattn.linear_attention(q, k, v, feature_map="elu", backend=backend, scale=0.8)
        g = torch.autograd.grad((o * o).sum(), (q, k), create_graph=True)
        return torch.autograd.grad(sum((x * x).sum() for x in g), (q, k, v))

    for a, b in zip(penalty("triton"), penalty("torch")):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_map_pass_is_one_triton_pass_each_way():
    """featattn.kernels.maps.apply_map: the Triton form forward and backward against the map's
    PyTorch form in float64, on a transposed (dense) view, on sliced (non-dense) ones (read
    in place) and on the q/k slices of a fused qkv projection; the output keeps a dense
    input's layout and is dense otherwise."""
    base = torch.randn(2, 37, 3, 16, device=DEV)
    one = torch.randn(1, 37, 1, 16, device=DEV)  # size-1 dims: strides there are arbitrary
    qkv = torch.randn(2, 37, 5 * 12, device=DEV)  # [B, T, (Hq + Hk + Hv) * D], D = 12
    for x in (base.transpose(1, 2), base.transpose(1, 2)[:, :, 5:], one.transpose(1, 2),
              one.expand(1, 37, 1, 16).transpose(1, 2)[:, :, ::2],
              qkv[..., :36].unflatten(-1, (3, 12)).transpose(1, 2),
              qkv[..., 36:48].unflatten(-1, (1, 12)).transpose(1, 2)):
        for fm in BUILTIN + ("test_softplus",):
            m = featattn.get_feature_map(fm)
            xi = x.detach().requires_grad_()
            y = M.apply_map(xi, M.fused_key(m), 0.6)
            g = torch.randn_like(y)
            (dx,) = torch.autograd.grad(y, xi, g)
            x64 = x.detach().double().requires_grad_()
            want = m(x64 * 0.6)
            (dwant,) = torch.autograd.grad(want, x64, g.double())
            torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(dx.double(), dwant, rtol=1e-5, atol=1e-6)
            if M._is_dense(x):
                assert M._same_layout(y, x)
            else:
                assert M._is_dense(y) and M._is_dense(dx)


@pytest.mark.parametrize("grad", ["expanded", "transposed", "dense"])
def test_map_pass_on_a_slice_takes_any_gradient_layout(grad):
    """apply_map on a fused-qkv slice (unit last stride, not dense: the rows pass) with an
    expanded (all strides 0) or transposed upstream gradient, against the torch map."""
    fm = featattn.get_feature_map("elu")
    base = torch.randn(1, 5, 2, 24, device=DEV)
    b1, b2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    y = M.apply_map(b1[..., :8].transpose(1, 2), M.fused_key(fm))
    y_ref = fm(b2[..., :8].transpose(1, 2))
    w = torch.randn(1, 2, 8, 5, device=DEV)
    for out in (y, y_ref):
        if grad == "expanded":
            out.sum().backward()
        elif grad == "transposed":
            (out.transpose(-1, -2) * w).sum().backward()
        else:
            (out * w.transpose(-1, -2).contiguous()).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-6)


def test_fuse_maps_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "yes")
    q = k = v = torch.randn(1, 1, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="FEATATTN_FUSE_MAPS must be"):
        featattn.select_kernel(q, k, v, feature_map="elu", backend="triton")


def test_squared_relu_map_is_registered_and_exact():
    x = torch.randn(3, 5, dtype=torch.float64)
    assert "squared_relu" in featattn.list_feature_maps()
    torch.testing.assert_close(featattn.get_feature_map("squared_relu")(x), torch.relu(x) ** 2)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["kernel", "pass"])
@pytest.mark.parametrize("fm", BUILTIN)
@pytest.mark.parametrize("T", [1, 1000, 4099])
def test_gpu_fused_map_bf16(fm, T, path):
    got, want = _check(fm, 2, 4, 2, T, 64, 64, torch.bfloat16, T > 1, True, "bthd", 1.0,
                       fn=_fused if path == "kernel" else _via_op)
    check_run(got, want, tolerance(torch.bfloat16, "chunked"), dtype=torch.bfloat16)


@pytest.mark.parametrize("B,H", [(1, 1), (1, 4), (3, 2)])
def test_layer_with_map_in_triton_matches_torch_path(B, H):
    """FeatureAttention (strided [B, T, H, D] views, size-1 dims) through the Triton map pass
    equals the same layer on the PyTorch path, outputs and parameter gradients."""
    torch.manual_seed(B * 10 + H)
    layer = featattn.FeatureAttention(8 * H, H, "elu", backend="triton").to(DEV)
    x = torch.randn(B, 29, 8 * H, device=DEV)
    y = layer(x)
    y.square().sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.backend = "torch"
    y2 = layer(x)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    for a, p in zip(got, layer.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["pass", "kernel"])
@pytest.mark.parametrize("fm", BUILTIN)
def test_a_nan_input_gives_a_nan_output(fm, mode, monkeypatch):
    """tl.maximum / tl.minimum drop NaN operands by default: the Triton forms must not turn a
    NaN query or key into a finite feature (the PyTorch maps give NaN)."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEV) for _ in range(3))
    q[0, 0, 3, 0] = float("nan")
    o = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton")
    assert o[0, 0, 3].isnan().any() and not o[0, 0, :3].isnan().any()
    k[0, 0, 2, 1] = float("nan")
    _, s = featattn.linear_attention(q.nan_to_num(), k, v, feature_map=fm, backend="triton",
                                     return_state=True)
    assert s.kv.isnan().any()


@pytest.mark.parametrize("mode", ["pass", "kernel"])
@pytest.mark.parametrize("fm", BUILTIN)
def test_extreme_inputs_match_the_pytorch_map(fm, mode, monkeypatch):
    """Inputs far out on both sides (exp overflows in the branch elu does not take, and
    underflows below the smallest normal number in the one it takes): the same output and
    gradients as the PyTorch map, nothing inf or NaN."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEV) for _ in range(3))
    q[0, 0, :, 0] = torch.tensor([100.0, -100.0, 90.0, -95.0] * 10)
    k[0, 1, :, 3] = torch.tensor([-100.0, 100.0, -1e4, 80.0, 0.0] * 8)
    outs = []
    for backend in ("triton", "torch"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o = featattn.linear_attention(qq, kk, vv, feature_map=fm, backend=backend,
                                      normalize=False)
        o.sum().backward()
        outs.append([o, qq.grad, kk.grad, vv.grad])
    for a, b in zip(*outs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_map_in_the_kernel_with_dk_in_tiles_sweeps_t_whole(monkeypatch):
    """The map in the kernel with Dk in several tiles is never split into segments (it
    failed on the GPU split: chunked._split), and splits_time says so; on features such
    shapes still split."""
    from featattn.kernels import chunked as C

    monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    seg = spy_launches(monkeypatch, C._seg_kernel, "FUSED")
    fwd = spy_launches(monkeypatch, C._fwd_kernel, "FUSED")
    bk = C._tiles(136, 24, dtype)[0]
    assert bk < 136
    for path in ("kernel", "pass"):
        monkeypatch.setenv("FEATATTN_FUSE_MAPS", path)
        q, k, v = (torch.randn(1, 2, 130, d, device=DEV, dtype=dtype, requires_grad=True)
                   for d in (136, 136, 24))
        featattn.linear_attention(q, k, v, feature_map="elu", backend="triton").sum().backward()
    assert set(fwd) == {True, False}, set(fwd)
    assert seg and set(seg) == {False}, set(seg)  # only the pass's features call split
    cuda = torch.device("cuda")  # (no GPU needed: the SM count is given)
    monkeypatch.setitem(C._SM_COUNT, cuda, 132)
    monkeypatch.setenv("FEATATTN_SEGMENT", "auto")
    assert C.splits_time(1, 2, 1 << 14, 64, 24, dtype, cuda)
    assert not C.splits_time(1, 2, 1 << 14, 136, 24, dtype, cuda)
    assert C.splits_only_as_pass(1, 2, 1 << 14, 136, 24, dtype, cuda)
    assert not C.splits_only_as_pass(1, 2, 1 << 14, 64, 24, dtype, cuda)
    assert not C.splits_only_as_pass(1, 2, 1 << 12, 136, 24, dtype, cuda)  # no split at all
    # the dispatcher keeps such a map as a pass, even without a backward
    monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "auto")
    x = torch.randn(1, 2, 130, 136, device=DEV)
    assert featattn.select_kernel(x, x, x[..., :24], feature_map="elu",
                                  backend="triton").map_path == "triton_pass"
    x = x[..., :64]
    assert featattn.select_kernel(x, x, x[..., :24], feature_map="elu",
                                  backend="triton").map_path == "kernel"
