"""Every environment variable featattn reads, in one place.

Each switch is declared once in :data:`SWITCHES` (name, default, when it is read, what it
does); code reads it through :func:`read` / :func:`enabled`, which refuse undeclared names, and
docs/kernels-and-dispatch.md lists the table (tests/test_switches.py keeps the two, and the
source, in step).  "import" switches are read when the module that uses them is imported (set
them before ``import featattn``); "call" switches on every call that uses them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["Switch", "SWITCHES", "read", "enabled"]


class Switch(NamedTuple):
    name: str
    default: str
    when: str  # "import" or "call"
    doc: str


SWITCHES = {s.name: s for s in (
    Switch("FEATATTN_FUSE_MAPS", "auto", "call",
           "where elementwise maps run on CUDA: `pass` (one Triton pass over q and k before the "
           "chunked kernel), `kernel` (inside the chunked kernel, on raw q/k), or `auto` (inside "
           "the kernel for calls of at most 2^20 batch*head*token rows or when it splits T into "
           "segments, else the pass)"),
    Switch("FEATATTN_SEGMENT", "auto", "call",
           "how the chunked kernels split T into segments swept in parallel: `auto` (when the "
           "grid fills at most half the SMs and T >= 16384), `off`, or a segment length in "
           "tokens (a multiple of 64)"),
    Switch("FEATATTN_NO_AUTOTUNE", "0", "import",
           "`1`: one fixed config per kernel instead of autotuning (quick GPU runs; hides bad "
           "configs, so never for `make gpu-test`)"),
    Switch("FEATATTN_POISON", "0", "import",
           "`1`: every buffer a kernel writes starts as NaN (tests; "
           "`featattn.testing.poisoned_outputs()` flips the same switch)"),
    Switch("FEATATTN_EAGER_CUSTOM_OP", "0", "import",
           "`1`: eager calls go through the torch.library custom ops too (by default only "
           "torch.compile does; eager calls take a cheaper autograd.Function)"),
    Switch("FEATATTN_TAYLOR_PARALLEL_MAX_T", "2048", "import",
           "longest T for which stateless Taylor calls use the parallel (quadratic) form; `0` "
           "turns it off"),
    Switch("FEATATTN_TAYLOR_VARLEN", "native", "call",
           "packed sequences (`cu_seqlens`) with the Taylor map on CUDA: `native` (one launch "
           "of the chunked Taylor kernel over all of them; 2.8x faster than `loop` on the H200, "
           "docs/benchmarks.md) or `loop` (one call per sequence)"),
    Switch("FEATATTN_HYBRID_LINEAR", "triton", "call",
           "hybrid (`window > 0`) calls of more than 64 queries: `triton` (the linear part in "
           "the chunked Triton kernel with its keys shifted by the window, the window's softmax "
           "and the shared denominator in featattn/kernels/window.py; on the H200 2.9x faster "
           "than `torch` at B8 H16 T16384 and below SDPA from T = 4096, docs/benchmarks.md) or "
           "`torch` (the chunked PyTorch path, also what `backend='auto'` runs on CPU)"),
    Switch("TRITON_INTERPRET", "0", "import",
           "Triton's own: `1` runs the kernels in its interpreter on CPU tensors (CI); "
           "`backend='auto'` never picks it"),
)}


def read(name: str) -> str:
    """The switch's value from the environment, or its declared default."""
    try:
        default = SWITCHES[name].default
    except KeyError:
        raise KeyError(f"{name} is not a declared switch (featattn/_switches.py)") from None
    return os.environ.get(name, default)


def enabled(name: str) -> bool:
    """A 0/1 switch is ``1``."""
    return read(name) == "1"
