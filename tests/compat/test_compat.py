"""flashy_linear_attention's README snippets, verbatim but for the import."""

import math

import pytest
import torch

import featattn
from featattn.compat import flashlinear
from featattn.compat.flashlinear import LinearAttention, LinearAttentionSmallVHD

from helpers import reference, rel_err


# --- the two README snippets, verbatim but for the import above ---------------------------
def triton_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps = 1e-5):
    qkv_out = LinearAttention.apply(q, k, v)
    denom = (q * k.cumsum(-2)).sum(dim=-1, keepdim=True) + eps
    return qkv_out / (denom)


def triton_linear_attention_small_vhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps = 1e-5):
    qkv_out = LinearAttentionSmallVHD.apply(q, k, v)
    denom = (q * k.cumsum(-2)).sum(dim=-1, keepdim=True) + eps
    return qkv_out / (denom)
# -------------------------------------------------------------------------------------------


def _inputs(B, H, T, Dqk, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # as flashy's own tests: softplus features, q scaled by 1/sqrt(d)
    q = torch.nn.functional.softplus(torch.randn(B, H, T, Dqk, generator=g)) / math.sqrt(Dqk)
    k = torch.nn.functional.softplus(torch.randn(B, H, T, Dqk, generator=g))
    v = torch.randn(B, H, T, Dv, generator=g)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)]


CASES = [
    # (snippet, B, H, T, Dqk, Dv)
    (triton_linear_attention, 2, 3, 63, 32, 32),
    (triton_linear_attention, 1, 2, 100, 16, 16),
    (triton_linear_attention_small_vhd, 2, 2, 65, 48, 16),
    (triton_linear_attention_small_vhd, 1, 1, 1, 40, 32),
]


def _combos():
    for case in CASES:
        for dtype in (torch.float32, torch.float64):
            # T=1: o_0 = v_0 * qk / (qk + eps), so dq is a difference of nearly equal terms and
            # the separate-denominator snippet itself is ill-conditioned in fp32: float64 only
            if case[3] == 1 and dtype != torch.float64:
                continue
            # the Triton kernels take fp32/fp16/bf16 (float64 runs on the torch path)
            for backend in ("auto", "triton") if dtype != torch.float64 else ("auto",):
                name = f"{case[0].__name__}-{'x'.join(map(str, case[1:]))}-{str(dtype)[6:]}-{backend}"
                yield pytest.param(case, dtype, backend, id=name)


@pytest.mark.parametrize("case,dtype,backend", list(_combos()))
def test_readme_snippets_match_reference(case, dtype, backend, monkeypatch):
    snippet, B, H, T, Dqk, Dv = case
    monkeypatch.setattr(flashlinear, "BACKEND", backend)
    q, k, v = _inputs(B, H, T, Dqk, Dv, dtype, seed=T)
    out = snippet(q, k, v)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    num, _, _ = reference(q64, k64, v64, normalize=False)
    den = (q64 * k64.cumsum(-2)).sum(dim=-1, keepdim=True) + 1e-5
    ref = num / den
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    tol = 1e-8 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < tol

    # the one-call migration gives the same answer
    fused = featattn.linear_attention(q, k, v, normalize=True, eps=1e-5, backend=backend)
    assert rel_err(fused, ref) < tol


def test_apply_is_unnormalised_product():
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    expected = (q @ k.transpose(-1, -2)).tril() @ v
    torch.testing.assert_close(LinearAttention.apply(q, k, v), expected)
    with pytest.raises(TypeError, match=r"\.apply\(q, k, v\)"):
        LinearAttention()


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0].__name__}-{'x'.join(map(str, c[1:]))}")
def test_readme_snippets_bf16_on_gpu(case):
    """bf16 on the GPU.  The snippet computes its own denominator in bf16 with torch
    (k.cumsum(-2) in bf16), which is flashy's code, not ours: so the kernel's product is
    checked against float64 on its own, and the whole snippet against float64 numerators
    divided by that same bf16 denominator."""
    snippet, B, H, T, Dqk, Dv = case
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_(True)
               for t in _inputs(B, H, T * 16, Dqk, Dv, torch.float32, seed=T))
    cls = LinearAttention if snippet is triton_linear_attention else LinearAttentionSmallVHD
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    num64, _, _ = reference(q64, k64, v64, normalize=False)

    prod = cls.apply(q, k, v)  # the kernel's part
    do = torch.randn_like(prod)
    grads = torch.autograd.grad(prod, (q, k, v), do)
    ref_grads = torch.autograd.grad(num64, (q64, k64, v64), do.double())
    assert prod.dtype == torch.bfloat16 and rel_err(prod, num64) < 2e-2
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-2

    out = snippet(q, k, v)  # verbatim, backward included
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    den_bf16 = ((q * k.cumsum(-2)).sum(dim=-1, keepdim=True) + 1e-5).detach().double()
    assert out.dtype == torch.bfloat16 and rel_err(out, num64.detach() / den_bf16) < 2e-2
