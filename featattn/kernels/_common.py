"""Pieces both Triton kernel families share: buffer allocation (with NaN poisoning for tests),
layout helpers, the ``a @ b`` helpers of the two precision families (:func:`mm_tf32x3`,
:func:`mm_ieee`, ...), the kernels' batch/head preamble (:func:`batch_head`,
:func:`sequence_heads`, :func:`head_start`, :func:`head_base`), the ``delta = do . o``
row-sum kernel, and the
torch.library registration that makes a kernel pair (forward, backward) an autograd-aware
custom op torch.compile can trace."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import triton
import triton.language as tl

from .. import _switches
from . import tuning as _tuning

#: True when Triton runs in its interpreter (CPU tensors, CI)
INTERPRET = _switches.enabled("TRITON_INTERPRET")

#: Debug switch: allocate every kernel-written buffer filled with NaN, so an element a kernel
#: forgets to write shows up in the result.  Tests turn it on (FEATATTN_POISON=1 too).
POISON_OUTPUTS = _switches.enabled("FEATATTN_POISON")


@contextlib.contextmanager
def poisoned_outputs(on: bool = True) -> Iterator[None]:
    """``with poisoned_outputs(): ...`` turns :data:`POISON_OUTPUTS` on for the block (and
    restores it after), so tests and benchmarks flip the one switch every kernel reads."""
    global POISON_OUTPUTS
    before = POISON_OUTPUTS
    POISON_OUTPUTS = on
    try:
        yield
    finally:
        POISON_OUTPUTS = before


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints.  (``triton.cdiv`` is a ``@triton.jit`` function: called from
    Python it goes through JITFunction.__call__, ~8 us a call, and a forward+backward made
    ~20 such calls.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), for host ints (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length()


def alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def size_bucket(B: int, H: int, T: int) -> int:
    """An autotuning bucket of a problem's size: log2 of the next powers of two of T and of
    B*H (tiles tuned on one small call are not kept for every later size)."""
    return (next_pow2(T).bit_length() << 8) | next_pow2(B * H).bit_length()


def launch_size(B: int, H: int, T: int, packed: bool = False) -> int:
    """The autotune keys' SIZE: :func:`size_bucket` of B * H programs (sequences x heads,
    times segments where T is split) each sweeping T tokens; ``packed`` (cu_seqlens: the T
    tokens hold B sequences) counts their mean length."""
    return size_bucket(B, H, cdiv(T, B) if packed else T)


def dtype_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(LOWP, FP32): bf16 inputs round fp32 intermediates to bf16 for the tensor cores; fp32
    inputs ask for fp32-accurate products (see each kernel's Numerics notes)."""
    return dtype == torch.bfloat16, dtype == torch.float32


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """The kernels assume a unit stride on the feature dim; anything else is rare enough that
    a copy is fine."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _bthd_like(ref: torch.Tensor) -> bool:
    return ref.stride(1) < ref.stride(2)


def empty_like_layout(ref: torch.Tensor, B, H, T, D, dtype, *, poison: bool = True) -> torch.Tensor:
    """A [B, H, T, D] tensor laid out [B, T, H, D] when ``ref`` is (a transposed view of) such
    a layout, so a caller working in [B, T, H, D] gets its transpose back for free."""
    make = alloc if poison else (lambda s, dt, dev: torch.empty(s, dtype=dt, device=dev))
    if _bthd_like(ref):
        return make((B, T, H, D), dtype, ref.device).transpose(1, 2)
    return make((B, H, T, D), dtype, ref.device)


@triton.jit
def sequence_rows(i_bh, H, T, cu, VARLEN: tl.constexpr):
    """(batch index, head, first token, length) of program row ``i_bh``: row b*H + h of a
    [B, H, T] batch, or with VARLEN sequence n = i_bh // H of the packed [1, H, T] batch,
    tokens [cu[n], cu[n+1])."""
    i_h = (i_bh % H).to(tl.int64)
    if VARLEN:
        i_n = i_bh // H
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        return i_h * 0, i_h, bos, (eos - bos).to(tl.int32)
    return (i_bh // H).to(tl.int64), i_h, i_h * 0, T


# a @ b in the kernels, with the precision of fp32 operands always named.  Two families:
# the chunked kernels (chunked, projected, window) use tf32x3 for fp32 inputs, the Taylor
# kernels (taylor_fused, taylor_parallel) ieee; fp16 inputs use tf32 on an fp32
# intermediate in both, bf16 inputs round it to bf16 (LOWP).  See each module's Numerics.


@triton.jit
def _mm_as(a, b, LOWP: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr):
    """a @ b where an operand is an fp32 intermediate: rounded to bf16 (LOWP, bf16 inputs),
    in precision PREC (FP32, fp32 inputs), else tf32 (fp16 inputs)."""
    if LOWP:
        r = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif FP32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    return r


@triton.jit
def _dot_as(a, b, FP32: tl.constexpr, PREC: tl.constexpr):
    """a @ b for two tiles in the input dtype, fp32 accumulation (precision PREC for fp32
    inputs; fp16 / bf16 operands take no precision)."""
    if FP32:
        r = tl.dot(a, b, input_precision=PREC)
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def mm_tf32x3(a, b, LOWP: tl.constexpr, TF32X3: tl.constexpr):
    """:func:`_mm_as` with tf32x3 for fp32 inputs (TF32X3)."""
    return _mm_as(a, b, LOWP, TF32X3, "tf32x3")


@triton.jit
def dot_in_tf32x3(a, b, TF32X3: tl.constexpr):
    """:func:`_dot_as` with tf32x3 for fp32 inputs (TF32X3)."""
    return _dot_as(a, b, TF32X3, "tf32x3")


@triton.jit
def mm_ieee(a, b, LOWP: tl.constexpr, FP32_IEEE: tl.constexpr):
    """:func:`_mm_as` with ieee fp32 for fp32 inputs (FP32_IEEE)."""
    return _mm_as(a, b, LOWP, FP32_IEEE, "ieee")


@triton.jit
def dot_in_ieee(a, b, FP32_IEEE: tl.constexpr):
    """:func:`_dot_as` with ieee fp32 for fp32 inputs (FP32_IEEE)."""
    return _dot_as(a, b, FP32_IEEE, "ieee")


# --------------------------------------------------------------------------- exp
if INTERPRET:
    @triton.jit
    def exp_nonpos(x):
        """exp(x) where it matters, x <= 0: the interpreter's (no inline PTX there; clamped,
        as numpy warns of an overflow in the branch not taken)."""
        return tl.exp(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL))
else:
    @triton.jit
    def exp_nonpos(x):
        """exp(x) where it matters, x <= 0 (elu's negative side, softmax's exp(l - max l)),
        as one ``ex2.approx.ftz``: tl.exp's ``ex2.approx.f32`` keeps subnormal results, for
        which ptxas adds a range test and two multiplies an element (offline, sm_90a: the
        fused elu forward's loop 1399 -> 1310 instructions); here results below 2^-126
        (x < -87.3) flush to 0, far below anything a sum or dot product next to them keeps.
        (The PTX, compiled offline for sm_90: ``mul.f32 x, 0f3FB8AA3B`` then
        ``ex2.approx.ftz.f32``.)"""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=tl.float32,
                                         is_pure=True, pack=1)


# The kernels' batch/head preamble, written once.  Pure inlined helpers: a kernel calling them
# compiles to the code it had with the lines written out (the same int64 arithmetic, in the
# same order).  Batch and head indices are int64 so that base offsets can pass 2**31.


@triton.jit
def batch_head(i_bh, H, G):
    """(i_b, i_h, i_hk), int64: batch index, head and key/value head (``i_h // G``, the group
    of G query heads sharing one k/v head) of program row ``i_bh = b*H + h``."""
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    return i_b, i_h, i_h // G


@triton.jit
def sequence_heads(i_bh, H, G, T, cu, VARLEN: tl.constexpr):
    """(i_b, i_h, i_hk, bos, TS, row) of program row ``i_bh``: :func:`sequence_rows`'s batch
    index, head, first token and length, the key/value head ``i_h // G``, and the row
    ``i_b * H + i_h`` of the [B*H, T] fp32 buffers (den, delta) -- with VARLEN a row of the one
    packed batch, whose tokens start at ``bos``."""
    i_b, i_h, bos, TS = sequence_rows(i_bh, H, T, cu, VARLEN)
    row = i_b * H + i_h
    return i_b, i_h, i_h // G, bos, TS, row


@triton.jit
def head_start(ptr, i_b, i_h, sb, sh):
    """``ptr + i_b*sb + i_h*sh``: head i_h of batch i_b (token 0) in a strided [B, H, T, ...]
    tensor."""
    return ptr + i_b * sb + i_h * sh


@triton.jit
def head_base(ptr, i_b, i_h, bos, sb, sh, st):
    """``ptr + i_b*sb + i_h*sh + bos*st``: token ``bos`` of head i_h of batch i_b in a strided
    [B, H, T, ...] tensor (the first token of a packed sequence, or 0)."""
    return head_start(ptr, i_b, i_h, sb, sh) + bos * st


@triton.jit(do_not_specialize=["T"])
def delta_kernel(o, do, delta, sob, soh, sot, sdb, sdh, sdt, T, H, DV,
                 BT: tl.constexpr, BV: tl.constexpr):
    """delta[b,h,t] = sum_j do[b,h,t,j] * o[b,h,t,j]  (fp32 [B,H,T]).  Grid (B*H, cdiv(T,BT))."""
    i_bh = tl.program_id(0)
    i_t = tl.program_id(1)
    i_b, i_h, _ = batch_head(i_bh, H, 1)
    offs_t = tl.arange(0, BT)
    t0 = tl.cast(i_t * BT, tl.int64)
    mt = (i_t * BT + offs_t) < T
    acc = tl.zeros([BT], dtype=tl.float32)
    for j in range(0, tl.cdiv(DV, BV)):
        offs_v = j * BV + tl.arange(0, BV)
        m = mt[:, None] & (offs_v < DV)[None, :]
        b_o = tl.load(head_base(o, i_b, i_h, t0, sob, soh, sot) + offs_t[:, None] * sot
                      + offs_v[None, :], mask=m, other=0.0).to(tl.float32)
        b_do = tl.load(head_base(do, i_b, i_h, t0, sdb, sdh, sdt) + offs_t[:, None] * sdt
                       + offs_v[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(b_o * b_do, axis=1)
    tl.store(delta + i_bh.to(tl.int64) * T + t0 + offs_t, acc, mask=mt)


class TunedLaunch:
    """``TunedLaunch(triton.autotune(...)(kernel))[grid](*args, **kwargs)``: the autotuned
    launch, paying the autotuner's host cost once per key.

    ``Autotuner.run`` rebuilds its key from every argument on each call (~50 us of host time
    a launch on the H100 machine, measured with cProfile); after the first call for a key
    this launches the JITFunction directly with the config the autotuner chose.

    The cache key is exactly the autotuner's: the values of the arguments its ``key`` names
    (found by name whether they are passed by position or by keyword) and the dtypes of the
    tensor arguments.  (An earlier version keyed on the keyword arguments alone, so head dims
    passed by position shared whichever config was tuned first, and a config tuned for one
    Dk could be launched, out of shared memory, for another.)

    ``name`` (a key of :data:`featattn.kernels.tuning.KNOBS`) lets
    ``tuning.override(name, BT=..., num_warps=..., num_stages=...)`` fix the config for
    benchmarks; meta-parameters it leaves out come from the first config of the space."""

    __slots__ = ("tuner", "best", "_key_at", "name")

    def __init__(self, tuner, name: Optional[str] = None):
        self.tuner = tuner
        self.name = name
        self.best = {}
        names = list(tuner.arg_names)
        #: (name, position) of every autotune key argument
        self._key_at = tuple((name, names.index(name)) for name in tuner.keys)

    def cache_key(self, args, kwargs) -> tuple:
        """The autotuner's key for a launch with these arguments."""
        n = len(args)
        vals = [args[i] if i < n else kwargs.get(name) for name, i in self._key_at]
        vals.extend(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
        vals.extend(str(a.dtype) for a in kwargs.values() if isinstance(a, torch.Tensor))
        return tuple(vals)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.name is not None:
                meta = _tuning.forced(self.name)
                if meta:
                    return self.tuner.fn[grid](*args, **kwargs, **self._config(meta))
            key = self.cache_key(args, kwargs)
            cfg = self.best.get(key)
            if cfg is None:
                out = self.tuner[grid](*args, **kwargs)
                self.best[key] = self.tuner.best_config
                return out
            return self.tuner.fn[grid](*args, **kwargs, **cfg.all_kwargs())

        return launch

    def _config(self, meta: dict) -> dict:
        """A forced config's launch meta-parameters: ``meta`` over the space's first config
        (keys the wrapper consumes itself, such as a Dv tile, are not the kernel's)."""
        cfg = dict(self.tuner.configs[0].all_kwargs())
        cfg.update({k: v for k, v in meta.items() if k in _tuning.LAUNCH_KNOBS})
        return cfg


def row_dot(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, T]: ``(do * o).sum(-1)`` in one pass (the normalised backward's delta)."""
    B, H, T, Dv = o.shape
    delta = alloc((B, H, T), torch.float32, o.device)
    bv = min(max(16, next_pow2(Dv)), 128)
    delta_kernel[(B * H, cdiv(T, 64))](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), T, H, Dv, BT=64, BV=bv)
    return delta


def check_inputs(q, k, v, normalize, initial_kv, initial_z, *, state_dim, dtypes, shape_reason):
    """Validate a kernel call (the kernels are public API too, not only behind
    featattn.linear_attention, which checks the same and more).

    ``state_dim(d)`` is the state's Dk for a q/k head dim d; ``shape_reason(d, Dv)`` is None
    when the kernel takes those dims, else why not.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv] (4-D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, d = q.shape
    if T < 1:
        raise ValueError(f"sequence length T must be >= 1, got {T}")
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != d:
        raise ValueError(f"k must be [B={B}, Hkv, T={T}, D={d}], got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, Hkv, T, Dv] matching k {tuple(k.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    Hkv, Dv = k.shape[1], v.shape[3]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of k/v heads ({Hkv}) must divide the number of q heads ({H})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in dtypes:
        raise TypeError(f"dtype {q.dtype} not supported; use float32, float16 or bfloat16")
    why = shape_reason(d, Dv)
    if why is not None:
        raise ValueError(why)
    Dk = state_dim(d)
    if initial_kv is not None and tuple(initial_kv.shape) != (B, H, Dk, Dv):
        raise ValueError(f"initial_kv must be [B,H,Dk,Dv]={(B, H, Dk, Dv)}, "
                         f"got {tuple(initial_kv.shape)}")
    if initial_z is not None:
        if not normalize:
            raise ValueError("initial_z is only meaningful with normalize=True; pass None")
        if tuple(initial_z.shape) != (B, H, Dk):
            raise ValueError(f"initial_z must be [B,H,Dk]={(B, H, Dk)}, got {tuple(initial_z.shape)}")


def check_packed_states(cu_seqlens, H, Dk, Dv, normalize, initial_kv, initial_z):
    """With ``cu_seqlens`` (N sequences) the states are per sequence: ``initial_kv [N, H, Dk,
    Dv]``, ``initial_z [N, H, Dk]`` (normalize only); else a ValueError naming the shapes."""
    N = cu_seqlens.shape[0] - 1
    if initial_kv is not None and tuple(initial_kv.shape) != (N, H, Dk, Dv):
        raise ValueError(f"with cu_seqlens ({N} sequences) initial_kv must be [N, H, Dk, Dv] = "
                         f"{(N, H, Dk, Dv)}, got {tuple(initial_kv.shape)}")
    if initial_z is not None:
        if not normalize:
            raise ValueError("initial_z is only meaningful with normalize=True; pass None")
        if tuple(initial_z.shape) != (N, H, Dk):
            raise ValueError(f"with cu_seqlens ({N} sequences) initial_z must be [N, H, Dk] = "
                             f"{(N, H, Dk)}, got {tuple(initial_z.shape)}")


# --------------------------------------------------------------------------- torch.library
# A kernel pair becomes two custom ops with fake (meta) implementations plus an autograd
# formula, so torch.compile(fullgraph=True) traces through them without a graph break and
# eager mode runs the very same path.  Custom ops cannot return None: unused outputs are
# 0-element tensors.


def _none_if_empty(t):
    return None if t is None or t.numel() == 0 else t


#: Route eager calls through the torch.library custom ops too (benchmarks / debugging; by
#: default only torch.compile uses them and eager calls take an autograd.Function).
EAGER_CUSTOM_OP = _switches.enabled("FEATATTN_EAGER_CUSTOM_OP")


def register_attention_ops(name: str, forward: Callable, backward: Callable,
                           state_dim: Callable[[int], int], differentiable: Callable,
                           fuses_maps: bool = False):
    """Register ``featattn::{name}_fwd`` / ``featattn::{name}_bwd`` and return the forward:
    a function with the forward op's signature that runs the custom op under torch.compile
    and an equivalent autograd.Function in eager mode (``.custom_op`` is the op itself).

    ``forward(q, k, v, normalize, eps, kv0, z0, store_final) -> (o, den, kvT, zT)`` (den only
    when normalising, kvT/zT only when storing the final state, else None) and
    ``backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize) -> (dq, dk, dv, dkv0, dz0)``.
    ``state_dim(d)`` is the state's Dk for a q/k head dim d.  The op returns
    ``(o, den, kv, z)`` and is differentiable in q, k, v, kv0, z0 and through kv and z.

    ``differentiable(q, k, v, kv0, z0, normalize, eps) -> (o, kvT, zT)`` computes the same
    forward with differentiable torch operations.  The Triton backward is not itself
    differentiable, so when a graph of the backward is asked for (``create_graph=True``: a
    gradient penalty, a Hessian-vector product) the backward recomputes the forward with it
    and differentiates that instead: right second derivatives at the torch path's cost,
    while plain backwards keep the kernels.

    ``fuses_maps``: the kernels take an elementwise feature map and q's scale (keyword
    arguments ``fmap``, a key of :mod:`featattn.kernels.maps`, and ``scale``) and q, k are
    raw; the op then has two more arguments, ``fmap: str`` ("" for none) and ``scale: float``,
    which ``differentiable`` receives too.
    """

    def map_kw(fmap, scale, cu=None):
        kw = dict(fmap=fmap, scale=scale) if fuses_maps else {}
        if cu is not None:  # packed sequences (only kernels that take them are given one)
            kw["cu_seqlens"] = cu
        return kw

    def run_forward(q, k, v, kv0, z0, normalize, eps, store_final, fmap="", scale=1.0, cu=None):
        o, den, kvT, zT = forward(q, k, v, normalize, eps, kv0, z0, store_final,
                                  **map_kw(fmap, scale, cu))
        e = q.new_empty(0, dtype=torch.float32)
        return (o, den if den is not None else e, kvT if kvT is not None else e.clone(),
                zT if zT is not None else e.clone())

    def run_forward_eager(q, k, v, kv0, z0, normalize, eps, store_final, fmap="", scale=1.0,
                          cu=None):
        # an autograd.Function may return None for the unused outputs (a custom op may not):
        # three fewer allocations a call, ~15 us each of host time on the H200 machine
        return forward(q, k, v, normalize, eps, kv0, z0, store_final, **map_kw(fmap, scale, cu))

    def run_backward_eager(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, fmap="",
                           scale=1.0, cu=None):
        if do is None:  # only the returned state is used
            B, H, T, _ = q.shape
            do = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
        return backward(q, k, v, o, den, kv0, z0, unit_last(do), dkvT, dzT, normalize,
                        **map_kw(fmap, scale, cu))

    def run_backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, fmap="", scale=1.0,
                     cu=None):
        dq, dk, dv, dkv0, dz0 = run_backward_eager(q, k, v, o, den, kv0, z0, do, dkvT, dzT,
                                                   normalize, fmap, scale, cu)
        e = q.new_empty(0, dtype=torch.float32)
        return dq, dk, dv, dkv0 if dkv0 is not None else e, dz0 if dz0 is not None else e.clone()

    @torch.library.custom_op(f"featattn::{name}_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        kv0: Optional[torch.Tensor], z0: Optional[torch.Tensor],
        normalize: bool, eps: float, store_final: bool, fmap: str = "", scale: float = 1.0,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return run_forward(q, k, v, kv0, z0, normalize, eps, store_final, fmap, scale, cu_seqlens)

    @fwd_op.register_fake
    def _(q, k, v, kv0, z0, normalize, eps, store_final, fmap="", scale=1.0, cu_seqlens=None):
        B, H, T, d = q.shape
        if cu_seqlens is not None:  # the states are per packed sequence
            B = cu_seqlens.shape[0] - 1
        Dk, Dv = state_dim(d), v.shape[-1]
        f32 = dict(dtype=torch.float32, device=q.device)
        o = empty_like_layout(q, q.shape[0], H, T, Dv, q.dtype, poison=False)
        den = torch.empty((q.shape[0], H, T), **f32) if normalize else torch.empty(0, **f32)
        kvT = torch.empty((B, H, Dk, Dv), **f32) if store_final else torch.empty(0, **f32)
        zT = torch.empty((B, H, Dk), **f32) if (store_final and normalize) else torch.empty(0, **f32)
        return o, den, kvT, zT

    @torch.library.custom_op(f"featattn::{name}_bwd", mutates_args=())
    def bwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        o: Optional[torch.Tensor], den: Optional[torch.Tensor],
        kv0: Optional[torch.Tensor], z0: Optional[torch.Tensor],
        do: Optional[torch.Tensor], dkvT: Optional[torch.Tensor], dzT: Optional[torch.Tensor],
        normalize: bool, fmap: str = "", scale: float = 1.0,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return run_backward(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, fmap, scale,
                            cu_seqlens)

    @bwd_op.register_fake
    def _(q, k, v, o, den, kv0, z0, do, dkvT, dzT, normalize, fmap="", scale=1.0,
          cu_seqlens=None):
        f32 = dict(dtype=torch.float32, device=q.device)
        dkv0 = torch.empty(kv0.shape, **f32) if kv0 is not None else torch.empty(0, **f32)
        has_z = z0 is not None and normalize
        dz0 = torch.empty(z0.shape, **f32) if has_z else torch.empty(0, **f32)
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                torch.empty(k.shape, dtype=k.dtype, device=k.device),
                torch.empty(v.shape, dtype=v.dtype, device=v.device), dkv0, dz0)

    def setup_context(ctx, inputs, output):
        q, k, v, kv0, z0, normalize, eps, store_final = inputs[:8]
        ctx.fmap, ctx.scale = inputs[8:10] if len(inputs) > 8 else ("", 1.0)
        cu = inputs[10] if len(inputs) > 10 else None
        o, den, _, _ = output
        # o is only needed for delta = do . o (normalised): not keeping it otherwise lets
        # the caller free it
        ctx.save_for_backward(q, k, v, o if normalize else None, den if normalize else None,
                              kv0, z0, cu)
        ctx.normalize = normalize
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: skip their work

    def grads_with_graph(ctx, do, dkvT, dzT):
        """The backward as differentiable operations (see ``differentiable`` above)."""
        q, k, v, _o, _den, kv0, z0, cu = ctx.saved_tensors
        return graph_backward(
            ctx.needs_input_grad, (q, k, v, kv0, z0),
            lambda: differentiable(q, k, v, kv0, z0, ctx.normalize, ctx.eps,
                                   **map_kw(ctx.fmap, ctx.scale, cu)),
            (do, _none_if_empty(dkvT), _none_if_empty(dzT)), 11)

    def grads(ctx, do, dkvT, dzT, bwd):
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            return grads_with_graph(ctx, do, dkvT, dzT)
        q, k, v, o, den, kv0, z0, cu = ctx.saved_tensors
        dq, dk, dv, dkv0, dz0 = bwd(q, k, v, o, den, kv0, z0, do, _none_if_empty(dkvT),
                                    _none_if_empty(dzT), ctx.normalize, ctx.fmap, ctx.scale, cu)
        return (dq, dk, dv, dkv0 if kv0 is not None else None,
                dz0 if z0 is not None else None, None, None, None, None, None, None)

    def backward_formula(ctx, do, _dden, dkvT, dzT):
        return grads(ctx, do, dkvT, dzT, bwd_op)

    fwd_op.register_autograd(backward_formula, setup_context=setup_context)

    class _Eager(torch.autograd.Function):
        """The same forward / backward as a plain autograd.Function, for eager calls.

        A torch.library custom op costs the host far more per call on CUDA: on the H100
        machine (torch 2.11) its ``backend_impl`` took ~0.27 ms a call of its own time, and a
        B=1 H=1 T=64 forward+backward through the ops took 1.1 ms of host time against
        ~0.5 ms for the bare kernels.  torch.compile still sees the custom ops (they are what
        makes the kernels traceable)."""

        @staticmethod
        def forward(ctx, *inputs):
            output = run_forward_eager(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, do, _dden, dkvT, dzT):
            return grads(ctx, do, dkvT, dzT, run_backward_eager)

    def op(q, k, v, kv0, z0, normalize, eps, store_final, fmap="", scale=1.0, cu_seqlens=None):
        if EAGER_CUSTOM_OP or torch.compiler.is_compiling():
            return fwd_op(q, k, v, kv0, z0, normalize, eps, store_final, fmap, scale, cu_seqlens)
        return _Eager.apply(q, k, v, kv0, z0, normalize, eps, store_final, fmap, scale, cu_seqlens)

    op.custom_op = fwd_op
    return op


def graph_backward(needs_input_grad, inputs, forward: Callable, cotangents, n_results: int):
    """A custom autograd Function's backward as differentiable operations, for
    ``create_graph=True`` (a gradient penalty, a Hessian-vector product): ``forward()``
    recomputes the Function's outputs from ``inputs`` (its first inputs, tensors or None) with
    differentiable torch operations, and their gradients against ``cotangents`` (one per
    output; None for an unused one) come back as a graph.  Returns ``n_results`` gradients
    (None past ``inputs`` and for inputs that need none; zeros where an input is unused)."""
    result = [None] * n_results
    wrt = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    if not wrt:
        return tuple(result)
    outs, gouts = [], []
    for out, g in zip(forward(), cotangents):
        if out is not None and g is not None:
            outs.append(out)
            gouts.append(g.to(out.dtype))
    if not outs:
        return tuple(result)
    got = torch.autograd.grad(outs, [inputs[i] for i in wrt], gouts, create_graph=True,
                              allow_unused=True)
    for i, g in zip(wrt, got):
        result[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(result)


def fill_state_half(normalize, kv0, z0, B, H, Dk, Dv, device):
    """With normalize, a state given as one half alone: the missing half is the empty
    prefix's (zeros), so kernels only ever see both or neither."""
    if normalize and (kv0 is None) != (z0 is None):
        if kv0 is None:
            kv0 = torch.zeros(B, H, Dk, Dv, dtype=torch.float32, device=device)
        else:
            z0 = torch.zeros(B, H, Dk, dtype=torch.float32, device=device)
    return kv0, z0


def torch_forward(feature_map: Optional[str] = None) -> Callable:
    """A ``differentiable`` for :func:`register_attention_ops`: the chunked PyTorch path in
    fp32 (float64 for float64 inputs) on q/k features, the map (by registry name, or the
    ``fmap`` key of an elementwise map fused into the chunked kernels, with q's ``scale``)
    applied first when the kernel fuses one."""

    def run(q, k, v, kv0, z0, normalize, eps, fmap="", scale=1.0, cu_seqlens=None):
        from ..chunked import chunked_linear_attention
        from ..feature_maps import resolve_feature_map

        up = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(up), k.to(up), v.to(up)
        if feature_map is not None:
            fm = resolve_feature_map(feature_map)
            q, k = fm(q), fm(k)
        elif fmap:
            from .maps import lookup

            fm = lookup(fmap)[0]
            q, k = fm(q * scale), fm(k)
        if cu_seqlens is None:
            return chunked_linear_attention(q, k, v, normalize=normalize, eps=eps,
                                            initial_kv=kv0, initial_z=z0, return_state=True)
        outs, kvs, zs = [], [], []  # packed sequences: each on its own
        cu = cu_seqlens.tolist()
        for n in range(len(cu) - 1):
            sl = slice(cu[n], cu[n + 1])
            o, kv, z = chunked_linear_attention(
                q[:, :, sl], k[:, :, sl], v[:, :, sl], normalize=normalize, eps=eps,
                initial_kv=None if kv0 is None else kv0[n:n + 1],
                initial_z=None if z0 is None else z0[n:n + 1], return_state=True)
            outs.append(o)
            kvs.append(kv)
            zs.append(z)
        return (torch.cat(outs, 2), torch.cat(kvs), torch.cat(zs) if normalize else None)

    return run
