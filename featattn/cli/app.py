"""featattn: causal linear attention with pluggable feature maps.

Commands:
  featattn demo    train small models that differ only in their attention layer on
                   multi-query associative recall (MQAR) and compare them
  featattn bench   time every backend the dispatcher can reach on this device
  featattn info    versions, the device, the kernels the dispatcher picks here and the
                   switches (environment variables) in force: paste it into bug reports

demo and bench print a table and write a PNG plot (and a JSON file of the numbers) under --out.
Run `featattn COMMAND --help` for the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .. import __version__
from .ui import UI

__all__ = ["main", "build_parser"]

DEMO_ATTENTIONS = ["softmax", "taylor", "elu", "relu", "identity"]

DEMO_HELP = """\
Train small models that differ only in their attention layer (softmax, and FeatureAttention
with each feature map) on multi-query associative recall (MQAR), then compare them.

MQAR (Zoology / Based): each sequence is N key-value pairs followed by queries of those keys,

    k1 v1 k2 v2 ... kN vN | q1 q2 ... qM

and the model must output the value bound to each queried key (loss and accuracy count the
query positions only). Pairs are drawn afresh for every sequence, so the layer has to store
them in its state. Data are generated on the fly from --seed; every model sees the same data.

Prints a progress bar per model and a table of recall accuracy, parameters and tokens/s;
writes demo.png (accuracy against training steps) and demo.json under --out."""

BENCH_HELP = """\
Time every backend the dispatcher can reach on this device, across sequence lengths,
forward and forward+backward, with peak memory (CUDA) and the kernel select_kernel picks.

backends:
  torch, reference, triton,    featattn.linear_attention(..., backend=NAME) (the default
  taylor_parallel,             set; any other backend= value, e.g. the aliases equal_dim,
  taylor_chunked, chunked      small_vhd, taylor_fused, may be named); a backend that cannot
                               run here gets one 'n/a' row with the reason. On a CPU with
                               TRITON_INTERPRET=1 the Triton kernels run in the (slow)
                               interpreter: timed only when named in --backends
  sdpa                         torch scaled_dot_product_attention(is_causal=True): softmax
  fla_chunk, fla_fused_chunk,  flash-linear-attention, when it is importable (left out
  fla_based                    otherwise; fla_based: --feature-map taylor, --dqk <= 16)

Prints a table and writes bench.png (time against T, log-log) and bench.json under --out.
On CUDA, times are triton.testing.do_bench medians; on the CPU, wall-clock medians."""

INFO_HELP = """\
Print what featattn finds here, in five tables:

  versions   featattn (and where it is imported from), Python, torch, triton, transformers
  device     the CUDA device's name and capability, else the CPU
  kernels    the kernel featattn.select_kernel picks (backend='auto') for a few representative
             calls, where the feature map runs and why faster kernels were not taken
  backends   whether each backend= value can run here, and the kernel it runs
  switches   every environment variable featattn reads, its value and whether it is the
             default (docs/kernels-and-dispatch.md)

Takes seconds: nothing is compiled or launched (select_kernel only looks at shapes)."""


# --------------------------------------------------------------------------- parsing


def _positive_int(text: str) -> int:
    try:
        val = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if val < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {val}")
    return val


def _positive_float(text: str) -> float:
    try:
        val = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (val > 0 and val != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return val


def _names(values: Optional[List[str]]) -> Optional[List[str]]:
    """``a b,c`` -> ``[a, b, c]`` (commas or spaces), duplicates dropped."""
    if values is None:
        return None
    out = [v.strip() for part in values for v in part.split(",") if v.strip()]
    return list(dict.fromkeys(out))


def _resolve_device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: CUDA is not available on this machine "
                         "(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device {text}: only cpu and cuda are supported")
    return device


def _out_paths(out: str, stem: str):
    """``--out`` is a directory (``DIR/stem.png`` + ``DIR/stem.json``) or a ``.png`` path."""
    p = Path(out)
    if p.suffix.lower() == ".png":
        return p, p.with_suffix(".json")
    return p / f"{stem}.png", p / f"{stem}.json"


def _prepare_out(parser: argparse.ArgumentParser, paths) -> None:
    """Create the output folder now, so a bad --out fails before the work, not after."""
    for folder in {p.parent for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"--out: cannot create {folder}: {e.strerror or e}")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="featattn", description=__doc__, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"featattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,info}", required=True)

    # ------------------------------------------------------------------ demo
    from .demo import DEFAULT_CONFIG as D, QUICK_CONFIG as Q

    p = sub.add_parser(
        "demo", formatter_class=fmt, help="train tiny models, one per attention layer, on MQAR",
        description=DEMO_HELP,
        epilog=("examples:\n"
                "  featattn demo                          # the default run (minutes on CPU)\n"
                "  featattn demo --quick                  # < 1 minute smoke test\n"
                "  featattn demo --feature-maps softmax taylor --steps 400 --out results/"))
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--feature-maps", nargs="+", metavar="NAME", default=None,
                   help=f"attention layers to compare: 'softmax' and/or registered feature maps, "
                        f"or 'all' (softmax and every registered map: the zoo table) "
                        f"(default: {' '.join(DEMO_ATTENTIONS)})")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"training steps per model (default: {D.steps}; --quick: {Q.steps})")
    p.add_argument("--seq-len", type=_positive_int, default=None,
                   help=f"tokens per sequence: 2 * kv-pairs, then queries "
                        f"(default: {D.seq_len}; --quick: {Q.seq_len})")
    p.add_argument("--kv-pairs", type=_positive_int, default=None,
                   help=f"key-value pairs per sequence (default: {D.kv_pairs}; "
                        f"--quick: {Q.kv_pairs})")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help=f"sequences per step (default: {D.batch}; --quick: {Q.batch})")
    p.add_argument("--dim", type=_positive_int, default=None,
                   help=f"model width (default: {D.dim}; --quick: {Q.dim})")
    p.add_argument("--heads", type=_positive_int, default=None,
                   help=f"attention heads (default: {D.heads})")
    p.add_argument("--layers", type=_positive_int, default=None,
                   help=f"blocks (default: {D.layers})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate, one-cycle schedule (default: {D.lr})")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help=f"evaluate every N steps (default: {D.eval_every}; "
                        f"--quick: {Q.eval_every})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"CPU threads for torch (default: torch's, here "
                        f"{torch.get_num_threads()}); "
                        "1 is steadier when other jobs share the CPU")
    p.add_argument("--out", default="out",
                   help="directory for demo.png and demo.json, or a .png path (default: out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes that finish in under a minute on CPU (a smoke test)")
    p.set_defaults(func=_cmd_demo, parser=p)

    # ------------------------------------------------------------------ bench
    from .bench import ALL_BACKENDS, DTYPES

    p = sub.add_parser(
        "bench", formatter_class=fmt, help="time every backend the dispatcher can reach here",
        description=BENCH_HELP,
        epilog=("defaults: on CUDA B=8 H=16 Dqk=Dv=64 bf16, T = 1024 4096 16384; on CPU B=1 H=4\n"
                "Dqk=Dv=64 fp32, T = 512 1024 2048 4096 8192 (under a minute); --quick: B=1 H=2\n"
                "Dqk=Dv=16 fp32, T = 64 128 (seconds).\n\n"
                "examples:\n"
                "  featattn bench\n"
                "  featattn bench --feature-map taylor --dqk 16 --lengths 1024 4096\n"
                "  featattn bench --backends torch sdpa --out results/\n"
                "  featattn bench --window 64 --feature-map hedgehog   # the hybrid layer"))
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--lengths", type=_positive_int, nargs="+", metavar="T", default=None,
                   help="sequence lengths to time")
    p.add_argument("--batch", type=_positive_int, default=None, help="batch size B")
    p.add_argument("--heads", type=_positive_int, default=None, help="heads H")
    p.add_argument("--dqk", type=_positive_int, default=None,
                   help="raw q/k head dim (before the map)")
    p.add_argument("--dv", type=_positive_int, default=None, help="value head dim")
    p.add_argument("--feature-map", default="elu",
                   help="feature map for the linear-attention backends (default: elu; identity "
                        "runs un-normalised)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   metavar="{float32,bfloat16,float16,float64}",
                   help="input dtype (also fp32, bf16, fp16, fp64); default: float32 on CPU, "
                        "bfloat16 on CUDA")
    p.add_argument("--backends", nargs="+", metavar="NAME", default=None,
                   help=f"subset of: {' '.join(ALL_BACKENDS)} (default: all)")
    p.add_argument("--window", type=_positive_int, default=None, metavar="W",
                   help="time the hybrid layer: a softmax over the last W keys plus linear "
                        "attention before them (docs/hybrid.md); sdpa stays full causal")
    p.add_argument("--out", default="out",
                   help="directory for bench.png and bench.json, or a .png path (default: out)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help=f"CPU threads for torch (default: torch's, here {torch.get_num_threads()})")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.set_defaults(func=_cmd_bench, parser=p)

    # ------------------------------------------------------------------ info
    from .info import SAMPLE_BHT

    B, H, T = SAMPLE_BHT
    p = sub.add_parser(
        "info", formatter_class=fmt,
        help="versions, device, kernels picked here and switches in force (for bug reports)",
        description=INFO_HELP,
        epilog=(f"the sample calls: B={B} H={H} T={T}, bfloat16 on CUDA, float32 on CPU\n\n"
                "examples:\n"
                "  featattn info\n"
                "  FEATATTN_FUSE_MAPS=kernel featattn info     # what a switch changes\n"
                "  featattn info --device cpu"))
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=_cmd_info, parser=p, threads=None)
    return parser


# --------------------------------------------------------------------------- demo


def _cmd_demo(args, ui: UI) -> int:
    from .. import list_feature_maps
    from .demo import (DEFAULT_CONFIG, QUICK_CONFIG, make_eval_set, plot_curves,
                       run_environment, train_one, write_json)

    parser = args.parser
    device = _resolve_device(parser, args.device)
    names = _names(args.feature_maps) or list(DEMO_ATTENTIONS)
    known = ["softmax"] + sorted(list_feature_maps())
    if "all" in names:  # the zoo: softmax and every registered map, in that order
        names = list(dict.fromkeys(n for m in names for n in (known if m == "all" else [m])))
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--feature-maps: unknown {', '.join(map(repr, unknown))}; "
                     f"choose from {', '.join(known)}")
    base = QUICK_CONFIG if args.quick else DEFAULT_CONFIG
    overrides = {k: getattr(args, k) for k in
                 ("steps", "seq_len", "kv_pairs", "batch", "dim", "heads", "layers", "lr",
                  "eval_every") if getattr(args, k) is not None}
    cfg = dataclasses.replace(base, seed=args.seed, **overrides)
    problems = cfg.problems()
    if problems:
        parser.error("; ".join(problems))
    png, js = _out_paths(args.out, "demo")
    _prepare_out(parser, (png, js))

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    ui.print(f"featattn demo: multi-query associative recall on {device}{threads}")
    ui.print(f"  task : {cfg.kv_pairs} key-value pairs then {cfg.num_queries} queries per "
             f"sequence (seq_len {cfg.seq_len}, {cfg.num_keys} keys, {cfg.num_keys} values), "
             f"seed {cfg.seed}")
    ui.print(f"  model: dim {cfg.dim}, {cfg.heads} heads, {cfg.layers} layer(s) of short conv + "
             f"attention + MLP; {cfg.steps} steps x {cfg.batch} sequences, AdamW lr {cfg.lr}")
    ui.print(f"  attention: {', '.join(names)}")
    env = run_environment(device)
    # the numbers reproduce exactly only when all of these match (docs/demo.md)
    ui.print("  reproducible for: seed " + str(cfg.seed) + ", "
             + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"))

    eval_set = make_eval_set(cfg, device)
    results = []
    t_all = time.perf_counter()
    with ui.progress() as add:
        for name in names:
            update = add(name, cfg.steps)
            last = {"acc": None}

            def on_step(step, loss, acc, update=update, last=last):
                if acc is not None:
                    last["acc"] = acc
                info = f"loss {loss:6.3f}"
                if last["acc"] is not None:
                    info += f"  acc {last['acc']:.3f}"
                update(step, info)

            results.append(train_one(name, cfg, device, eval_set=eval_set, on_step=on_step))
    total = time.perf_counter() - t_all

    rows = [[r.name, "-" if r.feature_dim is None else str(r.feature_dim),
             f"{r.state_bytes / 1024:,.1f}", f"{r.accuracy:.3f}", f"{r.final_loss:.3f}",
             f"{r.params:,}", f"{r.tokens_per_s:,.0f}", f"{r.train_seconds:.1f}"]
            for r in results]
    ui.print()
    ui.table(f"MQAR recall after {cfg.steps} steps ({device})",
             ["attention", "features/head", "state KiB", "recall acc", "final loss", "params",
              "tokens/s", "train s"],
             rows, right=[False, True, True, True, True, True, True, True])
    ui.print(f"total {total:.1f}s")
    try:
        plot_curves(results, cfg, png,
                    f"MQAR: {cfg.kv_pairs} pairs, seq_len {cfg.seq_len}, dim {cfg.dim}, "
                    f"{cfg.steps} steps, seed {cfg.seed} ({device})")
        ui.print(f"wrote {png}")
    except ImportError:
        ui.print("matplotlib is not installed: no plot (pip install matplotlib)")
    write_json(results, cfg, device, js)
    ui.print(f"wrote {js}")
    return 0


# --------------------------------------------------------------------------- bench


def _cmd_bench(args, ui: UI) -> int:
    from .. import list_feature_maps
    from .bench import (ALL_BACKENDS, DTYPES, default_config, fmt_mib, fmt_ms, plot_rows,
                        run_bench, write_json)

    parser = args.parser
    device = _resolve_device(parser, args.device)
    if args.feature_map not in list_feature_maps():
        parser.error(f"--feature-map: unknown {args.feature_map!r}; "
                     f"choose from {', '.join(sorted(list_feature_maps()))}")
    backends = _names(args.backends)
    if backends is not None:
        unknown = [b for b in backends if b not in ALL_BACKENDS]
        if unknown:
            parser.error(f"--backends: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(ALL_BACKENDS)}")
    if args.dtype is not None and DTYPES[args.dtype] in (torch.float16, torch.bfloat16) \
            and device.type == "cpu":
        ui.print(f"note: {args.dtype} on CPU is slow and only useful as a check")
    cfg = default_config(device, quick=args.quick)
    overrides = {k: getattr(args, k) for k in ("lengths", "batch", "heads", "dqk", "dv", "dtype",
                                                "window") if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, feature_map=args.feature_map, **overrides)
    if backends is not None:
        cfg = dataclasses.replace(cfg, backends=backends, explicit_backends=True)
    cfg.lengths = sorted(set(cfg.lengths))
    png, js = _out_paths(args.out, "bench")
    _prepare_out(parser, (png, js))

    from ..feature_maps import build_feature_map

    dk = build_feature_map(cfg.feature_map, cfg.dqk, cfg.heads, cfg.heads).output_dim(cfg.dqk)
    ui.print(f"featattn bench on {device}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                f" ({torch.get_num_threads()} threads)"))
    ui.print(f"  B={cfg.batch} H={cfg.heads} Dqk={cfg.dqk} (Dk={dk} after {cfg.feature_map}) "
             f"Dv={cfg.dv} {cfg.dtype}, normalize={cfg.normalize}, T in "
             f"{' '.join(map(str, cfg.lengths))}"
             + (f", window={cfg.window} (hybrid)" if cfg.window else ""))

    def on_row(row):
        if row.T is None:
            return
        ui.print(f"  {row.backend:<16} T={row.T:<6} fwd {fmt_ms(row.fwd_ms):>8} ms  "
                 f"fwd+bwd {fmt_ms(row.fwdbwd_ms):>8} ms  {row.note}")

    t0 = time.perf_counter()
    rows = run_bench(cfg, on_row=on_row)
    table = [[r.backend, r.kernel, "-" if r.T is None else str(r.T), fmt_ms(r.fwd_ms),
              fmt_ms(r.fwdbwd_ms), fmt_mib(r.peak_mib), r.note] for r in rows]
    ui.print()
    win = f", window={cfg.window}" if cfg.window else ""
    ui.table(f"featattn bench: {cfg.feature_map}{win}, B={cfg.batch} H={cfg.heads} "
             f"Dqk={cfg.dqk} Dv={cfg.dv} {cfg.dtype} on {device}",
             ["backend", "kernel", "T", "fwd ms", "fwd+bwd ms", "peak MiB", "note"], table,
             right=[False, False, True, True, True, True, False])
    ui.print(f"total {time.perf_counter() - t0:.1f}s")
    try:
        plot_rows(rows, cfg, png, f"featattn bench: {cfg.feature_map}{win}, B={cfg.batch} "
                  f"H={cfg.heads} Dqk={cfg.dqk} Dv={cfg.dv} {cfg.dtype} on {device}")
        ui.print(f"wrote {png}")
    except ImportError:
        ui.print("matplotlib is not installed: no plot (pip install matplotlib)")
    write_json(rows, cfg, js)
    ui.print(f"wrote {js}")
    return 0


# --------------------------------------------------------------------------- info


def _cmd_info(args, ui: UI) -> int:
    from .. import _switches
    from ..dispatch import KERNELS
    from .info import (SAMPLE_BHT, backend_rows, device_rows, kernel_rows, sample_dtype,
                       switch_rows, versions)

    device = _resolve_device(args.parser, args.device)
    ui.table("versions", ["package", "version", "location"],
             [list(r) for r in versions()])
    ui.print()
    ui.table("device", ["field", "value"], [list(r) for r in device_rows(device)])
    ui.print()

    B, H, T = SAMPLE_BHT
    dtype = str(sample_dtype(device)).replace("torch.", "")
    krows = kernel_rows(device)
    ui.table(f"kernels: backend='auto' on {device}, {dtype}, B={B} H={H} T={T}",
             ["call", "Dqk", "Dv", "kernel", "map path", "reasons"],
             [[r.call.label, str(r.call.dqk), str(r.call.dv), r.kernel or "error",
               r.map_path or "-", "; ".join(r.reasons) or "-"] for r in krows],
             right=[False, True, True])
    ui.print()
    brows = backend_rows(device)
    ui.table(f"backends: forced with backend=NAME on {device}, {dtype}",
             ["backend", "sample call", "kernel", "why not"],
             [[b, call, kernel or "n/a", why or "-"] for b, call, kernel, why in brows])
    reached = ({r.kernel for r in krows} | {kernel for _, _, kernel, _ in brows}) - {None}
    interpreted = device.type == "cpu" and _switches.enabled("TRITON_INTERPRET")
    ui.print(f"kernels that run here: {', '.join(k for k in KERNELS if k in reached)}"
             + (" (the Triton ones in its interpreter, TRITON_INTERPRET=1: slow, for tests)"
                if interpreted and reached - {"torch_chunked", "reference"} else ""))
    missing = [k for k in KERNELS if k not in reached]
    if missing:
        ui.print(f"kernels that do not: {', '.join(missing)}")
    ui.print()
    ui.table("switches (featattn/_switches.py, docs/kernels-and-dispatch.md)",
             ["switch", "value", "default", "state", "read at"],
             [[name, value or "(empty)", default or "(empty)", state, when]
              for name, value, default, state, when in switch_rows()])
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``featattn`` / ``python -m featattn``: returns the exit status (argparse errors raise
    SystemExit(2) with a message on stderr)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args, UI())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)         # main() may run inside another program
