"""``featattn bench``: time every backend the dispatcher can reach on this device.

Backends (``--backends``):

- ``torch``, ``reference``, ``triton``, ``taylor_parallel``, ``taylor_chunked``, ``chunked``
  (the default set), or any other ``backend=`` value of :func:`featattn.linear_attention`
  (``auto``, the aliases ``equal_dim``, ``small_vhd``, ``taylor_fused``...).  A backend that
  cannot run here (the Triton kernels on a CPU, a Taylor kernel for another map...) gets one row marked
  ``n/a`` with the dispatcher's reason.  On a CPU with ``TRITON_INTERPRET=1`` the Triton
  kernels are reachable but run in the interpreter, which is far too slow to time: they are
  marked ``n/a`` unless named in ``--backends``.
- ``sdpa``: torch's ``scaled_dot_product_attention(..., is_causal=True)``, the softmax
  baseline (O(T^2) work).
- ``fla_chunk``, ``fla_fused_chunk``: flash-linear-attention's ``chunk_linear_attn`` /
  ``fused_chunk_linear_attn`` on the same features (the feature map is timed too), and
  ``fla_based``: its ``fused_chunk_based`` (the Taylor map fused, q/k dim <= 16).  Only when
  ``fla`` is importable; otherwise these rows are left out.

Each row gives the median time of the forward (under ``torch.no_grad``) and of forward +
backward, the peak memory of forward + backward above the inputs (CUDA only), and the kernel
:func:`featattn.select_kernel` picks for that backend.  On CUDA timings come from
``triton.testing.do_bench`` (median); on the CPU from a wall-clock loop.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..dispatch import BACKENDS, HYBRID_DIRECT_MAX_T, IMPLS, KernelUnavailable, select_kernel
from ..feature_maps import FeatureMap, build_feature_map
from ..functional import linear_attention

__all__ = ["BenchConfig", "BenchRow", "FEATATTN_BACKENDS", "ALL_BACKENDS", "run_bench",
           "plot_rows", "default_config"]

#: backend= values of featattn.linear_attention that the bench times by default: the
#: dispatcher's own kernel names (any other backend= value, an alias, may be named too)
TRITON_BACKENDS = tuple(i.name for i in IMPLS if i.triton)
FEATATTN_BACKENDS = ("torch", "reference", "triton") + TRITON_BACKENDS
FLA_BACKENDS = ("fla_chunk", "fla_fused_chunk", "fla_based")
#: what a run times without --backends
DEFAULT_BACKENDS = FEATATTN_BACKENDS + ("sdpa",) + FLA_BACKENDS
#: every name --backends takes: the defaults and the dispatcher's other backend= values
ALL_BACKENDS = DEFAULT_BACKENDS + tuple(b for b in BACKENDS if b not in DEFAULT_BACKENDS)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}

#: the quadratic reference is skipped on the CPU above this estimated footprint
CPU_QUADRATIC_LIMIT = 3 * 2**30


@dataclass
class BenchConfig:
    device: str = "cpu"
    lengths: List[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    batch: int = 1
    heads: int = 4
    dqk: int = 64
    dv: int = 64
    feature_map: str = "elu"
    dtype: str = "float32"
    backends: List[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    explicit_backends: bool = False     # --backends was given: force interpreter kernels
    seed: int = 0
    window: int = 0                     # > 0: the hybrid layer (softmax over the last W keys)

    @property
    def normalize(self) -> bool:
        # the identity map's denominator can be <= 0: time it un-normalised, as it is used
        # (the hybrid layer's shared denominator needs it)
        return self.feature_map != "identity" or self.window > 0


def default_config(device: torch.device, quick: bool = False) -> BenchConfig:
    """The sizes ``featattn bench`` uses on ``device`` (``quick``: a smoke test)."""
    if quick:
        return BenchConfig(device=str(device), lengths=[64, 128], batch=1, heads=2, dqk=16, dv=16)
    if device.type == "cuda":
        return BenchConfig(device=str(device), lengths=[1024, 4096, 16384], batch=8, heads=16,
                           dqk=64, dv=64, dtype="bfloat16")
    return BenchConfig(device=str(device))


@dataclass
class BenchRow:
    backend: str
    kernel: str
    T: Optional[int]
    fwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.fwd_ms is not None or self.fwdbwd_ms is not None


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _do_bench():
    """triton.testing.do_bench with a median, or None."""
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - triton missing or broken: use the simple timer
        return None
    params = inspect.signature(do_bench).parameters
    if "return_mode" in params:
        return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                          return_mode="median")
    if "quantiles" in params:
        return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads,
                                          quantiles=[0.5])
    return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads)


def _wall_timer(fn: Callable[[], None], device: torch.device, grads=None,
                min_time: float = 0.3, max_reps: int = 25) -> float:
    """Median wall-clock ms of ``fn`` after two warm-up calls (at least 3 timed calls, more
    while they take under ``min_time`` seconds in all)."""
    def once():
        if grads:
            for g in grads:
                g.grad = None
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    once()
    once()
    times: List[float] = []
    while len(times) < 3 or (sum(times) < min_time * 1e3 and len(times) < max_reps):
        times.append(once())
    return statistics.median(times)


def _time(fn, device, grads=None) -> float:
    if device.type == "cuda":
        bench = _do_bench()
        if bench is not None:
            return float(bench(fn, grads))
    return _wall_timer(fn, device, grads)


def _peak_mib(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# --------------------------------------------------------------------------- backends


class Skip(Exception):
    """A backend that cannot run for this configuration; the message says why."""


@dataclass
class Case:
    """One backend at one size: builds inputs, runs forward / forward+backward."""

    fwd: Callable[[], torch.Tensor]
    leaves: Sequence[torch.Tensor]


def _inputs(cfg: BenchConfig, T: int, layout: str = "bhtd", grad: bool = False):
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def mk(d):
        shape = (cfg.batch, cfg.heads, T, d) if layout == "bhtd" else (cfg.batch, T, cfg.heads, d)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        return x.requires_grad_(grad)

    return mk(cfg.dqk), mk(cfg.dqk), mk(cfg.dv)


def _quadratic_bytes(cfg: BenchConfig, T: int) -> int:
    """Rough peak of an O(T^2) forward+backward: a few fp32 [B, H, T, T] matrices."""
    return 4 * cfg.batch * cfg.heads * T * T * 4


def _quadratic_limit(device: torch.device) -> float:
    if device.type == "cuda":
        return 0.8 * torch.cuda.mem_get_info(device)[0]
    return CPU_QUADRATIC_LIMIT


def _fla_fn(name: str):
    """The fla function for ``name``, or raise Skip."""
    if importlib.util.find_spec("fla") is None:
        raise Skip("fla is not installed (pip install flash-linear-attention)")
    try:
        if name == "fla_based":
            from fla.ops.based import fused_chunk_based as fn
        else:
            from fla.ops import linear_attn

            fn = getattr(linear_attn, {"fla_chunk": "chunk_linear_attn",
                                       "fla_fused_chunk": "fused_chunk_linear_attn"}[name])
    except Exception as e:  # noqa: BLE001 - any import problem means: not available
        raise Skip(f"fla import failed: {type(e).__name__}: {e}") from None
    return fn


def _call_fla(fn, q, k, v, **kwargs):
    """Call an fla op on ``[B, T, H, D]`` tensors whatever its version's signature.

    Old fla versions take ``head_first`` (default True, ``[B, H, T, D]``); newer ones take
    ``[B, T, H, D]`` only.  Options the function does not know are dropped.  Returns o.
    """
    params = inspect.signature(fn).parameters
    kw = {k_: v_ for k_, v_ in kwargs.items() if k_ in params}
    if "head_first" in params:
        kw["head_first"] = False
    out = fn(q, k, v, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def bench_feature_map(cfg: BenchConfig) -> Union[str, FeatureMap]:
    """What the bench passes as ``feature_map``: the name, or for a map with parameters or
    buffers (hedgehog, t2r, rebased, performer: sized by the layer that owns it) an instance
    built for ``cfg``'s head dim and heads on ``cfg.device``, as FeatureAttention builds it."""
    fm = build_feature_map(cfg.feature_map, cfg.dqk, cfg.heads, cfg.heads)
    if not any(True for _ in fm.parameters()) and not any(True for _ in fm.buffers()):
        return cfg.feature_map
    return fm.to(cfg.device)


def _case(cfg: BenchConfig, backend: str, T: int, grad: bool) -> Case:
    fm_name, normalize = bench_feature_map(cfg), cfg.normalize
    device = torch.device(cfg.device)
    if backend in BACKENDS:
        if backend == "reference" and _quadratic_bytes(cfg, T) > _quadratic_limit(device):
            raise Skip(f"skipped: O(T^2) memory, ~{_quadratic_bytes(cfg, T) / 2**30:.1f} GiB")
        if cfg.window and T <= HYBRID_DIRECT_MAX_T and backend not in ("torch", "reference",
                                                                       "auto"):
            raise Skip(f"T <= {HYBRID_DIRECT_MAX_T} with a window: linear_attention takes the "
                       f"direct PyTorch form (Triton from {HYBRID_DIRECT_MAX_T + 1} queries)")
        q, k, v = _inputs(cfg, T, grad=grad)
        win = {"window": cfg.window} if cfg.window else {}
        return Case(lambda: linear_attention(q, k, v, feature_map=fm_name, normalize=normalize,
                                             backend=backend, **win), (q, k, v))
    if backend == "sdpa":
        q, k, v = _inputs(cfg, T, grad=grad)
        return Case(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v))
    if backend in FLA_BACKENDS:
        if cfg.window:
            raise Skip("fla has no hybrid (window) form")
        fn = _fla_fn(backend)
        q, k, v = _inputs(cfg, T, layout="bthd", grad=grad)
        if backend == "fla_based":
            return Case(lambda: _call_fla(fn, q, k, v, scale=cfg.dqk ** -0.5, use_norm=normalize),
                        (q, k, v))
        fm = build_feature_map(cfg.feature_map, cfg.dqk, cfg.heads, cfg.heads).to(device)
        per_head = not isinstance(fm_name, str)  # its parameters are per head: [B, H, T, D] in

        def features(x, fn_map):
            if not per_head:  # acts on the last dim alone: any layout
                return fn_map(x)
            return fn_map(x.transpose(1, 2)).transpose(1, 2).contiguous()

        def run():
            return _call_fla(fn, features(q, fm.forward_query), features(k, fm.forward_key), v,
                             scale=1.0, normalize=normalize)

        return Case(run, (q, k, v))
    raise ValueError(f"unknown backend {backend!r}")


def _kernel_label(cfg: BenchConfig, backend: str):
    """(kernel name, None) or (None, reason it cannot run)."""
    if backend in BACKENDS:
        # (a window's kernel is asked of a long call: up to 64 queries take the direct form)
        q, k, v = _inputs(cfg, 128 if cfg.window else 1)
        try:
            choice = select_kernel(q, k, v, feature_map=bench_feature_map(cfg), backend=backend,
                                   window=cfg.window)
        except KernelUnavailable as e:
            return None, "; ".join(e.reasons)
        if (choice.name in TRITON_BACKENDS and torch.device(cfg.device).type == "cpu"
                and not cfg.explicit_backends):
            return None, ("Triton interpreter (TRITON_INTERPRET=1) is too slow to time; "
                          "name it in --backends to run it anyway")
        return choice.name, None
    if backend == "sdpa":
        return "sdpa (softmax)", None
    if cfg.window:
        return None, "fla has no hybrid (window) form"
    try:
        _fla_fn(backend)
    except Skip as e:
        return None, str(e)
    if torch.device(cfg.device).type != "cuda":
        return None, "fla's kernels need CUDA"
    if backend == "fla_based" and cfg.feature_map != "taylor":
        return None, "fla_based is the Taylor map: use --feature-map taylor"
    if backend == "fla_based" and cfg.dqk > 16:
        return None, f"fla_based supports q/k dims <= 16, got --dqk {cfg.dqk}"
    fn_names = {"fla_chunk": "chunk_linear_attn", "fla_fused_chunk": "fused_chunk_linear_attn",
                "fla_based": "fused_chunk_based"}
    return fn_names[backend], None


def _measure(cfg: BenchConfig, backend: str, T: int) -> BenchRow:
    device = torch.device(cfg.device)
    row = BenchRow(backend, "", T)
    try:
        case = _case(cfg, backend, T, grad=False)

        def fwd():
            with torch.no_grad():
                case.fwd()

        row.fwd_ms = _time(fwd, device)
        del case
        case = _case(cfg, backend, T, grad=True)
        do = torch.randn_like(case.fwd().detach())

        def fwdbwd():
            case.fwd().backward(do)

        fwdbwd()                                                     # warm-up / autotune
        row.fwdbwd_ms = _time(fwdbwd, device, list(case.leaves))
        for t in case.leaves:
            t.grad = None
        row.peak_mib = _peak_mib(fwdbwd, device)
    except Skip as e:
        row.note = str(e)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    except Exception as e:  # noqa: BLE001 - report it in the table and go on
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row.note = f"error: {type(e).__name__}: {msg[:120]}"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def available_backends(cfg: BenchConfig) -> List[str]:
    """``cfg.backends`` minus the fla ones when fla is not importable and they were not asked
    for by name (they are left out quietly)."""
    out = []
    for b in cfg.backends:
        if (b in FLA_BACKENDS and not cfg.explicit_backends
                and importlib.util.find_spec("fla") is None):
            continue
        out.append(b)
    return out


def run_bench(cfg: BenchConfig, on_row: Optional[Callable[[BenchRow], None]] = None,
              on_start: Optional[Callable[[str, int], None]] = None) -> List[BenchRow]:
    """Every backend at every length; rows ordered by backend, then T."""
    rows: List[BenchRow] = []
    for backend in available_backends(cfg):
        kernel, why = _kernel_label(cfg, backend)
        if kernel is None:
            row = BenchRow(backend, "-", None, note=f"n/a: {why}")
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        for T in cfg.lengths:
            if on_start:
                on_start(backend, T)
            row = _measure(cfg, backend, T)
            row.kernel = kernel
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


# --------------------------------------------------------------------------- output


def plot_rows(rows: List[BenchRow], cfg: BenchConfig, path: Path, title: str) -> Path:
    """Time against T, log-log: forward and forward+backward side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(10, 4), dpi=100)     # no pyplot: the Agg canvas, no global state
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    backends = list(dict.fromkeys(r.backend for r in rows if r.ok))
    kernels = {r.backend: r.kernel for r in rows if r.ok}

    def legend_label(b):
        k = kernels.get(b, "")
        return k if k.startswith(b) else f"{b} ({k})"

    for ax, attr, label in ((axes[0], "fwd_ms", "forward"),
                            (axes[1], "fwdbwd_ms", "forward + backward")):
        for b in backends:
            pts = [(r.T, getattr(r, attr)) for r in rows
                   if r.backend == b and getattr(r, attr) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=legend_label(b))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg.lengths, [str(t) for t in cfg.lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("time (ms)")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
        if backends:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_json(rows: List[BenchRow], cfg: BenchConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def fmt_mib(x: Optional[float]) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0f}"
