"""The kernels' GPU forms compile for sm_90a (the H200's), on a machine without a GPU.

The CPU tests run the kernels under the Triton interpreter, which never compiles them and
takes the ``INTERPRET`` branches (16-wide tiles, tl.exp instead of the inline PTX of
``_common.exp_nonpos``, one autotune config), so a kernel edit that only breaks the real
compilation would pass here and fail on the first GPU call.  benchmarks/sass_count.py
compiles each launch of a call exactly as the launcher would specialise it (PTX, then
ptxas from Triton's wheel), without running it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [
    ("--op", "chunked", "--map", "elu"),   # chunked forward/backward, a map inside them
    ("--op", "hedgehog_pass",),            # the projection pass (softmax pair, EVEN_F)
    ("--op", "hybrid",),                   # window kernels, chunked with a key shift
    ("--op", "taylor",),                   # fused Taylor
], ids=lambda a: "-".join(x.lstrip("-") for x in a))
def test_kernels_compile_for_sm90(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_count.py"), *args],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert out.stdout.count("a loop:") >= 2, out.stdout  # each kernel's SASS was read
