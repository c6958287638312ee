"""Bisect the GPU-only failure of session 15: an elementwise map inside the chunked kernels
with Dk in two key tiles (Dk > 128) and T split into segments gave wrong outputs and dq
(relative error 0.4-0.6) and, with one fixed config, an illegal memory access on the H200
(Triton 3.6), while the same calls unsplit, or split on features, passed.  featattn now
never splits such calls (``chunked._split``); this script lifts that guard and runs the
pieces one at a time, each in its own process (a fault poisons the CUDA context), printing
one line per (case, config, step):

    python3 benchmarks/gpu_split_dk.py --cases d136 d256 d136v64 d136feat --configs auto 64/4/2
    python3 benchmarks/gpu_split_dk.py                     # every case x config x step (~60
                                                           # processes: several minutes)
    TRITON_INTERPRET=1 python3 benchmarks/gpu_split_dk.py --cases d136fp16 --configs auto
                                                           # the same on CPU (all pass there)

Steps: ``seg`` the forward segment sums (``_seg_kernel`` with the map) against torch;
``fwd`` the forward's o (per segment) and final state; ``bwd`` dq, dk, dv (per segment).
Cases vary what might matter: Dk 136 (two tiles, the second padded) or 256 (two full
tiles), Dv 24 (a 32-wide value tile) or 64, the map in the kernel or on features (the
control), bf16 or fp16.  Configs: BT / warps / stages forced on all three chunked kernels,
or ``auto``.  All against float64 on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # Dk, Dv, map in the kernel, dtype
    "d136": (136, 24, True, "bfloat16"),
    "d136v64": (136, 64, True, "bfloat16"),
    "d256": (256, 24, True, "bfloat16"),
    "d136fp16": (136, 24, True, "float16"),
    "d136feat": (136, 24, False, "bfloat16"),  # control: features, split (passed)
}
CONFIGS = ["auto", "64/4/2", "32/4/2", "64/8/2"]
STEPS = ["seg", "fwd", "bwd"]
B, H, T, SEG = 1, 2, 130, 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def worker(case: str, config: str, step: str) -> str:
    sys.path[:0] = [str(ROOT)]
    import torch

    import featattn
    from featattn.kernels import chunked as C
    from featattn.kernels import maps, tuning

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (cpu: TRITON_INTERPRET=1, fp16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    Dk, Dv, fused, dt = CASES[case]
    dtype = getattr(torch, dt)
    os.environ["FEATATTN_SEGMENT"] = str(SEG)
    C._split = lambda programs, T_, device, kshift, varlen, f, NK: C.segments(programs, T_, device)
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, Dk, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    kv0 = torch.rand(B, H, Dk, Dv, generator=g)
    z0 = 1.0 + torch.rand(B, H, Dk, generator=g)
    do = torch.randn(B, H, T, Dv, generator=g)
    scale = 1.0
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    fmap = maps.fused_key(featattn.get_feature_map("elu")) if fused else ""
    x = [t.to(dev, dtype) for t in (q, k, v)]
    if not fused:  # the control: the features themselves
        x = [phi(x[0].double()).to(dtype), phi(x[1].double()).to(dtype), x[2]]
    fq64, fk64 = (phi(t.double()) if fused else t.double() for t in x[:2])
    v64 = x[2].double()
    cfg = {}
    if config != "auto":
        bt, nw, ns = (int(p) for p in config.split("/"))
        cfg = dict(BT=bt, num_warps=nw, num_stages=ns)
    ctxs = [tuning.override(n, **cfg) for n in ("chunked_fwd", "chunked_bwd", "chunked_seg")] \
        if cfg else []
    for c in ctxs:
        c.__enter__()
    ns = -(-T // SEG)
    if step == "seg":
        S, z = C._segment_sums(x[1], x[2], ns, SEG, fused=fused, phi=C._map_form(fmap)[1],
                               scale=1.0, has_z=True)
        sync()
        errs = []
        for j in range(ns - 1):
            sl = slice(j * SEG, min(T, (j + 1) * SEG))
            want = fk64[:, :, sl].transpose(-1, -2) @ v64[:, :, sl]
            errs.append(f"S{j} {_rel(S.view(B, H, ns, Dk, Dv)[:, :, j], want):.1e} "
                        f"z{j} {_rel(z.view(B, H, ns, Dk)[:, :, j], fk64[:, :, sl].sum(2)):.1e}")
        return " ".join(errs)
    kv0c, z0c = kv0.to(dev), z0.to(dev)
    A = torch.tril(fq64 @ fk64.transpose(-1, -2))  # reference, normalised, with the state
    num = A @ v64 + fq64 @ kv0c.double()
    den = A.sum(-1) + (fq64 * z0c.double()[:, :, None]).sum(-1) + 1e-6
    o64 = num / den[..., None]
    o, dn, kvT, zT = C._forward(x[0], x[1], x[2], True, 1e-6, kv0c, z0c, True, fmap, scale)
    sync()
    if step == "fwd":
        segs = " ".join(f"o[{j}] {_rel(o[:, :, j * SEG:(j + 1) * SEG], o64[:, :, j * SEG:(j + 1) * SEG]):.1e}"
                        for j in range(ns))
        kv64 = kv0c.double() + fk64.transpose(-1, -2) @ v64
        return f"{segs} kvT {_rel(kvT, kv64):.1e} zT {_rel(zT, z0c.double() + fk64.sum(2)):.1e}"
    xs = [t.double().requires_grad_() for t in x]
    fq, fk = (phi(t) if fused else t for t in xs[:2])
    A = torch.tril(fq @ fk.transpose(-1, -2))
    o_ref = (A @ xs[2] + fq @ kv0c.double()) / (
        A.sum(-1) + (fq * z0c.double()[:, :, None]).sum(-1) + 1e-6)[..., None]
    want = torch.autograd.grad(o_ref, xs, do.to(dev).double())
    got = C._backward(x[0], x[1], x[2], o, dn, kv0c, z0c, do.to(dev, dtype), None, None,
                      True, fmap, scale)
    sync()
    out = []
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], want):
        out.append(name + " " + " ".join(
            f"{_rel(a[:, :, j * SEG:(j + 1) * SEG], b[:, :, j * SEG:(j + 1) * SEG]):.1e}"
            for j in range(ns)))
    return " | ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + worker(*a.worker), flush=True)
        return
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for case in a.cases:
        for config in a.configs:
            for step in a.steps:
                p = subprocess.run([sys.executable, __file__, "--worker", case, config, step],
                                   capture_output=True, text=True, timeout=300, env=env)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                what = line[0][7:] if line else "FAIL " + " / ".join(
                    (p.stderr or p.stdout).strip().splitlines()[-2:])[-300:]
                print(f"{case} {config} {step}: {what}", flush=True)


if __name__ == "__main__":
    main()
