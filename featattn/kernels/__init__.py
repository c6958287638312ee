"""Triton kernels for featattn (the only part of the package that imports triton).

Exports:
    TRITON_AVAILABLE: bool, whether triton imported (the kernels below are usable).
    chunked_attention(q, k, v, *, normalize, eps, initial_kv=None, initial_z=None,
                      return_state=False) -> (o, kv, z)      (featattn/kernels/chunked.py)
    splits_time(B, H, T, Dk, Dv, dtype, device) -> bool: whether the chunked kernels with an
        elementwise map inside cut T into segments swept in parallel for this shape because
        its grid leaves most SMs idle (FEATATTN_SEGMENT).
    splits_only_as_pass(B, H, T, Dk, Dv, dtype, device) -> bool: whether such a call splits
        T only with its map as a pass (Dk in several key tiles).
    KERNEL_LIMITS: dict with the supported dims and dtypes (empty without triton).
    taylor_attention(q, k, v, *, normalize, eps, initial_kv=None, initial_z=None,
                     return_state=False) -> (o, kv, z)      (featattn/kernels/taylor_fused.py)
        the Taylor feature map fused into the kernel: raw q/k in, expanded-layout state out.
        Stateless calls up to T = 2048 run its parallel form (featattn/kernels/taylor_parallel.py).
    taylor_unsupported_reason(d, dv) -> None | str
    recurrent_step(q, k, v, *, normalize, eps, initial_kv, initial_z, feature_map=None,
                   scale=1.0, taylor=False, kv_out=None, z_out=None, out=None) -> (o, kv, z)
        a few tokens against a state in one launch, in place when kv_out/z_out are the state
        (featattn/kernels/decode.py); STEP_MAX_T, step_unsupported_reason(kind, d, dv, T).
    hybrid_step(q, k, v, kv, z, window_k, window_v, *, window, weight, window_scale, eps,
                feature_map=None, scale=1.0, fq=None, fk_evict=None, ...outs)
        -> (o, kv, z, window_k, window_v): the same for the hybrid layer (the window's softmax
        and the keys leaving it folded into the state, in place once the window is full);
        hybrid_step_unsupported_reason(dqk, dk, dv, T).
    projected_attention(q, k, v, form, *, normalize, eps, scale=1.0, initial_kv=None,
                        initial_z=None, return_state=False, cu_seqlens=None) -> (o, kv, z)
        a learned projection map (Hedgehog, T2R: FeatureMap.triton_projection) computed in the
        kernels, its weights' gradients included (featattn/kernels/projected.py);
        projection_unsupported_reason(form, d, H, Hkv=None) -> None | str.
    hybrid_attention(q, k, v, *, weight, window, window_scale, eps, features=None,
        feature_map="", scale=1.0, initial_kv=None, initial_z=None, return_state=False)
        -> (o, kv, z): the hybrid layer (a softmax window plus linear attention under one
        denominator; featattn/kernels/window.py); window_unsupported_reason(d, dv) -> None | str.
    taylor_parallel_max_t() -> int: the longest T the Taylor parallel form takes
        (FEATATTN_TAYLOR_PARALLEL_MAX_T); featattn.dispatch decides between the two forms.

Without triton ``import featattn`` still works: the dispatcher sees TRITON_AVAILABLE False
and uses the PyTorch path.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    TRITON_AVAILABLE = False

if TRITON_AVAILABLE:
    from .chunked import KERNEL_LIMITS, chunked_attention, splits_only_as_pass, splits_time
    from .taylor_fused import taylor_attention, taylor_unsupported_reason
    from .taylor_parallel import max_t as taylor_parallel_max_t
    from .decode import MAX_T as STEP_MAX_T
    from .decode import recurrent_step, step_unsupported_reason
    from .decode import hybrid_step, hybrid_step_unsupported_reason
    from .projected import projected_attention, projection_unsupported_reason
    from .window import hybrid_attention, window_unsupported_reason
else:  # pragma: no cover
    KERNEL_LIMITS: dict = {}

    def taylor_unsupported_reason(d: int, dv: int) -> str:
        return "taylor_fused: triton is not installed"

    def taylor_attention(*args, **kwargs):
        raise RuntimeError("featattn.kernels.taylor_attention needs triton (pip install triton)")

    def chunked_attention(*args, **kwargs):
        raise RuntimeError("featattn.kernels.chunked_attention needs triton (pip install triton)")

    def splits_time(*args, **kwargs) -> bool:
        return False

    def splits_only_as_pass(*args, **kwargs) -> bool:
        return False

    def taylor_parallel_max_t() -> int:
        return 0

    STEP_MAX_T = 0

    def step_unsupported_reason(kind, d, dv, T) -> str:
        return "triton is not installed"

    def recurrent_step(*args, **kwargs):
        raise RuntimeError("featattn.kernels.recurrent_step needs triton (pip install triton)")

    def hybrid_step_unsupported_reason(dqk, dk, dv, T) -> str:
        return "triton is not installed"

    def hybrid_step(*args, **kwargs):
        raise RuntimeError("featattn.kernels.hybrid_step needs triton (pip install triton)")

    def projection_unsupported_reason(form, d, H, Hkv=None) -> str:
        return "triton is not installed"

    def projected_attention(*args, **kwargs):
        raise RuntimeError("featattn.kernels.projected_attention needs triton (pip install triton)")

    def window_unsupported_reason(d, dv) -> str:
        return "triton is not installed"

    def hybrid_attention(*args, **kwargs):
        raise RuntimeError("featattn.kernels.hybrid_attention needs triton (pip install triton)")

__all__ = [
    "TRITON_AVAILABLE", "KERNEL_LIMITS", "chunked_attention", "splits_only_as_pass", "splits_time",
    "taylor_attention", "taylor_unsupported_reason", "taylor_parallel_max_t",
    "recurrent_step", "step_unsupported_reason", "STEP_MAX_T",
    "hybrid_step", "hybrid_step_unsupported_reason",
    "projected_attention", "projection_unsupported_reason",
    "hybrid_attention", "window_unsupported_reason",
]
