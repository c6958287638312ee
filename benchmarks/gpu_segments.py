"""Split-T segments of the chunked kernels (FEATATTN_SEGMENT) on the GPU: bf16 checks
against float64 with segments forced, then the op and the layer timed per segment setting.

    python benchmarks/gpu_segments.py                  # checks + sweep
    python benchmarks/gpu_segments.py --no-checks --modes off auto
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
from _timing import bench  # noqa: E402

DT = torch.bfloat16
DEV = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1: a dry run of the checks


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def checks():
    """bf16 through linear_attention with 256-token segments (and auto) against float64:
    output, final state, and the gradients of q, k, v and the initial state."""
    ok = True
    cases = [  # B, H, Hkv, T, Dk, Dv, map, fuse mode
        (1, 4, 4, int(os.environ.get("BENCH_T", 1000)), 64, 64, "elu", "pass"),
        (1, 4, 2, int(os.environ.get("BENCH_T", 4099)), 64, 64, "elu", "kernel"),
        (2, 2, 2, int(os.environ.get("BENCH_T", 777)), 32, 128, "relu", "pass"),
        (1, 2, 2, 1, 64, 64, "elu", "kernel"),
        (1, 2, 1, int(os.environ.get("BENCH_T", 1300)), 200, 64, None, "pass"),
    ]
    for seg in ("256", "auto"):
        os.environ["FEATATTN_SEGMENT"] = seg
        for B, H, Hkv, T, Dk, Dv, fm, mode in cases:
            os.environ["FEATATTN_FUSE_MAPS"] = mode
            g = torch.Generator(device=DEV).manual_seed(T)
            q = torch.randn(B, H, T, Dk, device=DEV, generator=g)
            k = torch.randn(B, Hkv, T, Dk, device=DEV, generator=g)
            v = torch.randn(B, Hkv, T, Dv, device=DEV, generator=g)
            if fm is None:
                q, k = q.abs() + 0.1, k.abs() + 0.1
            kv0 = torch.rand(B, H, Dk, Dv, device=DEV, generator=g)
            z0 = torch.rand(B, H, Dk, device=DEV, generator=g) + 1
            do = torch.randn(B, H, T, Dv, device=DEV, generator=g)
            res = []
            for dt, backend in ((DT, "triton"), (torch.float64, "reference")):
                leaves = [t.to(dt).requires_grad_() for t in (q, k, v)] + \
                         [s.double().requires_grad_() if dt == torch.float64 else s.clone().requires_grad_()
                          for s in (kv0, z0)]
                state = featattn.LinearAttentionState(kv=leaves[3], z=leaves[4])
                o, st = featattn.linear_attention(*leaves[:3], feature_map=fm, backend=backend,
                                                  initial_state=state, return_state=True)
                loss = (o.float() * do.to(o.dtype).float()).sum() + st.kv.float().sum() * 1e-3
                grads = torch.autograd.grad(loss, leaves)
                res.append((o, st.kv, *grads))
            errs = [_rel(a, b) for a, b in zip(*res)]
            good = max(errs) < 2e-2 and all(torch.isfinite(t).all() for t in res[0])
            ok &= good
            print(f"check seg={seg:5s} B{B} H{H}/{Hkv} T{T} Dk{Dk} Dv{Dv} {fm} {mode}: "
                  + " ".join(f"{n} {e:.1e}" for n, e in zip(("o", "kv", "dq", "dk", "dv", "dkv0", "dz0"), errs))
                  + (" OK" if good else " FAIL"), flush=True)
    os.environ.pop("FEATATTN_FUSE_MAPS", None)
    return ok


def sweep(modes, shapes, repeat=1, layers=True):
    rows = []
    for B, H, T in shapes:
        mk = lambda: torch.randn(B, H, T, 64, device=DEV, dtype=DT).requires_grad_()  # noqa: E731
        q, k, v = mk(), mk(), mk()
        do = torch.randn(B, H, T, 64, device=DEV, dtype=DT)
        fq = (F.elu(q.detach().float()) + 1).to(DT).requires_grad_()
        fk = (F.elu(k.detach().float()) + 1).to(DT).requires_grad_()
        calls = {
            "features": (lambda: featattn.linear_attention(fq, fk, v), [fq, fk, v], "pass"),
            "elu pass": (lambda: featattn.linear_attention(q, k, v, feature_map="elu"), [q, k, v], "pass"),
            "elu kernel": (lambda: featattn.linear_attention(q, k, v, feature_map="elu"), [q, k, v], "kernel"),
        }
        for name, (call, leaves, fuse) in calls.items():
            os.environ["FEATATTN_FUSE_MAPS"] = fuse
            cells = []
            for mode in list(modes) * repeat:  # the same setting twice shows the spread
                os.environ["FEATATTN_SEGMENT"] = mode

                def fwd():
                    with torch.no_grad():
                        call()

                def fwdbwd():
                    call().backward(do)

                fwdbwd()
                cells.append(f"{bench(fwd):.3f} / {bench(fwdbwd, leaves):.3f}")
            rows.append((f"B{B} H{H} T{T} {name}", cells))
            print(rows[-1], flush=True)
    os.environ.pop("FEATATTN_FUSE_MAPS", None)
    for B, T in ((1, 16384), (4, 4096)) if layers else ():
        x = torch.randn(B, T, 1024, device=DEV, dtype=DT, requires_grad=True)
        dy = torch.randn(B, T, 1024, device=DEV, dtype=DT)
        layer = featattn.FeatureAttention(1024, 16, "elu").to("cuda", DT)
        cells = []
        for mode in list(modes) * repeat:
            os.environ["FEATATTN_SEGMENT"] = mode

            def fwd():
                with torch.no_grad():
                    layer(x)

            def fwdbwd():
                layer(x).backward(dy)

            fwdbwd()
            cells.append(f"{bench(fwd):.3f} / {bench(fwdbwd, [x, *layer.parameters()]):.3f}")
        rows.append((f"layer B{B} T{T} elu", cells))
        print(rows[-1], flush=True)
    print("\n| call (ms fwd / fwd+bwd) | " + " | ".join(f"FEATATTN_SEGMENT={m}" for m in list(modes) * repeat) + " |")
    print("|---|" + "---|" * len(modes) * repeat)
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["off", "auto", "512", "1024", "2048"])
    ap.add_argument("--shapes", nargs="+", default=["1x16x16384", "8x16x16384", "8x16x4096", "4x16x4096"],
                    help="BxHxT")
    ap.add_argument("--repeat", type=int, default=1, help="time every setting this many times")
    ap.add_argument("--no-layers", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    ok = True if args.no_checks else checks()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    sweep(args.modes, shapes, args.repeat, not args.no_layers)
    if not ok:
        sys.exit("a check failed (see above)")


if __name__ == "__main__":
    main()
