"""CPU scaling of the chunked PyTorch path against the quadratic reference.

    python benchmarks/cpu_scaling.py            # B=1, H=4, D=64, fp32, elu features

The chunked path is O(T): T=16384 should cost about 4x T=4096.  The quadratic reference is
O(T^2) in time and memory and is skipped above --max-quadratic.
"""

import argparse
import time

import torch

from featattn.chunked import chunked_linear_attention
from featattn.reference import quadratic_linear_attention


def bench(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-quadratic", type=int, default=8192)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H={args.heads} D={args.dim} fp32, normalised")
    print(f"{'T':>6} {'chunked ms':>11} {'x prev':>7} {'quadratic ms':>13} {'speed-up':>9}")
    prev = None
    for T in args.lengths:
        q, k, v = (torch.rand(1, args.heads, T, args.dim) for _ in range(3))
        kw = dict(normalize=True, eps=1e-6)
        with torch.no_grad():
            tc = bench(lambda: chunked_linear_attention(q, k, v, **kw), args.reps)
            tq = bench(lambda: quadratic_linear_attention(q, k, v, **kw), 1) if T <= args.max_quadratic else None
        ratio = f"{tc / prev:7.2f}" if prev else f"{'':>7}"
        quad = f"{tq:13.1f}" if tq else f"{'skipped':>13}"
        sp = f"{tq / tc:8.1f}x" if tq else f"{'':>9}"
        print(f"{T:>6} {tc:11.1f} {ratio} {quad} {sp}")
        prev = tc


if __name__ == "__main__":
    main()
