"""Patch / unpatch for :mod:`featattn.hf`: :func:`patch_hf_model` (checking its arguments and
building one feature map per layer), :func:`unpatch_hf_model`, :func:`is_patched` and
:func:`patched_layers`, with the helpers that resolve a model's family, sizes and feature-map spec.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import numbers
from collections import abc
from typing import Iterable, Mapping, Optional, Union

from torch import nn

from ..dispatch import BACKENDS
from ..feature_maps import FeatureMap, get_feature_map, list_feature_maps
from ..feature_maps import registry as _registry
from ..feature_maps.registry import check_map_fits
from ._common import _FAMILIES, CONFIG_KEY, _Family, _require_transformers, _supported_text
from .attention import HFFeatureAttention
from .hooks import _install_hook, _remove_hook


def _resolve(model):
    """(family, base model, decoder layers) of a supported model, else a clear error."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            "patch_hf_model expects a transformers model (an nn.Module), got "
            f"{type(model).__name__}"
        )
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
    if fam.qkv == "c_attn":
        if getattr(attn, "is_cross_attention", False) or not hasattr(attn, "c_attn"):
            raise NotImplementedError("only GPT-2 self-attention (c_attn/c_proj) can be patched")
        heads = int(getattr(attn, "num_heads", config.num_attention_heads))
        head_dim = int(getattr(attn, "head_dim", config.hidden_size // heads))
        return heads, heads, head_dim
    if fam.qkv == "neox":
        if not (hasattr(attn, "query_key_value") and hasattr(attn, "dense")):
            raise NotImplementedError(f"{type(attn).__name__} has no query_key_value/dense: not "
                                      "a GPT-NeoX attention featattn knows")
        heads = int(config.num_attention_heads)
        return heads, heads, int(getattr(attn, "head_size", config.hidden_size // heads))
    names = ("qkv_proj", "o_proj") if fam.qkv == "fused" else ("q_proj", "k_proj", "v_proj", "o_proj")
    for name in names:
        if not hasattr(attn, name):
            raise NotImplementedError(
                f"{type(attn).__name__} has no {name}: not a {fam.model_type} attention "
                "featattn knows"
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
        raise ValueError(
            f"{name} must be a finite float > 0, got {val!r}; the default is {default}"
        )
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
                "feature_map_kwargs must be a dict or None, got "
                f"{type(feature_map_kwargs).__name__} "
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


def _build_map(
    spec, head_dim: int, heads: int, kv_heads: int, kwargs: Optional[dict]
) -> FeatureMap:
    kwargs = dict(kwargs or {})
    if isinstance(spec, FeatureMap):
        if kwargs:
            raise ValueError(
                "feature_map_kwargs only applies when feature_map is a name or a class"
            )
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
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise TypeError(
            f"feature_map_kwargs: {cls.__name__}({given}) "
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
            raise ValueError(
                f"layers: layer {j} is listed twice in layers={layers!r}; list each once"
            )
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
    window: int = 0,
) -> nn.Module:
    """Replace softmax self-attention by feature attention, in place; returns ``model``.

    Args:
        model: a causal LM (or its base ``*Model``) of a supported family
            (:data:`featattn.hf.SUPPORTED_FAMILIES`: Llama, Mistral, Mixtral, Qwen2, Qwen3,
            OLMo 2, Gemma 2, Gemma 3, Phi-3, GPT-NeoX, GPT-2; docs/hf.md says what each keeps
            and drops).
            Any other model raises ``NotImplementedError`` naming the supported families.
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
        window: 0, or W > 0 for the hybrid layer (LoLCATs): each patched layer keeps softmax
            attention (with the model's own scaling) over the last W tokens and uses linear
            attention for older ones, mixed per head by a learnable weight
            ``sigmoid(<attention>.window_logit)`` starting at 0.5 (docs/hybrid.md).  Padded
            batches are not supported with a window yet.

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
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no softmax window), got {window!r}")
    window = int(window)
    if window and not normalize:
        raise ValueError("window > 0 needs normalize=True (the softmax and linear parts share "
                         "one denominator)")
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
        "window": window,
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
        check_map_fits(fm, head_dim, heads, kv_heads, f"patch_hf_model (layer {i})")
        ref = _first_tensor(attn)
        if ref is not None:
            fm.to(device=ref.device)
            if ref.is_floating_point():
                fm.to(dtype=ref.dtype)
        new_modules[i] = HFFeatureAttention(
            attn, family=fam.model_type, layer_idx=i, feature_map=fm, heads=heads,
            kv_heads=kv_heads, head_dim=head_dim, normalize=normalize, eps=eps,
            scale=scale, backend=backend, window=window,
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
    the feature maps are dropped, as are the pre-forward hook, CUDA-graph decoding
    (:func:`~featattn.hf.enable_cuda_graphs`) and ``model.config.featattn``.
    Raises ``RuntimeError`` when the model is not patched.
    """
    fam, base, decoder_layers = _resolve(model)
    mods = _patched_modules(model)
    if not mods:
        raise RuntimeError("this model is not patched by featattn: nothing to unpatch")
    from .graphs import disable_cuda_graphs  # graphs imports this module

    disable_cuda_graphs(model)
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
