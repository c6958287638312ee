"""Linearise a Hugging Face ``transformers`` model: swap its softmax attention for feature attention.

``patch_hf_model(model)`` replaces the self-attention of each selected decoder layer by a
:class:`HFFeatureAttention` that reuses the layer's own projections (the same ``nn.Module``
objects, so the weights are shared, not copied), its rotary embeddings, grouped k/v heads and
attention scaling, and runs :func:`featattn.linear_attention` on them.  ``generate()`` then keeps
one :class:`~featattn.LinearAttentionState` per patched layer in the cache instead of growing
key/value tensors: prefill runs the chunked kernel once, every new token is an O(1) update.

Supported families: Llama, Mistral, Qwen2 (``*ForCausalLM`` and their base ``*Model``) and GPT-2
(``GPT2LMHeadModel`` / ``GPT2Model``), with transformers 5.x (the ``past_key_values`` -> ``cache``
keyword rename of 5.2x included).  ``transformers`` is an optional dependency
(``pip install featattn[hf]``): importing this module never imports it, calling the functions does.

``transfer_attention(model, batches, steps=...)`` trains the feature maps of a patched model (a
learnable map such as ``"hedgehog"``), and nothing else, to mimic the softmax attention they
replace (Hedgehog / LoLCATs attention transfer).

See docs/hf.md for the workflow, attention transfer, the save/load round trip and the limitations.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..dispatch import BACKENDS
from ..feature_maps import FeatureMap, TaylorFeatureMap, get_feature_map, list_feature_maps
from ..feature_maps import registry as _registry
from ..functional import linear_attention
from ..state import LinearAttentionState

__all__ = [
    "patch_hf_model",
    "unpatch_hf_model",
    "repatch_hf_model",
    "load_patched_hf_model",
    "load_feature_maps",
    "transfer_attention",
    "TransferResult",
    "TRANSFER_LOSSES",
    "is_patched",
    "patched_layers",
    "HFFeatureAttention",
    "cache_nbytes",
    "cache_kwarg_name",
    "SUPPORTED_FAMILIES",
    "CONFIG_KEY",
    "PADDING_KWARG",
]

#: attribute of ``model.config`` where the patch is recorded (saved in config.json)
CONFIG_KEY = "featattn"
#: keyword the patched model's pre-forward hook hands to every decoder layer: the 2-D key mask of
#: the current tokens (bool ``[B, T]``, True = real token), or ``False`` when nothing is padded
PADDING_KWARG = "featattn_padding_mask"


@dataclass(frozen=True)
class _Family:
    model_type: str
    example: str          # the causal-LM class users know the family by
    layers_attr: str      # decoder layers on the base model
    attn_attr: str        # self-attention on a decoder layer
    rotary: bool          # q/k get rotary embeddings (position_embeddings=(cos, sin))


_FAMILIES = {
    "llama": _Family("llama", "LlamaForCausalLM", "layers", "self_attn", True),
    "mistral": _Family("mistral", "MistralForCausalLM", "layers", "self_attn", True),
    "qwen2": _Family("qwen2", "Qwen2ForCausalLM", "layers", "self_attn", True),
    "gpt2": _Family("gpt2", "GPT2LMHeadModel", "h", "attn", False),
}
#: ``{model_type: causal-LM class name}`` of the families patch_hf_model knows
SUPPORTED_FAMILIES = {name: fam.example for name, fam in _FAMILIES.items()}


def _supported_text() -> str:
    return ", ".join(f"{name} ({cls})" for name, cls in SUPPORTED_FAMILIES.items())


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test environment has transformers
        raise ImportError(
            "featattn.hf needs the optional dependency `transformers`: pip install 'featattn[hf]'"
        ) from e
    return transformers


# --------------------------------------------------------------------------- the patched attention


@functools.lru_cache(maxsize=None)
def _param_names(fn) -> tuple:
    """Names of the parameters of ``fn`` that may be passed positionally (``self`` dropped)."""
    params = inspect.signature(fn).parameters.values()
    names = [
        p.name for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return tuple(names[1:]) if names and names[0] == "self" else tuple(names)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _default_apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


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
            self.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
        if "feature_map" in self._modules or "feature_map" in self._parameters or "feature_map" in self._buffers:
            raise ValueError(
                f"{type(original).__name__} already has an attribute named 'feature_map'; cannot patch it"
            )
        if not isinstance(feature_map, FeatureMap):
            raise TypeError(f"feature_map must be a featattn.FeatureMap, got {type(feature_map).__name__}")
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
        if self.family == "gpt2":
            q, k, v = self.c_attn(hidden_states).split(self.split_size, dim=2)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q = q.view(B, T, -1, d).transpose(1, 2)
        k = k.view(B, T, -1, d).transpose(1, 2)
        v = v.view(B, T, -1, d).transpose(1, 2)
        rotary = self.__dict__["_rotary"]
        if rotary is not None:
            if position_embeddings is None:
                raise RuntimeError(
                    f"the patched {self.family} attention of layer {self.layer_idx} got no "
                    "position_embeddings=(cos, sin); featattn supports transformers 5.x, whose decoder "
                    "layers pass them"
                )
            cos, sin = position_embeddings
            q, k = rotary(q, k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, key_mask=None, state=None, return_state=False):
        """Feature attention on projected ``q, k, v``; ``key_mask [B, T]`` (True = real token)
        zeroes the features and values of padded keys."""
        fm = self.feature_map
        if key_mask is None:
            return linear_attention(
                q, k, v, feature_map=fm, normalize=self.normalize, eps=self.eps, scale=self.q_scale,
                initial_state=state, return_state=return_state, backend=self.backend,
            )
        qf = fm.forward_query(q * self.q_scale if self.q_scale != 1.0 else q)
        kf = fm.forward_key(k)
        pad = ~key_mask.to(device=k.device, dtype=torch.bool)[:, None, :, None]
        kf = kf.masked_fill(pad, 0.0)
        v = v.masked_fill(pad, 0.0)
        return linear_attention(
            qf, kf, v, feature_map=None, normalize=self.normalize, eps=self.eps, scale=1.0,
            initial_state=state, return_state=return_state, backend=self.backend,
        )

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``o [B, H, T, d]`` -> ``[B, T, E]`` through the model's output projection."""
        B, H, T, d = o.shape
        o = o.transpose(1, 2).reshape(B, T, H * d)
        if self.family == "gpt2":
            return self.resid_dropout(self.c_proj(o))
        return self.o_proj(o)

    def _key_mask(self, bound: dict, B: int, T: int):
        """Key padding of the current tokens (True = real), or None when nothing is padded."""
        if PADDING_KWARG in bound:
            key_mask = bound[PADDING_KWARG]
            key_mask = None if key_mask is None or key_mask is False else key_mask
            if key_mask is not None and tuple(key_mask.shape) != (B, T):
                raise ValueError(f"{PADDING_KWARG} must be [B, T] = [{B}, {T}], got {tuple(key_mask.shape)}")
            return key_mask
        return _key_mask_from_attention_mask(bound.get("attention_mask"), B, T)

    # ---------------------------------------------------------------- forward

    def forward(self, *args, **kwargs):
        names = self.__dict__["_arg_names"]
        if len(args) > len(names):
            raise TypeError(f"too many positional arguments ({len(args)}) for the patched attention")
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
            o, new_state = self.attend(q, k, v, key_mask, state, return_state=True)
            layer.store(new_state, T)
        return self.output(o), None

    def extra_repr(self) -> str:
        return (
            f"family={self.family!r}, layer_idx={self.layer_idx}, heads={self.heads}, "
            f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
            f"q_scale={self.q_scale:g}, normalize={self.normalize}"
        )


def _q_scale(fm: FeatureMap, model_scaling: float, head_dim: int, scale) -> float:
    """What q is multiplied by before the feature map.

    Default (``scale=None``): the model's own softmax scaling, so the map sees the logits'
    scale softmax attention saw; for the Taylor map, which has the ``1/sqrt(d)`` built in, the
    model's scaling relative to ``1/sqrt(d)`` (1 for every supported family's default).
    """
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"scale must be None or a finite number, got {scale!r}")
        return float(scale)
    if isinstance(fm, TaylorFeatureMap):
        s = model_scaling * math.sqrt(head_dim)
    else:
        s = model_scaling
    return 1.0 if abs(s - 1.0) < 1e-12 else float(s)


# --------------------------------------------------------------------------- the recurrent cache


def _seq_length(cache) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # a cache type that cannot tell: treat it as empty
        return 0


def _state_layer(cache, layer_idx: int):
    """The :class:`FeatureAttentionCacheLayer` of ``layer_idx`` in ``cache``.

    An empty layer of any other kind (a fresh ``DynamicCache``, as ``generate()`` and the models
    create by default) is replaced in place, so the patched model works with the caches
    transformers makes; a layer already holding keys/values cannot be converted and raises.
    """
    layer_cls = _cache_classes()[0]
    if hasattr(cache, "self_attention_cache"):  # EncoderDecoderCache
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        raise TypeError(
            f"featattn's patched attention needs a transformers Cache with per-layer storage "
            f"(DynamicCache or featattn.hf.FeatureAttentionCache), got {type(cache).__name__}"
        )
    if len(layers) <= layer_idx:
        replicate = getattr(cache, "layer_class_to_replicate", None)
        if replicate is None:
            raise ValueError(
                f"{type(cache).__name__} has {len(layers)} layers; layer {layer_idx} does not exist"
            )
        while len(layers) < layer_idx:
            layers.append(replicate())
        layers.append(layer_cls())
    layer = layers[layer_idx]
    if isinstance(layer, layer_cls):
        return layer
    try:
        seen = layer.get_seq_length()
    except Exception:
        seen = 0 if getattr(layer, "keys", None) is None else 1
    if seen:
        raise RuntimeError(
            f"layer {layer_idx} of the {type(cache).__name__} already holds {seen} tokens of softmax "
            "keys/values: a patched model needs a fresh cache (or a featattn.hf.FeatureAttentionCache)"
        )
    new = layer_cls()
    layers[layer_idx] = new
    return new


@functools.lru_cache(maxsize=None)
def _cache_classes():
    """Build the transformers-dependent cache classes on first use."""
    _require_transformers()
    from transformers.cache_utils import CacheLayerMixin, DynamicCache

    class FeatureAttentionCacheLayer(CacheLayerMixin):
        """One patched layer's cache: a :class:`~featattn.LinearAttentionState` (fp32 ``kv``
        ``[B, H, Dk, Dv]`` and ``z`` ``[B, H, Dk]``) and the number of tokens seen.  Its size does
        not depend on the number of tokens."""

        is_sliding = False
        is_compileable = False
        is_croppable = False
        supports_early_init = False

        def __init__(self, **kwargs):
            super().__init__()
            self.state: Optional[LinearAttentionState] = None
            self.seen = 0
            self.device = None

        # -- featattn
        def store(self, state: LinearAttentionState, new_tokens: int) -> None:
            self.state = state
            self.seen += int(new_tokens)
            self.device = state.kv.device
            self.is_initialized = True

        def nbytes(self) -> int:
            return 0 if self.state is None else self.state.nbytes()

        # -- CacheLayerMixin
        def lazy_initialization(self, *args, **kwargs) -> None:
            return None

        def update(self, *args, **kwargs):
            raise RuntimeError(
                "this cache layer belongs to a featattn-patched attention: it holds a recurrent "
                "state, not keys/values"
            )

        def get_mask_sizes(self, query_length, *args, **kwargs):
            if isinstance(query_length, torch.Tensor):  # older API: cache_position
                query_length = query_length.shape[-1]
            return self.seen + int(query_length), 0

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def get_max_cache_shape(self) -> int:
            return -1

        def reset(self) -> None:
            self.state, self.seen, self.is_initialized = None, 0, False

        def crop(self, tokens_to_remove: int) -> None:
            # 5.2x: a negative count to remove; 5.17 also accepts a positive target length
            if tokens_to_remove == 0 or (tokens_to_remove > 0 and tokens_to_remove >= self.seen):
                return
            raise NotImplementedError(
                "a featattn recurrent state is a running sum and cannot drop tokens: cropping the "
                "cache (assisted / speculative decoding) is not supported"
            )

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.state is not None:
                self.state = self.state.index_select(0, beam_idx.to(self.state.kv.device))

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.state is not None:
                s = self.state
                self.state = LinearAttentionState(
                    s.kv.repeat_interleave(repeats, dim=0),
                    None if s.z is None else s.z.repeat_interleave(repeats, dim=0),
                )

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.state is not None:
                s = self.state
                self.state = LinearAttentionState(s.kv[indices], None if s.z is None else s.z[indices])

        def offload(self):
            if self.state is not None:
                self.state = self.state.to("cpu", non_blocking=True)

        def prefetch(self):
            if self.state is not None and self.device is not None and self.state.kv.device != self.device:
                self.state = self.state.to(self.device, non_blocking=True)

        def __repr__(self):
            shape = None if self.state is None else tuple(self.state.kv.shape)
            return f"FeatureAttentionCacheLayer(seen={self.seen}, kv={shape})"

    class FeatureAttentionCache(DynamicCache):
        """A ``DynamicCache`` whose patched layers hold a :class:`FeatureAttentionCacheLayer`.

        ``FeatureAttentionCache(model)`` for a patched model (unpatched layers, if any, keep
        ordinary growing key/value layers).  Passing one to ``generate()`` or ``forward()`` is
        optional: a patched model converts the empty layers of the ``DynamicCache`` that
        transformers creates by itself.
        """

        def __init__(self, model: Optional[nn.Module] = None, *, config=None, layers: Optional[Iterable[int]] = None):
            if model is not None:
                config = getattr(model, "config", config)
                if layers is None:
                    layers = patched_layers(model)
            if config is None:
                raise ValueError("FeatureAttentionCache needs a patched model (or config= and layers=)")
            if layers is None:
                record = getattr(config, CONFIG_KEY, None) or {}
                layers = record.get("layers", [])
            super().__init__(config=config)
            for i in sorted(set(int(i) for i in layers)):
                if len(self.layers) <= i:
                    if self.layer_class_to_replicate is None:
                        raise ValueError(f"layer {i} is out of range for this config")
                    while len(self.layers) < i:
                        self.layers.append(self.layer_class_to_replicate())
                    self.layers.append(FeatureAttentionCacheLayer())
                else:
                    self.layers[i] = FeatureAttentionCacheLayer()

        @property
        def states(self) -> dict:
            """``{layer_idx: LinearAttentionState or None}`` of the patched layers."""
            return {
                i: layer.state for i, layer in enumerate(self.layers)
                if isinstance(layer, FeatureAttentionCacheLayer)
            }

        def nbytes(self) -> int:
            """Bytes held (recurrent states plus the keys/values of unpatched layers)."""
            return cache_nbytes(self)

    for cls in (FeatureAttentionCacheLayer, FeatureAttentionCache):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return FeatureAttentionCacheLayer, FeatureAttentionCache


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers cache: featattn states plus any key/value tensors."""
    if hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "store") and hasattr(layer, "nbytes"):
            total += layer.nbytes()
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cache_kwarg_name(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` / ``generate()`` take the cache and return it:
    ``"cache"`` (transformers >= 5.2x) or ``"past_key_values"`` (5.17 and earlier)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# FeatureAttentionCache / FeatureAttentionCacheLayer are not in __all__ so that a star import
# does not import transformers; they are built on first access.
def __getattr__(name):  # PEP 562: the cache classes need transformers, so build them lazily
    if name == "FeatureAttentionCacheLayer":
        return _cache_classes()[0]
    if name == "FeatureAttentionCache":
        return _cache_classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- the base-model hook


def _base_model_pre_hook(module, args, kwargs):
    """Runs before the base model's forward (LlamaModel, GPT2Model, ...).

    With a 2-D ``attention_mask`` covering ``past + T`` tokens it
      * hands the decoder layers the key mask of the current tokens (:data:`PADDING_KWARG`,
        ``False`` when nothing is padded), so the patched attention zeroes padded keys;
      * when the mask has zeros and no ``position_ids`` were given, sets
        ``position_ids = cumsum(mask) - 1`` (0 on padding), as ``generate()`` does, so rotary /
        learned positions of a padded sequence match the unpadded run.
    """
    names = _param_names(type(module).forward)
    npos = min(len(args), len(names))

    def get(name):
        if name in kwargs:
            return kwargs[name]
        if name in names[:npos]:
            return args[names.index(name)]
        return None

    mask = get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    ids, embeds = get("input_ids"), get("inputs_embeds")
    if isinstance(ids, torch.Tensor):
        T = ids.shape[-1]
    elif isinstance(embeds, torch.Tensor):
        T = embeds.shape[1]
    else:
        return None
    cache = get("cache")
    if cache is None:
        cache = get("past_key_values")
    B = ids.shape[0] if isinstance(ids, torch.Tensor) else embeds.shape[0]
    if mask.shape[-1] != _seq_length(cache) + T or mask.shape[0] != B:
        return None
    keep = mask != 0
    flags = torch.stack([(~keep).any(), (~keep[:, -T:]).any()]).tolist()  # one sync
    any_pad, current_pad = bool(flags[0]), bool(flags[1])
    kwargs = dict(kwargs)
    kwargs[PADDING_KWARG] = keep[:, -T:] if current_pad else False
    if any_pad and get("position_ids") is None:
        pos = (keep.long().cumsum(-1) - 1).masked_fill(~keep, 0)[:, -T:]
        if "position_ids" in names[:npos]:
            args = list(args)
            args[names.index("position_ids")] = pos
            args = tuple(args)
        else:
            kwargs["position_ids"] = pos
    return args, kwargs


def _install_hook(base: nn.Module) -> None:
    if any(fn is _base_model_pre_hook for fn in base._forward_pre_hooks.values()):
        return
    base.register_forward_pre_hook(_base_model_pre_hook, with_kwargs=True)


def _remove_hook(base: nn.Module) -> None:
    for hid, fn in list(base._forward_pre_hooks.items()):
        if fn is _base_model_pre_hook:
            del base._forward_pre_hooks[hid]
            base._forward_pre_hooks_with_kwargs.pop(hid, None)


# --------------------------------------------------------------------------- patch / unpatch


def _resolve(model):
    """(family, base model, decoder layers) of a supported model, else a clear error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_hf_model expects a transformers model (an nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    fam = _FAMILIES.get(model_type)
    if fam is None:
        raise NotImplementedError(
            f"patch_hf_model does not support {type(model).__name__} (model_type={model_type!r}); "
            f"supported families: {_supported_text()}"
        )
    if getattr(config, "add_cross_attention", False):
        raise NotImplementedError("patch_hf_model does not support models with cross-attention")
    base = getattr(model, "base_model", model)
    layers = getattr(base, fam.layers_attr, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise NotImplementedError(
            f"{type(model).__name__} has no decoder layers at .{fam.layers_attr}; supported: "
            f"{_supported_text()} (a causal LM or its base model)"
        )
    return fam, base, layers


def _attn_sizes(fam: _Family, attn: nn.Module, config):
    if fam.model_type == "gpt2":
        if getattr(attn, "is_cross_attention", False) or not hasattr(attn, "c_attn"):
            raise NotImplementedError("only GPT-2 self-attention (c_attn/c_proj) can be patched")
        heads = int(getattr(attn, "num_heads", config.num_attention_heads))
        head_dim = int(getattr(attn, "head_dim", config.hidden_size // heads))
        return heads, heads, head_dim
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, name):
            raise NotImplementedError(
                f"{type(attn).__name__} has no {name}: not a {fam.model_type} attention featattn knows"
            )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(attn, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def _map_class_path(cls) -> str:
    """Registry name of a map class when registered under it, else ``module:QualName``."""
    name = getattr(cls, "name", None)
    if isinstance(name, str) and _registry._REGISTRY.get(name) is cls:
        return name
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_map_spec(spec):
    """A recorded spec (registry name or ``module:QualName``) -> a name or a FeatureMap class."""
    if not isinstance(spec, str):
        return spec
    if ":" in spec and spec not in _registry._REGISTRY:
        mod, _, qual = spec.partition(":")
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj
    return spec


def _check_positive_float(name: str, val, default: str) -> float:
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise TypeError(
            f"{name} must be a finite float > 0, got {type(val).__name__} {val!r}; "
            f"the default is {default}"
        )
    if not (math.isfinite(val) and val > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {val!r}; the default is {default}")
    return float(val)


def _check_feature_map(feature_map, feature_map_kwargs):
    """The recorded spec of ``feature_map`` (registry name or ``module:QualName``), after
    checking it and ``feature_map_kwargs`` without building anything."""
    if isinstance(feature_map, str):
        if feature_map not in list_feature_maps():
            raise ValueError(
                f"feature_map: unknown feature map {feature_map!r}; known feature maps: "
                f"{', '.join(list_feature_maps())} (or pass a FeatureMap class or instance)"
            )
        spec = feature_map
    elif isinstance(feature_map, FeatureMap):
        spec = _map_class_path(type(feature_map))
    elif isinstance(feature_map, type) and issubclass(feature_map, FeatureMap):
        spec = _map_class_path(feature_map)
    else:
        raise TypeError(
            "feature_map must be a registered name (one of "
            f"{', '.join(list_feature_maps())}), a FeatureMap subclass or a FeatureMap instance, "
            f"got {type(feature_map).__name__} {feature_map!r}"
        )
    if feature_map_kwargs is not None:
        if not isinstance(feature_map_kwargs, Mapping):
            raise TypeError(
                f"feature_map_kwargs must be a dict or None, got {type(feature_map_kwargs).__name__} "
                f"{feature_map_kwargs!r}; e.g. feature_map_kwargs={{'feature_dim': 64}}"
            )
        bad = [k for k in feature_map_kwargs if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"feature_map_kwargs keys must be str (constructor argument names), got {bad!r}"
            )
        if feature_map_kwargs and isinstance(feature_map, FeatureMap):
            raise ValueError(
                f"feature_map_kwargs={dict(feature_map_kwargs)!r} only applies when feature_map is "
                f"a name or a class, got an instance of {type(feature_map).__name__}; configure "
                "the instance itself, or pass its class"
            )
    return spec


def _build_map(spec, head_dim: int, heads: int, kv_heads: int, kwargs: Optional[dict]) -> FeatureMap:
    kwargs = dict(kwargs or {})
    if isinstance(spec, FeatureMap):
        if kwargs:
            raise ValueError("feature_map_kwargs only applies when feature_map is a name or a class")
        return copy.deepcopy(spec)
    if isinstance(spec, str):
        if spec not in list_feature_maps():
            get_feature_map(spec)  # raises the registry's "unknown feature map" error
        cls = _registry._REGISTRY[spec]
    elif isinstance(spec, type) and issubclass(spec, FeatureMap):
        cls = spec
    else:
        raise TypeError(
            "feature_map must be a registered name (one of "
            f"{', '.join(list_feature_maps())}), a FeatureMap subclass or a FeatureMap instance, "
            f"got {type(spec).__name__}"
        )
    params = inspect.signature(cls.__init__).parameters
    for key, val in (("head_dim", head_dim), ("heads", heads), ("kv_heads", kv_heads)):
        if key in params and key not in kwargs:
            kwargs[key] = val
    try:
        fm = cls(**kwargs)
    except TypeError as e:  # an unknown or missing constructor argument
        raise TypeError(
            f"feature_map_kwargs: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
            f"failed: {e}; pass only arguments of {cls.__name__}{inspect.signature(cls.__init__)}"
        ) from e
    if not isinstance(fm, FeatureMap):
        raise TypeError(f"{cls.__name__} did not build a FeatureMap")
    return fm


def _normalize_layers(layers, n: int) -> list:
    if layers is None:
        return list(range(n))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    # a str is iterable, and would otherwise be read one character at a time
    if isinstance(layers, (str, bytes)) or not isinstance(layers, abc.Iterable):
        raise TypeError(
            f"layers must be None, an int or a list of ints (decoder-layer indices), got "
            f"{type(layers).__name__} {layers!r}; e.g. layers=[0, -1]"
        )
    layers = list(layers)
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(
                f"layers must be None, an int or a list of ints, got an element "
                f"{type(i).__name__} {i!r} in layers={layers!r}; e.g. layers=[0, -1]"
            )
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(
                f"layers: index {i} is out of range for a model with {n} decoder layers; "
                f"use -{n} .. {n - 1}"
            )
        if j in out:
            raise ValueError(f"layers: layer {j} is listed twice in layers={layers!r}; list each once")
        out.append(j)
    if not out:
        raise ValueError("layers is empty: nothing to patch; pass None for every layer")
    return sorted(out)


def _patched_modules(model) -> dict:
    """``{layer_idx: HFFeatureAttention}`` of a model."""
    out = {}
    for m in model.modules():
        if isinstance(m, HFFeatureAttention):
            out[m.layer_idx] = m
    return out


def is_patched(model: nn.Module) -> bool:
    """True when some decoder layer of ``model`` runs featattn's patched attention."""
    return any(isinstance(m, HFFeatureAttention) for m in model.modules())


def patched_layers(model: nn.Module) -> list:
    """Indices of the patched decoder layers (empty when the model is not patched)."""
    return sorted(_patched_modules(model))


def patch_hf_model(
    model: nn.Module,
    feature_map: Union[str, FeatureMap, type] = "taylor",
    *,
    layers: Optional[Iterable[int]] = None,
    normalize: bool = True,
    eps: float = 1e-6,
    feature_map_kwargs: Optional[dict] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace softmax self-attention by feature attention, in place; returns ``model``.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``GPT2LMHeadModel`` (or their base ``*Model``).  Any other model raises
            ``NotImplementedError`` naming the supported families.
        feature_map: a registered name (``"taylor"``, ``"elu"``, ``"hedgehog"``, ...), a
            :class:`~featattn.FeatureMap` subclass, or an instance (deep-copied into each
            layer).  Each patched layer gets its own map as the submodule
            ``<attention>.feature_map``; a map constructor taking ``head_dim``, ``heads`` or
            ``kv_heads`` gets the layer's sizes.
        layers: decoder-layer indices to patch (negative ones count from the end); None: all.
        normalize, eps: as in :func:`featattn.linear_attention`.
        feature_map_kwargs: extra constructor arguments of the map (JSON-serialisable: they are
            recorded in the config).
        scale: what q is multiplied by before the map.  Default: the model's own softmax
            scaling (``attention.scaling``, ``1/sqrt(head_dim)``), except for the Taylor map,
            which has ``1/sqrt(d)`` built in and gets ``scaling * sqrt(d)`` (= 1).
        backend: passed to :func:`featattn.linear_attention`.

    The patch is recorded in ``model.config.featattn`` (saved by ``save_pretrained``); after
    ``from_pretrained`` re-apply it with :func:`repatch_hf_model`.  Patching a model that is
    already patched raises ``RuntimeError`` (call :func:`unpatch_hf_model` first).

    The model also gets a forward pre-hook on its base model: with a 2-D ``attention_mask``
    that has padding and no ``position_ids``, positions are computed from the mask as
    ``generate()`` does (``cumsum(mask) - 1``), and the key padding is handed to the patched
    layers.
    """
    _require_transformers()
    fam, base, decoder_layers = _resolve(model)
    if is_patched(model):
        raise RuntimeError(
            f"this model is already patched (layers {patched_layers(model)}); call "
            "featattn.hf.unpatch_hf_model(model) first to patch it differently"
        )
    # every argument is checked, and the config record built, before the first module is
    # replaced: a bad argument must leave the model exactly as it was
    map_spec = _check_feature_map(feature_map, feature_map_kwargs)
    if not isinstance(normalize, bool):
        raise TypeError(
            f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}; "
            "pass True (the default) or False"
        )
    eps = _check_positive_float("eps", eps, "1e-6")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(
                f"scale must be None or a real number, got {type(scale).__name__} {scale!r}; "
                "pass None for the model's own softmax scaling, or a float such as 0.125"
            )
        if not math.isfinite(scale):
            raise ValueError(
                f"scale must be None or a finite number, got {scale!r}; pass None for the "
                "model's own softmax scaling"
            )
        scale = float(scale)
    if not isinstance(backend, str) or backend not in BACKENDS:
        err = ValueError if isinstance(backend, str) else TypeError
        raise err(
            f"backend must be one of {', '.join(map(repr, BACKENDS))}, got "
            f"{type(backend).__name__} {backend!r}; 'auto' picks the kernel per call"
        )
    idxs = _normalize_layers(layers, len(decoder_layers))
    config = model.config
    record = {
        "feature_map": map_spec,
        "feature_map_kwargs": dict(feature_map_kwargs) if feature_map_kwargs else None,
        "layers": idxs,
        "normalize": normalize,
        "eps": eps,
        "scale": scale,
        "backend": backend,
        "featattn_version": _version(),
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"feature_map_kwargs must be JSON-serialisable (the patch is recorded in config.json), "
            f"got {feature_map_kwargs!r}: {e}; pass plain numbers, strings, lists and dicts"
        ) from None

    new_modules = {}
    for i in idxs:
        layer = decoder_layers[i]
        attn = getattr(layer, fam.attn_attr, None)
        if attn is None:
            raise NotImplementedError(f"decoder layer {i} has no .{fam.attn_attr}")
        heads, kv_heads, head_dim = _attn_sizes(fam, attn, config)
        fm = _build_map(feature_map, head_dim, heads, kv_heads, feature_map_kwargs)
        fm.output_dim(head_dim)  # a map built for another head dim raises here
        ref = _first_tensor(attn)
        if ref is not None:
            fm.to(device=ref.device)
            if ref.is_floating_point():
                fm.to(dtype=ref.dtype)
        new_modules[i] = HFFeatureAttention(
            attn, family=fam.model_type, layer_idx=i, feature_map=fm, heads=heads,
            kv_heads=kv_heads, head_dim=head_dim, normalize=normalize, eps=eps,
            scale=scale, backend=backend,
        )
        new_modules[i].train(attn.training)
    for i, new in new_modules.items():
        setattr(decoder_layers[i], fam.attn_attr, new)
    _install_hook(base)
    setattr(config, CONFIG_KEY, record)
    return model


def _first_tensor(module: nn.Module):
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return None


def _version() -> str:
    from .. import __version__

    return __version__


def unpatch_hf_model(model: nn.Module) -> nn.Module:
    """Put the original softmax attention modules back, in place; returns ``model``.

    The originals get the (shared) projections back as they are now, fine-tuning included;
    the feature maps are dropped, as are the pre-forward hook and ``model.config.featattn``.
    Raises ``RuntimeError`` when the model is not patched.
    """
    fam, base, decoder_layers = _resolve(model)
    mods = _patched_modules(model)
    if not mods:
        raise RuntimeError("this model is not patched by featattn: nothing to unpatch")
    for layer in decoder_layers:
        new = getattr(layer, fam.attn_attr, None)
        if not isinstance(new, HFFeatureAttention):
            continue
        orig = new.original
        for name in list(orig._modules):
            orig._modules[name] = new._modules.get(name)
        for name in list(orig._parameters):
            orig._parameters[name] = new._parameters.get(name)
        for name in list(orig._buffers):
            orig._buffers[name] = new._buffers.get(name)
        orig.train(new.training)
        setattr(layer, fam.attn_attr, orig)
    _remove_hook(base)
    if hasattr(model.config, CONFIG_KEY):
        try:
            delattr(model.config, CONFIG_KEY)
        except AttributeError:  # pragma: no cover
            setattr(model.config, CONFIG_KEY, None)
    return model


# --------------------------------------------------------------------------- save / load


def _feature_map_keys(model) -> list:
    keys = []
    for name, m in model.named_modules():
        if isinstance(m, HFFeatureAttention):
            keys += [f"{name}.feature_map.{k}" for k in m.feature_map.state_dict()]
    return keys


def _read_tensors(checkpoint, wanted: set) -> dict:
    """The tensors named in ``wanted`` from a state dict, a checkpoint file or a directory
    written by ``save_pretrained`` (safetensors, sharded or not, or pytorch_model.bin)."""
    if isinstance(checkpoint, Mapping):
        return {k: v for k, v in checkpoint.items() if k in wanted}
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        files = []
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(path, index)):
                with open(os.path.join(path, index)) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({os.path.join(path, weight_map[k]) for k in wanted if k in weight_map})
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if os.path.isfile(os.path.join(path, single)):
                    files = [os.path.join(path, single)]
                    break
            else:
                raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"checkpoint {path!r} is neither a directory nor a file")
    out = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    if k in wanted:
                        out[k] = fh.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in sd.items() if k in wanted})
    return out


def load_feature_maps(model: nn.Module, checkpoint) -> list:
    """Load the feature-map parameters/buffers of a patched model from ``checkpoint`` (a
    ``save_pretrained`` directory, a weights file or a state dict); returns the keys loaded.
    Raises ``KeyError`` naming any feature-map tensor the checkpoint lacks."""
    keys = _feature_map_keys(model)
    if not keys:
        return []
    prefix = getattr(model, "base_model_prefix", "") or ""
    # a checkpoint saved from the causal LM and loaded into the base model, or vice versa
    aliases = {}
    for k in keys:
        aliases[k] = k
        if prefix:
            aliases[f"{prefix}.{k}"] = k
            if k.startswith(prefix + "."):
                aliases[k[len(prefix) + 1:]] = k
    found = _read_tensors(checkpoint, set(aliases))
    sd = {aliases[k]: v for k, v in found.items()}
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(
            f"the checkpoint has no feature-map weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
            "was it saved from a patched model with the same feature map?"
        )
    model.load_state_dict(sd, strict=False)
    return sorted(sd)


def repatch_hf_model(
    model: nn.Module,
    checkpoint=None,
    *,
    feature_map: Union[None, str, FeatureMap, type] = None,
) -> nn.Module:
    """Re-apply the patch recorded in ``model.config.featattn`` (after ``from_pretrained``).

    ``from_pretrained`` builds the softmax model and drops the saved feature-map weights as
    unexpected keys; this patches the recorded layers with the recorded map and settings, then
    loads those weights from ``checkpoint`` (the ``save_pretrained`` directory, a weights file or
    a state dict).  When ``checkpoint`` is None it is ``model.config._name_or_path`` if that is a
    local directory; a map with parameters and no checkpoint to read them from raises
    ``ValueError`` (and leaves the model unpatched).  ``feature_map=`` overrides the recorded map
    (needed for a map that is neither registered nor importable).
    """
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(record, Mapping) or not record.get("layers"):
        raise ValueError(
            "model.config has no featattn record: this model was not saved from a patched model; "
            "use featattn.hf.patch_hf_model(model, ...) instead"
        )
    record = dict(record)
    spec = feature_map if feature_map is not None else _resolve_map_spec(record["feature_map"])
    kwargs = record.get("feature_map_kwargs") if not isinstance(spec, FeatureMap) else None
    patch_hf_model(
        model, spec, layers=record["layers"], normalize=record.get("normalize", True),
        eps=record.get("eps", 1e-6), feature_map_kwargs=kwargs, scale=record.get("scale"),
        backend=record.get("backend", "auto"),
    )
    if not _feature_map_keys(model):
        return model
    if checkpoint is None:
        guess = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        if guess and os.path.isdir(guess):
            checkpoint = guess
    if checkpoint is None:
        unpatch_hf_model(model)
        setattr(model.config, CONFIG_KEY, record)
        raise ValueError(
            "the recorded feature map has parameters: pass checkpoint=<the save_pretrained directory> "
            "so that repatch_hf_model can load them"
        )
    try:
        load_feature_maps(model, checkpoint)
    except Exception:
        unpatch_hf_model(model)
        setattr(model.config, CONFIG_KEY, record)
        raise
    return model


def load_patched_hf_model(path, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` then :func:`repatch_hf_model` with the
    feature-map weights from ``path``.  ``model_class`` defaults to ``AutoModelForCausalLM``."""
    _require_transformers()
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    return repatch_hf_model(model, checkpoint=path if os.path.isdir(os.fspath(path)) else None)



# --------------------------------------------------------------------------- attention transfer

#: the ``loss=`` values :func:`transfer_attention` accepts
TRANSFER_LOSSES = ("mse", "xent", "mse+xent")


class _StopForward(Exception):
    """Raised after the last layer being trained: the rest of the model is not needed."""


@dataclass
class TransferResult:
    """What :func:`transfer_attention` returns.

    ``losses[layer_idx][step]`` is the transfer loss of that patched layer at that step (before
    the step's update); ``total`` sums the layers per step.  ``initial`` / ``final`` average each
    layer's loss over the first / last tenth of the steps (at least one step), which smooths the
    batch-to-batch noise.
    """

    losses: dict
    loss: str
    steps: int
    seconds: float

    @property
    def total(self) -> list:
        """Sum over layers of the loss, per step."""
        return [sum(per[s] for per in self.losses.values()) for s in range(self.steps)]

    def _window(self) -> int:
        return max(1, self.steps // 10)

    @property
    def initial(self) -> dict:
        """``{layer_idx: mean loss over the first tenth of the steps}``."""
        n = self._window()
        return {i: sum(per[:n]) / len(per[:n]) for i, per in self.losses.items() if per}

    @property
    def final(self) -> dict:
        """``{layer_idx: mean loss over the last tenth of the steps}``."""
        n = self._window()
        return {i: sum(per[-n:]) / len(per[-n:]) for i, per in self.losses.items() if per}

    def __str__(self) -> str:
        init, fin = self.initial, self.final
        rows = [f"attention transfer ({self.loss}, {self.steps} steps, {self.seconds:.1f} s)"]
        rows += [f"  layer {i:>3}: {init[i]:.4g} -> {fin[i]:.4g}" for i in sorted(fin)]
        return "\n".join(rows)


class _TransferRun:
    """Installed on every patched layer during :func:`transfer_attention`: the layer returns the
    original softmax attention's output (so the model runs as the softmax model it was), and a
    layer being trained also computes its feature attention on the same inputs, its loss against
    the softmax one, and back-propagates it into its feature map."""

    def __init__(self, loss: str, train_layers, stop_after: Optional[int]):
        self.loss = loss
        self.train_layers = set(train_layers)
        self.stop_after = stop_after
        self.step_losses: dict = {}

    def layer_forward(self, attn: "HFFeatureAttention", bound: dict, key_mask):
        kwargs = {k: v for k, v in bound.items() if k != PADDING_KWARG}
        for name in ("cache", "past_key_values", "layer_past"):
            if name in kwargs:
                kwargs[name] = None
        with torch.no_grad():
            out = attn.original(**kwargs)
        target = out[0] if isinstance(out, tuple) else out
        if attn.layer_idx in self.train_layers:
            with torch.no_grad():
                q, k, v = attn.project(bound["hidden_states"], bound.get("position_embeddings"))
            with torch.enable_grad():
                value = _transfer_loss(attn, q, k, v, key_mask, target, self.loss)
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"attention transfer: the loss of layer {attn.layer_idx} is {value.item()}; "
                        "lower lr="
                    )
                value.backward()  # one independent graph per layer: freed right away
            self.step_losses[attn.layer_idx] = float(value.detach())
        if attn.layer_idx == self.stop_after:
            raise _StopForward
        return out


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_mean(x: torch.Tensor, query_mask) -> torch.Tensor:
    """Mean of ``x [B, ..., T]`` over real query positions (``query_mask [B, T]``)."""
    if query_mask is None:
        return x.mean()
    m = query_mask.to(device=x.device, dtype=x.dtype).view(query_mask.shape[0], *([1] * (x.dim() - 2)), -1)
    m = m.expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1)


def _transfer_loss(attn, q, k, v, key_mask, target, kind: str) -> torch.Tensor:
    parts = []
    if "mse" in kind.split("+"):
        pred = attn.output(attn.attend(q, k, v, key_mask))
        dt = _acc_dtype(target)
        err = (pred.to(dt) - target.to(dt)).pow(2).mean(-1)  # [B, T]
        parts.append(_masked_mean(err, key_mask))
    if "xent" in kind.split("+"):
        parts.append(_attention_kl(attn, q, k, key_mask))
    return parts[0] if len(parts) == 1 else sum(parts)


def _attention_kl(attn, q, k, key_mask) -> torch.Tensor:
    """Hedgehog's attention-weight loss: cross-entropy between the softmax weights (target, no
    grad) and the normalised linear weights ``phi(q_t).phi(k_s) / sum_s' phi(q_t).phi(k_s')``,
    minus the softmax entropy (so it is the KL divergence, 0 for a perfect fit: same gradient).
    Materialises ``[B, H, T, T]`` weights: meant for the short sequences of transfer."""
    dt = _acc_dtype(q)
    B, H, T, _ = q.shape
    g = attn.heads // attn.kv_heads
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_mask is not None:
        km = key_mask.to(device=q.device, dtype=torch.bool)
        eye = torch.eye(T, dtype=torch.bool, device=q.device)[None, None]
        # a padded query row keeps its diagonal so that every row is finite (it is not counted)
        allowed = (allowed & km[:, None, None, :]) | (eye & ~km[:, None, :, None])
    with torch.no_grad():
        logits = (q.to(dt) @ k.to(dt).repeat_interleave(g, dim=1).transpose(-1, -2)) * attn.scaling
        log_a = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        a = log_a.exp()
    fm = attn.feature_map
    fq = fm.forward_query(q * attn.q_scale if attn.q_scale != 1.0 else q).to(dt)
    fk = fm.forward_key(k).to(dt).repeat_interleave(g, dim=1)
    s = (fq @ fk.transpose(-1, -2)).masked_fill(~allowed, 0.0)
    tiny = torch.finfo(dt).tiny
    log_lin = s.clamp_min(tiny).log() - s.sum(-1, keepdim=True).clamp_min(tiny).log()
    kl = (a * (log_a - log_lin)).masked_fill(~allowed, 0.0).sum(-1)  # [B, H, T]
    return _masked_mean(kl, key_mask)


def _batch_inputs(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        inputs = {"input_ids": batch}
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
    else:
        raise TypeError(
            "each transfer batch must be an input_ids tensor [B, T] or a dict of model inputs "
            f"(input_ids, attention_mask, ...), got {type(batch).__name__}"
        )
    if device is not None:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:
        inputs["input_ids"] = ids[None]
    return inputs


def _batch_stream(batches, steps: Optional[int]):
    """(number of steps, iterator of batches): ``steps=None`` is one pass; otherwise the
    batches are cycled (a one-shot iterator that runs out raises)."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    if steps is None:
        items = list(batches)
        if not items:
            raise ValueError("transfer_attention got no batches")
        return len(items), iter(items)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")

    def gen():
        done = 0
        while True:
            it = iter(batches)
            reiterable = it is not batches
            got = 0
            for b in it:
                got += 1
                yield b
                done += 1
                if done >= steps:
                    return
            if got == 0 or not reiterable:
                raise ValueError(
                    f"the transfer batches ran out after {done} of {steps} steps: pass a list "
                    "(it is cycled), a longer iterator, or steps=None for one pass"
                )

    return int(steps), gen()


class _ProgressBar:
    """rich's progress bar on a terminal (when rich is installed), else a plain line to stderr
    every tenth of the run: works without a tty and without stdin."""

    def __init__(self, total: int, enabled: bool, description: str):
        self.total, self.enabled, self.description = total, enabled, description
        self._rich = self._task = None
        self._every = max(1, total // 10)
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._rich = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console,
                )
        except Exception:  # rich missing or unusable: plain lines
            self._rich = None
        if self._rich is not None:
            self._rich.start()
            self._task = self._rich.add_task(description, total=total, loss="-")

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=step, loss=f"{loss:.4g}")
        elif step % self._every == 0 or step == self.total:
            print(f"{self.description}: step {step}/{self.total}  loss {loss:.4g}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


def transfer_attention(
    model: nn.Module,
    batches,
    *,
    steps: Optional[int] = None,
    lr: float = 1e-2,
    loss: str = "mse",
    layers: Optional[Iterable[int]] = None,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    progress: bool = True,
) -> TransferResult:
    """Attention transfer: train the feature maps of a patched model to mimic its softmax attention.

    Each step runs the model once, with no gradient, *as the softmax model*: every patched layer
    returns its original softmax attention's output (``attn.original``), so each layer sees the
    hidden states of the model it was patched from.  A layer being trained also computes its
    feature attention on the same inputs and a loss against the softmax one; each layer's loss
    is back-propagated into its own feature map only, and one Adam step updates all of them.
    Layers are thus trained together, in one forward per step.  The forward stops after the last
    layer being trained.  Afterwards the model runs its linear path again, as before the call.

    Args:
        model: a model patched by :func:`patch_hf_model` with a learnable map (``"hedgehog"``).
        batches: an ``input_ids`` tensor ``[B, T]``, a dict of model inputs (``input_ids``,
            ``attention_mask``, ...; ``labels`` is ignored), or an iterable of either.  Padding
            given by ``attention_mask`` is left out of the loss.
        steps: number of optimiser steps; the batches are cycled (a one-shot iterator that runs
            out raises ``ValueError``).  None: one step per batch, one pass.
        lr: Adam learning rate.
        loss: ``"mse"``: mean squared error between the layer's outputs (after the output
            projection), linear vs softmax, averaged over tokens and hidden units.  ``"xent"``:
            Hedgehog's loss on the attention weights, the cross-entropy of the normalised linear
            weights ``phi(q_t).phi(k_s) / sum_s' phi(q_t).phi(k_s')`` under the softmax weights,
            reported minus the softmax entropy (i.e. the KL divergence, 0 for a perfect fit);
            it materialises ``[B, H, T, T]`` weights, so use short sequences.  ``"mse+xent"``:
            their sum (LoLCATs-style).
        layers: the patched layers to train (default: all of them).  All patched layers run
            softmax attention during transfer whether trained or not.
        weight_decay: Adam's (L2) weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over ``steps``).
        progress: show a progress bar: rich's on a terminal when rich is installed, otherwise a
            plain line on stderr every tenth of the run.

    Returns:
        a :class:`TransferResult`: ``.losses[layer_idx]`` (one float per step), ``.total``,
        ``.initial``, ``.final``; ``print()`` it for a summary.

    Only the feature-map parameters of the trained layers change: every other parameter has
    ``requires_grad`` off during the call and its ``.grad`` untouched; the ``requires_grad``
    flags and the train/eval mode of the model (and of the original attentions) are restored
    afterwards, and the feature maps' ``.grad`` is left as None.  Dropout is off during transfer.
    """
    _require_transformers()
    _resolve(model)
    mods = _patched_modules(model)
    if not mods:
        raise RuntimeError("transfer_attention needs a model patched by featattn.hf.patch_hf_model")
    if loss not in TRANSFER_LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, TRANSFER_LOSSES))}, got {loss!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if layers is None:
        train = sorted(mods)
    else:
        train = _normalize_layers(layers, len(_resolve(model)[2]))
        missing = [i for i in train if i not in mods]
        if missing:
            raise ValueError(f"layers {missing} are not patched (patched: {sorted(mods)})")
    fm_params = []
    for i in train:
        for p in mods[i].feature_map.parameters():
            if p.is_floating_point() and all(p is not q for q in fm_params):
                fm_params.append(p)
    if not fm_params:
        name = type(mods[train[0]].feature_map).__name__
        raise ValueError(
            f"the feature map ({name}) has no parameters to train: attention transfer needs a "
            "learnable map, e.g. patch_hf_model(model, 'hedgehog')"
        )
    n_steps, stream = _batch_stream(batches, steps)
    device = next(iter(fm_params)).device

    all_params = list(model.parameters())
    for m in mods.values():  # an original's parameters are the patched module's: nothing new
        all_params += [p for p in m.original.parameters()]
    flags = {id(p): (p, p.requires_grad) for p in all_params}
    modes = [(m, m.training) for m in model.modules()]
    modes += [(sub, sub.training) for m in mods.values() for sub in m.original.modules()]

    run = _TransferRun(loss, train, stop_after=max(train))
    result = {i: [] for i in train}
    bar = _ProgressBar(n_steps, bool(progress), f"attention transfer ({loss})")
    t0 = time.perf_counter()
    try:
        for p, _ in flags.values():
            p.requires_grad_(False)
        for p in fm_params:
            p.requires_grad_(True)
            p.grad = None
        model.eval()
        for m in mods.values():
            m.original.eval()
            m.__dict__["_transfer"] = run
        opt = torch.optim.Adam(fm_params, lr=float(lr), weight_decay=float(weight_decay))
        sched = None
        if lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, n_steps) / n_steps))
            )
        for step in range(1, n_steps + 1):
            inputs = _batch_inputs(next(stream), device)
            inputs["use_cache"] = False
            run.step_losses = {}
            with torch.no_grad():
                try:
                    model(**inputs)
                except _StopForward:
                    pass
            if set(run.step_losses) != set(train):  # pragma: no cover - a layer was skipped
                raise RuntimeError(
                    f"attention transfer: layers {sorted(set(train) - set(run.step_losses))} did "
                    "not run in the forward pass"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            for i in train:
                result[i].append(run.step_losses[i])
            bar.update(step, sum(run.step_losses.values()))
    finally:
        bar.close()
        for m in mods.values():
            m.__dict__.pop("_transfer", None)
        for p, flag in flags.values():
            p.requires_grad_(flag)
        for p in fm_params:
            p.grad = None
        for m, mode in modes:
            m.training = mode
    return TransferResult(losses=result, loss=loss, steps=n_steps, seconds=time.perf_counter() - t0)
