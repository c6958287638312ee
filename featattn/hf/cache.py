"""The recurrent cache of :mod:`featattn.hf`: finding (or making) a patched layer's cache layer in
a transformers cache, :func:`cache_nbytes` and :func:`cache_kwarg_name`.  The cache classes
:class:`FeatureAttentionCacheLayer` and :class:`FeatureAttentionCache` subclass transformers'
classes, so they live in :mod:`featattn.hf._cache_types`, imported on first access of their names
(PEP 562 ``__getattr__``): importing this module never imports transformers.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

#: the cache classes built on first access (they need transformers)
_LAZY_CLASSES = ("FeatureAttentionCacheLayer", "FeatureAttentionCache")


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
            f"layer {layer_idx} of the {type(cache).__name__} already holds {seen} tokens of "
            "softmax keys/values: a patched model needs a fresh cache (or a "
            "featattn.hf.FeatureAttentionCache)"
        )
    new = layer_cls()
    layers[layer_idx] = new
    return new


def _cache_classes():
    """``(FeatureAttentionCacheLayer, FeatureAttentionCache)``, imported on first use: their module
    needs transformers (and raises the ``featattn[hf]`` ImportError without it)."""
    from . import _cache_types

    return _cache_types.FeatureAttentionCacheLayer, _cache_types.FeatureAttentionCache


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
    if name in _LAZY_CLASSES:
        return _cache_classes()[_LAZY_CLASSES.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
