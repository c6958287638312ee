"""GPU check + timing of the fused Taylor kernel (featattn.kernels.taylor_fused), one device call.

1. Correctness: o, final state and every gradient (dq, dk, dv, d initial state) against a
   float64 reference on materialised Taylor features, in bf16 / fp16 / fp32, odd shapes, up
   to T = 16384; prints rel. errors.  It is the tests' harness (featattn.testing: inputs,
   reference, run_and_grads, tolerances), run with every kernel-written buffer NaN-poisoned
   (featattn.testing.poisoned_outputs), so an element a kernel never writes fails the table.
2. Timing (triton.testing.do_bench median, ms) of forward and forward+backward at B=8, H=16,
   d=16, Dv=64, bf16, normalised, T in 1024/4096/16384, with peak extra memory of
   forward+backward, next to torch SDPA causal softmax attention (head dim 64, same B, H, T)
   and, when importable, fla's fused_chunk_based.

    python benchmarks/gpu_taylor.py                 # everything
    python benchmarks/gpu_taylor.py --quick         # correctness only
    python benchmarks/gpu_taylor.py --sweep-bv      # also time the backward Dv tile 16/32/64
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featattn.kernels import taylor_fused as TF  # noqa: E402
from featattn.kernels import taylor_parallel as TP  # noqa: E402
from featattn.testing import (  # noqa: E402  (the tests' correctness harness)
    compare_runs, kernel_vs_reference, rand_qkv, rand_state, taylor_dim, tolerance)
from _timing import bench, peak_mib, wall_ms  # noqa: E402  (benchmarks/_timing.py)

HBM_TBPS = 3.0  # measured device copy on the H100 (ANCHORS.md)
#: the checks also run on CPU tensors under TRITON_INTERPRET=1
#: (tests/kernels/test_taylor_fused.py runs a tiny one so this script's check path cannot rot);
#: the timings need CUDA
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, Hkv, T, d, Dv, dtype, layout="bhtd", grad=False, qscale=0.7, generator=None):
    """Raw q, k, v on DEVICE (featattn.testing.rand_qkv, q scaled by ``qscale``);
    ``generator`` None draws from the device's global RNG."""
    return rand_qkv(B, H, Hkv, T, d, Dv, dtype, DEVICE, generator, grad, layout=layout,
                    q_scale=qscale)


# --------------------------------------------------------------------------- correctness
CHECKS = [
    # B, H, Hkv, T, d, Dv, dtype, normalize, init, layout
    (2, 4, 2, 1000, 16, 64, torch.bfloat16, True, True, "bthd"),
    (2, 4, 4, 1000, 16, 64, torch.bfloat16, False, False, "bhtd"),
    (1, 4, 4, 4099, 16, 64, torch.bfloat16, True, False, "bhtd"),
    (1, 2, 2, 16384, 16, 64, torch.bfloat16, True, True, "bthd"),
    (1, 2, 2, 16384, 16, 64, torch.float16, True, False, "bhtd"),
    (1, 2, 1, 2047, 16, 128, torch.bfloat16, False, True, "bhtd"),
    (1, 2, 2, 777, 32, 64, torch.bfloat16, True, True, "bthd"),
    (1, 2, 2, 300, 5, 40, torch.bfloat16, True, True, "bhtd"),
    (1, 2, 2, 63, 16, 256, torch.bfloat16, True, True, "bhtd"),
    (1, 2, 2, 515, 16, 64, torch.float32, True, True, "bhtd"),
    (1, 2, 1, 1000, 16, 64, torch.float16, False, True, "bthd"),
]


def check_one(B, H, Hkv, T, d, Dv, dtype, normalize, init, layout):
    """``({name: rel. error}, [failures])`` of o, the final state (kv, z) and every gradient
    (dq, dk, dv, dkv0, dz0) against the float64 reference on materialised Taylor features
    (featattn.testing: the harness the tests use), the kernels' buffers NaN-poisoned
    (featattn.testing.poisoned_outputs) for the forward and backward."""
    seed = T * 31 + d
    q, k, v = inputs(B, H, Hkv, T, d, Dv, dtype, layout, generator=seed)
    kv0, z0 = rand_state(B, H, taylor_dim(d), Dv, normalize, generator=seed + 1, device=DEVICE,
                         z_min=1.0) if init else (None, None)
    got, want = kernel_vs_reference(TF.taylor_attention, q, k, v, kv0, z0, normalize=normalize,
                                    eps=1e-6, return_state=True, feature_map="taylor")
    return compare_runs(got, want, tolerance(dtype, "taylor"))


#: cases of the parallel (quadratic) form: no state in or out
PAR_CHECKS = [
    # B, H, Hkv, T, d, Dv, dtype, normalize, layout
    (2, 4, 2, 1000, 16, 64, torch.bfloat16, True, "bthd"),
    (1, 4, 4, 2048, 16, 64, torch.bfloat16, True, "bhtd"),
    (1, 2, 2, 4099, 16, 64, torch.bfloat16, True, "bhtd"),
    (1, 2, 1, 2047, 16, 128, torch.bfloat16, False, "bhtd"),
    (1, 2, 2, 777, 32, 64, torch.bfloat16, True, "bthd"),
    (1, 2, 2, 300, 5, 40, torch.bfloat16, True, "bhtd"),
    (1, 2, 2, 63, 16, 256, torch.bfloat16, True, "bhtd"),
    (1, 2, 2, 1, 16, 64, torch.bfloat16, False, "bhtd"),
    (1, 2, 2, 515, 16, 64, torch.float32, True, "bhtd"),
    (1, 2, 1, 1000, 16, 64, torch.float16, True, "bthd"),
]


def par_check_one(B, H, Hkv, T, d, Dv, dtype, normalize, layout):
    """check_one for the parallel form (no state in or out: o, dq, dk, dv); the caller
    forces the form on (TP.PARALLEL_MAX_T)."""
    q, k, v = inputs(B, H, Hkv, T, d, Dv, dtype, layout, generator=T + d)
    got, want = kernel_vs_reference(TF.taylor_attention, q, k, v, normalize=normalize,
                                    eps=1e-6, feature_map="taylor")
    if T == 1 and normalize:  # o = v exactly: dq and dk are rounding noise, only written
        errs, failures = compare_runs(got, want, tolerance(dtype, "taylor"), ("o", "dv"))
        _, unwritten = compare_runs(got, want, math.inf, ("dq", "dk"))
        return errs, failures + unwritten
    return compare_runs(got, want, tolerance(dtype, "taylor"), ("o", "dq", "dk", "dv"))


def run_par_checks():
    """The parallel form against float64 (forced on for every T here)."""
    print("\n## parallel form vs float64 (rel. error; outputs NaN-poisoned)")
    print("| shape | dtype | norm | layout | o | dq | dk | dv | ok |")
    print("|---" * 9 + "|")
    old, TP.PARALLEL_MAX_T = TP.PARALLEL_MAX_T, 1 << 30
    ok_all = True
    try:
        for c in PAR_CHECKS:
            B, H, Hkv, T, d, Dv, dtype, normalize, layout = c
            try:
                errs, failures = par_check_one(*c)
            except Exception as e:  # noqa: BLE001
                errs, failures = {}, [f"ERROR {type(e).__name__}: {str(e)[:300]}"]
            ok = not failures
            ok_all &= ok
            cols = " | ".join(f"{errs[n]:.1e}" if n in errs else "-" for n in ("o", "dq", "dk", "dv"))
            print(f"| B{B} H{H}/{Hkv} T{T} d{d} Dv{Dv} | {str(dtype)[6:]} | {normalize} | {layout} | "
                  f"{cols} | {'OK' if ok else 'FAIL'} |", flush=True)
            for why in failures:
                print(f"|   {why} |", flush=True)
    finally:
        TP.PARALLEL_MAX_T = old
    return ok_all


def crossover(B=8, H=16, d=16, Dv=64, Ts=(1024, 2048, 3072, 4096)):
    """Chunked against parallel form per T (bf16 normalised, API calls, median ms)."""
    print("\n## chunked vs parallel form (ms; fwd / fwd+bwd), and SDPA")
    old = TP.PARALLEL_MAX_T
    try:
        for T in Ts:
            TP.PARALLEL_MAX_T = 0
            c = time_ours(B, H, T, d, Dv)
            TP.PARALLEL_MAX_T = 1 << 30
            p = time_ours(B, H, T, d, Dv)
            s = time_sdpa(B, H, T)
            print(f"T{T}: chunked {c[0]:.3f} / {c[1]:.3f} ({c[2]:.0f} MiB) | parallel {p[0]:.3f} / "
                  f"{p[1]:.3f} ({p[2]:.0f} MiB) | sdpa {s[0]:.3f} / {s[1]:.3f}", flush=True)
            torch.cuda.empty_cache()
    finally:
        TP.PARALLEL_MAX_T = old


def par_sweep(B=8, H=16, d=16, Dv=64, T=2048):
    """The parallel form's kernels per tile config: forward (BM, BN, warps, stages) and the
    one-launch backward (BMK, BNK, BMQ, BNQ, warps, stages), median ms."""
    import math

    print(f"\n## parallel form, kernels per config, T={T} (median ms)")
    q, k, v = inputs(B, H, H, T, d, Dv, torch.bfloat16)
    do = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16)
    o, den, _, _ = TP._forward(q, k, v, True, 1e-6, None, None, False)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    inv = 1.0 / math.sqrt(d)
    common = dict(D=d, DP=16, DV=Dv, BV=64, NORMALIZE=True, LOWP=True, FP32_IEEE=False)
    for bm, bn, nw, ns in [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4)]:
        cfg = dict(BM=bm, BN=bn, num_warps=nw, num_stages=ns)
        t = bench(lambda: TP._fwd_kernel[(B * H, triton.cdiv(T, bm), 1)](
            q, k, v, o, den, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1),
            o.stride(2), T, H, 1, 1e-6, inv, 0, **common, **cfg))
        print(f"fwd BM{bm} BN{bn} w{nw} s{ns}: {t:.3f}", flush=True)
    for a, b, c, e, nw, ns in [(32, 128, 64, 64, 4, 3), (32, 128, 128, 32, 4, 3),
                               (16, 128, 64, 64, 4, 3), (32, 128, 64, 64, 4, 4),
                               (32, 128, 64, 64, 4, 5), (64, 64, 64, 64, 4, 2),
                               (32, 128, 64, 32, 4, 3), (64, 128, 128, 64, 8, 3)]:
        cfg = dict(BMK=a, BNK=b, BMQ=c, BNQ=e, num_warps=nw, num_stages=ns)
        try:
            t = bench(lambda: TP._bwd_kernel[(B * H, triton.cdiv(T, b) + triton.cdiv(T, c))](
                q, k, v, o, do, den, dq, dk, dv, q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
                T, H, 1, inv, 0, **common, **cfg))
            print(f"bwd kv {a}/{b} q {c}/{e} w{nw} s{ns}: {t:.3f}", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"bwd kv {a}/{b} q {c}/{e} w{nw} s{ns}: ERROR {type(ex).__name__} {str(ex)[:150]}")


def run_checks(ids=None):
    print("\n## correctness vs float64 on materialised features (rel. error ||x - ref|| / ||ref||; "
          "outputs NaN-poisoned, tolerances featattn.testing.TOLERANCES['taylor'])")
    names = ["o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"]
    print("| shape | dtype | norm | init | layout | " + " | ".join(names) + " | ok |")
    print("|---" * (6 + len(names)) + "|")
    all_ok = True
    for n, c in enumerate(CHECKS):
        if ids is not None and n not in ids:
            continue
        B, H, Hkv, T, d, Dv, dtype, normalize, init, layout = c
        try:
            errs, failures = check_one(*c)
        except Exception as e:  # noqa: BLE001
            errs, failures = {}, [f"ERROR {type(e).__name__}: {str(e)[:300]}"]
        ok = not failures
        all_ok &= ok
        cols = " | ".join(f"{errs[n]:.1e}" if n in errs else "-" for n in names)
        print(f"| B{B} H{H}/{Hkv} T{T} d{d} Dv{Dv} | {str(dtype)[6:]} | {normalize} | {init} "
              f"| {layout} | {cols} | {'OK' if ok else 'FAIL'} |", flush=True)
        for why in failures:
            print(f"|   {why} |", flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return all_ok


# --------------------------------------------------------------------------- timing


def time_ours(B, H, T, d, Dv):
    q, k, v = inputs(B, H, H, T, d, Dv, torch.bfloat16, grad=True)
    do = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return TF.taylor_attention(q, k, v, normalize=True, eps=1e-6)

    def fwdbwd():
        o, _, _ = TF.taylor_attention(q, k, v, normalize=True, eps=1e-6)
        o.backward(do)

    fwdbwd()
    return bench(fwd), bench(fwdbwd, [q, k, v]), peak_mib(fwdbwd)


def time_sdpa(B, H, T, D=64):
    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(), mk(), mk()
    do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    f = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            return f(q, k, v, is_causal=True)

    def fwdbwd():
        f(q, k, v, is_causal=True).backward(do)

    fwdbwd()
    return bench(fwd), bench(fwdbwd, [q, k, v]), peak_mib(fwdbwd)


def time_fla(B, H, T, d, Dv):
    try:
        from fla.ops.based import fused_chunk_based
    except Exception as e:  # noqa: BLE001
        return None, f"fla unavailable: {type(e).__name__}: {str(e)[:100]}"
    mk = lambda dd, s: (torch.randn(B, T, H, dd, device="cuda") * s).to(torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = mk(d, 0.7), mk(d, 1.0), mk(Dv, 1.0)
    do = torch.randn(B, T, H, Dv, device="cuda", dtype=torch.bfloat16)

    def call():
        r = fused_chunk_based(q, k, v, scale=1.0, use_norm=True)
        return r[0] if isinstance(r, tuple) else r

    def fwd():
        with torch.no_grad():
            return call()

    def fwdbwd():
        call().backward(do)

    try:
        fwdbwd()
        return (bench(fwd), bench(fwdbwd, [q, k, v]), peak_mib(fwdbwd)), None
    except Exception as e:  # noqa: BLE001
        return None, f"fla failed: {type(e).__name__}: {str(e)[:200]}"


def kernel_resources():
    """Registers / spills of the compiled Triton kernels (best effort across versions)."""
    out = []
    for name in ("_fwd_kernel", "_bwd_kernel"):
        jf = getattr(TF, name)
        caches = getattr(jf, "device_caches", None) or {}
        for dev, entry in caches.items():
            cache = entry[0] if isinstance(entry, tuple) else entry
            for key, ck in getattr(cache, "items", lambda: [])():
                try:
                    md = ck.metadata
                    cfg = f"warps={md.num_warps} stages={md.num_stages}"
                except Exception:  # noqa: BLE001
                    cfg = "?"
                out.append(f"{name}: regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} "
                           f"shared={getattr(ck.metadata, 'shared', '?')} {cfg}")
    return out


def run_timing(B=8, H=16, d=16, Dv=64, Ts=(1024, 4096, 16384), with_fla=False):
    rows = []
    for T in Ts:
        floor = B * H * T * (2 * d + 2 * Dv) * 2 / (HBM_TBPS * 1e12) * 1e3
        f, fb, mem = time_ours(B, H, T, d, Dv)
        rows.append((f"featattn taylor_fused T{T}", floor, f, fb, mem))
        print(f"ours T{T}: fwd {f:.3f} fwd+bwd {fb:.3f} mem {mem:.0f} MiB", flush=True)
        torch.cuda.empty_cache()
        s = time_sdpa(B, H, T)
        rows.append((f"torch SDPA causal softmax (hd 64) T{T}", float("nan"), *s))
        print(f"sdpa T{T}: fwd {s[0]:.3f} fwd+bwd {s[1]:.3f} mem {s[2]:.0f} MiB", flush=True)
        torch.cuda.empty_cache()
        if with_fla:
            r, err = time_fla(B, H, T, d, Dv)
            if r is None:
                print(err)
            else:
                rows.append((f"fla fused_chunk_based T{T}", floor, *r))
            torch.cuda.empty_cache()
    print(f"\n## timing, {torch.cuda.get_device_name()}, bf16, B={B} H={H} d={d} Dv={Dv}, normalised "
          "(median ms; mem = peak extra MiB of fwd+bwd)")
    print("| case | floor fwd | fwd | fwd+bwd | mem |")
    print("|---|---|---|---|---|")
    for name, floor, f, fb, mem in rows:
        print(f"| {name} | {floor:.3f} | {f:.3f} | {fb:.3f} | {mem:.0f} |")
    print("\nautotuned fwd:", {str(k): str(v) for k, v in TF._fwd_small.cache.items()})
    print("autotuned bwd:", {str(k): str(v) for k, v in TF._bwd_small.cache.items()})
    for line in kernel_resources():
        print(line)


def _compiled(jf):
    """{cache key: compiled kernel} of a Triton JITFunction (best effort across versions)."""
    out = {}
    for entry in (getattr(jf, "device_caches", None) or {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        out.update(dict(getattr(cache, "items", lambda: [])()))
    return out


def _res(jf, before):
    new = [ck for key, ck in _compiled(jf).items() if key not in before]
    if not new:
        return "(cached)"
    ck = new[-1]
    return f"regs={getattr(ck, 'n_regs', '?')} spills={getattr(ck, 'n_spills', '?')} smem={getattr(ck.metadata, 'shared', '?')}"


#: (BT, BV, warps, stages, maxnreg) of the forward, (BV, BT, warps, stages, maxnreg) of the
#: backward; FEATATTN_SWEEP="fwd:64,32,4,1,0;bwd:64,32,8,2,0" replaces them (0 = no cap)
FWD_SWEEP = [(64, 32, 4, 2, 0), (64, 32, 4, 1, 0), (64, 64, 8, 2, 0), (32, 32, 4, 1, 0),
             (64, 32, 4, 1, 168), (128, 64, 8, 2, 0), (64, 16, 4, 2, 0)]
BWD_SWEEP = [(64, 32, 4, 3, 0), (64, 32, 8, 3, 0), (64, 16, 4, 2, 0), (64, 64, 4, 2, 0),
             (32, 32, 4, 2, 0)]
if os.environ.get("FEATATTN_SWEEP"):
    for part in os.environ["FEATATTN_SWEEP"].split(";"):
        name, cfgs = part.split(":")
        rows = [tuple(int(x) for x in c.split(",")) for c in cfgs.split("/")]
        if name == "fwd":
            FWD_SWEEP = rows
        else:
            BWD_SWEEP = rows


def _meta(bt, nw, ns, reg):
    m = dict(BT=bt, num_warps=nw, num_stages=ns)
    if reg:
        m["maxnreg"] = reg
    return m


def _tuned(kernel, cfg, fn, *args):
    """fn(*args) with the kernel's config fixed (featattn.kernels.tuning)."""
    from featattn.kernels import tuning

    with tuning.override(kernel, **cfg):
        return fn(*args)


def sweep_configs(B=8, H=16, d=16, Dv=64, Ts=(16384, 2048), batches=(4,)):
    """Time every forward / backward tile config directly (no autotuning), bf16, normalised."""
    print(f"\n## config sweep, bf16 normalised, B={B} H={H} d={d} Dv={Dv} (median ms)")
    best = None
    for T in Ts:
        q, k, v = inputs(B, H, H, T, d, Dv, torch.bfloat16)
        for bt, bv, nw, ns, reg in FWD_SWEEP:
            cfg = dict(_meta(bt, nw, ns, reg), BV=bv)
            seen = _compiled(TF._fwd_kernel)
            try:
                t = bench(lambda: _tuned("taylor_fwd", cfg, TF._forward, q, k, v, True, 1e-6, None, None, False))
                print(f"fwd T{T} BT{bt} BV{bv} w{nw} s{ns} r{reg}: {t:.3f}  {_res(TF._fwd_kernel, seen)}", flush=True)
                if T == Ts[0] and (best is None or t < best[0]):
                    best = (t, cfg)
            except Exception as e:  # noqa: BLE001
                print(f"fwd T{T} BT{bt} BV{bv} w{nw} s{ns} r{reg}: ERROR {type(e).__name__}: {str(e)[:200]}")
        o, den, _, _ = TF._forward(q, k, v, True, 1e-6, None, None, False)
        do = torch.randn_like(o)
        for bv, bt, nw, ns, reg in BWD_SWEEP:
            cfg = dict(_meta(bt, nw, ns, reg), BV=bv)
            seen = _compiled(TF._bwd_kernel)
            try:
                t = bench(lambda: _tuned("taylor_bwd", cfg, TF._backward, q, k, v, o, den, None, None, do, None, None, True))
                print(f"bwd T{T} BV{bv} BT{bt} w{nw} s{ns} r{reg}: {t:.3f}  {_res(TF._bwd_kernel, seen)}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"bwd T{T} BV{bv} BT{bt} w{nw} s{ns} r{reg}: ERROR {type(e).__name__}: {str(e)[:200]}")
        # free them before the next T; not `del`, which unbinds names the lambdas close over
        q = k = v = o = den = do = None
        torch.cuda.empty_cache()
    if best is not None:  # occupancy: does a second program per SM help? (time per program)
        t0, cfg = best
        print(f"best fwd at T{Ts[0]}: {cfg} {t0:.3f} ms for {B * H} programs")
        for b in batches:
            q, k, v = inputs(b, H, H, Ts[0], d, Dv, torch.bfloat16)
            t = bench(lambda: _tuned("taylor_fwd", cfg, TF._forward, q, k, v, True, 1e-6, None, None, False))
            print(f"  B={b}: {t:.3f} ms ({t / t0:.2f}x for {b / B:.0f}x the programs)", flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def overhead(shapes=((1, 1, 64), (8, 16, 1024), (8, 16, 2048)), d=16, Dv=64):
    """The API's fwd+bwd against the bare kernel wrappers of the form it takes (parallel for
    stateless T <= PARALLEL_MAX_T, else chunked): GPU ms per call (do_bench) and host ms per
    call (queue running ahead).  At B=1 H=1 T=64 the GPU work is negligible."""
    print("\n## API vs bare kernels (ms per call)")
    for B, H, T in shapes:
        q, k, v = inputs(B, H, H, T, d, Dv, torch.bfloat16, grad=True)
        do = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16)
        mod = TP if TP.use_parallel(T, False) else TF

        def api_fwdbwd():
            TF.taylor_attention(q, k, v, normalize=True, eps=1e-6)[0].backward(do)

        def raw_fwd():
            return mod._forward(q, k, v, True, 1e-6, None, None, False)

        o, den, _, _ = raw_fwd()

        def raw_bwd():
            return mod._backward(q, k, v, o, den, None, None, do, None, None, True)

        api_fwdbwd()
        a, f, g = bench(api_fwdbwd, [q, k, v]), bench(raw_fwd), bench(raw_bwd)
        ha = _host_ms(lambda: (api_fwdbwd(), setattr(q, "grad", None), setattr(k, "grad", None),
                               setattr(v, "grad", None)), n=100)
        hr = _host_ms(lambda: (raw_fwd(), raw_bwd()), n=100)
        print(f"B{B} H{H} T{T} ({mod.__name__.split('.')[-1]}): GPU api fwd+bwd {a:.3f} | raw fwd "
              f"{f:.3f} + raw bwd {g:.3f} = {f + g:.3f} || host api {ha:.3f} raw {hr:.3f}", flush=True)


def _host_ms(fn, n=300):
    """Host milliseconds per call of ``fn`` with the GPU queue running ahead (B=1 H=1 T=64:
    the GPU work is far below the host cost, so this is the launch path's cost)."""
    return wall_ms(fn, n)


def overhead_detail(d=16, Dv=64, T=64):
    """Where the host time of one API forward+backward goes (B=1 H=1: the GPU work is
    negligible): host ms with autograd's worker thread and without it, then cProfile of the
    whole call on the main thread (multithreading off, so the backward is profiled too)."""
    import cProfile
    import io
    import pstats

    q, k, v = inputs(1, 1, 1, T, d, Dv, torch.bfloat16, grad=True)
    do = torch.randn(1, 1, T, Dv, device="cuda", dtype=torch.bfloat16)

    def api():
        TF.taylor_attention(q, k, v, normalize=True, eps=1e-6)[0].backward(do)
        q.grad = k.grad = v.grad = None

    def api_fwd():
        with torch.no_grad():
            TF.taylor_attention(q, k, v, normalize=True, eps=1e-6)

    print(f"\n## host ms per call, B1 H1 T{T}")
    print(f"API fwd (no grad): {_host_ms(api_fwd):.3f}")
    print(f"API fwd+bwd: {_host_ms(api):.3f}")
    torch.autograd.set_multithreading_enabled(False)
    print(f"API fwd+bwd, autograd multithreading off: {_host_ms(api):.3f}")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        api()
    pr.disable()
    torch.cuda.synchronize()
    torch.autograd.set_multithreading_enabled(True)
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats(key).print_stats(28)
        print(f"\n### cProfile, 200 API fwd+bwd calls (multithreading off), by {key}")
        print("\n".join(line[:170] for line in out.getvalue().splitlines()[:45]))


def sweep_bv(B=8, H=16, d=16, Dv=64, T=16384):
    print("\n## backward Dv tile sweep (T=%d)" % T)
    from featattn.kernels import tuning

    for bv in (16, 32, 64):
        with tuning.override("taylor_bwd", BV=bv):
            f, fb, mem = time_ours(B, H, T, d, Dv)
        print(f"BWD_BV={bv}: fwd {f:.3f} fwd+bwd {fb:.3f} (bwd ~{fb - f:.3f}) mem {mem:.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="correctness only")
    ap.add_argument("--no-checks", action="store_true", help="timing only")
    ap.add_argument("--fla", action="store_true", help="also time fla fused_chunk_based")
    ap.add_argument("--sweep-bv", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every tile config, then exit")
    ap.add_argument("--crossover", action="store_true",
                    help="parallel-form checks, then chunked vs parallel timing per T")
    ap.add_argument("--par-sweep", action="store_true",
                    help="parallel-form kernels alone per tile config, then exit")
    ap.add_argument("--overhead-detail", action="store_true",
                    help="where the host time of one call goes (threads, cProfile), then exit")
    ap.add_argument("--overhead", action="store_true", help="host cost per call, then exit")
    ap.add_argument("--T", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--checks", type=int, nargs="*", default=None, help="indices into CHECKS")
    args = ap.parse_args()
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if args.crossover:
        ok = True if args.no_checks else run_par_checks()
        crossover()
        print("\nPARALLEL CORRECTNESS:", "skipped" if args.no_checks else ("ALL OK" if ok else "FAILURES"))
        return 0 if ok else 1
    if args.par_sweep:
        par_sweep()
        return 0
    if args.overhead_detail:
        overhead_detail()
        return 0
    if args.overhead:
        overhead()
        return 0
    if args.sweep:
        sweep_configs(Ts=tuple(args.T) if args.T != [1024, 4096, 16384] else (16384, 2048))
        return 0
    ok = True if args.no_checks else run_checks(args.checks)
    if not args.quick:
        run_timing(Ts=tuple(args.T), with_fla=args.fla)
        if args.sweep_bv:
            sweep_bv()
    print("\nCORRECTNESS:", "skipped" if args.no_checks else ("ALL OK" if ok else "FAILURES"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
