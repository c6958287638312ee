"""Time a kernel family under each of a list of forced launch configs (GPU), each checked first.

    python3 benchmarks/gpu_tune.py projected                       # the default config list
    python3 benchmarks/gpu_tune.py projected --configs 64/4/2/64 32/8/2/32 --T 4096 16384
    python3 benchmarks/gpu_tune.py chunked --configs 64/4/2 128/8/2
    python3 benchmarks/gpu_tune.py chunked --dk 128 --set chunked.BWD_MAX_BK=64   # 2 Dk tiles
    python3 benchmarks/gpu_tune.py chunked --T 16384 --configs 64/4/2 64/4/2r168 32/4/2r168 \
        --set chunked.AUTO_SPLIT_FULL_GRID=3        # register caps for 3 programs an SM

A config is ``BT/num_warps/num_stages[/BV][rMAXNREG]`` (BV: the Dv tile, projected only;
``r168``: at most 168 registers a thread, e.g. ``64/4/2r168`` for three 4-warp programs an SM),
forced on the
family's forward and backward kernels with :func:`featattn.kernels.tuning.override`.  Each
config runs in its own process (a config that faults poisons its CUDA context, so it is
reported as CRASH and the sweep goes on); up to ``--jobs`` compile and check at once, while
the timing sections take a lock so that only one process times at a time.

Before timing, each process checks the config in bf16 against float64 at T = 1000 (output
and every gradient, grouped heads: H = 4, Hkv = 2).  Timed calls (B = 8, H = 16, D = 64, bf16,
normalised, median of triton.testing.do_bench):

* ``projected``: ``linear_attention(q, k, v, feature_map=<Hedgehog 64 -> 128>)`` with the map
  in the kernels (``FEATATTN_FUSE_MAPS=kernel``);
* ``projection_pass``: the same call with the map as a Triton pass before the chunked kernel
  (``FEATATTN_FUSE_MAPS=pass``), the pass's config forced (forward and backward);
* ``chunked``: ``linear_attention`` on elu features computed beforehand, and
  ``feature_map="elu"`` with the map in the kernel (``FEATATTN_FUSE_MAPS=kernel``).

Prints one markdown row per config: max relative error, fwd / fwd+bwd ms per T.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULTS = {
    "projection_pass": ["64/4/2", "32/4/2", "128/8/2", "64/8/2", "32/8/2", "64/4/3", "32/4/3"],
    "projected": ["64/4/2/64", "32/8/2/64", "16/8/2/64", "32/8/1/64", "16/4/2/64",
                  "64/8/2/64", "64/4/2/32", "32/4/2/32", "32/8/2/32", "64/8/2/32"],
    "chunked": ["64/4/2", "64/4/3", "64/4/4", "64/8/2", "32/4/2", "128/8/2", "32/4/3",
                "32/8/2"],
}
TIMEOUT_S = 240


def _parse(family, text):
    spec, r, reg = text.partition("r")
    if r and not reg.isdigit():
        raise ValueError(f"config {text!r}: a register cap is 'r' and a number, e.g. 64/4/2r168")
    parts = [int(x) for x in spec.split("/")]
    meta = dict(BT=parts[0], num_warps=parts[1], num_stages=parts[2])
    if reg:
        meta["maxnreg"] = int(reg)
    if len(parts) == 4:
        if family != "projected":
            raise ValueError(f"config {text!r}: a Dv tile (4th field) is for projected only")
        meta["BV"] = parts[3]
    return meta


# --------------------------------------------------------------------------- worker
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(family, fm, dk=64):
    """Max relative error of output and gradients against float64 (bf16, T = 1000; chunked:
    q/k head dim ``dk``)."""
    import torch

    import featattn

    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 1000, 64
    Dqk = dk if family == "chunked" else D
    q = torch.randn(B, H, T, Dqk, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, T, Dqk, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
    fmap = "elu" if family == "chunked" else fm(H, Hkv)
    params = [] if family == "chunked" else list(fmap.parameters())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = featattn.linear_attention(*leaves, feature_map=fmap, backend="triton", scale=0.125)
    do = torch.randn_like(o)
    got = [o] + list(torch.autograd.grad(o, leaves + params, do))
    ref_map = copy.deepcopy(fmap).double() if params else fmap
    r = [t.double().requires_grad_() for t in (q, k, v)]
    ro = featattn.linear_attention(*r, feature_map=ref_map, backend="reference", scale=0.125)
    want = [ro] + list(torch.autograd.grad(ro, r + list(ref_map.parameters() if params else []),
                                           do.double()))
    if not all(torch.isfinite(t).all() for t in got):
        return float("inf")
    return max(_rel(a, b) for a, b in zip(got, want))


def worker(family, cfg, Ts, lock_path, dk=64, sets=()):
    import torch
    import torch.nn.functional as F

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    import featattn
    from featattn.feature_maps import HedgehogFeatureMap
    from featattn.kernels import tuning
    from _timing import bench, set_constants

    set_constants(sets)

    os.environ["FEATATTN_FUSE_MAPS"] = "pass" if family == "projection_pass" else "kernel"
    hedgehog = family != "chunked"

    def fm(H, Hkv=None):
        m = HedgehogFeatureMap(64, heads=H, kv_heads=Hkv).cuda()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn_like(p))
        return m

    meta = _parse(family, cfg)
    out = {"config": cfg}
    names = [family] if family == "projection_pass" else [f"{family}_fwd", f"{family}_bwd"]
    with contextlib.ExitStack() as forced:
        for name in names:
            forced.enter_context(tuning.override(name, **meta))
        out["err"] = _check(family, fm, dk)
        B, H, D = 8, 16, 64
        calls = []
        for T in Ts:
            mk = lambda: torch.randn(B, H, T, D, device="cuda",  # noqa: E731
                                     dtype=torch.bfloat16).requires_grad_()
            q, k, v = mk(), mk(), mk()
            do = torch.randn_like(v)
            if hedgehog:
                m = fm(H)
                calls.append((f"T={T} hedgehog", lambda q=q, k=k, v=v, m=m:
                              featattn.linear_attention(q, k, v, feature_map=m),
                              [q, k, v, *m.parameters()], do))
            else:
                qf, kf = q.detach(), k.detach()
                if dk != D:  # features of another width (Hedgehog's 2f, say)
                    qf, kf = (torch.randn(B, H, T, dk, device="cuda") for _ in range(2))
                fq = (F.elu(qf.float()) + 1).bfloat16().requires_grad_()
                fk = (F.elu(kf.float()) + 1).bfloat16().requires_grad_()
                calls.append((f"T={T} features", lambda fq=fq, fk=fk, v=v:
                              featattn.linear_attention(fq, fk, v), [fq, fk, v], do))
                calls.append((f"T={T} features plain", lambda fq=fq, fk=fk, v=v:
                              featattn.linear_attention(fq, fk, v, normalize=False),
                              [fq, fk, v], do))
                calls.append((f"T={T} elu", lambda q=q, k=k, v=v:
                              featattn.linear_attention(q, k, v, feature_map="elu"),
                              [q, k, v], do))
        for _, call, _, do in calls:  # compile outside the lock
            call().backward(do)
        torch.cuda.synchronize()
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name, call, leaves, do in calls:
                def fwd(call=call):
                    with torch.no_grad():
                        call()

                out[name] = (bench(fwd), bench(lambda call=call, do=do: call().backward(do),
                                               leaves))
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- driver
def _run_one(family, cfg, Ts, lock_path, dk, sets):
    cmd = [sys.executable, __file__, family, "--worker", cfg, "--T", *map(str, Ts),
           "--dk", str(dk), *(["--set", *sets] if sets else []),
           "--lock", lock_path]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "status": "TIMEOUT"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"config": cfg, "status": "CRASH: " + " / ".join(tail)[-300:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(DEFAULTS))
    ap.add_argument("--configs", nargs="+")
    ap.add_argument("--T", nargs="+", type=int, default=[4096, 16384])
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--dk", type=int, default=64,
                    help="chunked: the width of the precomputed features (q/k head dim)")
    ap.add_argument("--set", nargs="+", default=[], metavar="MODULE.NAME=INT",
                    help="set a featattn.kernels constant in every worker, e.g. "
                         "chunked.BWD_MAX_BK=64")
    ap.add_argument("--worker")
    ap.add_argument("--lock")
    a = ap.parse_args()
    if a.worker:
        worker(a.family, a.worker, a.T, a.lock, a.dk, a.set)
        return
    configs = a.configs or DEFAULTS[a.family]
    for c in configs:
        _parse(a.family, c)  # bad syntax fails here, not in a worker
    lock_path = os.path.join(tempfile.mkdtemp(), "gpu.lock")
    with ThreadPoolExecutor(a.jobs) as ex:
        results = list(ex.map(lambda c: _run_one(a.family, c, a.T, lock_path, a.dk, a.set), configs))
    names = [k for r in results for k in r if k.startswith("T=")]
    names = list(dict.fromkeys(names))
    print(f"\n| config (BT/warps/stages{'/BV' if a.family == 'projected' else ''}) | max rel err "
          + "".join(f"| {n} fwd / fwd+bwd ms " for n in names) + "|")
    print("|---|---|" + "---|" * len(names))
    for r in results:
        if "status" in r:
            print(f"| {r['config']} | {r['status']} |" + " |" * len(names))
            continue
        cells = "".join(f"| {r[n][0]:.3f} / {r[n][1]:.3f} " if n in r else "| - " for n in names)
        print(f"| {r['config']} | {r['err']:.1e} {cells}|")


if __name__ == "__main__":
    main()
