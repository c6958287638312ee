"""``FeatureAttention``: a causal linear-attention layer with a pluggable feature map."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .feature_maps import FeatureMap, TaylorFeatureMap
from .feature_maps.registry import build_feature_map, check_map_fits
from .dispatch import _check_backend
from .functional import _validate_cu_seqlens, _validate_eps, _validate_key_mask, decode_step
from .functional import linear_attention
from .state import LinearAttentionState

__all__ = ["FeatureAttention"]

#: raw q/k size used for the Taylor map when ``qk_dim`` is not given: 1 + 16 + 256 = 273
#: features, where a 64-dim q/k would expand to 4161.
TAYLOR_DEFAULT_QK_DIM = 16

#: epsilon of the optional q/k and output RMSNorms
NORM_EPS = 1e-6

OUTPUT_NORMS = ("rmsnorm",)


def _check_options(rotary, rope_theta, qk_norm, output_norm, output_gate, dropout) -> None:
    """The layer options' checks: expected, got, and the fix."""
    for name, val in (("rotary", rotary), ("qk_norm", qk_norm), ("output_gate", output_gate)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool (True to turn it on), got "
                            f"{type(val).__name__} {val!r}")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, numbers.Real):
        raise TypeError(f"rope_theta must be a float > 0 (the rotary base, e.g. 10000.0), got "
                        f"{type(rope_theta).__name__} {rope_theta!r}")
    if not math.isfinite(float(rope_theta)) or rope_theta <= 0:
        raise ValueError(f"rope_theta must be a finite float > 0 (the rotary base, e.g. "
                         f"10000.0), got {rope_theta!r}")
    if output_norm is not None and not isinstance(output_norm, str):
        raise TypeError(f"output_norm must be None or one of {OUTPUT_NORMS}, got "
                        f"{type(output_norm).__name__} {output_norm!r}; pass output_norm="
                        f"'rmsnorm' (or None for no norm)")
    if output_norm is not None and output_norm not in OUTPUT_NORMS:
        raise ValueError(f"output_norm must be None or one of {OUTPUT_NORMS}, got "
                         f"{output_norm!r}; pass output_norm='rmsnorm' (or None for no norm)")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__} "
                        f"{dropout!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1) (a probability; 0 turns it off), "
                         f"got {dropout!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (the rotary embedding's pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """``cos, sin`` ``[..., dim]`` of the rotary embedding at integer ``positions`` (angles
    computed in float64, then cast to ``dtype``)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device,
                                       dtype=torch.float64) / dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


class FeatureAttention(nn.Module):
    """Multi-head causal linear attention: ``[B, T, dim] -> [B, T, dim]``.

    ``q = x W_q``, ``k = x W_k``, ``v = x W_v`` (``heads`` query heads, ``kv_heads`` key/value
    heads; the three weights are the rows of one ``qkv_proj`` Linear), then :func:`featattn.linear_attention` with ``feature_map`` per head, then an
    output projection.  ``forward`` returns a tensor, so the layer composes in
    ``nn.Sequential``; pass ``return_state=True`` (or a ``state``) for chunked prefill and
    step-by-step decoding, which give exactly the full forward's outputs.

    Args:
        dim: model width.
        heads: number of query heads H.
        feature_map: a registered name or a :class:`FeatureMap` instance (it becomes a
            submodule, so learnable maps train with the layer).
        head_dim: value head dim Dv (default ``dim // heads``).
        qk_dim: raw q/k head dim (default 16 for ``"taylor"``, else ``head_dim``).
        kv_heads: key/value heads Hkv, dividing ``heads`` (default ``heads``).
        normalize, eps: as in :func:`featattn.linear_attention`.
        bias: bias in the projections.
        feature_map_kwargs: passed to the registered map's constructor; ``head_dim`` (=qk_dim),
            ``heads`` and ``kv_heads`` are filled in when the constructor takes them.
        backend: passed to :func:`featattn.linear_attention`.
        window: 0, or W > 0 for the hybrid layer (LoLCATs): a softmax over the last W tokens
            plus linear attention over the older ones, mixed per head by a learnable weight
            ``sigmoid(window_logit)`` (starting at 0.5); see docs/hybrid.md.
        causal: False for an encoder layer (every token reads every token); ``forward`` then
            takes ``key_padding_mask`` for padded batches.  No decoding state then.

    Layer options (all off by default: a layer built without them has the same parameters,
    state dict and outputs as before they existed):

        qk_norm: RMSNorm of each head's raw q and k over ``qk_dim`` (eps 1e-6, one learnable
            weight ``[qk_dim]`` for q, ``q_norm``, one for k, ``k_norm``, shared by the heads),
            applied first.
        rotary: rotary position embeddings (RoPE, the rotate-half convention of GPT-NeoX and
            Llama) on the raw q and k, after ``qk_norm`` and before the feature map: pairs
            ``(i, i + qk_dim/2)`` rotate by ``pos * rope_theta ** (-2i / qk_dim)``.  ``qk_dim``
            must be even.  Positions are absolute: a call continuing from a ``state`` starts at
            the tokens that state has seen (``state.offset``, kept by the layer), packed
            sequences (``cu_seqlens``) each start at 0, and ``forward(positions=)`` overrides
            them (needed with ``cp_group``).
        rope_theta: the rotary base (default 10000.0).
        output_norm: None, or ``"rmsnorm"``: RMSNorm of each head's attention output over
            ``head_dim`` (eps 1e-6, one learnable weight ``o_norm`` ``[head_dim]`` shared by the
            heads), as fla's layers do.
        output_gate: multiply the (normed) attention output by ``silu(x W_g)`` (SiLU, i.e.
            swish, as fla's gated layers; ``W_g`` is ``g_proj``, ``dim -> heads * head_dim``,
            with ``bias``) before the output projection.
        dropout: dropout probability on the layer's output, after ``o_proj`` (the residual
            dropout of GPT-2-style blocks); active only in training mode.

    Order: ``q, k, v = x W`` -> ``qk_norm`` -> ``rotary`` -> attention (feature map inside) ->
    ``output_norm`` -> ``output_gate`` -> ``o_proj`` -> ``dropout``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        feature_map: Union[str, FeatureMap] = "taylor",
        *,
        head_dim: Optional[int] = None,
        qk_dim: Optional[int] = None,
        kv_heads: Optional[int] = None,
        normalize: bool = True,
        eps: float = 1e-6,
        bias: bool = False,
        feature_map_kwargs: Optional[dict] = None,
        backend: str = "auto",
        window: int = 0,
        causal: bool = True,
        rotary: bool = False,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        output_norm: Optional[str] = None,
        output_gate: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(
                    f"dim ({dim}) is not divisible by heads ({heads}); pass head_dim explicitly"
                )
            head_dim = dim // heads
        for name, val in (("head_dim", head_dim), ("qk_dim", qk_dim), ("kv_heads", kv_heads)):
            if val is None:
                continue
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be None or a positive int, got "
                                f"{type(val).__name__} {val!r}")
            if val < 1:
                raise ValueError(f"{name} must be None or a positive int, got {val!r}")
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
            raise ValueError(f"window must be an int >= 0 (0: no softmax window), got {window!r}")
        window = int(window)  # (a numpy integer, say)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
        if window and not causal:
            raise ValueError("window > 0 is a causal layer; pass causal=True (the default)")
        if window and not normalize:
            raise ValueError("window > 0 needs normalize=True (the softmax and linear parts "
                             "share one denominator)")
        _check_options(rotary, rope_theta, qk_norm, output_norm, output_gate, dropout)
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        # the call's own checks, made here so a bad layer fails when built, not at its first
        # forward
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
        eps = _validate_eps(eps, torch.float32)  # the layer's usual dtypes accumulate in fp32
        _check_backend(backend)
        if isinstance(feature_map, str):
            if qk_dim is None:
                qk_dim = TAYLOR_DEFAULT_QK_DIM if feature_map == "taylor" else head_dim
            sized = sorted({"head_dim", "heads", "kv_heads"} & set(feature_map_kwargs or {}))
            if sized:
                raise ValueError(f"feature_map_kwargs must not set {', '.join(sized)}: the layer "
                                 f"sizes its map (pass qk_dim=, heads=, kv_heads= to the layer)")
            fm = build_feature_map(feature_map, qk_dim, heads, kv_heads, **(feature_map_kwargs or {}))
        elif isinstance(feature_map, FeatureMap):
            if feature_map_kwargs:
                raise ValueError("feature_map_kwargs only applies when feature_map is a name")
            fm = feature_map
            if qk_dim is None:
                qk_dim = TAYLOR_DEFAULT_QK_DIM if isinstance(fm, TaylorFeatureMap) else head_dim
        else:
            raise TypeError(
                f"feature_map must be a registered name or a FeatureMap, got {type(feature_map).__name__}"
            )
        check_map_fits(fm, qk_dim, heads, kv_heads, "FeatureAttention")
        self.dim, self.heads, self.kv_heads = dim, heads, kv_heads
        self.head_dim, self.qk_dim = head_dim, qk_dim
        self.normalize, self.eps, self.backend = normalize, eps, backend
        self.feature_map = fm
        # q, k and v come from one GEMM (one launch forward, one for each gradient backward);
        # the kernels read the [B, T, H, D] slices of its output in place
        self._qkv_split = (heads * qk_dim, kv_heads * qk_dim, kv_heads * head_dim)
        self.qkv_proj = nn.Linear(dim, sum(self._qkv_split), bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.window = window
        self.causal = causal
        #: the hybrid layer's per-head mixing weight f = sigmoid(window_logit) (window > 0)
        self.window_logit = nn.Parameter(torch.zeros(heads)) if window else None
        if rotary and qk_dim % 2:
            raise ValueError(f"rotary=True rotates pairs of q/k dims and needs an even qk_dim, "
                             f"got qk_dim={qk_dim}; pass an even qk_dim")
        self.rotary, self.rope_theta = rotary, float(rope_theta)
        self.qk_norm, self.output_norm = qk_norm, output_norm
        self.output_gate, self.dropout = output_gate, float(dropout)
        # the options' parameters exist only when the option is on: checkpoints saved without
        # them load unchanged (strict) into a layer built without them
        if qk_norm:
            self.q_norm = nn.RMSNorm(qk_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(qk_dim, eps=NORM_EPS)
        if output_norm:
            self.o_norm = nn.RMSNorm(head_dim, eps=NORM_EPS)
        if output_gate:
            self.g_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self._register_load_state_dict_pre_hook(self._merge_separate_projections)

    def _window_kwargs(self) -> dict:
        if not self.window:
            return {}
        return dict(window=self.window, window_weight=torch.sigmoid(self.window_logit))

    def _merge_separate_projections(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints saved before the projections were fused hold ``q_proj``, ``k_proj``
        and ``v_proj``: concatenate them into ``qkv_proj`` (rows q, then k, then v)."""
        for p in ("weight", "bias"):
            names = [f"{prefix}{n}_proj.{p}" for n in "qkv"]
            if all(n in state_dict for n in names):
                state_dict[f"{prefix}qkv_proj.{p}"] = torch.cat([state_dict.pop(n) for n in names])

    def projections(self, x: torch.Tensor):
        """``(q, k, v)`` of ``x: [B, T, dim]`` straight from the projection: ``[B, H, T, qk_dim]``,
        ``[B, Hkv, T, qk_dim]``, ``[B, Hkv, T, head_dim]`` (strided views of one GEMM's
        output), before ``qk_norm`` and ``rotary`` when those options are on; the feature map
        is applied later, by :func:`featattn.linear_attention`."""
        q, k, v = self.qkv_proj(x).split(self._qkv_split, dim=-1)
        return (q.unflatten(-1, (self.heads, self.qk_dim)).transpose(1, 2),
                k.unflatten(-1, (self.kv_heads, self.qk_dim)).transpose(1, 2),
                v.unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2))

    @property
    def feature_dim(self) -> int:
        """Expanded feature dim Dk (the state's third dim)."""
        return self.feature_map.output_dim(self.qk_dim)

    def init_state(self, batch: int, *, device=None) -> LinearAttentionState:
        """The zero state for ``batch`` sequences (equivalent to passing ``state=None``)."""
        state = LinearAttentionState.zeros(
            batch, self.heads, self.feature_dim, self.head_dim,
            normalize=self.normalize, device=device,
        )
        if self.rotary:
            state.offset = torch.zeros(batch, dtype=torch.int64, device=device)
        return state

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[LinearAttentionState] = None,
        return_state: bool = False,
        update_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
        cp_group=None,
        key_padding_mask: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
    ):
        """``x: [B, T, dim]`` -> ``[B, T, dim]`` (and the new state if ``return_state``).

        ``state`` is the :class:`LinearAttentionState` returned by an earlier call over the
        preceding tokens; decoding one token at a time is ``y, s = layer(x_t, s, True)``.
        ``update_state=True`` advances ``state`` in place instead (inference: no gradient),
        through :func:`featattn.decode_step`: ``y = layer(x_t, s, update_state=True)``.
        ``cu_seqlens``: packed sequences, ``x [1, total_T, dim]`` holding N sequences back to
        back (int32/int64 ``[N + 1]`` cumulative lengths, see
        :func:`featattn.linear_attention`); each is attended alone and a state is per sequence.
        ``cp_group``: context parallelism, ``x`` being this rank's slice of the sequence (see
        :func:`featattn.linear_attention` and docs/distributed.md).
        ``key_padding_mask``: ``[B, T]``, False at padded tokens, which no query then reads;
        with ``rotary=True`` each row's real tokens are numbered in order (padding takes no
        position), so a padded row (left, right or with holes) gives what the row alone gives,
        and the state continues after its last real token.
        ``positions``: only with ``rotary=True``, integer ``[T]`` or ``[B, T]`` rotary
        positions of the tokens (``[total_T]`` with ``cu_seqlens``), overriding the default
        ``state.offset + t`` (0-based from each packed sequence's start); the returned state
        then continues after each sequence's last given position.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FeatureAttention expects x of shape [B, T, {self.dim}], got {got}")
        w = self.qkv_proj.weight
        if not x.is_floating_point():
            raise TypeError(f"FeatureAttention expects a floating-point x (the token "
                            f"embeddings), got {x.dtype}; embed token ids first, or cast with "
                            f"x.to({w.dtype})")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"FeatureAttention holds {w.dtype} weights but x is {x.dtype}: cast "
                            f"one to the other (x.to({w.dtype}) or layer.to({x.dtype})), or run "
                            f"under torch.autocast")
        B, T, _ = x.shape
        if positions is not None and not self.rotary:
            raise ValueError("positions= only applies to a layer with rotary=True (the "
                             "positions of the rotary embedding); this layer has none: drop it")
        # [B, T, H, D] -> [B, H, T, D] as views: the kernels take strided inputs
        q, k, v = self.projections(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        next_offset = None
        if self.rotary:
            keep = None  # with a padding mask the real tokens are numbered, padding is not
            if key_padding_mask is not None and positions is None and cu_seqlens is None:
                keep = _validate_key_mask(key_padding_mask, q)[:, 0, :, 0]
            pos = self._positions(q, state, cu_seqlens, cp_group, positions, keep)
            cos, sin = rotary_cos_sin(pos, self.qk_dim, self.rope_theta, q.dtype)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B or 1, 1, T, Dqk]: every head
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # the next call continues after each sequence's last position
            if cu_seqlens is None:  # (a row of padding only saw no token: it stays put)
                next_offset = pos[:, -1].expand(B) + (1 if keep is None else keep.any(1).long())
            else:
                next_offset = pos[0, cu_seqlens[1:].long() - 1] + 1
        if update_state:
            if not self.causal:
                raise ValueError("update_state=True decodes a causal layer; this one has "
                                 "causal=False (every token reads every token: no decoding)")
            if cu_seqlens is not None:
                raise ValueError("update_state=True decodes one batch of sequences; packed "
                                 "sequences (cu_seqlens) are for prefill and training")
            if cp_group is not None:
                raise ValueError("update_state=True decodes on one rank; cp_group is for "
                                 "prefill and training of a sequence split across ranks")
            if state is None:
                raise ValueError("update_state=True needs a state to update; start from "
                                 "layer.init_state(batch) or a prefill with return_state=True")
            if key_padding_mask is not None:
                raise ValueError("update_state=True decodes real tokens only and takes no "
                                 "key_padding_mask (it would be ignored); pass the padded "
                                 "prompt in a prefill call (return_state=True), then decode")
            # (with a window its keys and values move along in the state's tensors once
            # it is full; while it fills, the state object takes the new tensors)
            o = decode_step(q, k, v, state, feature_map=self.feature_map,
                            normalize=self.normalize, eps=self.eps, backend=self.backend,
                            **self._window_kwargs())
            if next_offset is not None:
                state.offset = next_offset
            y = self._output(o, x)
            return (y, state) if return_state else y
        res = linear_attention(
            q, k, v,
            feature_map=self.feature_map,
            normalize=self.normalize,
            eps=self.eps,
            initial_state=state,
            return_state=return_state,
            backend=self.backend,
            cu_seqlens=cu_seqlens,
            cp_group=cp_group,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            **self._window_kwargs(),
        )
        o, new_state = res if return_state else (res, None)
        if new_state is not None and next_offset is not None:
            new_state.offset = next_offset
        y = self._output(o, x)
        return (y, new_state) if return_state else y

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, head_dim]`` -> ``[B, T, dim]``: output norm, gate, projection,
        dropout."""
        B, T, _ = x.shape
        if self.output_norm:
            o = self.o_norm(o)
        o = o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        if self.output_gate:
            o = o * F.silu(self.g_proj(x))
        y = self.o_proj(o)
        if self.dropout:
            y = F.dropout(y, self.dropout, training=self.training)
        return y

    def _positions(self, q_like, state, cu_seqlens, cp_group, positions,
                   keep=None) -> torch.Tensor:
        """The rotary positions ``[B or 1, T]`` (int64) of this call's tokens (``q_like``:
        ``[B, H, T, D]``); with ``keep`` (bool ``[B, T]``, False at padding) only real tokens
        count (a padded token has its preceding real token's position, or the offset)."""
        B, T, device = q_like.shape[0], q_like.shape[2], q_like.device
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point \
                    or positions.dtype.is_complex or positions.dtype == torch.bool:
                got = (f"a {positions.dtype} tensor" if isinstance(positions, torch.Tensor)
                       else type(positions).__name__)
                raise TypeError(f"positions must be an integer tensor [T] or [B, T], got {got}; "
                                f"e.g. torch.arange(T)")
            if positions.dim() == 1:
                positions = positions.unsqueeze(0)
            if positions.dim() != 2 or positions.shape[1] != T or positions.shape[0] not in (1, B):
                raise ValueError(f"positions must be [T] or [B, T] = [{B}, {T}] (one position "
                                 f"per token of x), got shape {tuple(positions.shape)}")
            if positions.device != device:
                raise ValueError(f"positions is on {positions.device} but x is on {device}; "
                                 f"move it with positions.to(x.device)")
            return positions.long()
        if cp_group is not None:
            raise ValueError("rotary=True with cp_group needs positions=: this rank holds a "
                             "slice of the sequence and cannot tell where it starts; pass "
                             "positions=torch.arange(start, start + T) for the slice")
        if cu_seqlens is not None:
            _validate_cu_seqlens(cu_seqlens, q_like)  # before the positions read it
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is None:
            offset = torch.zeros(n, dtype=torch.int64, device=device)
        else:
            offset = getattr(state, "offset", None)
            if offset is None:
                raise ValueError(
                    "rotary=True continues from the state's token count (state.offset), and this "
                    "state has none (it was not made by a rotary layer); start from "
                    "layer.init_state(batch) or a call with return_state=True, set "
                    "state.offset = torch.full((batch,), tokens_seen), or pass positions=")
            if offset.shape != (n,):
                raise ValueError(f"state.offset must be [{n}] (tokens seen per sequence), got "
                                 f"shape {tuple(offset.shape)}")
            offset = offset.to(device=device, dtype=torch.int64)
        if keep is not None:
            return offset[:, None] + (keep.long().cumsum(1) - 1).clamp_min(0)
        if cu_seqlens is None:
            return offset[:, None] + torch.arange(T, device=device)
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        seq = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=T)
        return (torch.arange(T, device=device) - cu[seq] + offset[seq]).unsqueeze(0)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, qk_dim={self.qk_dim}, "
            f"head_dim={self.head_dim}, feature_dim={self.feature_dim}, normalize={self.normalize}"
            + (f", window={self.window}" if self.window else "")
            + ("" if self.causal else ", causal=False")
            + (f", rotary=True, rope_theta={self.rope_theta:g}" if self.rotary else "")
            + (", qk_norm=True" if self.qk_norm else "")
            + (f", output_norm={self.output_norm!r}" if self.output_norm else "")
            + (", output_gate=True" if self.output_gate else "")
            + (f", dropout={self.dropout:g}" if self.dropout else "")
        )
