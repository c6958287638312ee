"""Which forced launch configs of the projected kernels fault on the GPU.

    REPS=300 LOWS=16,32 python3 benchmarks/gpu_faults.py d16f16v16,d16f64v150,d64f128v64

For each (config of the autotune space or "auto", narrowest tile ``low``, case) one process
with CUDA_LAUNCH_BLOCKING=1 runs ``linear_attention(..., feature_map=<Hedgehog>,
return_state=True)`` with the map inside the kernels (bf16), then REPS backward launches (a
fault can take more than one launch to show: the autotuner's timing launches found it).
Prints one line per run: ok, or FAIL with the last marker reached (start / fwd-ok) and the
error.  ``low``: the narrowest head-dim tile (``projected._tiles`` with its floor replaced:
the package itself now never goes below 32 on the GPU).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIGS = ["auto", "64/4/2", "64/8/2", "32/4/2", "64/4/3", "32/8/2"]
CASES = {  # B, H, Hkv, T, d, f, Dv, state
    "d16f16v16": (1, 2, 2, 30, 16, 16, 16, True),
    "d16f64v150": (1, 4, 2, 20, 16, 64, 150, True),
    "d64f128v64": (1, 2, 2, 100, 64, 128, 64, False),
    "d32f32v32": (1, 2, 2, 70, 32, 32, 32, False),
}


def worker(cfg, low, case, dtype):
    import torch
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
    import featattn
    from featattn.feature_maps import HedgehogFeatureMap
    from featattn.kernels import projected, tuning

    def tiles(D, F, Dv, pair, dt):  # projected._tiles with the narrowest tile ``low``
        from featattn.kernels._common import next_pow2

        bd, bf = max(low, next_pow2(D)), max(low, next_pow2(F))
        cap = max(low, 8192 // (bf * (2 if pair else 1)))
        return bd, bf, max(low, min(next_pow2(Dv), 128, cap))

    projected._tiles = tiles
    os.environ["FEATATTN_FUSE_MAPS"] = "kernel"
    B, H, Hkv, T, d, f, Dv, st = CASES[case]
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    fm = HedgehogFeatureMap(d, heads=H, kv_heads=Hkv, feature_dim=f).cuda()
    q = torch.randn(B, H, T, d, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, Hkv, T, d, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, Hkv, T, Dv, device="cuda", dtype=dt, requires_grad=True)
    s0 = None
    if st:
        s0 = featattn.LinearAttentionState(torch.rand(B, H, 2 * f, Dv, device="cuda"),
                                           1 + torch.rand(B, H, 2 * f, device="cuda"))
    import contextlib
    with contextlib.ExitStack() as stack:
        if cfg != "auto":
            bt, nw, ns = map(int, cfg.split("/"))
            for name in ("projected_fwd", "projected_bwd"):
                stack.enter_context(tuning.override(name, BT=bt, num_warps=nw, num_stages=ns))
        o, s = featattn.linear_attention(q, k, v, feature_map=fm, backend="triton",
                                         initial_state=s0, return_state=True)
        torch.cuda.synchronize()
        print("MARK fwd-ok", flush=True)
        loss = o.float().square().sum() + s.kv.sum() + s.z.sum()
        for _ in range(int(os.environ.get("REPS", "1"))):
            torch.autograd.grad(loss, [q, k, v, *fm.parameters()], retain_graph=True)
        torch.cuda.synchronize()
        print("MARK bwd-ok", flush=True)


def run(args):
    cfg, low, case, dtype = args
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    p = subprocess.run([sys.executable, __file__, "--worker", cfg, str(low), case, dtype],
                       capture_output=True, text=True, env=env, timeout=300)
    marks = [ln[5:] for ln in p.stdout.splitlines() if ln.startswith("MARK ")]
    if p.returncode == 0:
        return f"{case} {dtype} low={low} {cfg}: ok"
    err = [ln for ln in p.stderr.splitlines() if "Error" in ln][-1:] or p.stderr.splitlines()[-1:]
    return f"{case} {dtype} low={low} {cfg}: FAIL after {marks[-1:] or ['start']} {err}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        sys.exit(0)
    cases = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CASES)
    lows = [int(x) for x in os.environ.get("LOWS", "16").split(",")]
    grid = list(itertools.product(CONFIGS, lows, cases, ["bfloat16"]))
    with ThreadPoolExecutor(12) as ex:
        for line in ex.map(run, grid):
            print(line, flush=True)
