"""GPU check + timing of featattn.kernels.chunked_attention (one script, one device call).

1. Correctness: o, the final state and every gradient (dq, dk, dv, d initial state) against
   the float64 reference, in bf16 / fp16 / fp32, on odd shapes; prints rel. errors.  It is
   the tests' harness (featattn.testing: inputs, reference, run_and_grads, tolerances), run
   with every kernel-written buffer NaN-poisoned (featattn.testing.poisoned_outputs), so an
   element a kernel never writes fails the table.
2. Timing (triton.testing.do_bench median, ms) of forward and forward+backward on the
   target shapes (B=8, H=16, bf16), with peak extra memory of forward+backward, next to
   flash-linear-attention (fla) when it is importable, and the HBM floor of the forward.

    python benchmarks/gpu_kernels.py                       # everything
    FEATATTN_NO_AUTOTUNE=1 python benchmarks/gpu_kernels.py --no-timing   # checks only
    python benchmarks/gpu_kernels.py --no-checks --no-fla  # timings only

Autotuning compiles every config for every new (Dk, Dv): run the checks with
FEATATTN_NO_AUTOTUNE=1 (one config) unless that is what you want to test.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featattn.kernels import chunked as C  # noqa: E402
from featattn.kernels import chunked_attention  # noqa: E402
from featattn.testing import (  # noqa: E402  (the tests' correctness harness)
    compare_runs, kernel_vs_reference, rand_features, rand_state, tolerance)
from _timing import bench, peak_mib  # noqa: E402  (benchmarks/_timing.py)

HBM_TBPS = 3.0  # measured device copy on the H100 (ANCHORS.md)
PROFILE = True  # print a kernel breakdown for the tiled-Dk timings
#: the checks also run on CPU tensors under TRITON_INTERPRET=1 (tests/kernels/test_kernels.py
#: runs a tiny one so this script's check path cannot rot); the timings need CUDA
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout="bhtd", grad=False, generator=None):
    """Feature-like q, k, v on DEVICE (featattn.testing.rand_features: positive when
    normalising, else N(0, 1/Dk)); ``generator`` None draws from the device's global RNG."""
    return rand_features(B, H, Hkv, T, Dk, Dv, dtype, normalize=normalize, layout=layout,
                         generator=generator, device=DEVICE, requires_grad=grad)


# --------------------------------------------------------------------------- correctness
CHECKS = [
    # B, H, Hkv, T, Dk, Dv, dtype, normalize, init, layout
    (2, 4, 4, 1000, 64, 64, torch.bfloat16, True, True, "bhtd"),
    (2, 4, 4, 1000, 64, 64, torch.bfloat16, False, False, "bthd"),
    (2, 4, 2, 4099, 64, 64, torch.bfloat16, True, False, "bhtd"),
    (1, 2, 2, 16384, 64, 64, torch.bfloat16, True, True, "bhtd"),
    (1, 2, 2, 16384, 64, 64, torch.float16, True, False, "bhtd"),
    (1, 2, 2, 777, 128, 128, torch.bfloat16, True, True, "bthd"),
    (1, 2, 2, 1000, 128, 64, torch.bfloat16, False, True, "bhtd"),
    (1, 2, 2, 1000, 273, 64, torch.bfloat16, True, True, "bhtd"),
    (1, 2, 2, 300, 32, 128, torch.bfloat16, True, False, "bhtd"),
    (1, 2, 2, 300, 1024, 256, torch.bfloat16, False, False, "bhtd"),
    (1, 2, 2, 63, 17, 5, torch.bfloat16, True, True, "bhtd"),
    (1, 2, 2, 1000, 64, 64, torch.float32, True, True, "bhtd"),
    (1, 2, 1, 1000, 273, 64, torch.float32, True, True, "bhtd"),
]


def check_one(B, H, Hkv, T, Dk, Dv, dtype, normalize, init, layout):
    """``({name: rel. error}, [failures])`` of o, the final state (kv, z) and every gradient
    (dq, dk, dv, dkv0, dz0) against the float64 reference (featattn.testing: the harness the
    tests use), the kernels' buffers NaN-poisoned (featattn.testing.poisoned_outputs) for
    the forward and backward, so an unwritten element fails."""
    seed = T * 31 + Dk
    q, k, v = inputs(B, H, Hkv, T, Dk, Dv, dtype, normalize, layout, generator=seed)
    kv0, z0 = rand_state(B, H, Dk, Dv, normalize, generator=seed + 1, device=DEVICE) if init \
        else (None, None)
    got, want = kernel_vs_reference(chunked_attention, q, k, v, kv0, z0, normalize=normalize,
                                    eps=1e-6, return_state=True)
    return compare_runs(got, want, tolerance(dtype, "chunked"))


COLUMNS = ["o", "kv", "z", "dq", "dk", "dv", "dkv0", "dz0"]


def run_checks(dtypes):
    print("\n## correctness vs float64 (rel. error, ||x - ref|| / ||ref||; outputs NaN-poisoned, "
          "tolerances featattn.testing.TOLERANCES['chunked'])")
    print("| shape | dtype | norm | init | layout | " + " | ".join(COLUMNS) + " | ok |")
    print("|---" * (6 + len(COLUMNS)) + "|")
    all_ok = True
    for c in CHECKS:
        B, H, Hkv, T, Dk, Dv, dtype, normalize, init, layout = c
        if dtype not in dtypes:
            continue
        try:
            errs, failures = check_one(*c)
        except Exception as e:  # noqa: BLE001
            errs, failures = {}, [f"ERROR {type(e).__name__}: {str(e)[:300]}"]
        ok = not failures
        all_ok &= ok
        cols = " | ".join(f"{errs[n]:.1e}" if n in errs else "-" for n in COLUMNS)
        print(f"| B{B} H{H}/{Hkv} T{T} Dk{Dk} Dv{Dv} | {str(dtype)[6:]} | {normalize} | {init} "
              f"| {layout} | {cols} | {'OK' if ok else 'FAIL'} |", flush=True)
        for why in failures:
            print(f"|   {why} |", flush=True)
    return all_ok


# --------------------------------------------------------------------------- timing


def time_ours(B, H, T, Dk, Dv, normalize, layout="bhtd", pad_to=None):
    q, k, v = inputs(B, H, H, T, Dk, Dv, torch.bfloat16, normalize, layout, grad=True)
    if pad_to:  # q/k rows stored with a 16-byte-aligned stride, passed as a view
        def padded(x):
            buf = torch.zeros(*x.shape[:-1], pad_to, device="cuda", dtype=x.dtype)
            buf[..., :Dk] = x.detach()
            return buf[..., :Dk].requires_grad_()
        q, k = padded(q), padded(k)
    do = torch.randn(B, H, T, Dv, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return chunked_attention(q, k, v, normalize=normalize, eps=1e-6)

    def fwdbwd():
        o, _, _ = chunked_attention(q, k, v, normalize=normalize, eps=1e-6)
        o.backward(do)

    fwdbwd()
    res = bench(fwd), bench(fwdbwd, [q, k, v]), peak_mib(fwdbwd)
    if PROFILE and Dk > 128:  # where the time goes when Dk is tiled
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwdbwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
    return res


def time_fla(kind, B, H, T, Dk, Dv):
    try:
        from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn
    except Exception as e:  # noqa: BLE001
        return None, f"fla unavailable: {e}"
    norm = kind.endswith("_norm")
    f = {"fused_chunk": fused_chunk_linear_attn, "chunk": chunk_linear_attn}[kind.replace("_norm", "")]
    mk = lambda d: torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16).div_(math.sqrt(d)).requires_grad_()  # noqa: E731
    q, k, v = mk(Dk), mk(Dk), mk(Dv)
    do = torch.randn(B, T, H, Dv, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            return f(q, k, v, scale=1.0, normalize=norm)

    def fwdbwd():
        o, _ = f(q, k, v, scale=1.0, normalize=norm)
        o.backward(do)

    try:
        fwdbwd()
        return (bench(fwd), bench(fwdbwd, [q, k, v]), peak_mib(fwdbwd)), None
    except Exception as e:  # noqa: BLE001
        return None, f"fla {kind} failed: {type(e).__name__}: {str(e)[:100]}"


TARGETS = [
    # name, T, Dk, Dv, normalize, target fwd / fwd+bwd (ms), fla kinds to compare
    ("64/64 plain", 16384, 64, 64, False, "<=0.37 / <=1.57", ("fused_chunk",)),
    ("64/64 norm", 16384, 64, 64, True, "<=1.15x plain fwd", ("chunk_norm",)),
    ("64/64 plain T4k", 4096, 64, 64, False, "fwd+bwd <= fla", ("fused_chunk",)),
    ("64/64 plain T1k", 1024, 64, 64, False, "fwd+bwd <= fla", ("fused_chunk",)),
    ("128/128 plain", 4096, 128, 128, False, "<=0.475 / <=2.6", ("chunk", "fused_chunk")),
    ("128/64 plain", 16384, 128, 64, False, "<=1.22 / <=6.7", ("chunk",)),
    ("273/64 norm", 16384, 273, 64, True, "<=8.5 fwd", ()),
    ("273/64 norm rows padded to 288", 16384, 273, 64, True, "<=8.5 fwd", ("chunk_norm",)),
]


def run_timing(B=8, H=16, with_fla=True, only=""):
    rows = []
    for name, T, Dk, Dv, norm, target, fla_kinds in TARGETS:
        if only and only not in name:
            continue
        floor = B * H * T * (2 * Dk + 2 * Dv) * 2 / (HBM_TBPS * 1e12) * 1e3
        C._MAX_BK = 64 if "BK64" in name else 128  # variant: smaller Dk tiles
        f, fb, mem = time_ours(B, H, T, Dk, Dv, norm, pad_to=288 if "padded" in name else None)
        C._MAX_BK = 128
        rows.append((f"ours {name} T{T}", floor, f, fb, mem, target))
        print(f"ours {name} T{T}: fwd {f:.3f} fwd+bwd {fb:.3f} mem {mem:.0f} MiB", flush=True)
        if with_fla:
            for kind in fla_kinds:
                r, err = time_fla(kind, B, H, T, Dk, Dv)
                if r is None:
                    print(err)
                    continue
                rows.append((f"fla {kind} {name} T{T}", floor, *r, ""))
    print("\n## timing, H100, bf16, B=%d H=%d (median ms; mem = peak extra MiB of fwd+bwd)" % (B, H))
    print("| case | floor fwd | fwd | fwd+bwd | mem | target |")
    print("|---|---|---|---|---|---|")
    for name, floor, f, fb, mem, target in rows:
        print(f"| {name} | {floor:.3f} | {f:.3f} | {fb:.3f} | {mem:.0f} | {target} |")
    print("\nautotuned configs (fwd):", {k: str(v) for k, v in C._fwd.cache.items()})
    print("autotuned configs (bwd):", {k: str(v) for k, v in C._bwd.cache.items()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness table")
    ap.add_argument("--no-timing", action="store_true", help="skip the timings")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="dtypes of the checks")
    ap.add_argument("--no-fla", action="store_true", help="do not time fla (ANCHORS.md has it)")
    ap.add_argument("--only", default="", help="time only the cases whose name contains this")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = True
    if not args.no_checks:
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        ok = run_checks({names[d] for d in args.dtypes.split(",")})
    if not args.no_timing:
        run_timing(with_fla=not args.no_fla, only=args.only)
    print("\nCORRECTNESS:", "ALL OK" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
