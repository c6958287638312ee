"""Fixed tile configs for benchmarking and tuning, without touching production code paths.

    from featattn.kernels import tuning

    with tuning.override("taylor_fwd", BT=16, BV=32, num_warps=4, num_stages=1):
        o = featattn.linear_attention(q, k, v, feature_map="taylor")   # that config, no autotune
    with tuning.override("taylor_bwd", BV=32):                          # only the Dv tile
        ...
    with tuning.override("chunked_fwd", BT=32, num_warps=8):           # num_stages: the
        ...                                                             # space's first config's

Inside the block every launch of the named kernel uses the given meta-parameters instead of
the autotuned (or, for the Taylor backward's Dv tile, the computed) ones; outside it nothing
changes.  A config the kernel cannot compile fails inside the block, as a direct launch would.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

__all__ = ["KNOBS", "override", "forced"]

#: the meta-parameters of a launch (as opposed to tiles a wrapper picks, such as a Dv tile)
LAUNCH_KNOBS = ("BT", "num_warps", "num_stages", "maxnreg")

#: kernel -> the meta-parameters :func:`override` may fix
KNOBS = {
    "taylor_fwd": ("BT", "BV", "num_warps", "num_stages", "maxnreg"),
    "taylor_bwd": ("BT", "BV", "num_warps", "num_stages", "maxnreg"),
    # chunked.py: the forward, the backward, the segment sums of a T split
    "chunked_fwd": LAUNCH_KNOBS,
    "chunked_bwd": LAUNCH_KNOBS,
    "chunked_seg": LAUNCH_KNOBS,
    # projected.py (Hedgehog / T2R maps in the kernel); BV: the Dv tile (programs per head)
    "projected_fwd": LAUNCH_KNOBS + ("BV",),
    "projected_bwd": LAUNCH_KNOBS + ("BV",),
    "projection_pass": LAUNCH_KNOBS,  # the projection maps' feature pass, both directions
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
