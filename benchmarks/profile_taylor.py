"""Where the chunked fused Taylor kernels spend their time (GPU): registers / spills and the
Triton GPU IR of the compiled kernels, and a target for Nsight Compute.

    OUT=/tmp/ir python3 benchmarks/profile_taylor.py --ir   # regs, spills; ttgir into $OUT
    ncu --clock-control none --kernel-name regex:'_(fwd|bwd)_kernel' --launch-skip 2 \\
        --launch-count 2 --section WarpStateStats --section SourceCounters \\
        python3 benchmarks/profile_taylor.py              # one profiled fwd and bwd launch

Shapes: B=8 H=16 d=16 Dv=64 bf16 normalised, T from --T (default 2048); the kernels run with
FEATATTN_NO_AUTOTUNE's fixed configs so ncu sees exactly one launch of each per call.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FEATATTN_NO_AUTOTUNE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from featattn.kernels import taylor_fused as TF  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_taylor import _compiled, inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--ir", action="store_true")
    args = ap.parse_args()
    B, H, T, d, Dv = 8, 16, args.T, 16, 64
    torch.manual_seed(0)
    q, k, v = inputs(B, H, H, T, d, Dv, torch.bfloat16)  # gpu_taylor's (featattn.testing's)
    do = torch.randn(B, H, T, Dv, device="cuda").bfloat16()
    for _ in range(2):  # compile + warm, then the launch a profiler picks
        o, den, _, _ = TF._forward(q, k, v, True, 1e-6, None, None, False)
        TF._backward(q, k, v, o, den, None, None, do, None, None, True)
    torch.cuda.synchronize()
    if args.ir:
        for name in ("_fwd_kernel", "_bwd_kernel"):
            for ck in _compiled(getattr(TF, name)).values():
                print(f"{name}: regs={ck.n_regs} spills={ck.n_spills} smem={ck.metadata.shared} "
                      f"warps={ck.metadata.num_warps}")
                out = os.environ.get("OUT")
                if out:
                    Path(out, f"{name}.ttgir").write_text(ck.asm.get("ttgir") or "")


if __name__ == "__main__":
    main()
