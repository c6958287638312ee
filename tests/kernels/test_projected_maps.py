"""Learned projection maps (Hedgehog, T2R) computed inside the chunked Triton kernels
(FeatureMap.triton_projection, featattn/kernels/projected.py).

Each case runs ``linear_attention(..., feature_map=<map>, backend="triton")`` and the float64
reference on the map's PyTorch form (a float64 copy of the map), same inputs and upstream
gradients, and compares the output, the returned state and the gradients of q, k, v, the
initial state and every map parameter.  Under the interpreter in fp32/fp16 (small shapes);
the ``cuda`` cases in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import featattn  # noqa: E402
from featattn.feature_maps import HedgehogFeatureMap  # noqa: E402
from featattn.feature_maps.t2r import T2RFeatureMap  # noqa: E402
from featattn.kernels import projected_attention  # noqa: E402
from featattn.dispatch import PROJECTION_KERNEL_MAX_ROWS  # noqa: E402
from helpers import rel_err, tolerance  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


class NoBiasHedgehog(featattn.FeatureMap):
    """A user's map: Hedgehog's softmax pair without biases, one weight per head."""

    def __init__(self, d, heads, f):
        super().__init__()
        self.q_weight = torch.nn.Parameter(torch.randn(heads, d, f) / d ** 0.5)
        self.k_weight = torch.nn.Parameter(torch.randn(heads, d, f) / d ** 0.5)

    def output_dim(self, d):
        return 2 * self.q_weight.shape[-1]

    def _phi(self, x, w):
        lg = torch.einsum("bhtd,hdf->bhtf", x.to(w.dtype), w)
        return torch.cat([lg.softmax(-1), (-lg).softmax(-1)], -1).to(x.dtype)

    def forward_query(self, q):
        return self._phi(q, self.q_weight)

    def forward_key(self, k):
        return self._phi(k, self.k_weight)

    def forward(self, x):
        return self.forward_query(x)

    def triton_projection(self):
        return featattn.ProjectionTritonForm(self.q_weight, None, self.k_weight, None,
                                             "softmax_pair")


def _map(kind, d, H, Hkv, f, tie, seed=0):
    torch.manual_seed(seed)
    if kind == "nobias":
        return NoBiasHedgehog(d, H, f)
    if kind == "hedgehog":
        fm = HedgehogFeatureMap(d, heads=H, kv_heads=Hkv, feature_dim=f, tie_qk=tie)
    else:
        fm = T2RFeatureMap(d, heads=H, kv_heads=Hkv, feature_dim=f)
    with torch.no_grad():  # away from the identity start, so every weight matters
        for p in fm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return fm


def _run(fm, q, k, v, state, do, dkv, dz, backend, dtype, normalize, scale, cu=None):
    """(output, state, grads of q, k, v, kv0, z0, *map parameters) in float64."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    s0 = None
    leaves = [q, k, v]
    if state is not None:
        kv0 = state[0].detach().clone().requires_grad_()
        z0 = state[1].detach().clone().requires_grad_() if normalize else None
        s0 = featattn.LinearAttentionState(kv0, z0)
        leaves += [kv0] + ([z0] if normalize else [])
    params = list(fm.parameters())
    o, s = featattn.linear_attention(q, k, v, feature_map=fm, backend=backend, scale=scale,
                                     normalize=normalize, initial_state=s0, return_state=True,
                                     cu_seqlens=cu)
    loss = (o.double() * do).sum() + (s.kv.double() * dkv).sum()
    if normalize:
        loss = loss + (s.z.double() * dz).sum()
    grads = torch.autograd.grad(loss, leaves + params)
    outs = [o, s.kv] + ([s.z] if normalize else []) + list(grads)
    return [x.detach().double() for x in outs]


CASES = [
    # kind, B, H, Hkv, T, d, f, Dv, normalize, state, tie
    ("hedgehog", 1, 2, 2, 37, 16, 16, 16, True, False, False),
    ("hedgehog", 2, 4, 2, 50, 16, 12, 24, True, True, False),  # grouped, f != d, state
    ("hedgehog", 1, 2, 2, 40, 16, 16, 16, True, True, True),  # tie_qk
    ("hedgehog", 1, 1, 1, 1, 8, 8, 16, False, True, False),  # T = 1, not normalised
    ("hedgehog", 1, 1, 1, 20, 16, 64, 150, True, True, False),  # several Dv tiles
    ("t2r", 1, 4, 2, 33, 16, 20, 8, True, True, False),  # q heads share their kv head's map
    ("hedgehog", 1, 4, 2, 20, 16, 64, 150, True, True, False),  # Dv tiles and grouped heads
    ("nobias", 1, 2, 2, 30, 16, 16, 16, True, True, False),  # a user's map without biases
]


PASS_CASES = [CASES[1], CASES[3], CASES[5]]
# softmax pairs whose 2f features fill one key tile (projected.PAIR_EPILOGUE's calls)
PAIR_CASES = [CASES[0], CASES[2], CASES[3], CASES[6], CASES[7],
              ("hedgehog", 1, 4, 2, 130, 16, 16, 24, True, True, False)]  # in 64-token segments


@pytest.mark.parametrize("mode,case,dtype",
                         [("kernel", c, dt) for c in CASES for dt in (torch.float32, torch.float16)]
                         + [(m, c, dt) for m in ("pass", "pass_recompute")
                            for c in PASS_CASES
                            for dt in (torch.float32, torch.float16)]
                         + [("pass_pair", c, dt) for c in PAIR_CASES
                            for dt in (torch.float32, torch.float16)],
                         ids=lambda x: "-".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_projection_in_kernel_matches_float64(mode, case, dtype, monkeypatch):
    """mode "kernel": the features made inside the attention kernels; "pass": one Triton pass
    writes them and the chunked kernel runs on them (large calls), its backward reading the
    features (projected.PASS_BWD_FROM_FEATURES, the default); "pass_recompute": the same,
    its backward recomputing them from x; "pass_pair": the pass and the chunked kernels as
    one autograd node, the backward kernel making the logits' gradients
    (projected.PAIR_EPILOGUE)."""
    from featattn.kernels import chunked, projected
    from helpers import spy_launches

    monkeypatch.setattr(projected, "PASS_BWD_FROM_FEATURES", mode == "pass")
    monkeypatch.setattr(projected, "PAIR_EPILOGUE", mode == "pass_pair")
    epi = spy_launches(monkeypatch, chunked._bwd_kernel, "EPI_PAIR")
    seg = spy_launches(monkeypatch, chunked._seg_kernel, "BWD")
    # (on the GPU tiles are >= 32 wide: 2f = 16 features do not fill one, so no pair path)
    pair = mode == "pass_pair" and chunked.pair_epilogue_fits(case[6], dtype)
    if mode in ("pass_recompute", "pass_pair"):
        mode = "pass"
    split = mode == "pass_pair" and case[4] > 64
    if split:
        monkeypatch.setenv("FEATATTN_SEGMENT", "64")
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    if DEV == "cuda":
        dtype = torch.bfloat16 if dtype == torch.float16 else dtype
    kind, B, H, Hkv, T, d, f, Dv, normalize, with_state, tie = case
    fm = _map(kind, d, H, Hkv, f, tie).to(DEV)
    Dk = fm.output_dim(d)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T, d, generator=g).to(DEV)
    k = torch.randn(B, Hkv, T, d, generator=g).to(DEV)
    v = torch.randn(B, Hkv, T, Dv, generator=g).to(DEV)
    do = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64).to(DEV)
    dkv = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64).to(DEV)
    dz = torch.randn(B, H, Dk, generator=g, dtype=torch.float64).to(DEV)
    state = None
    if with_state:
        state = (torch.rand(B, H, Dk, Dv, generator=g).to(DEV),
                 (1.0 + torch.rand(B, H, Dk, generator=g)).to(DEV))
    choice = featattn.select_kernel(q, k, v, fm, backend="triton")
    assert choice.name == "chunked" and choice.map_path == {"kernel": "kernel", "pass": "triton_pass"}[mode], choice
    got = _run(fm, q, k, v, state, do, dkv, dz, "triton", dtype, normalize, 0.7)
    fm64 = copy.deepcopy(fm).double()
    want = _run(fm64, q.double(), k.double(), v.double(),
                None if state is None else tuple(s.double() for s in state),
                do, dkv, dz, "reference", torch.float64, normalize, 0.7)
    names = ["o", "kv"] + (["z"] if normalize else []) + ["dq", "dk", "dv"]
    names += (["dkv0"] + (["dz0"] if normalize else [])) if with_state else []
    names += [n for n, _ in fm.named_parameters()]
    tol = tolerance(dtype, "small")
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), name
        err = rel_err(a, b)
        # gradients through the features' rounding to fp16/bf16 get 2x the forward's room
        assert err < (tol if name in ("o", "kv", "z") else 2 * tol), (name, err)
    assert (set(epi) == {True}) if pair else (True not in epi), set(epi)
    assert not split or set(seg) == {False, True}, set(seg)  # forward and backward sums


def test_fused_path_never_calls_the_pytorch_map(monkeypatch):
    fm = _map("hedgehog", 16, 2, 2, 16, False).to(DEV)

    def boom(*a, **kw):
        raise AssertionError("the map's PyTorch form ran")

    for name in ("forward", "forward_query", "forward_key"):
        monkeypatch.setattr(HedgehogFeatureMap, name, boom)
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEV, requires_grad=True) for _ in range(3))
    o = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton")
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and fm.q_weight.grad is not None


def test_weight_gradients_repeat_bit_for_bit():
    """Per-program partial sums reduced by torch, no atomics: two runs are identical."""
    fm = _map("hedgehog", 16, 4, 2, 16, False).to(DEV)
    q = torch.randn(2, 4, 40, 16, device=DEV)
    k, v = torch.randn(2, 2, 40, 16, device=DEV), torch.randn(2, 2, 40, 16, device=DEV)
    runs = []
    for _ in range(2):
        fm.zero_grad()
        featattn.linear_attention(q, k, v, feature_map=fm, backend="triton").square().sum().backward()
        runs.append([p.grad.clone() for p in fm.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["kernel", "pass"])
def test_packed_sequences_match_each_sequence_alone(mode, monkeypatch):
    """Forward, states and gradients (of q, k, v and the weights) of a packed row against
    each sequence alone on the PyTorch path."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    fm = _map("hedgehog", 16, 2, 2, 16, False).to(DEV)
    cu = torch.tensor([0, 1, 18, 40], device=DEV)
    x = [torch.randn(1, 2, 40, 16, device=DEV) for _ in range(3)]
    w = torch.randn(1, 2, 40, 16, device=DEV)

    def grads(loss, leaves):
        return torch.autograd.grad(loss, leaves + list(fm.parameters()))

    q, k, v = (t.clone().requires_grad_() for t in x)
    o, s = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton", cu_seqlens=cu,
                                     return_state=True)
    got = grads((o * w).sum() + s.kv.sum(), [q, k, v])
    q2, k2, v2 = (t.clone().requires_grad_() for t in x)
    loss = 0.0
    for n in range(3):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        o1, s1 = featattn.linear_attention(q2[:, :, sl], k2[:, :, sl], v2[:, :, sl],
                                           feature_map=fm, backend="torch", return_state=True)
        assert rel_err(o[:, :, sl], o1) < 1e-5
        assert rel_err(s.kv[n:n + 1], s1.kv) < 1e-5 and rel_err(s.z[n:n + 1], s1.z) < 1e-5
        loss = loss + (o1 * w[:, :, sl]).sum() + s1.kv.sum()
    for a, b in zip(got, grads(loss, [q2, k2, v2])):
        assert rel_err(a, b) < 1e-5


def test_select_kernel_says_when_the_projection_stays_in_pytorch(monkeypatch):
    monkeypatch.delenv("FEATATTN_FUSE_MAPS", raising=False)
    q = k = v = torch.randn(1, 2, 8, 160, device=DEV)
    fm = HedgehogFeatureMap(160, heads=2)
    c = featattn.select_kernel(q, k, v, fm, backend="triton")
    assert c.map_path == "torch" and any("above 128" in r for r in c.reasons), c
    q = k = v = torch.randn(1, 2, 8, 16, device=DEV)
    c = featattn.select_kernel(q, k, v, HedgehogFeatureMap(16, heads=2), backend="triton")
    assert c.map_path == "kernel" and c.map_fused  # auto, a small (host-bound) call: the kernels
    big = torch.zeros(1, 2, PROJECTION_KERNEL_MAX_ROWS // 2 + 1, 16, device=DEV)
    c = featattn.select_kernel(big, big, big, HedgehogFeatureMap(16, heads=2), backend="triton")
    assert c.map_path == "triton_pass" and c.map_fused  # auto, large: the pass (2x faster)
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "kernel")
    c = featattn.select_kernel(q, k, v, HedgehogFeatureMap(16, heads=2), backend="triton")
    assert c.map_path == "kernel" and c.map_fused


def test_projected_attention_rejects_weights_for_other_heads():
    fm = HedgehogFeatureMap(16, heads=2)
    q = torch.randn(1, 4, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="do not fit 4 query heads"):
        projected_attention(q, q, q, fm.triton_projection(), normalize=True, eps=1e-6)


@pytest.mark.parametrize("mode", ["kernel", "pass"])
def test_weights_for_other_heads_never_reach_the_kernels(mode, monkeypatch):
    """k with 2 heads and a map built for 1 or 4 key heads, a T2R built for 8 query heads
    used with 4, one bias without the other: the dispatcher keeps the map in PyTorch (whose
    own checks raise) instead of reading the wrong weights."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    q = torch.randn(1, 4, 12, 16, device=DEV)
    k = v = torch.randn(1, 2, 12, 16, device=DEV)
    for fm in (HedgehogFeatureMap(16, heads=4, kv_heads=1), HedgehogFeatureMap(16, heads=4,
               kv_heads=4), T2RFeatureMap(16, heads=8, kv_heads=2)):
        c = featattn.select_kernel(q, k, v, fm.to(DEV), backend="triton")
        assert c.map_path == "torch" and any("do not fit" in r for r in c.reasons), c
        with pytest.raises(ValueError):
            featattn.linear_attention(q, k, v, feature_map=fm, backend="triton")
    one_bias = _map("hedgehog", 16, 4, 2, 16, False).to(DEV)
    form = one_bias.triton_projection()._replace(k_bias=None)
    monkeypatch.setattr(one_bias, "triton_projection", lambda: form)
    c = featattn.select_kernel(q, k, v, one_bias, backend="triton")
    assert c.map_path == "torch" and any("both or neither" in r for r in c.reasons), c


def test_projected_attention_checks_its_inputs():
    fm = HedgehogFeatureMap(16, heads=2).to(DEV)
    form = fm.triton_projection()
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="k must be"):
        projected_attention(q, q[:, :, :5], q, form, normalize=True, eps=1e-6)
    with pytest.raises(ValueError, match="initial_kv must be"):
        projected_attention(q, q, q, form, normalize=True, eps=1e-6,
                            initial_kv=torch.zeros(1, 2, 16, 16, device=DEV))
    with pytest.raises(ValueError, match="cu_seqlens must end"):
        projected_attention(q, q, q, form, normalize=True, eps=1e-6,
                            cu_seqlens=torch.tensor([0, 5, 40], device=DEV))
    with pytest.raises(TypeError):
        projected_attention(q, q, q.half(), form, normalize=True, eps=1e-6)


def test_pass_covers_several_row_blocks(monkeypatch):
    """FEATATTN_FUSE_MAPS=pass with T over the pass's 1024-token blocks (a tail block of 6
    tokens): output, state and every gradient (weights included) against float64."""
    fm = _map("hedgehog", 8, 1, 1, 8, False).to(DEV)
    g = torch.Generator().manual_seed(4)
    x = [torch.randn(1, 1, 1030, 8, generator=g).to(DEV) for _ in range(3)]
    cot = [torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV)
           for shape in ((1, 1, 1030, 8), (1, 1, 16, 8), (1, 1, 16))]
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
    choice = featattn.select_kernel(*x, fm, backend="triton")
    assert choice.map_path == "triton_pass", choice
    got = _run(fm, *x, None, *cot, "triton", torch.float32, True, 0.5)
    want = _run(copy.deepcopy(fm).double(), *(t.double() for t in x), None, *cot, "reference",
                torch.float64, True, 0.5)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("mode", ["kernel", "pass"])
def test_strided_bthd_inputs(mode, monkeypatch):
    """[B, T, H, D] tensors (layout="bthd", strided views for the kernels): the same output and
    gradients as the contiguous call."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", mode)
    fm = _map("hedgehog", 16, 4, 2, 16, False).to(DEV)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 21, 4, 16, generator=g).to(DEV)
    k, v = (torch.randn(2, 21, 2, 16, generator=g).to(DEV) for _ in range(2))
    runs = []
    for layout in ("bthd", "bhtd"):
        x = [t.clone() if layout == "bthd" else t.transpose(1, 2).contiguous() for t in (q, k, v)]
        x = [t.requires_grad_() for t in x]
        o = featattn.linear_attention(*x, feature_map=fm, backend="triton", layout=layout)
        o = o if layout == "bthd" else o.transpose(1, 2)
        grads = torch.autograd.grad(o.square().sum(), x + list(fm.parameters()))
        grads = [gr if layout == "bthd" or gr.dim() != 4 else gr.transpose(1, 2) for gr in grads]
        runs.append([o, *grads])
    for a, b in zip(*runs):
        assert rel_err(a, b) < 1e-5


def test_pair_epilogue_with_only_the_state_used(monkeypatch):
    """projected.PAIR_EPILOGUE: a loss on the returned state alone (no output gradient)
    gives the gradients of the two-node pass path."""
    from featattn.kernels import projected

    from featattn.kernels import chunked
    from helpers import spy_launches

    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "pass")
    fm = _map("hedgehog", 16, 2, 2, 16, False).to(DEV)
    epi = spy_launches(monkeypatch, chunked._bwd_kernel, "EPI_PAIR")
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(1, 2, 70, 16, generator=g).to(DEV) for _ in range(3)]
    got = []
    for on in (False, True):
        monkeypatch.setattr(projected, "PAIR_EPILOGUE", on)
        q, k, v = (t.clone().requires_grad_() for t in x)
        _, s = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton",
                                         return_state=True)
        got.append(torch.autograd.grad(s.kv.sum() + s.z.sum(), [q, k, v, fm.q_weight,
                                                                fm.k_weight]))
    for a, b in zip(*got):
        assert rel_err(b, a) < 1e-5
    assert set(epi) == {False, True}, set(epi)  # each path ran
