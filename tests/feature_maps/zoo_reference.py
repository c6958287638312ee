"""Float64 references for the literature maps' tests (t2r, dpfp, rebased, performer), written
from the attention formula, independently of featattn's kernels and reference backend."""

import torch

import featattn

EPS = 1e-6  # linear_attention's default


def causal_attention(scores, v, normalize, eps=EPS):
    """``o_t = sum_{s<=t} S[t, s] v_s / (sum_{s<=t} S[t, s] + eps)`` for a score matrix
    ``S: [B, H, T, T]`` (``phi(q_t) . phi(k_s)``) and ``v: [B, Hkv, T, Dv]``; query head h
    reads kv head ``h // (H // Hkv)``."""
    v = v.repeat_interleave(scores.shape[1] // v.shape[1], 1)
    T = scores.shape[-1]
    s = scores * torch.ones(T, T, dtype=scores.dtype).tril()
    num = s @ v
    return num / (s.sum(-1, keepdim=True) + eps) if normalize else num


def dot_scores(fq, fk):
    """``phi(q_t) . phi(k_s)`` for query features ``[B, H, T, F]`` and key features
    ``[B, Hkv, T, F]``."""
    fk = fk.repeat_interleave(fq.shape[1] // fk.shape[1], 1)
    return fq @ fk.transpose(-1, -2)


def qkv(B=2, H=4, Hkv=2, T=12, d=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, dd, generator=g, dtype=torch.float64).requires_grad_(True)
            for h, dd in ((H, d), (Hkv, d), (Hkv, dv))]


def check_against_references(fm, scores_fn, params=(), normalize=True, **sizes):
    """``linear_attention(q, k, v, feature_map=fm)`` (default backend) and its gradients
    (q, k, v and ``params``) match backend="reference" and the test's own formula
    ``causal_attention(scores_fn(q, k), v)``."""
    q, k, v = qkv(**sizes)
    leaves = [q, k, v, *params]
    runs = {
        "auto": lambda: featattn.linear_attention(q, k, v, feature_map=fm, normalize=normalize),
        "reference": lambda: featattn.linear_attention(q, k, v, feature_map=fm,
                                                       normalize=normalize, backend="reference"),
        "formula": lambda: causal_attention(scores_fn(q, k), v, normalize),
    }
    g = None
    results = {}
    for name, run in runs.items():
        o = run()
        if g is None:
            g = torch.randn_like(o)
        grads = torch.autograd.grad((o * g).sum(), leaves)
        results[name] = (o.detach(), grads)
    o_ref, g_ref = results["formula"]
    assert o_ref.abs().max() > 0
    for name in ("auto", "reference"):
        o, grads = results[name]
        torch.testing.assert_close(o, o_ref, msg=lambda m: f"{name} output: {m}")
        for i, (a, b) in enumerate(zip(grads, g_ref)):
            assert b.abs().sum() > 0, f"gradient {i} of the formula is 0: the test checks nothing"
            torch.testing.assert_close(a, b, msg=lambda m: f"{name} gradient {i}: {m}")
