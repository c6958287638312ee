"""Helpers shared by the benchmark scripts: timing (the methodology docs/benchmarks.md records:
triton.testing.do_bench median, 50 ms warm-up, 300 ms of repetitions) and switch setting."""

import torch


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def _loop(fn, n, warmup):
    """(host seconds, wall seconds) of ``n`` back-to-back calls after ``warmup`` calls: host
    until the last call returns, wall until the GPU has finished too."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host, time.perf_counter() - t


def wall_ms(fn, n=300) -> float:
    """Wall milliseconds per call of ``fn`` over ``n`` back-to-back calls, host included (the
    number a Python loop sees: a decode step, or the launch path's cost when the GPU work is
    small), after 20 warm-up calls."""
    return _loop(fn, n, 20)[1] / n * 1e3


def host_us(fn, n=200) -> float:
    """Host microseconds per call of ``fn`` over ``n`` back-to-back calls (without waiting for
    the GPU: what the Python side costs when the launch queue never fills), after 10 warm-up
    calls."""
    return _loop(fn, n, 10)[0] / n * 1e6


def peak_mib(fn) -> float:
    """Peak memory ``fn()`` allocates beyond what was already allocated, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def set_constants(items) -> None:
    """Apply ``MODULE.NAME=INT`` settings to featattn.kernels modules (``chunked.DEN_IN_MMA=0``):
    the switches the benchmark scripts' ``--set`` / ``--const`` options flip before a run."""
    import importlib

    for item in items:
        target, value = item.split("=")
        mod, attr = target.rsplit(".", 1)
        module = importlib.import_module(f"featattn.kernels.{mod}")
        if not hasattr(module, attr):
            raise ValueError(f"{item}: featattn.kernels.{mod} has no {attr}")
        setattr(module, attr, int(value))


def tuned_configs() -> dict:
    """``{launch name: [config, ...]}``: the config each autotuned launch of featattn.kernels
    (the ``TunedLaunch`` objects with a name) chose for every key it has seen in this process,
    as ``"BT64/w4/s2 SIZE=..."`` strings sorted by key, so that runs which differ by more than
    noise can be told apart by the configs the autotuner picked (its choice between configs
    close in time can change from one process to the next)."""
    import importlib
    import pkgutil

    import featattn.kernels as K
    from featattn.kernels._common import TunedLaunch

    out = {}
    for info in pkgutil.iter_modules(K.__path__):
        try:
            module = importlib.import_module(f"featattn.kernels.{info.name}")
        except ImportError:
            continue
        for obj in vars(module).values():
            if isinstance(obj, TunedLaunch) and obj.name and obj.best:
                names = [n for n, _ in obj._key_at]
                rows = []
                for key, cfg in sorted(obj.best.items(), key=lambda kv: str(kv[0])):
                    kw = cfg.all_kwargs()
                    meta = "/".join(f"{k}{v}" for k, v in sorted(cfg.kwargs.items()))
                    rows.append(f"{meta}/w{kw.get('num_warps')}/s{kw.get('num_stages')} "
                                + " ".join(f"{n}={v}" for n, v in zip(names, key)))
                out[obj.name] = rows
    return out
