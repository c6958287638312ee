"""Fixed tile configs for benchmarking and tuning, without touching production code paths.

    from featattn.kernels import tuning

    with tuning.override("taylor_fwd", BT=16, BV=32, num_warps=4, num_stages=1):
        o = featattn.linear_attention(q, k, v, feature_map="taylor")   # that config, no autotune
    with tuning.override("taylor_bwd", BV=32):                          # only the Dv tile
        ...

Inside the block every launch of the named kernel uses the given meta-parameters instead of
the autotuned (or, for the Taylor backward's Dv tile, the computed) ones; outside it nothing
changes.  A config the kernel cannot compile fails inside the block, as a direct launch would.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

__all__ = ["KNOBS", "override", "forced"]

#: kernel -> the meta-parameters :func:`override` may fix
KNOBS = {
    "taylor_fwd": ("BT", "BV", "num_warps", "num_stages", "maxnreg"),
    "taylor_bwd": ("BT", "BV", "num_warps", "num_stages", "maxnreg"),
}

_FORCED: dict = {}


@contextlib.contextmanager
def override(kernel: str, **meta) -> Iterator[None]:
    """Launch ``kernel`` (a key of :data:`KNOBS`) with ``meta`` inside the block."""
    if kernel not in KNOBS:
        raise ValueError(f"unknown kernel {kernel!r}; tunable kernels: {', '.join(KNOBS)}")
    bad = sorted(set(meta) - set(KNOBS[kernel]))
    if bad:
        raise ValueError(f"{kernel} has no meta-parameter {', '.join(bad)}; it takes "
                         f"{', '.join(KNOBS[kernel])}")
    before = _FORCED.get(kernel)
    _FORCED[kernel] = dict(meta)
    try:
        yield
    finally:
        if before is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = before


def forced(kernel: str) -> Optional[dict]:
    """The meta-parameters fixed for ``kernel`` now, or None (autotuned as usual)."""
    return _FORCED.get(kernel)
