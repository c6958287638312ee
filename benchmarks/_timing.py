"""Timing helpers shared by the GPU benchmark scripts (the methodology docs/benchmarks.md
records: triton.testing.do_bench median, 50 ms warm-up, 300 ms of repetitions)."""

import torch


def bench(fn, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def wall_ms(fn, n=300) -> float:
    """Wall milliseconds per call of ``fn`` over ``n`` back-to-back calls, host included (the
    number a Python loop sees: a decode step, or the launch path's cost when the GPU work is
    small), after 20 warm-up calls."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def peak_mib(fn) -> float:
    """Peak memory ``fn()`` allocates beyond what was already allocated, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
