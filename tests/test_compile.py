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
