"""bf16 / fp16 relative error at T = 65536 of ``linear_attention(..., feature_map=MAP)`` (normalised)
against a float64 run of the PyTorch path, under kernel switches given as ``MODULE.NAME=INT``
(one process per setting, as benchmarks/gpu_ab.py runs them).  The issues' numerics target:
at most 3e-3 in bf16 and 1e-3 in fp16.

    python3 benchmarks/gpu_long_errors.py                                  # defaults, elu
    python3 benchmarks/gpu_long_errors.py --maps elu relu chunked.DEN_IN_MMA=0
"""
import argparse
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
    args = ap.parse_args()
    set_constants(args.switches)
    B, H, D = 1, 4, 64
    print("| switches | map | dtype | T | rel. error |\n|---|---|---|---|---|")
    for name in args.maps:
        for dt in (torch.bfloat16, torch.float16):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, args.T, D, device="cuda", dtype=dt, generator=g)
                       for _ in range(3))
            o = featattn.linear_attention(q, k, v, feature_map=name)
            ref = featattn.linear_attention(q.double(), k.double(), v.double(), feature_map=name,
                                            backend="torch")
            err = ((o.double() - ref).norm() / ref.norm()).item()
            print(f"| {' '.join(args.switches) or 'defaults'} | {name} | {str(dt)[6:]} | {args.T} "
                  f"| {err:.2e} |")


if __name__ == "__main__":
    main()
