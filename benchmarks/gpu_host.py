"""Host time of one eager call, at the level users call (CUDA): what a Python loop pays before
the GPU work, which is all that counts at small shapes.

    python benchmarks/gpu_host.py                    # B=4 H=16 T=1024 D=64, bf16
    python benchmarks/gpu_host.py --B 1 --H 1 --T 64
    python benchmarks/gpu_host.py --profile          # also where the layer's host time goes
    python benchmarks/gpu_host.py --cprofile         # and which Python functions it is
    python benchmarks/gpu_host.py --repeat 5         # each row the least of 5 measurements

Each row: microseconds of host time per call (the wall time of back-to-back calls without a
synchronisation, divided by their number; the launch queue never fills at these sizes) for
bare Triton launches (the floor), SDPA, the op and the layer, forward and forward+backward,
the map as a pass and in the kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.language as tl  # the jit functions' annotations are resolved from the globals

import featattn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402


REPEAT = 1  # --repeat


def host_us(fn, n=200, grad=False) -> float:
    """:func:`_timing.host_us` under no_grad (forward rows) or enable_grad (fwd+bwd rows);
    the least of ``--repeat`` measurements (the host's own noise only ever adds time)."""
    with torch.enable_grad() if grad else torch.no_grad():
        return min(_timing.host_us(fn, n) for _ in range(REPEAT))


def launch_rows():
    import triton

    @triton.jit
    def one(x):
        pass

    @triton.jit
    def many(x, y, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16,
             a17, a18, a19, a20, a21, B0: tl.constexpr, B1: tl.constexpr):
        pass

    tuned = triton.autotune([triton.Config({"B1": 16}), triton.Config({"B1": 32})],
                            key=["a0", "a1"])(triton.jit(many.fn))
    x = torch.zeros(16, device="cuda")
    ints = list(range(2, 24))
    return [
        ("empty @triton.jit kernel, 1 argument", host_us(lambda: one[(1,)](x))),
        ("empty kernel, 24 arguments", host_us(lambda: many[(1,)](x, x, *ints, B0=16, B1=16))),
        ("the same through triton.autotune (2 configs)",
         host_us(lambda: tuned[(1,)](x, x, *ints, B0=16))),
    ]


def profile_calls(fn, n=50, rows=30):
    """torch.profiler table of ``n`` calls of ``fn`` (after 10 warm-up calls), sorted by self
    CPU time: which aten ops, autograd nodes and CUDA runtime/driver calls (kernel launches
    among them) the host time of a call goes to."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(10):
        fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        sync()
    print(f"\nprofile of {n} calls (self CPU time; divide by {n} for one call)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def cprofile_calls(fn, n=200, rows=40):
    """cProfile of ``n`` calls of ``fn`` (after 10 warm-up calls), sorted by own time: which
    Python functions (featattn's, Triton's launcher, autograd's) the host time goes to."""
    import cProfile
    import pstats

    for _ in range(10):
        fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    print(f"\ncProfile of {n} calls (tottime: own time; divide by {n} for one call)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--profile", action="store_true",
                    help="also profile the layer's forward+backward (torch.profiler)")
    ap.add_argument("--cprofile", action="store_true",
                    help="also profile the Python of the op's and the layer's forward+backward")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each row this many times and print the least")
    a = ap.parse_args()
    global REPEAT
    REPEAT = a.repeat
    dt = torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "featattn from",
          Path(featattn.__file__).parent, flush=True)
    rows = launch_rows()
    q, k, v = (torch.randn(a.B, a.H, a.T, a.D, device="cuda", dtype=dt) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    rows.append(("SDPA forward", host_us(lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=True))))
    rows.append(("SDPA forward+backward", host_us(lambda: F.scaled_dot_product_attention(
        qg, kg, vg, is_causal=True).backward(v), grad=True)))
    rows.append(("op on features, forward", host_us(lambda: featattn.linear_attention(q, k, v))))
    rows.append(("op on features, forward+backward",
                 host_us(lambda: featattn.linear_attention(qg, kg, vg).backward(v), grad=True)))
    for mode in ("pass", "kernel"):
        os.environ["FEATATTN_FUSE_MAPS"] = mode
        rows.append((f"op elu, map {mode}, forward",
                     host_us(lambda: featattn.linear_attention(q, k, v, feature_map="elu"))))
        rows.append((f"op elu, map {mode}, forward+backward", host_us(
            lambda: featattn.linear_attention(qg, kg, vg, feature_map="elu").backward(v),
            grad=True)))
    os.environ.pop("FEATATTN_FUSE_MAPS")
    dim = a.H * a.D
    layer = featattn.FeatureAttention(dim, a.H, "elu").to("cuda", dt)
    x = torch.randn(a.B, a.T, dim, device="cuda", dtype=dt, requires_grad=True)
    dy = torch.randn_like(x)
    rows.append(("FeatureAttention elu forward", host_us(lambda: layer(x))))
    rows.append(("FeatureAttention elu forward+backward",
                 host_us(lambda: layer(x).backward(dy), grad=True)))
    print(f"\nhost us per call, B={a.B} H={a.H} T={a.T} D={a.D} bf16\n")
    print("| call | host us |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    profilers = [f for f, on in ((profile_calls, a.profile), (cprofile_calls, a.cprofile)) if on]
    for prof in profilers:
        with torch.enable_grad():
            print("\n## the op on features, forward+backward")
            prof(lambda: featattn.linear_attention(qg, kg, vg).backward(v))
            print("\n## FeatureAttention elu, forward+backward")
            prof(lambda: layer(x).backward(dy))

if __name__ == "__main__":
    main()
