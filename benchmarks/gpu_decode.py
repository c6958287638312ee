"""Decode-step timings on the GPU (H200, bf16): featattn.decode_step eager and replayed in a
CUDA graph, linear_attention with a state, the hybrid layer's step (window 64) against the
PyTorch form it replaced, fla's fused_recurrent_linear_attn and softmax SDPA over a KV cache,
in one run.

    python benchmarks/gpu_decode.py

"eager" is wall time per call over 300 back-to-back calls (host included, the number a Python
decode loop sees); "graph" is per replay of a captured step.  H = 16, D = 64 (Taylor d = 16).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import featattn
from featattn import LinearAttentionState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import wall_ms  # noqa: E402

DT = torch.bfloat16


def graph_ms(fn, n=1000):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n // 10):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def rows(B, H=16):
    out = []
    for fm, d in (("elu", 64), ("taylor", 16)):
        Dk = 1 + d + d * d if fm == "taylor" else d
        q, k, v = (torch.randn(B, H, 1, n, device="cuda", dtype=DT) for n in (d, d, 64))
        st = LinearAttentionState(torch.rand(B, H, Dk, 64, device="cuda"),
                                  torch.rand(B, H, Dk, device="cuda") + 1)
        o = torch.empty(B, H, 1, 64, device="cuda", dtype=DT)
        with torch.no_grad():
            step = lambda: featattn.decode_step(q, k, v, st, feature_map=fm, out=o)  # noqa: E731
            out.append((f"B={B} decode_step {fm}", wall_ms(step), graph_ms(step)))
            la = lambda: featattn.linear_attention(q, k, v, feature_map=fm, initial_state=st,  # noqa: E731
                                                   return_state=True)
            name = featattn.select_kernel(q, k, v, fm, initial_state=st).name
            out.append((f"B={B} linear_attention({fm}, initial_state) [{name}]", wall_ms(la), float("nan")))
    out += hybrid_rows(B, H)
    try:
        from fla.ops.linear_attn import fused_recurrent_linear_attn

        q, k, v = (torch.randn(B, 1, H, 64, device="cuda", dtype=DT) for _ in range(3))
        s0 = torch.rand(B, H, 64, 64, device="cuda")

        def fla():
            return fused_recurrent_linear_attn(F.elu(q) + 1, F.elu(k) + 1, v, scale=1.0,
                                               initial_state=s0, output_final_state=True,
                                               normalize=False)

        with torch.no_grad():
            out.append((f"B={B} fla fused_recurrent_linear_attn (elu in PyTorch)", wall_ms(fla), float("nan")))
    except Exception as e:  # noqa: BLE001
        print(f"fla unavailable: {type(e).__name__}: {str(e)[:120]}")
    for L in (4096, 65536):
        qs = torch.randn(B, H, 1, 64, device="cuda", dtype=DT)
        kc, vc = (torch.randn(B, H, L, 64, device="cuda", dtype=DT) for _ in range(2))
        sd = lambda: F.scaled_dot_product_attention(qs, kc, vc)  # noqa: E731
        with torch.no_grad():
            out.append((f"B={B} SDPA, one query over a {L}-token KV cache", wall_ms(sd), graph_ms(sd)))
    return out


def hybrid_rows(B, H=16, W=64, d=64):
    """The hybrid layer's step (window W, full): decode_step's step kernel against the
    direct PyTorch form it replaced (backend="torch"), after checking they agree."""
    out = []
    for name in ("elu", "hedgehog"):
        fm = name
        if name == "hedgehog":
            fm = featattn.get_feature_map("hedgehog", head_dim=d, heads=H).cuda().to(DT)
            fm.requires_grad_(False)
        Dk = 2 * d if name == "hedgehog" else d
        q, k, v = (torch.randn(B, H, 1, d, device="cuda", dtype=DT) for _ in range(3))
        wk, wv = (torch.randn(B, H, W, d, device="cuda", dtype=DT) for _ in range(2))
        st = LinearAttentionState(torch.rand(B, H, Dk, d, device="cuda"),
                                  torch.rand(B, H, Dk, device="cuda") + 1, wk, wv)
        o = torch.empty(B, H, 1, d, device="cuda", dtype=DT)
        kw = dict(feature_map=fm, window=W, window_weight=torch.full((H,), 0.5, device="cuda"))
        with torch.no_grad():
            want, want_st = featattn.linear_attention(q, k, v, initial_state=st, return_state=True,
                                                      backend="torch", **kw)
            got_st = st.clone()
            got = featattn.decode_step(q, k, v, got_st, **kw)
            err = max((a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
                      for a, b in ((got, want), (got_st.kv, want_st.kv),
                                   (got_st.window_k, want_st.window_k)))
            print(f"B={B} hybrid {name} W={W}: step kernel vs PyTorch form, max rel. error "
                  f"{err:.2e}", flush=True)
            step = lambda: featattn.decode_step(q, k, v, st, out=o, **kw)  # noqa: E731
            out.append((f"B={B} decode_step {name}, window {W}", wall_ms(step), graph_ms(step)))
            old = lambda: featattn.linear_attention(q, k, v, initial_state=st,  # noqa: E731
                                                    return_state=True, backend="torch", **kw)
            out.append((f"B={B} linear_attention({name}, window {W}), PyTorch form (before)",
                        wall_ms(old), float("nan")))
    return out


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    table = []
    for B in (1, 32):
        for r in rows(B):
            print(r, flush=True)
            table.append(r)
    print("\n| one decode step | eager ms/call | CUDA graph ms/step |\n|---|---|---|")
    for name, e, g in table:
        print(f"| {name} | {e:.4f} | {g:.4f} |")


if __name__ == "__main__":
    main()
