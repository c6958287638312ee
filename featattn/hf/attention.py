"""The patched attention of :mod:`featattn.hf`: :class:`HFFeatureAttention`, the module that
replaces a transformers self-attention (sharing its projections) and runs
:func:`featattn.linear_attention`, with the rotary-embedding, key-padding and q-scaling helpers it
uses.  Imports nothing from transformers.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Optional

import torch
from torch import nn

from ..feature_maps import FeatureMap, TaylorFeatureMap
from ..functional import decode_step, linear_attention, unpad_attend
from ..layers import rotate_half
from ._common import _FAMILIES, PADDING_KWARG, _supported_text
from .cache import _state_layer


@functools.lru_cache(maxsize=None)
def _param_names(fn) -> tuple:
    """Names of the parameters of ``fn`` that may be passed positionally (``self`` dropped)."""
    params = inspect.signature(fn).parameters.values()
    names = [
        p.name for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return tuple(names[1:]) if names and names[0] == "self" else tuple(names)


def _default_apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotary_fn_for(original: nn.Module):
    """The family's own ``apply_rotary_pos_emb`` (from the module defining its attention)."""
    module = inspect.getmodule(type(original))
    fn = getattr(module, "apply_rotary_pos_emb", None)
    return fn if callable(fn) else _default_apply_rotary


def _key_mask_from_attention_mask(mask, B: int, T: int):
    """Fallback when the pre-forward hook did not run (a decoder layer called directly): the key
    padding of the current T tokens from the mask the layer got.  2-D: ``[B, past+T]``, nonzero =
    real.  4-D ``[B, 1, Tq, Tk]``: bool (True = attend) or additive float (0 = attend); a key is
    real when some query may attend to it (every real key sees at least itself)."""
    if not isinstance(mask, torch.Tensor) or mask.shape[0] != B:
        return None
    if mask.dim() == 2:
        keep = mask[:, -T:] != 0
    elif mask.dim() == 4:
        allowed = mask if mask.dtype == torch.bool else mask == 0
        keep = allowed.any(dim=-2).any(dim=1)[:, -T:]
    else:
        return None
    if keep.shape[-1] != T or bool(keep.all()):
        return None
    return keep


class HFFeatureAttention(nn.Module):
    """Feature (linear) attention in place of a transformers self-attention module.

    It registers the original module's children, parameters and buffers under the same names
    (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` or GPT-2's ``c_attn``, ``c_proj``, ...), so the
    projections are the very same modules and the model's ``state_dict`` keys do not change; the
    feature map is one more submodule, ``feature_map``, so a learnable map trains and saves with
    the model.  The original module is kept (unregistered) as :attr:`original` for
    :func:`unpatch_hf_model`.

    ``forward`` accepts the call signature of the module it replaces, in transformers 5.17 and
    5.2x (``past_key_values=`` or ``cache=``), and returns ``(output, None)`` (no attention
    weights).

    Computation, per layer: ``q, k, v`` from the projections (q ``[B, H, T, d]``, k/v
    ``[B, Hkv, T, d]``: grouped heads are not repeated), rotary embeddings on q and k where the
    family has them, then ``linear_attention(q, k, v, feature_map=self.feature_map,
    scale=self.q_scale, ...)``; padded keys (see :data:`PADDING_KWARG`) have their features and
    values zeroed, so they add nothing to any sum.  With a cache the layer's
    :class:`~featattn.LinearAttentionState` is read and replaced.

    During :func:`transfer_attention` it returns the original softmax attention's output
    instead (and computes its transfer loss on the side).
    """

    def __init__(
        self,
        original: nn.Module,
        *,
        family: str,
        layer_idx: int,
        feature_map: FeatureMap,
        heads: int,
        kv_heads: int,
        head_dim: int,
        normalize: bool = True,
        eps: float = 1e-6,
        scale: Optional[float] = None,
        backend: str = "auto",
        window: int = 0,
    ):
        super().__init__()
        if family not in _FAMILIES:
            raise ValueError(f"unknown family {family!r}; supported: {_supported_text()}")
        # share (not copy) everything the original owns, under the same names
        for name, child in original._modules.items():
            self.add_module(name, child)
        for name, p in original._parameters.items():
            self.register_parameter(name, p)
        for name, b in original._buffers.items():
            persistent = name not in original._non_persistent_buffers_set
            self.register_buffer(name, b, persistent=persistent)
        if any("feature_map" in d for d in (self._modules, self._parameters, self._buffers)):
            raise ValueError(
                f"{type(original).__name__} already has an attribute named 'feature_map'; "
                "cannot patch it"
            )
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(
                f"feature_map must be a featattn.FeatureMap, got {type(feature_map).__name__}"
            )
        self.feature_map = feature_map
        self.__dict__["_original"] = original
        self.__dict__["_arg_names"] = _param_names(type(original).forward)
        fam = _FAMILIES[family]
        self.__dict__["_rotary"] = _rotary_fn_for(original) if fam.rotary else None
        self.family = family
        self.config = getattr(original, "config", None)
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = int(heads), int(kv_heads), int(head_dim)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.normalize, self.eps, self.backend = normalize, eps, backend
        self.is_causal = True
        #: what the model's softmax multiplies q . k by (``module.scaling``)
        self.scaling = float(getattr(original, "scaling", head_dim ** -0.5))
        self.q_scale = _q_scale(feature_map, self.scaling, head_dim, scale)
        self.split_size = getattr(original, "split_size", heads * head_dim)
        #: the hybrid layer (LoLCATs): softmax over the last ``window`` tokens, linear attention
        #: over older ones, mixed per head by ``sigmoid(window_logit)`` (docs/hybrid.md)
        self.window = int(window)
        if self.window:
            ref = next(iter(self.parameters()), None)
            self.window_logit = nn.Parameter(torch.zeros(
                self.heads, device=None if ref is None else ref.device,
                dtype=torch.float32 if ref is None or not ref.is_floating_point() else ref.dtype))
        else:
            self.window_logit = None

    def window_kwargs(self) -> dict:
        """The hybrid options of :func:`featattn.linear_attention` ({} without a window): the
        softmax part uses the model's own scaling."""
        if not self.window:
            return {}
        logit = self.window_logit
        up = torch.promote_types(logit.dtype, torch.float32)  # float64 models keep float64
        return dict(window=self.window, window_weight=torch.sigmoid(logit.to(up)),
                    window_scale=self.scaling)

    @property
    def original(self) -> nn.Module:
        """The softmax attention module this one replaced (it shares the projections)."""
        return self.__dict__["_original"]

    @property
    def feature_dim(self) -> int:
        """Expanded feature dim Dk of the recurrent state."""
        return self.feature_map.output_dim(self.head_dim)

    # ---------------------------------------------------------------- pieces

    def project(self, hidden_states: torch.Tensor, position_embeddings=None):
        """``hidden_states [B, T, E]`` -> ``q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, d]``,
        rotary embeddings applied (the inputs of :func:`featattn.linear_attention`)."""
        B, T, _ = hidden_states.shape
        d = self.head_dim
        qkv = _FAMILIES[self.family].qkv
        if qkv == "c_attn":
            q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        elif qkv == "neox":  # [B, T, H, 3d]: q, k, v side by side in each head
            q, k, v = self.query_key_value(hidden_states).view(B, T, -1, 3 * d).chunk(3, dim=-1)
        elif qkv == "fused":
            q, k, v = self.qkv_proj(hidden_states).split(
                (self.heads * d, self.kv_heads * d, self.kv_heads * d), dim=2)
        else:
            q = self.q_proj(hidden_states)
            k = self.k_proj(hidden_states)
            v = self.v_proj(hidden_states)
        q, k = self._qk_norm(q, k, whole=True)  # OLMo 2: over the whole projection
        q = q.view(B, T, -1, d)
        k = k.view(B, T, -1, d)
        q, k = self._qk_norm(q, k, whole=False)  # Qwen3, Gemma 3: per head
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, -1, d).transpose(1, 2)
        rotary = self.__dict__["_rotary"]
        if rotary is not None:
            if position_embeddings is None:
                raise RuntimeError(
                    f"the patched {self.family} attention of layer {self.layer_idx} got no "
                    "position_embeddings=(cos, sin); featattn supports transformers 5.x, whose "
                    "decoder layers pass them"
                )
            cos, sin = position_embeddings
            q, k = rotary(q, k, cos, sin)
        return q, k, v

    def _qk_norm(self, q, k, *, whole: bool):
        """The module's own q_norm / k_norm where it has them: applied to the whole projection
        (``whole``) when the norm's size is the projection's, else per head (size head_dim)."""
        qn, kn = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        if qn is None or kn is None:
            return q, k
        size = getattr(qn, "weight", None)
        size = size.shape[-1] if isinstance(size, torch.Tensor) else None
        per_head = size is None or size == self.head_dim
        if per_head == whole:
            return q, k
        return qn(q), kn(k)

    def attend(self, q, k, v, key_mask=None, state=None, return_state=False):
        """Feature attention on projected ``q, k, v``; ``key_mask [B, T]`` (True = real token):
        the real tokens of each row are packed into one sequence each (``cu_seqlens``), attended,
        and the outputs put back in place (padded positions get 0), so padding costs nothing and
        fused kernels still run.  A row with no real token falls back to zeroing the features
        and values of padded keys."""
        fm = self.feature_map
        if key_mask is None:
            return linear_attention(
                q, k, v, feature_map=fm, normalize=self.normalize, eps=self.eps, scale=self.q_scale,
                initial_state=state, return_state=return_state, backend=self.backend,
                **self.window_kwargs(),
            )
        keep = key_mask.to(device=k.device, dtype=torch.bool)
        lengths = keep.sum(1)
        if self.window and return_state:
            held = 0 if state is None or state.window_k is None else state.window_k.shape[2]
            seen = (lengths + held).tolist()
            if len({min(n, self.window) for n in seen}) > 1:
                short = [b for b, n in enumerate(seen) if n < self.window]
                raise ValueError(
                    f"layer {self.layer_idx} has a softmax window (window={self.window}) and a "
                    f"cache: each row keeps its last {self.window} keys, so every row of a padded "
                    f"batch needs at least {self.window} real tokens (rows {short[:8]} have "
                    f"fewer). transformers makes a cache unless use_cache=False, in training "
                    f"too: pass use_cache=False (training, scoring), or generate those rows "
                    f"separately")
        if bool((lengths > 0).all()):
            return self._attend_packed(q, k, v, keep, state, return_state)
        if self.window:
            raise ValueError(
                f"layer {self.layer_idx} has a softmax window (window={self.window}) and a row of "
                "the batch has no real token (its attention_mask is all 0): drop that row")
        qf = fm.forward_query(q * self.q_scale if self.q_scale != 1.0 else q)
        kf = fm.forward_key(k)
        pad = ~key_mask.to(device=k.device, dtype=torch.bool)[:, None, :, None]
        kf = kf.masked_fill(pad, 0.0)
        v = v.masked_fill(pad, 0.0)
        return linear_attention(
            qf, kf, v, feature_map=None, normalize=self.normalize, eps=self.eps, scale=1.0,
            initial_state=state, return_state=return_state, backend=self.backend,
        )

    def _attend_packed(self, q, k, v, keep, state, return_state):
        """unpad -> linear_attention(cu_seqlens) -> repad (FlashAttention's varlen recipe)."""
        def attend(qp, kp, vp, cu):
            return linear_attention(
                qp, kp, vp, feature_map=self.feature_map, normalize=self.normalize,
                eps=self.eps, scale=self.q_scale, initial_state=state,
                return_state=return_state, backend=self.backend, cu_seqlens=cu,
                **self.window_kwargs())

        return unpad_attend(q, k, v, keep, attend, return_state)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, d]`` -> ``[B, T, E]`` through the model's output projection."""
        B, H, T, d = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * d)
        qkv = _FAMILIES[self.family].qkv
        if qkv == "c_attn":
            return self.resid_dropout(self.c_proj(o))
        if qkv == "neox":
            return self.dense(o)
        return self.o_proj(o)

    def _key_mask(self, bound: dict, B: int, T: int):
        """Key padding of the current tokens (True = real), or None when nothing is padded.

        Without the base-model hook's :data:`PADDING_KWARG` (a 4-D mask, a layer called
        directly) the mask is read, which is a host synchronisation; a one-token call skips
        that and is taken as a real token, as ``generate()``'s decoding steps are (so a step
        can be captured in a CUDA graph: featattn.hf.enable_cuda_graphs)."""
        if PADDING_KWARG in bound:
            key_mask = bound[PADDING_KWARG]
            key_mask = None if key_mask is None or key_mask is False else key_mask
            if key_mask is not None and tuple(key_mask.shape) != (B, T):
                raise ValueError(
                    f"{PADDING_KWARG} must be [B, T] = [{B}, {T}], got {tuple(key_mask.shape)}"
                )
            return key_mask
        if T == 1:
            return None
        return _key_mask_from_attention_mask(bound.get("attention_mask"), B, T)

    # ---------------------------------------------------------------- forward

    def forward(self, *args, **kwargs):
        names = self.__dict__["_arg_names"]
        if len(args) > len(names):
            raise TypeError(
                f"too many positional arguments ({len(args)}) for the patched attention"
            )
        bound = dict(zip(names, args))
        for key in kwargs:
            if key in bound:
                raise TypeError(f"patched attention got multiple values for argument {key!r}")
        bound.update(kwargs)
        hidden_states = bound.get("hidden_states")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError("the patched attention expects hidden_states of shape [B, T, hidden]")
        if bound.get("encoder_hidden_states") is not None:
            raise NotImplementedError("featattn patches self-attention only (no cross-attention)")
        cache = bound.get("cache")
        if cache is None:
            cache = bound.get("past_key_values")  # transformers < 5.2x name
        if cache is None:
            cache = bound.get("layer_past")  # GPT-NeoX's name
        B, T, _ = hidden_states.shape
        key_mask = self._key_mask(bound, B, T)
        transfer = self.__dict__.get("_transfer")
        if transfer is not None:  # inside transfer_attention: softmax output, linear loss
            return transfer.layer_forward(self, bound, key_mask)

        q, k, v = self.project(hidden_states, bound.get("position_embeddings"))

        layer = _state_layer(cache, self.layer_idx) if cache is not None else None
        if layer is None:
            o = self.attend(q, k, v, key_mask)
        else:
            state = layer.state
            if state is not None:
                if state.kv.shape[0] != B:
                    raise ValueError(
                        f"the cache of layer {self.layer_idx} holds a batch of {state.kv.shape[0]} "
                        f"sequences but the input has {B}"
                    )
                if state.kv.device != q.device:
                    state = state.to(q.device)
            if state is not None and key_mask is None and not torch.is_grad_enabled():
                # decoding: the state advanced in place (one step kernel on CUDA, no new
                # state tensors per token, the window's too once full); the cache is
                # mutated as transformers' own are
                o = decode_step(q, k, v, state, feature_map=self.feature_map,
                                normalize=self.normalize, eps=self.eps, scale=self.q_scale,
                                backend=self.backend, **self.window_kwargs())
                new_state = state
            else:
                o, new_state = self.attend(q, k, v, key_mask, state, return_state=True)
            layer.store(new_state, T)
        return self.output(o), None

    def extra_repr(self) -> str:
        return (
            f"family={self.family!r}, layer_idx={self.layer_idx}, heads={self.heads}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
            f"q_scale={self.q_scale:g}, normalize={self.normalize}"
            + (f", window={self.window}" if self.window else "")
        )


def _q_scale(fm: FeatureMap, model_scaling: float, head_dim: int, scale) -> float:
    """What q is multiplied by before the feature map.

    Default (``scale=None``): the model's own softmax scaling, so the map sees the logits'
    scale softmax attention saw; for the Taylor map, which has the ``1/sqrt(d)`` built in, the
    model's scaling relative to ``1/sqrt(d)`` (1 for every supported family's default).
    """
    if scale is not None:
        if (
            isinstance(scale, bool) or not isinstance(scale, numbers.Real)
            or not math.isfinite(scale)
        ):
            raise ValueError(f"scale must be None or a finite number, got {scale!r}")
        return float(scale)
    if isinstance(fm, TaylorFeatureMap):
        s = model_scaling * math.sqrt(head_dim)
    else:
        s = model_scaling
    return 1.0 if abs(s - 1.0) < 1e-12 else float(s)
