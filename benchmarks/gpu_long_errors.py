"""bf16 / fp16 relative errors at T = 65536 of ``linear_attention(..., feature_map=MAP)``
(normalised) and its gradients against a float64 run of the PyTorch path, under kernel
switches given as ``MODULE.NAME=INT`` (run one setting per process, as gpu_ab.py does).
dq and dk cannot reach 3e-3 in bf16 with bf16 features (benchmarks/bf16_grad_floor.py).  The issues' numerics target:
at most 3e-3 in bf16 and 1e-3 in fp16.

    python3 benchmarks/gpu_long_errors.py                                  # defaults, elu
    python3 benchmarks/gpu_long_errors.py chunked.BWD_KSUM_DOT=0 --maps elu relu --paths pass
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _timing import set_constants  # noqa: E402

import featattn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("switches", nargs="*", help="MODULE.NAME=INT, e.g. chunked.DEN_IN_MMA=0")
    ap.add_argument("--maps", nargs="+", default=["elu"])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--paths", nargs="+", default=["pass", "kernel"],
                    help="FEATATTN_FUSE_MAPS: the map as a pass before the kernels, or in them")
    args = ap.parse_args()
    set_constants(args.switches)
    B, H, D = 1, 4, 64
    print("| switches | map, path | dtype | T | o | dq | dk | dv |\n|---|---|---|---|---|---|---|---|")
    for name, path, dt in [(m, p, d) for m in args.maps for p in args.paths
                           for d in (torch.bfloat16, torch.float16)]:
        os.environ["FEATATTN_FUSE_MAPS"] = path
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, args.T, D, device="cuda", dtype=dt, generator=g)
                       for _ in range(4))
        x = [t.requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*x, feature_map=name)
        got = [o, *torch.autograd.grad(o, x, do)]
        r = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = featattn.linear_attention(*r, feature_map=name, backend="torch")
        want = [ref, *torch.autograd.grad(ref, r, do.double())]
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
        print(f"| {' '.join(args.switches) or 'defaults'} | {name}, {path} | {str(dt)[6:]} | {args.T} | "
              + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
