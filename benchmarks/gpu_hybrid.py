"""The hybrid layer (``window > 0``: softmax over the last W keys, linear attention before)
on the GPU, in one run: the chunked PyTorch path (``FEATATTN_HYBRID_LINEAR=torch``, the
default) and the Triton form (``=triton``: the linear part in the chunked kernel on shifted
keys, the window in featattn/kernels/window.py), beside the pure linear kernel and causal
SDPA.

    python benchmarks/gpu_hybrid.py                 # checks, then B8 H16 D64 W64 elu tables
    python benchmarks/gpu_hybrid.py --T 4096 16384 --window 64
    python benchmarks/gpu_hybrid.py --profile       # the kernels of one Triton fwd+bwd, by time
    python benchmarks/gpu_hybrid.py --configs       # every window-kernel tile config's time
    python benchmarks/gpu_hybrid.py --packed        # also packed sequences, one call vs a loop

Before timing, both settings are checked in bf16 at T = 1000 (grouped heads, a state in and
out) against the float64 oracle: output and the gradients of q, k, v.  ms fwd / fwd+bwd
(median of triton.testing.do_bench) and the peak memory of forward+backward.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import featattn  # noqa: E402
from gpu_e2e import print_table, timed_case  # noqa: E402

DT = torch.bfloat16


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(W, dev):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1000, 64, device=dev)
    k, v = torch.randn(2, 2, 1000, 64, device=dev), torch.randn(2, 2, 1000, 64, device=dev)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = featattn.linear_attention(*leaves, feature_map="elu", window=W, backend="reference")
    grads_want = torch.autograd.grad(want.square().sum(), leaves)
    for mode in ("torch", "triton", "triton, 256-token segments"):
        os.environ["FEATATTN_HYBRID_LINEAR"] = mode.split(",")[0]
        if "segments" in mode:  # the chunked kernels split T (the key shift in their sums)
            os.environ["FEATATTN_SEGMENT"] = "256"
        lv = [t.to(DT).requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*lv, feature_map="elu", window=W)
        g = torch.autograd.grad(o.float().square().sum(), lv)
        errs = [_rel(o, want)] + [_rel(a, b) for a, b in zip(g, grads_want)]
        ok = max(errs) < 2e-2
        print(f"check {mode}: o {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
              f"dv {errs[3]:.1e} {'OK' if ok else 'FAILED'}", flush=True)
        os.environ.pop("FEATATTN_SEGMENT", None)
        if not ok:
            raise SystemExit(f"FEATATTN_HYBRID_LINEAR={mode} disagrees with the oracle")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["torch", "triton"],
                    help="FEATATTN_HYBRID_LINEAR settings to time")
    ap.add_argument("--profile", action="store_true",
                    help="also list the GPU kernels of the Triton form's fwd+bwd at the last T")
    ap.add_argument("--packed", action="store_true",
                    help="also time B sequences of the first T packed (cu_seqlens) in one "
                         "call, against one call per sequence (how packed calls ran before)")
    ap.add_argument("--configs", action="store_true",
                    help="also list the autotuner's time for every tile config of the window "
                         "kernels (the last shape tuned)")
    args = ap.parse_args()
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if not args.no_checks:
        check(args.window, dev)
    rows = []
    B, H, D = args.B, args.H, 64
    for T in args.T:
        q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=DT).requires_grad_()
                   for _ in range(3))
        do = torch.randn(B, H, T, D, device=dev, dtype=DT)
        for mode in args.modes:
            os.environ["FEATATTN_HYBRID_LINEAR"] = mode
            timed_case(rows, f"T={T} hybrid W={args.window} elu, FEATATTN_HYBRID_LINEAR={mode}",
                       lambda: featattn.linear_attention(q, k, v, feature_map="elu",
                                                         window=args.window), [q, k, v], do)
        timed_case(rows, f"T={T} pure linear elu (no window)",
                   lambda: featattn.linear_attention(q, k, v, feature_map="elu"), [q, k, v], do)
        timed_case(rows, f"T={T} causal SDPA",
                   lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], do)
    if args.packed:
        packed_rows(rows, B, H, D, args.T[0], args.window, dev)
    print(f"\n{torch.cuda.get_device_name()}, bf16, B = {B}, H = {H}, D = {D}")
    print_table(rows)
    if args.profile:
        profile(q, k, v, do, args.window)
    if args.configs:
        from featattn.kernels import window as W

        for name, launch in (("forward", W._FWD), ("dq", W._DQ), ("dk/dv", W._DKDV)):
            tuner = launch.tuner
            timings = getattr(tuner, "configs_timings", None) or {}
            print(f"\n{name} kernel, ms per config (best: {tuner.best_config}):")
            for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1][0]):
                print(f"  {cfg}: {ms[0]:.3f}")


def packed_rows(rows, B, H, D, T, W, dev):
    """B sequences of T tokens packed into one row (cu_seqlens): one Triton call for all,
    against one call per sequence (the Python loop packed calls took before), and the same
    tokens as a batch of B; checked against each other first."""
    os.environ["FEATATTN_HYBRID_LINEAR"] = "triton"
    q, k, v = (torch.randn(1, H, B * T, D, device=dev, dtype=DT).requires_grad_()
               for _ in range(3))
    do = torch.randn(1, H, B * T, D, device=dev, dtype=DT)
    cu = torch.arange(0, B * T + 1, T, device=dev, dtype=torch.int32)

    def packed():
        return featattn.linear_attention(q, k, v, feature_map="elu", window=W, cu_seqlens=cu)

    def loop():
        return torch.cat([featattn.linear_attention(q[:, :, i * T:(i + 1) * T],
                                                    k[:, :, i * T:(i + 1) * T],
                                                    v[:, :, i * T:(i + 1) * T],
                                                    feature_map="elu", window=W)
                          for i in range(B)], 2)

    with torch.no_grad():
        err = _rel(packed(), loop())
    print(f"packed vs per-sequence: rel. error {err:.1e}", flush=True)
    timed_case(rows, f"{B} x {T} packed (cu_seqlens), one call", packed, [q, k, v], do)
    timed_case(rows, f"{B} x {T} packed, one call per sequence (before)", loop, [q, k, v], do)
    qb, kb, vb = (x.detach().view(H, B, T, D).transpose(0, 1).contiguous().requires_grad_()
                  for x in (q, k, v))
    dob = do.view(H, B, T, D).transpose(0, 1).contiguous()
    timed_case(rows, f"B={B} T={T}, the same tokens as a batch",
               lambda: featattn.linear_attention(qb, kb, vb, feature_map="elu", window=W),
               [qb, kb, vb], dob)


def profile(q, k, v, do, window, n=3):
    """The GPU kernels of ``n`` Triton-form fwd+bwd calls, by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.environ["FEATATTN_HYBRID_LINEAR"] = "triton"

    def step():
        featattn.linear_attention(q, k, v, feature_map="elu", window=window).backward(do)

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    print(f"\nkernels of {n} fwd+bwd calls at T = {q.shape[2]}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20,
                                    max_name_column_width=60))


if __name__ == "__main__":
    main()
