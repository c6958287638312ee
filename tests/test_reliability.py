"""Regression tests of the reliability issue (#13): tuned-config cache keys, double backward,
many head dims in one process on the GPU."""

import pytest
import torch


def _chunked():
    from featattn.kernels import chunked

    return chunked


@pytest.mark.parametrize("positional", [True, False])
def test_tuned_launch_keys_on_the_autotuners_declared_key(positional):
    """Head dims passed by position must give their own cache entries: a config tuned for
    one Dk is not valid (shared memory) for another."""
    ch = _chunked()
    launch = ch._FWD
    names = list(launch.tuner.arg_names)
    args = [None] * names.index("DK") + [33, 40]  # DK, DV by position
    key_pos = launch.cache_key(tuple(args) if positional else (), {} if positional else
                               {"DK": 33, "DV": 40})
    other = launch.cache_key(tuple(args[:-2] + [96, 96]) if positional else (),
                             {} if positional else {"DK": 96, "DV": 96})
    assert key_pos != other
    assert 33 in key_pos and 40 in key_pos


def test_tuned_launch_caches_one_config_per_head_dim_pair():
    from featattn.kernels import chunked_attention

    ch = _chunked()
    ch._FWD.best.clear()
    seen = []
    # all in one tile bucket (BK = BV = 32): only DK / DV themselves tell them apart
    for dk, dv in ((20, 20), (24, 20), (20, 28), (24, 20)):
        q, k, v = (torch.randn(1, 1, 5, d) for d in (dk, dk, dv))
        chunked_attention(q, k, v, normalize=True, eps=1e-6)
        seen.append(len(ch._FWD.best))
    assert seen == [1, 2, 3, 3], seen
    dims = {(key[0], key[1]) for key in ch._FWD.best}
    assert dims == {(20, 20), (24, 20), (20, 28)}, dims


def test_tuned_launch_tunes_each_problem_size_apart():
    """A config tuned on a first small call (a warm-up, a short prompt) is not kept for every
    later size: the key holds a bucket of the grid and of each program's tokens."""
    from featattn.kernels import chunked_attention

    ch = _chunked()
    ch._FWD.best.clear()
    seen = []
    for B, H, T in ((1, 1, 5), (1, 1, 7), (1, 1, 300), (4, 4, 5), (1, 1, 300)):
        q, k, v = (torch.randn(B, H, T, 16) for _ in range(3))
        chunked_attention(q, k, v, normalize=True, eps=1e-6)
        seen.append(len(ch._FWD.best))
    assert seen == [1, 1, 2, 3, 3], seen


def test_every_autotuned_kernel_is_tuned_per_problem_size():
    """Each TunedLaunch of featattn.kernels names a size bucket in its autotune key."""
    import importlib

    from featattn.kernels._common import TunedLaunch

    found = []
    for mod in ("chunked", "projected", "taylor_fused", "taylor_parallel", "window"):
        m = importlib.import_module(f"featattn.kernels.{mod}")
        for name, obj in vars(m).items():
            launches = obj.values() if isinstance(obj, dict) else [obj]
            for launch in launches:
                if isinstance(launch, TunedLaunch):
                    found.append((mod, name))
                    assert {"SIZE", "size_key"} & set(launch.tuner.keys), (mod, name)
    assert len(found) >= 10, found


def test_tuned_launch_keys_include_tensor_dtypes():
    ch = _chunked()
    names = list(ch._FWD.tuner.arg_names)
    a32 = [torch.empty(1)] + [None] * (names.index("DK") - 1) + [16, 16]
    a16 = [torch.empty(1, dtype=torch.float16)] + a32[1:]
    assert ch._FWD.cache_key(tuple(a32), {}) != ch._FWD.cache_key(tuple(a16), {})


# --------------------------------------------------------------------------- GPU, autotuned
def _gpu_check(q, k, v, feature_map, normalize):
    """Forward + backward on the GPU against float64 on the same (rounded) inputs."""
    import featattn

    def rel_err(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = featattn.linear_attention(q, k, v, feature_map=feature_map, normalize=normalize)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    r = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ro = featattn.linear_attention(*r, feature_map=feature_map, normalize=normalize,
                                   backend="reference")
    rgrads = torch.autograd.grad(ro, r, do.double())
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[q.dtype]
    assert rel_err(o, ro) < tol, (tuple(q.shape), q.dtype, "o", rel_err(o, ro))
    for name, a, b in zip("qkv", grads, rgrads):
        err = rel_err(a, b)
        if normalize and q.shape[2] == 1 and name in "qk":
            # At T = 1 the normalised output is v * s / (s + eps): dq and dk are O(eps), and any
            # fp32 kernel computes them as the cancellation do.v - do.o, i.e. rounding noise of
            # |do| |v| size.  Relative to their own (1e-8) norm that noise is O(1) (seen on the
            # H200: dq 6e-9 vs -4e-9), so measure it against the gradients' natural scale |do|.
            err = ((a.double() - b.double()).norm() / do.double().norm()).item()
        assert err < tol, (tuple(q.shape), q.dtype, "d" + name, err)


@pytest.mark.cuda
@pytest.mark.parametrize("B,T", [(2, 24), (2, 64), (32, 200), (2, 1)])
@pytest.mark.parametrize("d", [8, 16])
def test_gpu_fp32_small_head_dim_elu(B, T, d):
    """`featattn demo` crashed here (H200): every autotune config hit an illegal memory
    access with fp32 at Dk = Dv = 16.  Run with autotuning on (make gpu-test)."""
    torch.manual_seed(B * 1000 + T + d)
    q, k, v = (torch.randn(B, 2, T, d, device="cuda") for _ in range(3))
    _gpu_check(q, k, v, "elu", True)


@pytest.mark.cuda
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_many_head_dims_in_one_process(dtype, normalize):
    """A config tuned for one head dim must not be reused for another of its tile bucket
    (OutOfResources at Dk = Dv = 96 after other dims had run)."""
    torch.manual_seed(0)
    for d in (33, 64, 96, 120, 128, 96):
        q, k, v = (torch.randn(1, 18, 128, d, device="cuda", dtype=dtype) for _ in range(3))
        _gpu_check(q, k, v, "elu", normalize)


# --------------------------------------------------------------------------- double backward
def _penalty_grads(q, k, v, kv0, z0, **kw):
    """A gradient penalty: P = sum((dL/dq)^2) + sum((dL/dk) * k) with L = sum(o * w), then
    dP/d(q, k, v, kv0).  Needs the second derivative of the op."""
    import featattn
    from featattn.state import LinearAttentionState

    state = None if kv0 is None else LinearAttentionState(kv0, z0)
    o = featattn.linear_attention(q, k, v, initial_state=state, **kw)
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)
    gq, gk = torch.autograd.grad((o * w).sum(), (q, k), create_graph=True)
    pen = (gq ** 2).sum() + (gk * k).sum()
    leaves = [t for t in (q, k, v, kv0) if t is not None]
    return torch.autograd.grad(pen, leaves)


def _leaves(seed, B, H, T, d, dv, dtype, with_state, Dk=None, normalize=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, n, generator=g, dtype=torch.float64) * 0.5
               for n in (d, d, dv))
    kv0 = z0 = None
    if with_state:
        kv0 = torch.rand(B, H, Dk or d, dv, generator=g, dtype=torch.float64)
        z0 = torch.rand(B, H, Dk or d, generator=g, dtype=torch.float64) + 1 if normalize else None
    ts = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (q, k, v)]
    st = [t.float().requires_grad_(True) if t is not None else None for t in (kv0, z0)]
    if dtype == torch.float64 and kv0 is not None:
        st = [t.requires_grad_(True) if t is not None else None for t in (kv0, z0)]
    return ts + st


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("feature_map", ["elu", "taylor"])
def test_double_backward_matches_finite_differences(backend, feature_map):
    """The PyTorch backends: gradgradcheck (finite differences of the gradient, float64)."""
    import featattn

    torch.manual_seed(0)
    # small: gradgradcheck differentiates every input element numerically
    q, k, v = (torch.randn(1, 1, 5, n, dtype=torch.float64, requires_grad=True) * 0.5
               for n in (2, 2, 3))
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))

    def f(q, k, v):
        return featattn.linear_attention(q, k, v, feature_map=feature_map, backend=backend)

    assert torch.autograd.gradgradcheck(f, (q, k, v), atol=1e-6, rtol=1e-4)


def _triton_cases():
    # (backend, feature_map, d, dv, T, with_state): the chunked kernels on features (Dk <= Dv
    # and Dk > Dv), the fused Taylor kernel's chunked form (a state) and its parallel form
    return [
        ("chunked", "elu", 8, 16, 37, False),
        ("chunked", "elu", 8, 8, 37, True),
        ("small_vhd", "elu", 20, 8, 37, True),  # an alias of chunked
        ("taylor_chunked", "taylor", 4, 8, 37, True),
        ("taylor_parallel", "taylor", 4, 8, 37, False),
    ]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("case", _triton_cases(), ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}-dv{c[3]}"
                         f"-{'state' if c[5] else 'nostate'}")
def test_double_backward_through_triton_kernels(case, normalize):
    """A gradient penalty through the Triton kernels (fp32 in the interpreter) equals the
    float64 torch path's (itself checked against finite differences above).  Before the
    fix it was wrong (-0.0068 against -0.0788), without gradients for k and v, or raised."""
    backend, fm, d, dv, T, with_state = case
    Dk = 1 + d + d * d if fm == "taylor" else d
    kw = dict(feature_map=fm, normalize=normalize)
    got = _penalty_grads(*_leaves(1, 1, 2, T, d, dv, torch.float32, with_state, Dk, normalize),
                         backend=backend, **kw)
    want = _penalty_grads(*_leaves(1, 1, 2, T, d, dv, torch.float64, with_state, Dk, normalize),
                          backend="torch", **kw)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and torch.isfinite(a).all(), i
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < 2e-4, (i, err)


def test_first_order_backward_keeps_the_kernels():
    """Without create_graph the Triton backward runs (not the torch recomputation)."""
    import featattn

    q, k, v = (torch.randn(1, 1, 9, 8, requires_grad=True) for _ in range(3))
    o = featattn.linear_attention(q, k, v, feature_map="elu", backend="equal_dim")
    gq, = torch.autograd.grad(o.sum(), q)
    assert gq.grad_fn is None and not gq.requires_grad
    gq2, = torch.autograd.grad(
        featattn.linear_attention(q, k, v, feature_map="elu", backend="equal_dim").sum(), q,
        create_graph=True)
    assert gq2.requires_grad
    assert torch.allclose(gq, gq2, atol=1e-5, rtol=1e-4)


def test_nan_in_v_reaches_only_its_own_chunk_and_later():
    """What docs/kernels-and-dispatch.md says of non-finite inputs: rows of earlier chunks
    stay finite, rows from the start of the NaN's chunk on do not."""
    import featattn

    q, k, v = (torch.randn(1, 1, 150, 8) for _ in range(3))
    v[0, 0, 100] = float("nan")
    o = featattn.linear_attention(q, k, v, feature_map="elu", backend="torch")
    bad = torch.isnan(o[0, 0]).any(-1)
    assert not bad[:64].any() and bad[64:].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eps_that_vanishes_in_fp32_is_rejected(dtype):
    import featattn

    q = -torch.rand(1, 1, 4, 8).to(dtype) - 0.1  # relu features all 0: den == eps
    k, v = torch.randn(1, 1, 4, 8).to(dtype), torch.randn(1, 1, 4, 8).to(dtype)
    with pytest.raises(ValueError, match=r"eps=1e-50 is 0 once added in torch.float32"):
        featattn.linear_attention(q, k, v, feature_map="relu", eps=1e-50)
    # a float64 call accumulates in float64, where 1e-50 is a normal number
    o = featattn.linear_attention(q.double(), k.double(), v.double(), feature_map="relu",
                                  eps=1e-50)
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match="float64"):
        featattn.linear_attention(q.double(), k.double(), v.double(), eps=1e-320)
    o = featattn.linear_attention(q, k, v, feature_map="relu", eps=1e-30)
    assert torch.isfinite(o.float()).all()


# --------------------------------------------------------------------------- input validation
def _qkv(H=2, Hkv=2, T=4, d=8, dv=8):
    return torch.randn(1, H, T, d), torch.randn(1, Hkv, T, d), torch.randn(1, Hkv, T, dv)


@pytest.mark.parametrize("shapes,match", [
    (dict(Hkv=0), "at least one head"),
    (dict(H=0, Hkv=0), "at least one head"),
    (dict(d=0), "head dims must be >= 1"),
    (dict(dv=0), "head dims must be >= 1"),
])
@pytest.mark.parametrize("feature_map", [None, "elu", "taylor"])
def test_empty_heads_and_dims_are_rejected(shapes, match, feature_map):
    import featattn

    with pytest.raises(ValueError, match=match):
        featattn.linear_attention(*_qkv(**shapes), feature_map=feature_map)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(head_dim=0), ValueError, "head_dim must be None or a positive int"),
    (dict(head_dim=-4), ValueError, "head_dim"),
    (dict(qk_dim=-1), ValueError, "qk_dim"),
    (dict(qk_dim=0, feature_map="elu"), ValueError, "qk_dim"),
    (dict(kv_heads="2"), TypeError, "kv_heads must be None or a positive int, got str"),
    (dict(kv_heads=3), ValueError, "kv_heads"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps="1e-6"), TypeError, "eps"),
    (dict(eps=1e-50), ValueError, "0 once added in torch.float32"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
])
def test_feature_attention_checks_its_arguments_when_built(kwargs, err, match):
    import featattn

    kwargs = dict(kwargs)
    fm = kwargs.pop("feature_map", "taylor")
    with pytest.raises(err, match=match):
        featattn.FeatureAttention(32, 4, fm, **kwargs)


def _custom_map(forward, name):
    import featattn

    class M(featattn.FeatureMap):
        def output_dim(self, head_dim):
            return head_dim

    M.forward = lambda self, x: forward(x)
    m = M()
    m.name = name
    return m


@pytest.mark.parametrize("forward,err,match", [
    (lambda x: (x, x), TypeError, "must return one tensor for q, got tuple"),
    (lambda x: x[:, :, :-1], ValueError, "must keep every dim but the last"),
    (lambda x: x[:1].expand(2, *x.shape[1:]) if x.shape[0] == 1 else x[:1], ValueError,
     "must keep every dim but the last"),
    (lambda x: x.double(), TypeError, "returned torch.float64 q features for torch.float32"),
])
def test_feature_map_outputs_are_checked(forward, err, match):
    import featattn

    fm = _custom_map(forward, "bad")
    with pytest.raises(err, match=match):
        featattn.linear_attention(*_qkv(), feature_map=fm)


# --------------------------------------------------------------------------- torch.compile
class _CountingBackend:
    """A torch.compile backend (AOTAutograd, eager kernels) that counts the graphs compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs += 1
        keep = lambda g, _: make_boxed_func(g.forward)  # noqa: E731 - run the graph as is
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)


@pytest.mark.parametrize("fm,backend,how", [
    ("taylor", "auto", "dynamic"), ("taylor", "auto", "mark_dynamic"),  # the torch path on CPU
    ("elu", "triton", "dynamic"),  # the kernels' custom ops (interpreter): fewer lengths
])
def test_compiled_layer_does_not_recompile_as_T_changes(how, fm, backend):
    """Variable-length training: one or two graphs for every T in 10..110 (dynamo specialises
    a size of 1, hence two), not one per T until the recompile limit."""
    import torch._dynamo

    import featattn

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(32, 4, fm, backend=backend)
    count = _CountingBackend()
    compiled = torch.compile(layer, backend=count, fullgraph=True, dynamic=(how == "dynamic"))
    for T in range(10, 111, 20 if how == "dynamic" and backend == "auto" else 50):
        x = torch.randn(2, T, 32, requires_grad=True)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)
        out = compiled(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        ref = layer(x)
        (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    assert 1 <= count.graphs <= 2, count.graphs
