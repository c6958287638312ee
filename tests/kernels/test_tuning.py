"""featattn.kernels.tuning: fixing a kernel's launch config (for benchmarks and config sweeps)
launches exactly that config, inside the block only, with the same results as autotuning."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import featattn  # noqa: E402
from featattn.feature_maps import HedgehogFeatureMap  # noqa: E402
from featattn.kernels import chunked as C  # noqa: E402
from featattn.kernels import projected as P  # noqa: E402
from featattn.kernels import tuning  # noqa: E402
from helpers import rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Forced configs must be ones the kernels compile right on the device: under the interpreter
# any tile works; on an H200 fp32 16-wide tiles and the projection kernels' BV = 32 at BT = 64
# fault (docs/benchmarks.md), so the GPU runs bf16 with configs benchmarks/gpu_tune.py passed.
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 3e-2 if DEV == "cuda" else 1e-5  # forced against autotuned: same maths, other order
CHUNKED_FWD = dict(BT=32) if DEV == "cuda" else dict(BT=16)
CHUNKED_BWD = dict(BT=32, num_warps=8) if DEV == "cuda" else dict(BT=16, num_warps=2)
PROJ = dict(BT=32, num_warps=4, BV=32) if DEV == "cuda" else dict(BV=16)


def _spy(jit_fn, launched, monkeypatch):
    """Record the meta-parameters of every launch of ``jit_fn`` (a JITFunction)."""
    real = jit_fn.run

    def spy(*a, **kw):
        launched.append({k: kw[k] for k in ("BT", "BV", "num_warps") if k in kw})
        return real(*a, **kw)

    monkeypatch.setattr(jit_fn, "run", spy, raising=False)


def _grads(call, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o = call(*xs)
    (gs) = torch.autograd.grad((o.double() ** 2).sum(), xs)
    return [o.detach().double()] + [g.double() for g in gs]


def test_forced_chunked_config_is_launched_and_matches(monkeypatch):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=g).to(DEV, DT) for _ in range(3))

    def call(q, k, v):
        return featattn.linear_attention(q, k, v, feature_map="elu", backend="triton")

    want = _grads(call, q, k, v)
    launched_fwd, launched_bwd = [], []
    _spy(C._fwd_kernel, launched_fwd, monkeypatch)
    _spy(C._bwd_kernel, launched_bwd, monkeypatch)
    with tuning.override("chunked_fwd", **CHUNKED_FWD), \
            tuning.override("chunked_bwd", **CHUNKED_BWD):
        assert tuning.forced("chunked_fwd") == CHUNKED_FWD
        got = _grads(call, q, k, v)
    assert launched_fwd and all(m["BT"] == CHUNKED_FWD["BT"] for m in launched_fwd)
    assert launched_bwd and all(m["BT"] == CHUNKED_BWD["BT"]
                                and m["num_warps"] == CHUNKED_BWD["num_warps"]
                                for m in launched_bwd)
    assert tuning.forced("chunked_fwd") is None and tuning.forced("chunked_bwd") is None
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < TOL


def test_forced_projected_dv_tile_splits_the_heads(monkeypatch):
    """projected_fwd / projected_bwd take BV, the Dv tile the wrapper grids over."""
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "kernel")
    torch.manual_seed(0)
    fm = HedgehogFeatureMap(16, heads=2, feature_dim=16).to(DEV)
    g = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 33, 16, generator=g).to(DEV, DT) for _ in range(2))
    v = torch.randn(1, 2, 33, 80, generator=g).to(DEV, DT)

    def call(q, k, v):
        return featattn.linear_attention(q, k, v, feature_map=fm, backend="triton")

    want = _grads(call, q, k, v)
    launched = []
    _spy(P._fwd_kernel, launched, monkeypatch)
    _spy(P._bwd_kernel, launched, monkeypatch)
    with tuning.override("projected_fwd", **PROJ), tuning.override("projected_bwd", **PROJ):
        got = _grads(call, q, k, v)
    assert len(launched) == 2 and all(m["BV"] == PROJ["BV"] for m in launched), launched
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < TOL


def test_unknown_kernels_and_knobs_are_explained():
    with pytest.raises(ValueError, match="tunable kernels: taylor_fwd"):
        with tuning.override("nope_fwd", BT=16):
            pass
    for kernel, knob in (("chunked_fwd", "BV"), ("taylor_fwd", "BK")):
        with pytest.raises(ValueError, match=f"{kernel} has no meta-parameter {knob}"):
            with tuning.override(kernel, **{knob: 16}):
                pass
