"""causal=False (every query reads every key) and key_padding_mask, against float64 brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featattn
from featattn.dispatch import KernelUnavailable
from featattn.feature_maps import resolve_feature_map


def brute(q, k, v, fm, keep=None, normalize=True, eps=1e-6, kv0=None, z0=None):
    """Every (query, key) pair, by definition, in float64."""
    G = q.shape[1] // k.shape[1]
    m = resolve_feature_map(fm) if fm is not None else None
    fq = m.forward_query(q) if m is not None else q
    fk = (m.forward_key(k) if m is not None else k).repeat_interleave(G, 1)
    vv = v.repeat_interleave(G, 1)
    s = fq @ fk.transpose(-1, -2)  # [B, H, T, T]
    if keep is not None:
        s = s * keep[:, None, None, :].to(s.dtype)
    num, den = s @ vv, s.sum(-1, keepdim=True)
    if kv0 is not None:
        num = num + fq @ kv0
        den = den + (fq * z0[:, :, None]).sum(-1, keepdim=True)
    return num / (den + eps) if normalize else num


def _qkv(B, H, Hkv, T, D, Dv, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 30), G=st.sampled_from([1, 2]), fm=st.sampled_from(["elu", "taylor", None]),
       backend=st.sampled_from(["auto", "torch", "reference"]), normalize=st.booleans(),
       masked=st.booleans(), seed=st.integers(0, 10_000))
def test_noncausal_equals_brute_force(T, G, fm, backend, normalize, masked, seed):
    H = 2 * G
    q, k, v = _qkv(2, H, H // G, T, 4, 3, seed)
    if fm is None:
        q, k = q.abs() + 0.1, k.abs() + 0.1  # features: keep the denominator away from 0
    keep = None
    if masked:
        keep = torch.rand(2, T, generator=torch.Generator().manual_seed(seed)) > 0.3
        keep[:, 0] = True  # every row keeps a key
    got = featattn.linear_attention(q, k, v, feature_map=fm, causal=False, normalize=normalize,
                                    key_padding_mask=keep, backend=backend)
    torch.testing.assert_close(got, brute(q, k, v, fm, keep, normalize), rtol=1e-10, atol=1e-12)


def test_noncausal_gradients_state_and_low_precision():
    q, k, v = _qkv(1, 4, 2, 17, 8, 5, seed=3)
    st0 = featattn.LinearAttentionState(torch.rand(1, 4, 8, 5, dtype=torch.float64),
                                        torch.rand(1, 4, 8, dtype=torch.float64))
    runs = []
    for backend in ("auto", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, st0.kv, st0.z)]
        o, s = featattn.linear_attention(
            *leaves[:3], feature_map="elu", causal=False, return_state=True, backend=backend,
            initial_state=featattn.LinearAttentionState(leaves[3], leaves[4]))
        g = torch.autograd.grad((o * o).sum() + s.kv.sum() + s.z.sum(), leaves)
        runs.append([o, s.kv, s.z, *g])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    want = brute(q, k, v, "elu", kv0=st0.kv, z0=st0.z)
    torch.testing.assert_close(runs[0][0], want, rtol=1e-10, atol=1e-12)
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        got = featattn.linear_attention(q.to(dt), k.to(dt), v.to(dt), feature_map="elu",
                                        causal=False)
        assert got.dtype == dt
        assert ((got.double() - brute(q, k, v, "elu")).norm() / want.norm()).item() < tol


def test_causal_key_padding_mask_equals_the_unpadded_rows():
    """Right padding: each row's real tokens attend as if alone, causal or not."""
    q, k, v = _qkv(2, 2, 2, 10, 4, 4, seed=5)
    keep = torch.ones(2, 10, dtype=torch.long)
    keep[1, 6:] = 0  # integer masks (Hugging Face's attention_mask) are accepted
    for causal in (True, False):
        got = featattn.linear_attention(q, k, v, feature_map="elu", causal=causal,
                                        key_padding_mask=keep)
        alone = featattn.linear_attention(q[1:, :, :6], k[1:, :, :6], v[1:, :, :6],
                                          feature_map="elu", causal=causal)
        torch.testing.assert_close(got[1:, :, :6], alone, rtol=1e-10, atol=1e-12)


def test_layer_encoder_mode():
    torch.manual_seed(0)
    layer = featattn.FeatureAttention(16, 2, "elu", causal=False).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y = layer(x)
    # every output depends on the last token: not causal
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert (layer(x2)[:, 0] - y[:, 0]).abs().max() > 1e-6
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 5:] = False
    torch.testing.assert_close(layer(x, key_padding_mask=keep)[0, :5], layer(x[:1, :5])[0])
    assert "causal=False" in repr(layer)
    with pytest.raises(ValueError, match="causal=False"):
        layer(x[:, :1], layer.init_state(2), update_state=True)


def test_select_kernel_and_bad_input():
    q, k, v = _qkv(1, 2, 2, 6, 4, 4, seed=1)
    assert featattn.select_kernel(q, k, v, "elu", causal=False).name == "noncausal"
    with pytest.raises(KernelUnavailable, match="two GEMMs"):
        featattn.select_kernel(q, k, v, "elu", backend="chunked", causal=False)
    la = featattn.linear_attention
    with pytest.raises(TypeError, match="causal must be a bool"):
        la(q, k, v, causal="no")
    with pytest.raises(ValueError, match=r"\[B, T\] = \[1, 6\]"):
        la(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool \\(or 0/1 integers\\)"):
        la(q, k, v, key_padding_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="causal=False is not supported with window"):
        la(q, k, v, causal=False, window=4)
    with pytest.raises(ValueError, match="key_padding_mask is not supported with cu_seqlens"):
        la(q, k, v, key_padding_mask=torch.ones(1, 6, dtype=torch.bool),
           cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="window > 0 is a causal layer"):
        featattn.FeatureAttention(16, 2, "elu", causal=False, window=4)
