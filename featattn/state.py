"""The recurrent state of causal linear attention.

After a prefix of length t, linear attention is fully described by

    kv = sum_{s<=t} phi(k_s)^T v_s      [B, H, Dk, Dv]
    z  = sum_{s<=t} phi(k_s)            [B, H, Dk]      (only needed when normalising)

with Dk the *expanded* feature dim (e.g. 273 for the Taylor map of a 16-dim q/k) and H the
number of query heads (with grouped k/v heads the state is kept per query head, so that an
initial state may differ between the heads of a group).  Both are kept in fp32 (float64 when
the computation runs in float64): a bf16 running sum drifts by tens of percent over 1k-4k
tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["LinearAttentionState", "compute_dtype"]


def no_autocast(fn):
    """Run ``fn`` (attention math on features it casts to :func:`compute_dtype` itself) with
    autocast off: under ``torch.autocast`` its matmuls would run in bf16 / fp16 whatever the
    operands, so the returned state would come back in that dtype (which the next call
    refuses) and the sums would lose the fp32 accumulation.  Feature maps are applied
    outside, under the caller's autocast."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The accumulation (and state) dtype: float64 if any input is float64, else float32."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


@dataclass
class LinearAttentionState:
    """Recurrent state handed between calls of :func:`featattn.linear_attention`.

    Attributes:
        kv: ``[B, H, Dk, Dv]`` fp32, the running ``sum phi(k)^T v``.
        z: ``[B, H, Dk]`` fp32, the running ``sum phi(k)``; ``None`` for a state produced with
            ``normalize=False`` (such a state cannot feed a normalised call).

        window_k, window_v: only in the state of a hybrid call (``window=W > 0``): the raw
            keys ``[B, Hkv, P, Dqk]`` and values ``[B, Hkv, P, Dv]`` of the last ``P = min(W,
            tokens seen)`` tokens, in the input dtype, which the softmax window still reads;
            ``kv`` / ``z`` then cover the tokens before them.

    Passing the state returned by one call as ``initial_state`` of the next makes running a
    sequence in pieces give the same output as running it whole.  Decoding one token at a
    time is then O(1) per token (O(W) more with a window).
    """

    kv: torch.Tensor
    z: Optional[torch.Tensor] = None
    window_k: Optional[torch.Tensor] = None
    window_v: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        key_dim: int,
        value_dim: int,
        *,
        normalize: bool = True,
        device=None,
        dtype: torch.dtype = torch.float32,
    ) -> "LinearAttentionState":
        """The state of an empty prefix."""
        for name, val in (("batch", batch), ("heads", heads), ("key_dim", key_dim),
                          ("value_dim", value_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"LinearAttentionState.zeros: {name} must be an int >= 1, got "
                                 f"{type(val).__name__} {val!r}")
        kv = torch.zeros(batch, heads, key_dim, value_dim, device=device, dtype=dtype)
        z = torch.zeros(batch, heads, key_dim, device=device, dtype=dtype) if normalize else None
        return cls(kv, z)

    @property
    def normalized(self) -> bool:
        """True when the state carries ``z`` (it came from a ``normalize=True`` call)."""
        return self.z is not None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Dk, Dv)``."""
        return tuple(self.kv.shape)  # type: ignore[return-value]

    def map(self, fn) -> "LinearAttentionState":
        """A state holding ``fn(t)`` for each tensor ``t`` of this one (kv, z and the window's
        keys and values and the token ``offset`` where present), e.g.
        ``state.map(lambda t: t[indices])``: ``fn`` should act on the batch dim (dim 0), the
        only dim of ``offset``."""
        return LinearAttentionState(*(None if t is None else fn(t) for t in self._tensors()))

    def _tensors(self) -> tuple:
        return (self.kv, self.z, self.window_k, self.window_v, self.offset)

    @property
    def windowed(self) -> bool:
        """True when the state carries a softmax window's keys and values (a hybrid call's)."""
        return self.window_k is not None

    def detach(self) -> "LinearAttentionState":
        """A new state cut from the autograd graph (for truncated backprop through time)
        whose tensors share storage with this one's, as ``Tensor.detach`` does: an in-place
        update (``update_state=True``, ``decode_step``) of either changes both; ``clone()``
        gives an independent copy."""
        return self.map(lambda t: t.detach())

    def clone(self) -> "LinearAttentionState":
        return self.map(lambda t: t.clone())

    def to(self, *args, **kwargs) -> "LinearAttentionState":
        """The state for a layer moved as by ``Module.to`` (same arguments as ``Tensor.to``):
        every tensor goes to the device; a dtype (the inputs' new dtype, e.g. after
        ``layer.half()``) casts the window's raw keys and values to it, while kv and z stay
        in the accumulation dtype of such inputs (float64 for float64, else float32); the
        token ``offset`` keeps its integer dtype::

            layer.half()
            y = layer(x.half(), state.to(torch.float16), update_state=True)
        """
        dtype, device = kwargs.get("dtype"), kwargs.get("device")
        extra = {k: kwargs[k] for k in ("non_blocking", "copy") if k in kwargs}
        for a in args:
            if isinstance(a, bool):  # Tensor.to(..., non_blocking, copy) positionally
                extra["copy" if "non_blocking" in extra else "non_blocking"] = a
            elif isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, torch.Tensor):
                dtype, device = a.dtype, a.device
            else:  # a device, its name or index
                device = a
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"LinearAttentionState.to: the inputs' dtype must be a floating "
                            f"point dtype, got {dtype}")
        device = self.kv.device if device is None else torch.device(device)
        acc = self.kv.dtype if dtype is None else \
            (torch.float64 if dtype == torch.float64 else torch.float32)

        def move(t, dt):
            return None if t is None else t.to(device=device, dtype=dt, **extra)

        return LinearAttentionState(move(self.kv, acc), move(self.z, acc),
                                    move(self.window_k, dtype or getattr(self.window_k, "dtype", None)),
                                    move(self.window_v, dtype or getattr(self.window_v, "dtype", None)),
                                    move(self.offset, getattr(self.offset, "dtype", None)))

    def index_select(self, dim: int, index: torch.Tensor) -> "LinearAttentionState":
        """Select along batch (``dim=0``), e.g. to reorder beams."""
        return self.map(lambda t: t.index_select(dim, index))

    def nbytes(self) -> int:
        """Bytes held by the state (constant in the number of tokens seen)."""
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)
