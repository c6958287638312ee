"""select_kernel decisions and linear_attention(backend="triton") end to end.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py), fp32/fp16 only.
"""

import pytest
import torch

import featattn
from featattn import LinearAttentionState, linear_attention, select_kernel

from helpers import (check_close, check_run, kernel_vs_reference, rand_qkv, reference,
                     run_and_grads, tolerance)


def _qkv(Dqk, Dv, T=8, dtype=torch.float32):
    return rand_qkv(1, 2, 1, T, Dqk, Dv, dtype=dtype)


def test_auto_on_cpu_is_torch_with_reasons():
    choice = select_kernel(*_qkv(16, 64), feature_map="elu")
    assert choice.name == "torch_chunked"
    assert any("CUDA" in r for r in choice.reasons)


@pytest.mark.parametrize(
    "Dqk,Dv,fm,expected",
    [(64, 64, None, "chunked"), (32, 128, "elu", "chunked"), (128, 64, None, "chunked"),
     (16, 64, "elu", "chunked"), (5, 8, "hedgehog_like", "chunked"), (4, 8, "taylor", "taylor_parallel")],
)
def test_triton_names_the_kernel(Dqk, Dv, fm, expected):
    if fm == "hedgehog_like":  # 2 * Dqk = 10 features > Dv = 8
        fm = featattn.get_feature_map("hedgehog", head_dim=Dqk, heads=2, kv_heads=1)
    assert select_kernel(*_qkv(Dqk, Dv), feature_map=fm, backend="triton").name == expected


@pytest.mark.parametrize("alias", ["equal_dim", "small_vhd"])
def test_old_chunked_names_are_aliases(alias):
    """equal_dim and small_vhd were two names of one kernel body: either selects it, for any
    Dk, Dv."""
    for dqk, dv in ((16, 64), (64, 16)):
        assert select_kernel(*_qkv(dqk, dv), backend=alias).name == "chunked"
    assert featattn.dispatch.ALIASES[alias] == ("chunked",)


def test_taylor_form_is_named_and_explained(monkeypatch):
    """The dispatcher, not the kernel module, picks the Taylor form: parallel for stateless
    calls up to FEATATTN_TAYLOR_PARALLEL_MAX_T tokens, else chunked, and says why."""
    from featattn import kernels

    q, k, v = _qkv(4, 8, T=8)
    assert select_kernel(q, k, v, "taylor", "taylor_fused").name == "taylor_parallel"
    stateful = select_kernel(q, k, v, "taylor", "taylor_fused", return_state=True)
    assert stateful.name == "taylor_chunked"
    assert any(r.startswith("taylor_parallel: a state") for r in stateful.reasons)
    monkeypatch.setattr(kernels, "taylor_parallel_max_t", lambda: 4)
    long = select_kernel(q, k, v, "taylor", "triton")
    assert long.name == "taylor_chunked" and "above FEATATTN_TAYLOR_PARALLEL_MAX_T=4" in long.reasons[0]
    with pytest.raises(featattn.dispatch.KernelUnavailable) as e:
        select_kernel(q, k, v, "elu", "taylor_fused")
    assert e.value.reasons == ("taylor_parallel: only for feature_map='taylor'",
                               "taylor_chunked: only for feature_map='taylor'")


def test_names_are_declared_once():
    """KERNELS, BACKENDS and the aliases all come from the implementation specs."""
    d = featattn.dispatch
    assert d.KERNELS == tuple(i.name for i in d.IMPLS)
    assert set(d.BACKENDS) == {"auto", "triton"} | set(d.KERNELS) | set(d.ALIASES)


def test_float64_cannot_use_triton():
    q, k, v = _qkv(8, 8, dtype=torch.float64)
    assert select_kernel(q, k, v).name == "torch_chunked"
    with pytest.raises(ValueError, match="float64.*fp32, fp16, bf16"):
        select_kernel(q, k, v, backend="triton")


def _triton_api(fm, states=None):
    """linear_attention(backend="triton") with the kernels' call signature (for
    featattn.testing.run_and_grads); it always asks for the state and appends it to
    ``states`` (returning it only with ``return_state``: otherwise it is an unused output)."""

    def attn(q, k, v, *, normalize, eps, initial_kv=None, initial_z=None, return_state=False):
        st = None if initial_kv is None else LinearAttentionState(initial_kv, initial_z)
        o, st = linear_attention(q, k, v, feature_map=fm, normalize=normalize, eps=eps,
                                 initial_state=st, return_state=True, backend="triton")
        if states is not None:
            states.append(st)
        return (o, st.kv, st.z) if return_state else (o, None, None)

    return attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fm,Dqk,Dv", [("elu", 16, 24), ("taylor", 4, 8), ("relu", 24, 16)])
def test_triton_backend_matches_reference(fm, Dqk, Dv, dtype):
    from featattn import testing

    B, H, Hkv, T = 2, 4, 2, 45
    x = torch.randn(B, T, H + 2 * Hkv, Dqk)
    q = x[:, :, :H].transpose(1, 2).to(dtype)  # strided views, as a layer passes them
    k = x[:, :, H : H + Hkv].transpose(1, 2).to(dtype)
    v = torch.randn(B, Hkv, T, Dv).to(dtype)
    tol = tolerance(dtype, "api")
    # o and its gradients (the state returned but unused), the kernels' buffers NaN-poisoned
    states = []
    with testing.poisoned_outputs():
        got = run_and_grads(_triton_api(fm, states), q, k, v, normalize=True, eps=1e-6)
    want = run_and_grads(reference, q, k, v, normalize=True, eps=1e-6, dtype=torch.float64,
                         feature_map=fm)
    check_run(got, want, tol, ("o",), dtype=dtype)
    check_run(got, want, 5 * tol, ("dq", "dk", "dv"))
    _, kv_ref, z_ref = reference(q, k, v, fm)
    check_close("kv", states[0].kv, kv_ref, tol)
    check_close("z", states[0].z, z_ref, tol)
    assert states[0].kv.dtype == torch.float32
    # and gradients through the returned state too
    got, want = kernel_vs_reference(_triton_api(fm), q, k, v, normalize=True, eps=1e-6,
                                    return_state=True, feature_map=fm)
    check_run(got, want, 5 * tol, ("dq", "dk", "dv"))


def test_state_hands_over_between_backends():
    q, k, v = rand_qkv(1, 2, 2, 70, 4, 8, dtype=torch.float32)
    whole = linear_attention(q, k, v, feature_map="taylor", backend="reference")
    a, st = linear_attention(q[:, :, :33], k[:, :, :33], v[:, :, :33], feature_map="taylor",
                             return_state=True, backend="triton")
    b, st = linear_attention(q[:, :, 33:50], k[:, :, 33:50], v[:, :, 33:50], feature_map="taylor",
                             initial_state=st, return_state=True, backend="torch")
    c = linear_attention(q[:, :, 50:], k[:, :, 50:], v[:, :, 50:], feature_map="taylor",
                         initial_state=st, backend="triton")
    check_close("o", torch.cat([a, b, c], 2), whole, 1e-5)
    assert isinstance(st, LinearAttentionState) and st.kv.dtype == torch.float32


def test_layer_runs_on_triton_backend():
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(32, 4, "elu", kv_heads=2, backend="triton")
    x = torch.randn(2, 21, 32)
    y = layer(x)
    layer.backend = "torch"
    check_close("y", y, layer(x), 1e-5)
