"""torch.compile(fullgraph=True) traces FeatureAttention with the Triton kernels without a
graph break (the kernels are torch.library custom ops with fake implementations)."""

import pytest
import torch
from torch import nn

import featattn


def _model(backend, fm="elu"):
    torch.manual_seed(0)
    return nn.Sequential(
        featattn.FeatureAttention(32, 4, fm, kv_heads=2, backend=backend),
        nn.LayerNorm(32),
        featattn.FeatureAttention(32, 4, fm, backend=backend),
    )


@pytest.mark.parametrize("fm", ["elu", "taylor"])  # chunked equal_dim / taylor_fused kernels
def test_fullgraph_trace_on_cpu_interpreter(fm):
    # aot_eager: dynamo + AOTAutograd with fake tensors (checks the fake kernels and that
    # nothing breaks the graph) without paying for Inductor's C++ compile in CI
    model = _model("triton", fm)
    x = torch.randn(2, 19, 32, requires_grad=True)
    ref = model(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("fm", ["elu", "taylor"])
def test_fullgraph_inductor_on_cuda(fm):
    model = _model("auto", fm).cuda()
    x = torch.randn(2, 300, 32, device="cuda", requires_grad=True)
    ref = model(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
def test_fullgraph_inductor_hybrid_on_cuda(fm):
    """A hybrid (window) layer under Inductor: the Triton form as the featattn::hybrid_fwd
    custom op, equal to eager."""
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(64, 4, fm, kv_heads=2, window=32).cuda()
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    ref = layer(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = torch.compile(layer, fullgraph=True)(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
def test_one_graph_for_every_T_on_the_torch_path(how):
    """Variable-length training compiles the CPU (chunked PyTorch) path once.  T crosses one
    chunk (64) and two: a size-n chunk dim that may be 1, or a size n - 1, made dynamo guard
    on it and compile again for T <= 64, T <= 128 and longer."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(16, 2, "taylor", qk_dim=4, backend="torch")
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=count, fullgraph=True, dynamic=(how == "dynamic"))
    for T in (10, 64, 65, 128, 129, 200):
        x = torch.randn(2, T, 16)
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1, len(graphs)


def test_compiled_torch_path_is_exact_in_float64():
    """The compiled form (one block, a spare padded chunk) against the float64 oracle, with a
    state, grouped heads and T below, at and above the chunk size."""
    from featattn.chunked import chunked_linear_attention
    from featattn.reference import quadratic_linear_attention

    def f(q, k, v, kv0, z0):
        return chunked_linear_attention(q, k, v, normalize=True, eps=1e-6, initial_kv=kv0,
                                        initial_z=z0, return_state=True, chunk_size=8)

    # "eager": the traced forward runs op by op and autograd goes through it; Dv = 6 so that
    # no T equals another size (dynamo's duck sizing would tie them and recompile)
    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T in (3, 8, 9, 17):
        q = torch.rand(2, 4, T, 5, generator=g, dtype=torch.float64, requires_grad=True)
        k = torch.rand(2, 2, T, 5, generator=g, dtype=torch.float64)
        v = torch.randn(2, 2, T, 6, generator=g, dtype=torch.float64)
        kv0 = torch.rand(2, 4, 5, 6, generator=g, dtype=torch.float64)
        z0 = torch.rand(2, 4, 5, generator=g, dtype=torch.float64)
        got = compiled(q, k, v, kv0, z0)
        want = quadratic_linear_attention(q, k, v, normalize=True, eps=1e-6, initial_kv=kv0,
                                          initial_z=z0, return_state=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        (ga,) = torch.autograd.grad(got[0].sum(), q)
        (gb,) = torch.autograd.grad(want[0].sum(), q)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


def test_compiled_window_layer_decodes_like_the_prefill():
    """A compiled hybrid layer decoding from an empty state (the window grows 0 -> W, then
    keys fold into the linear state: dynamic shapes after the first recompiles) gives the
    prefill's outputs.  Inductor (torch 2.13, CPU) miscompiled the fold as a slice of the
    concatenated window (kv 4e-2 off after the window filled); it now folds by a mask when
    compiling (featattn.hybrid, featattn.reference)."""
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(16, 4, window=3).eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        want = layer(x)
        compiled = torch.compile(layer)
        state = layer.init_state(2)
        got = torch.cat([compiled(x[:, t:t + 1], state, update_state=True) for t in range(7)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_window_layer_takes_a_key_padding_mask_with_dynamic_shapes():
    """A hybrid layer with a key_padding_mask under torch.compile(dynamic=True): the padded
    rows are packed eagerly (a graph break; Inductor failed on the packing, "Exponent must be
    non-negative") and the result is the eager one."""
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(16, 4, window=3)
    x = torch.randn(2, 9, 16)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    got = torch.compile(layer, dynamic=True)(x, key_padding_mask=mask)
    torch.testing.assert_close(got, layer(x, key_padding_mask=mask), rtol=1e-5, atol=1e-5)
