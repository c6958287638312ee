"""``FeatureAttention``: a causal linear-attention layer with a pluggable feature map."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .feature_maps import FeatureMap, TaylorFeatureMap
from .feature_maps.registry import build_feature_map
from .dispatch import _check_backend
from .functional import _validate_eps, decode_step, linear_attention
from .state import LinearAttentionState

__all__ = ["FeatureAttention"]

#: raw q/k size used for the Taylor map when ``qk_dim`` is not given: 1 + 16 + 256 = 273
#: features, where a 64-dim q/k would expand to 4161.
TAYLOR_DEFAULT_QK_DIM = 16


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
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be an int >= 0 (0: no softmax window), got {window!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
        if window and not causal:
            raise ValueError("window > 0 is a causal layer; pass causal=True (the default)")
        if window and not normalize:
            raise ValueError("window > 0 needs normalize=True (the softmax and linear parts "
                             "share one denominator)")
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
        """``(q, k, v)`` of ``x: [B, T, dim]`` as the attention reads them: ``[B, H, T, qk_dim]``,
        ``[B, Hkv, T, qk_dim]``, ``[B, Hkv, T, head_dim]`` (strided views of one GEMM's
        output, raw: the feature map is applied by :func:`featattn.linear_attention`)."""
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
        return LinearAttentionState.zeros(
            batch, self.heads, self.feature_dim, self.head_dim,
            normalize=self.normalize, device=device,
        )

    def forward(
        self,
        x: torch.Tensor,
        state: Optional[LinearAttentionState] = None,
        return_state: bool = False,
        update_state: bool = False,
        cu_seqlens: Optional[torch.Tensor] = None,
        cp_group=None,
        key_padding_mask: Optional[torch.Tensor] = None,
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
        ``key_padding_mask``: ``[B, T]``, False at padded tokens, which no query then reads.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"FeatureAttention expects x of shape [B, T, {self.dim}], got {got}")
        B, T, _ = x.shape
        # [B, T, H, D] -> [B, H, T, D] as views: the kernels take strided inputs
        q, k, v = self.projections(x)
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
            if self.window:  # the window's keys grow: the state object takes the new tensors
                o, new = linear_attention(q, k, v, feature_map=self.feature_map,
                                          normalize=self.normalize, eps=self.eps,
                                          initial_state=state, return_state=True,
                                          backend=self.backend, **self._window_kwargs())
                state.kv, state.z, state.window_k, state.window_v = \
                    new.kv, new.z, new.window_k, new.window_v
                y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
                return (y, state) if return_state else y
            o = decode_step(q, k, v, state, feature_map=self.feature_map,
                            normalize=self.normalize, eps=self.eps, backend=self.backend)
            y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
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
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))
        return (y, new_state) if return_state else y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, qk_dim={self.qk_dim}, "
            f"head_dim={self.head_dim}, feature_dim={self.feature_dim}, normalize={self.normalize}"
            + (f", window={self.window}" if self.window else "")
            + ("" if self.causal else ", causal=False")
        )
