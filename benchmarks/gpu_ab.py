"""A/B timings of source trees or switches at the level users call (GPU), alternated.

    mkdir ab_old && git archive <ref> featattn | tar -x -C ab_old   # an old tree (git-ignored:
                                                                    # name it in the device's carry)
    python3 benchmarks/gpu_ab.py ab_old .                 # old tree vs the working tree
    python3 benchmarks/gpu_ab.py . .:chunked.DEN_IN_MMA=0 .:chunked.DEN_IN_MMA_MAX_BK=128
    python3 benchmarks/gpu_ab.py ab_old . --rounds 3 --only elu features
    python3 benchmarks/gpu_ab.py . . --configs             # also each process's tuned configs

Each variant is ``TREE[:MODULE.NAME=INT,...]``: a directory holding ``featattn/`` (``.`` the
working tree) and featattn.kernels constants set before the first call.  Every variant runs
in a process of its own, ``--rounds`` times, the variants alternated (A B A B ...), so that a
clock or thermal drift does not pass for a difference; the table gives each variant's best
round (a round's number is do_bench's median).  Before timing, each process checks every call
in bf16 at T = 1000 and 1024 (padded and whole chunks) against float64 on the same bf16
inputs (output and gradients), on the path the timed call takes (FEATATTN_FUSE_MAPS as
MAP_PATH sets it for both: at T = 1000 the dispatcher would put every map in the kernels); a
call whose error passes ERR_LIMIT is
reported and not timed (the variant's other calls still are).  The kernels tune their
configs per problem size, so the check's small shape does not pick the timed call's.
Single forwards of identical code have differed by up to 1.5x between processes (sessions
14-15); ``--configs`` prints the config each autotuned launch chose in each process, to tell
the autotuner's choice from a change.

Calls (B = 8, H = 16, T = 16384 or ``--T``, D = 64, bf16, normalised unless said), fwd /
fwd+bwd ms:

* ``features``: ``linear_attention(fq, fk, v)`` on elu features computed beforehand;
* ``plain``: the same, ``normalize=False``;
* ``elu``: ``linear_attention(q, k, v, feature_map="elu")`` with the map as one Triton pass
  before the kernels (``FEATATTN_FUSE_MAPS=pass``: the dispatcher's choice at T = 16384);
* ``elu_kernel``: the same with the map inside the chunked kernels
  (``FEATATTN_FUSE_MAPS=kernel``: its choice for calls of <= 2^20 rows, e.g. ``--T 4096``);
* ``wide``: features of width 128 (a Hedgehog map's 64 -> 2 x 64);
* ``hedgehog``: ``linear_attention(q, k, v, feature_map=<Hedgehog 64 -> 128>)``;
* ``hybrid``: ``linear_attention(q, k, v, feature_map="elu", window=64)`` (the map as a pass).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

CALLS = ("features", "plain", "elu", "elu_kernel", "wide", "hedgehog", "hybrid")
#: FEATATTN_FUSE_MAPS for each call's check and timing (set, since at the check's T = 1000
#: the dispatcher would choose "kernel" for every map)
MAP_PATH = {"elu_kernel": "kernel"}
HYBRID_WINDOW = 64  # the hybrid call's softmax window (issue 20's W)
ERR_LIMIT = 2e-2  # bf16 output and gradients against float64 (the tests' bf16 tolerances)
HERE = Path(__file__).resolve().parent


def _parse(variant):
    tree, _, sets = variant.partition(":")
    return tree, [s for s in sets.split(",") if s]


def _make(name, B, H, T, D, device="cuda"):
    """(call, leaves, map parameters) of one named call at this shape."""
    import torch
    import torch.nn.functional as F

    import featattn
    from featattn.feature_maps import HedgehogFeatureMap

    g = torch.Generator(device=device).manual_seed(0)  # drawn where they live: fast
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    if name in ("features", "plain", "wide"):
        w = 2 * D if name == "wide" else D
        if w != D:
            q, k = rnd(B, H, T, w), rnd(B, H, T, w)
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        return (lambda a, b, c, fm=None: featattn.linear_attention(
            a, b, c, normalize=name != "plain")), [fq, fk, v], None
    if name in ("elu", "elu_kernel"):
        return (lambda a, b, c, fm=None: featattn.linear_attention(
            a, b, c, feature_map="elu")), [q, k, v], None
    if name == "hybrid":
        return (lambda a, b, c, fm=None: featattn.linear_attention(
            a, b, c, feature_map="elu", window=HYBRID_WINDOW)), [q, k, v], None
    fm = HedgehogFeatureMap(D, heads=H).to(device)
    with torch.no_grad():
        for p in fm.parameters():
            p.add_(0.2 * rnd(*p.shape))
    return (lambda a, b, c, fm=fm: featattn.linear_attention(a, b, c, feature_map=fm)), \
        [q, k, v], fm


def _check(name):
    """Largest relative error of output and gradients (bf16) against float64, at T = 1000
    (masked chunks) and T = 1024 (whole chunks: chunked.FULL_TILES's constant masks)."""
    return max(_check_at(name, 1000), _check_at(name, 1024))


def _check_at(name, T):
    import torch

    call, leaves, fm = _make(name, 2, 4, T, 64)
    x = [t.bfloat16().requires_grad_() for t in leaves]
    params = list(fm.parameters()) if fm is not None else []
    o = call(*x)  # on the timed call's path (the worker set FEATATTN_FUSE_MAPS)
    do = torch.randn_like(o)
    got = [o, *torch.autograd.grad(o, x + params, do)]
    fm64 = copy.deepcopy(fm).double() if fm is not None else None
    r = [t.detach().double().requires_grad_() for t in x]  # the same (bf16) inputs

    def ref(a, b, c):
        import featattn

        if name == "hedgehog":
            return featattn.linear_attention(a, b, c, feature_map=fm64, backend="reference")
        if name == "hybrid":
            return featattn.linear_attention(a, b, c, feature_map="elu", window=HYBRID_WINDOW,
                                             backend="reference")
        return featattn.linear_attention(a, b, c,
                                         feature_map="elu" if name.startswith("elu") else None,
                                         normalize=name != "plain", backend="reference")

    ro = ref(*r)
    want = [ro, *torch.autograd.grad(ro, r + (list(fm64.parameters()) if fm64 else []),
                                     do.double())]
    return max(((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def worker(tree, sets, names, T):
    sys.path[:0] = [os.path.abspath(tree), str(HERE)]
    import torch

    import featattn
    from _timing import bench, set_constants, tuned_configs

    if not featattn.__file__.startswith(os.path.abspath(tree)):
        raise SystemExit(f"imported featattn from {featattn.__file__}, not from {tree}")
    set_constants(sets)
    out = {}
    for name in names:
        os.environ["FEATATTN_FUSE_MAPS"] = MAP_PATH.get(name, "pass")
        err = _check(name)
        if not err < ERR_LIMIT:  # this call fails; the variant's other calls still count
            print(f"FAILED {name}: relative error {err:.2e} against float64 "
                  f"(limit {ERR_LIMIT:.0e}): not timed", flush=True)
            continue
        call, leaves, fm = _make(name, 8, 16, T, 64)
        x = [t.bfloat16().requires_grad_() for t in leaves]
        do = torch.randn_like(x[2])
        params = list(fm.parameters()) if fm is not None else []

        def fwd(call=call, x=x):
            with torch.no_grad():
                call(*x)

        call(*x).backward(do)  # compile and autotune outside the timing
        out[name] = (err, bench(fwd), bench(lambda: call(*x).backward(do), x + params))
    print("RESULT " + json.dumps(out), flush=True)
    print("CONFIGS " + json.dumps(tuned_configs()), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="TREE[:MODULE.NAME=INT,...]")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=CALLS, default=list(CALLS))
    ap.add_argument("--T", type=int, default=16384, help="the timed calls' sequence length")
    ap.add_argument("--configs", action="store_true",
                    help="print the configs the autotuner chose in each process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        tree, sets = _parse(a.variants[0])
        worker(tree, sets, a.only, a.T)
        return
    for v in a.variants:
        tree, _ = _parse(v)
        if not (Path(tree) / "featattn" / "__init__.py").exists():
            raise SystemExit(f"{v}: {tree}/featattn/__init__.py does not exist")
    best = {v: {} for v in a.variants}
    for rnd in range(a.rounds):
        order = a.variants if rnd % 2 == 0 else a.variants[::-1]
        for v in order:
            p = subprocess.run([sys.executable, __file__, v, "--worker", "--T", str(a.T),
                                "--only", *a.only],
                               capture_output=True, text=True, timeout=900)
            for ln in p.stdout.splitlines():
                if ln.startswith("FAILED "):
                    print(f"{v} round {rnd}: {ln}", flush=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                print(f"{v} round {rnd}: FAILED {' / '.join(tail)[-400:]}", flush=True)
                continue
            res = json.loads(line[0][7:])
            cfgs = [ln for ln in p.stdout.splitlines() if ln.startswith("CONFIGS ")]
            if cfgs and a.configs:  # the autotuner's choices, to tell a lottery from a change
                for name, rows in json.loads(cfgs[0][8:]).items():
                    print(f"    {name}: " + "; ".join(rows), flush=True)
            print(f"{v} round {rnd}: " + ", ".join(
                f"{n} {e:.1e} {f:.3f}/{fb:.3f}" for n, (e, f, fb) in res.items()), flush=True)
            for n, (e, f, fb) in res.items():
                old = best[v].get(n)
                best[v][n] = (max(e, old[0]) if old else e, min(f, old[1]) if old else f,
                              min(fb, old[2]) if old else fb)
    print("\n| variant | " + " | ".join(f"{n}: err, fwd / fwd+bwd ms" for n in a.only) + " |")
    print("|---|" + "---|" * len(a.only))
    for v in a.variants:
        cells = [f"{best[v][n][0]:.1e}, {best[v][n][1]:.3f} / {best[v][n][2]:.3f}"
                 if n in best[v] else "-" for n in a.only]
        print(f"| `{v}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
