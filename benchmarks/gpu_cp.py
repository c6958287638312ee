"""Context parallelism (``cp_group``) across the GPUs of one host: each rank holds a slice of
one long sequence; the whole sequence on one GPU is the anchor.  Run with torchrun:

    torchrun --nproc_per_node 2 benchmarks/gpu_cp.py                  # NCCL, the issue's rows
    torchrun --nproc_per_node 2 benchmarks/gpu_cp.py --cpu --T 4096   # gloo smoke run (fp32)

Per map and total T: B = 1, H = 16, D = 64 (Taylor d = 16, Dv = 64), bf16.  First the
outputs of the context-parallel call, gathered, are compared with one GPU's call on the
whole sequence (relative error), then each is timed (fwd+bwd, median of ``--repeat`` runs,
each between barriers): rank time, the whole-sequence time on rank 0's GPU, their ratio,
and the share of the rank time that is not the local call (the same call on the rank's
slice without ``cp_group``): the collectives and the prefix sums.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import featattn


def timed(fn, device, repeat, barrier=True):
    """Median ms of ``repeat`` calls, each between barriers (``barrier=False``: one rank's
    own call, which the other ranks do not join)."""
    times = []
    for _ in range(repeat):
        if barrier:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU, fp32 (a smoke run)")
    ap.add_argument("--T", type=int, nargs="+", default=[131072, 524288], help="total tokens")
    ap.add_argument("--maps", default="elu,taylor")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu:
        dist.init_process_group("gloo")
        device, dtype = torch.device("cpu"), torch.float32
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        device, dtype = torch.device("cuda"), torch.bfloat16
    group = dist.new_group(list(range(world)))
    rows = []
    for name in args.maps.split(","):
        d = 16 if name == "taylor" else 64
        for T in args.T:
            g = torch.Generator(device="cpu").manual_seed(T)
            q, k = (torch.randn(1, 16, T, d, generator=g) for _ in range(2))
            v = torch.randn(1, 16, T, 64, generator=g)
            do = torch.randn(1, 16, T, 64, generator=g)
            sl = slice(rank * T // world, (rank + 1) * T // world)
            local = [t[:, :, sl].to(device, dtype).requires_grad_() for t in (q, k, v)]
            dlocal = do[:, :, sl].to(device, dtype)

            def cp():
                return featattn.linear_attention(*local, feature_map=name, cp_group=group)

            with torch.no_grad():
                o = cp()
            parts = [torch.empty_like(o) for _ in range(world)]
            dist.all_gather(parts, o.contiguous())
            cp().backward(dlocal)  # warm-up: kernels compile and autotune
            t_cp = timed(lambda: cp().backward(dlocal), device, args.repeat)
            t_local = timed(lambda: featattn.linear_attention(
                *local, feature_map=name).backward(dlocal), device, args.repeat)
            if rank == 0:
                whole = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
                dwhole = do.to(device, dtype)
                with torch.no_grad():
                    o_whole = featattn.linear_attention(*whole, feature_map=name)
                err = ((torch.cat(parts, 2).double() - o_whole.double()).norm()
                       / o_whole.double().norm()).item()
            dist.barrier()
            if rank == 0:
                featattn.linear_attention(*whole, feature_map=name).backward(dwhole)  # warm-up
                t_whole = timed(lambda: featattn.linear_attention(
                    *whole, feature_map=name).backward(dwhole), device, args.repeat,
                    barrier=False)
                rows.append((name, T, err, t_cp, t_whole, t_cp / t_whole,
                             max(0.0, 1 - t_local / t_cp)))
                print(rows[-1], flush=True)
                del whole, dwhole, o_whole
            dist.barrier()
    if rank == 0:
        kind = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        print(f"\n{world} ranks x {kind}, {dtype}, B = 1, H = 16\n")
        print("| map | total T | CP vs whole rel. err | rank fwd+bwd ms | whole on one device ms "
              "| ratio | not-local share |")
        print("|---|---|---|---|---|---|---|")
        for name, T, err, a, b, r, share in rows:
            print(f"| {name} | {T} | {err:.1e} | {a:.2f} | {b:.2f} | {r:.2f} | {share:.0%} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
