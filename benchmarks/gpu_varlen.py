"""Packed sequences (``cu_seqlens``) against one sequence of the same total length and against
the same batch padded to its longest sequence, in one run (the packed-sequences issue's targets).

    python benchmarks/gpu_varlen.py                        # H200: 16 sequences summing to 65536
    python benchmarks/gpu_varlen.py --device cpu --total 2048 --seqs 4 --maps elu  # smoke run

Rows, ms fwd / fwd+bwd (median of triton.testing.do_bench on CUDA, best of 5 wall times on
CPU), H = 16, D = 64, bf16 on CUDA (fp32 on CPU):
  * one sequence of ``total`` tokens, B = 1;
  * ``seqs`` sequences packed into one row (``cu_seqlens``), uniform random lengths;
  * the same lengths drawn log-normally (skewed), packed, and padded to the longest (B = seqs,
    key_padding_mask), with the fraction of padded tokens.
Before timing, the packed call is checked against each sequence run alone (forward).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import featattn


def lengths_uniform(total, n, g):
    cuts = torch.randperm(total - 1, generator=g)[: n - 1].add(1).sort().values.tolist()
    edges = [0] + cuts + [total]
    return [b - a for a, b in zip(edges, edges[1:])]


def lengths_lognormal(total, n, g):
    w = torch.empty(n).log_normal_(0.0, 1.0, generator=g)
    raw = (w / w.sum() * total).floor().clamp_min(1).long()
    raw[raw.argmax()] += total - int(raw.sum())
    return raw.tolist()


def timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")

    def wall(fn, n=5):
        fn()
        best = math.inf
        for _ in range(n):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    return wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--total", type=int, default=65536)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--maps", default="elu,taylor")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bench = timer(dev)
    g = torch.Generator().manual_seed(0)
    H, T = args.heads, args.total
    rows = []
    for fm in args.maps.split(","):
        D = 16 if fm == "taylor" else 64

        def mk(*shape):
            return torch.randn(*shape, device=dev, dtype=dt).requires_grad_()

        q, k, v = mk(1, H, T, D), mk(1, H, T, D), mk(1, H, T, 64)
        do = torch.randn(1, H, T, 64, device=dev, dtype=dt)

        def run(cu=None, q=q, k=k, v=v, do=do, mask=None):
            def f():
                with torch.no_grad():
                    featattn.linear_attention(q, k, v, feature_map=fm, cu_seqlens=cu,
                                              key_padding_mask=mask)

            def fb():
                featattn.linear_attention(q, k, v, feature_map=fm, cu_seqlens=cu,
                                          key_padding_mask=mask).backward(do)

            return bench(f), bench(fb)

        rows.append((fm, f"one sequence of {T}", *run()))
        for kind, make in (("uniform", lengths_uniform), ("log-normal", lengths_lognormal)):
            lens = make(T, args.seqs, g)
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=dev,
                              dtype=torch.int32)
            if kind == "uniform":  # packed == each alone, before any timing
                with torch.no_grad():
                    packed = featattn.linear_attention(q, k, v, feature_map=fm, cu_seqlens=cu)
                    c = cu.tolist()
                    worst = max(
                        ((packed[:, :, a:b].float() - featattn.linear_attention(
                            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], feature_map=fm).float())
                         .norm() / packed[:, :, a:b].float().norm()).item()
                        for a, b in zip(c, c[1:]))
                print(f"{fm}: packed vs alone, worst relative error {worst:.1e}", flush=True)
            rows.append((fm, f"{args.seqs} packed, {kind} lengths (max {max(lens)})",
                         *run(cu)))
            if kind == "log-normal":
                L = max(lens)
                qp, kp, vp = mk(args.seqs, H, L, D), mk(args.seqs, H, L, D), mk(args.seqs, H, L, 64)
                dop = torch.randn(args.seqs, H, L, 64, device=dev, dtype=dt)
                mask = torch.arange(L, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
                pad = 1 - T / (args.seqs * L)
                rows.append((fm, f"{args.seqs} padded to {L} ({pad:.0%} padding)",
                             *run(None, qp, kp, vp, dop, mask)))
        for r in rows[-4:]:
            print(r, flush=True)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"\n{name}, {dt}, H = {H}, total {T} tokens\n")
    print("| map | call | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for fm, what, a, b in rows:
        print(f"| {fm} | {what} | {a:.3f} | {b:.3f} |")


if __name__ == "__main__":
    main()
