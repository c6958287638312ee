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
