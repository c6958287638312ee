"""Every autotune config of every kernel, alone, on every dtype and a spread of shapes (GPU).

The autotuner benchmarks every config of its space the first time a key is seen, so one
config that faults (an illegal memory access poisons the whole CUDA context) or computes a
wrong answer for some dtype / shape breaks the user's call even when the config it would
finally pick is fine.  This script forces each config in turn and checks forward and backward
against the float64 reference.  Each (kernel, config, dtype) runs in its own process, so a
fault is reported as CRASH for that case and the sweep goes on.

    python3 benchmarks/gpu_configs.py            # the whole sweep (a few minutes on an H200)
    python3 benchmarks/gpu_configs.py --only chunked --jobs 8

Prints one line per failing case and a summary table; exits 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

TOL = {"float32": 2e-4, "float16": 8e-3, "bfloat16": 4e-2}
DTYPES = ("float32", "float16", "bfloat16")
WORKER_TIMEOUT_S = 150

# (family, kernel): what a worker patches, and the shapes its cases cover
FAMILIES = {
    "chunked": dict(dims=[(16, 16), (64, 64), (96, 96), (128, 128), (200, 64)],
                    states=(False, True)),
    "taylor_small": dict(dims=[(4, 64), (16, 64), (16, 100)], states=(True,)),
    "taylor_big": dict(dims=[(17, 64), (32, 48)], states=(True,)),
    "parallel": dict(dims=[(16, 64), (8, 100), (32, 32)], states=(False,)),
}


def _cases(family):
    spec = FAMILIES[family]
    out = []
    dims = json.loads(os.environ.get("FEATATTN_SWEEP_DIMS", "null")) or spec["dims"]
    for dk, dv in dims:
        for normalize in (True, False):
            for state in spec["states"]:
                out.append(dict(dk=dk, dv=dv, normalize=normalize, state=state, T=200))
    return out


# --------------------------------------------------------------------------- worker
def _space(family, kernel):
    """The configs autotuning would try (FEATATTN_NO_AUTOTUNE unset while they are built)."""
    os.environ.pop("FEATATTN_NO_AUTOTUNE", None)
    from featattn.kernels import chunked as ch
    from featattn.kernels import taylor_fused as tf
    from featattn.kernels import taylor_parallel as tp

    if family == "chunked":
        return ch._configs()
    if family == "taylor_small":
        return (tf._fwd_configs if kernel == "fwd" else tf._bwd_configs)(False)
    if family == "taylor_big":
        return (tf._fwd_configs if kernel == "fwd" else tf._bwd_configs)(True)
    return tp._configs(kernel)


def _patch(family, kernel, cfg):
    """Make the launch of (family, kernel) use ``cfg`` alone; every other kernel keeps the
    single FEATATTN_NO_AUTOTUNE config (the worker imports featattn with it set)."""
    import triton

    from featattn.kernels import chunked as ch
    from featattn.kernels import taylor_fused as tf
    from featattn.kernels import taylor_parallel as tp
    from featattn.kernels._common import TunedLaunch

    def tuned(tuner):
        return TunedLaunch(triton.autotune(configs=[cfg], key=list(tuner.keys))(tuner.fn))

    if family == "chunked":
        if kernel == "fwd":
            ch._FWD = tuned(ch._fwd)
        else:
            ch._BWD = tuned(ch._bwd)
    elif family.startswith("taylor"):
        big = family == "taylor_big"
        t = {("fwd", False): tf._fwd_small, ("fwd", True): tf._fwd_big,
             ("bwd", False): tf._bwd_small, ("bwd", True): tf._bwd_big}[(kernel, big)]
        tf._LAUNCH[t] = tuned(t)
    else:
        if kernel == "fwd":
            tp._FWD = tuned(tp._fwd)
        else:
            tp._BWD = tuned(tp._bwd)


def _run_case(family, dtype, case):
    import torch

    from featattn.kernels import chunked_attention, taylor_attention
    from featattn.feature_maps import resolve_feature_map
    from featattn.reference import quadratic_linear_attention

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(hash((family, dtype, str(case))) % 2**31)
    B, H, T, dk, dv = 2, 2, case["T"], case["dk"], case["dv"]
    normalize, state = case["normalize"], case["state"]
    taylor = family != "chunked"
    fm = resolve_feature_map("taylor" if taylor else "elu")

    def rnd(*s):
        return torch.randn(*s, device="cuda", generator=g)

    q, k, v = rnd(B, H, T, dk), rnd(B, H, T, dk), rnd(B, H, T, dv)
    if not taylor:  # the chunked kernels take features: positive ones keep den away from 0
        q, k = fm(q), fm(k)
    Dk = fm.output_dim(dk) if taylor else dk
    kv0 = rnd(B, H, Dk, dv).abs() if state else None
    z0 = (rnd(B, H, Dk).abs() * 4 + 1) if (state and normalize) else None
    q, k, v = (t.to(dt).requires_grad_(True) for t in (q, k, v))
    if kv0 is not None:
        kv0.requires_grad_(True)
    if z0 is not None:
        z0.requires_grad_(True)
    fn = taylor_attention if taylor else chunked_attention
    o, kvT, zT = fn(q, k, v, normalize=normalize, eps=1e-6, initial_kv=kv0, initial_z=z0,
                    return_state=state)
    do = rnd(*o.shape).to(dt)
    loss = (o.float() * do.float()).sum()
    if state:
        w = rnd(*kvT.shape)
        loss = loss + (kvT * w).sum() * 1e-3
    leaves = [t for t in (q, k, v, kv0, z0) if t is not None]
    grads = torch.autograd.grad(loss, leaves)

    # float64 reference on the same (rounded) inputs
    r = [t.detach().double().requires_grad_(True) for t in leaves]
    rq, rk, rv = r[:3]
    if taylor:
        fq, fk = fm(rq), fm(rk)
    else:
        fq, fk = rq, rk
    rkv0 = r[3] if state else None
    rz0 = r[4] if (state and normalize) else None
    ro, rkv, _ = quadratic_linear_attention(fq, fk, rv, normalize=normalize, eps=1e-6,
                                            initial_kv=rkv0, initial_z=rz0, return_state=True)
    rloss = (ro * do.double()).sum()
    if state:
        rloss = rloss + (rkv * w.double()).sum() * 1e-3
    rgrads = torch.autograd.grad(rloss, r)

    def rel(a, b):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all():
            return float("inf")
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    errs = {"o": rel(o, ro)}
    if state:
        errs["kvT"] = rel(kvT, rkv)
    for name, a, b in zip(("dq", "dk", "dv", "dkv0", "dz0"), grads, rgrads):
        errs[name] = rel(a, b)
    torch.cuda.synchronize()
    return errs


def worker(family, kernel, index, dtype, start):
    cfg = _space(family, kernel)[index]
    os.environ["FEATATTN_NO_AUTOTUNE"] = "1"
    _patch(family, kernel, cfg)
    for i, case in enumerate(_cases(family)):
        if i < start:
            continue
        print(json.dumps({"start": i}), flush=True)
        try:
            errs = _run_case(family, dtype, case)
        except Exception as e:  # noqa: BLE001 - reported, then the process goes on or dies
            print(json.dumps({"done": i, "error": f"{type(e).__name__}: {str(e)[:200]}"}),
                  flush=True)
            if "CUDA" in str(e):
                os._exit(3)  # the context is gone: the driver restarts after this case
            continue
        print(json.dumps({"done": i, "errs": errs}), flush=True)


# --------------------------------------------------------------------------- driver
def _drive(job):
    family, kernel, index, dtype = job
    cases = _cases(family)
    results = {}
    start = 0
    while start < len(cases):
        env = dict(os.environ, FEATATTN_NO_AUTOTUNE="1", PYTHONUNBUFFERED="1")
        try:
            p = subprocess.run([sys.executable, __file__, "--worker", family, kernel, str(index),
                                dtype, str(start)], capture_output=True, text=True, env=env,
                               timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # a hung launch: report it, skip the case
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            p = subprocess.CompletedProcess(e.cmd, -9, out, "HANG (worker timed out)")
        last = start
        for line in p.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "start" in rec:
                last = rec["start"]
                results[last] = ("CRASH", p.stderr.strip().splitlines()[-1:] or ["?"])
            else:
                results[rec["done"]] = ("ERROR", rec["error"]) if "error" in rec else \
                    ("OK", rec["errs"])
        if p.returncode == 0 and len(results) >= len(cases) - start:
            break
        if last not in results:
            results[last] = ("CRASH", p.stderr.strip().splitlines()[-1:] or ["?"])
        start = last + 1
    return job, cases, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5)
    ap.add_argument("--only", nargs="*", default=list(FAMILIES))
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    ap.add_argument("--dims", nargs="*", default=None,
                    help="override the families' (Dk, Dv) list, e.g. 16x16 16x64")
    a = ap.parse_args()
    if a.worker:
        family, kernel, index, dtype, start = a.worker
        return worker(family, kernel, int(index), dtype, int(start))

    if a.dims:
        dims = [tuple(int(x) for x in d.split("x")) for d in a.dims]
        os.environ["FEATATTN_SWEEP_DIMS"] = json.dumps(dims)  # the workers read it too
    jobs = []
    for family in a.only:
        for kernel in ("fwd", "bwd"):
            for index in range(len(_space(family, kernel))):
                for dtype in a.dtypes:
                    jobs.append((family, kernel, index, dtype))
    print(f"{len(jobs)} (kernel, config, dtype) jobs, {a.jobs} at a time", flush=True)
    bad = 0
    rows = []
    with ThreadPoolExecutor(a.jobs) as pool:
        for fut in as_completed([pool.submit(_drive, j) for j in jobs]):
            (family, kernel, index, dtype), cases, results = fut.result()
            cfg = _space(family, kernel)[index]
            n_bad = 0
            for i, case in enumerate(cases):
                status, info = results.get(i, ("MISSING", None))
                if status == "OK":
                    worst = max(info.values())
                    if worst <= TOL[dtype]:
                        continue
                    status, info = "WRONG", {k: f"{v:.2e}" for k, v in info.items()}
                n_bad += 1
                print(f"{status:7s} {family}/{kernel} cfg{index} {cfg} {dtype} {case}: {info}",
                      flush=True)
            bad += n_bad
            rows.append((family, kernel, index, str(cfg), dtype, len(cases) - n_bad, len(cases)))
            print(f"done {family}/{kernel} cfg{index} {dtype}: {len(cases) - n_bad}/{len(cases)}",
                  flush=True)
    print("\n| kernel | config | dtype | cases passed |\n|---|---|---|---|")
    for family, kernel, index, cfg, dtype, ok, n in rows:
        print(f"| {family}/{kernel} | {index}: {cfg} | {dtype} | {ok}/{n} |")
    print(f"\n{bad} failing cases")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main() or 0)
