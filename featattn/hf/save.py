"""Save / load for :mod:`featattn.hf`: re-applying a recorded patch after ``from_pretrained``
(:func:`repatch_hf_model`, :func:`load_patched_hf_model`) and loading the feature-map weights from
a ``save_pretrained`` directory, a weights file or a state dict (:func:`load_feature_maps`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Union

import torch
from torch import nn

from ..feature_maps import FeatureMap
from ._common import _FAMILIES, CONFIG_KEY, _require_transformers
from .attention import HFFeatureAttention
from .patch import _resolve_map_spec, patch_hf_model, unpatch_hf_model


def _feature_map_keys(model) -> list:
    """The state-dict keys a patch adds: each map's tensors and, with a softmax window, the
    layer's ``window_logit``."""
    keys = []
    for name, m in model.named_modules():
        if isinstance(m, HFFeatureAttention):
            keys += [f"{name}.feature_map.{k}" for k in m.feature_map.state_dict()]
            if m.window:
                keys.append(f"{name}.window_logit")
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
                files = sorted(
                    {os.path.join(path, weight_map[k]) for k in wanted if k in weight_map}
                )
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
            f"the checkpoint has no feature-map weights for "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}; "
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
    if feature_map is None and not isinstance(record.get("feature_map"), str):
        raise ValueError(f"model.config.{CONFIG_KEY} names no feature map (got "
                         f"{record.get('feature_map')!r}): the record is damaged; pass "
                         f"feature_map= (the map the model was patched with)")
    try:
        spec = feature_map if feature_map is not None else _resolve_map_spec(record["feature_map"])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the recorded feature map {record['feature_map']!r} cannot be imported "
                         f"({type(e).__name__}: {e}); install the package that defines it, or "
                         f"pass feature_map= (an instance or class)") from None
    kwargs = record.get("feature_map_kwargs") if not isinstance(spec, FeatureMap) else None
    patch_hf_model(
        model, spec, layers=record["layers"], normalize=record.get("normalize", True),
        eps=record.get("eps", 1e-6), feature_map_kwargs=kwargs, scale=record.get("scale"),
        backend=record.get("backend", "auto"), window=record.get("window", 0),
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
            "the recorded feature map has parameters: pass checkpoint=<the save_pretrained "
            "directory> so that repatch_hf_model can load them"
        )
    try:
        load_feature_maps(model, checkpoint)
    except Exception:
        unpatch_hf_model(model)
        setattr(model.config, CONFIG_KEY, record)
        raise
    return model


#: ``from_pretrained`` keywords that say where config.json is (read first, for the record)
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
               "subfolder", "token", "trust_remote_code")


def _read_config(path, kwargs: dict):
    """The config ``from_pretrained(path, **kwargs)`` would start from: ``kwargs["config"]`` if
    it is a config object, else ``AutoConfig.from_pretrained`` of it or of ``path``."""
    from transformers import AutoConfig, PretrainedConfig  # the 4.x name, kept in 5.x

    given = kwargs.get("config")
    if isinstance(given, PretrainedConfig):
        return given
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    return AutoConfig.from_pretrained(given if given is not None else path, **hub)


def _concrete_class(model_class, config):
    """The ``PreTrainedModel`` subclass that ``model_class.from_pretrained`` builds for
    ``config``: ``model_class`` itself, or what an Auto class maps ``type(config)`` to."""
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    mapping = getattr(model_class, "_model_mapping", None)  # every transformers Auto class has it
    if not isinstance(model_class, type) or mapping is None:
        raise TypeError(
            "model_class must be a transformers model class (e.g. LlamaForCausalLM) or an Auto "
            f"class (e.g. AutoModelForCausalLM), got {model_class!r}"
        )
    try:
        found = mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"{model_class.__name__} has no model class for {type(config).__name__} "
            f"(model_type={getattr(config, 'model_type', None)!r}); pass model_class= explicitly"
        ) from None
    if isinstance(found, (list, tuple)):  # several classes for one config: pick by architectures
        names = set(getattr(config, "architectures", None) or ())
        found = next((c for c in found if c.__name__ in names), found[0])
    return found


def _feature_map_patterns(config) -> set:
    """Regexes (transformers matches them with ``re.search``) for the feature-map keys of the
    layers recorded in ``config.featattn``, wherever the layers sit (causal LM or base model
    keys).  Empty when the family is unknown: re-patching will then raise its own error."""
    record = getattr(config, CONFIG_KEY, None)
    fam = _FAMILIES.get(getattr(config, "model_type", None))
    layers = record.get("layers") if isinstance(record, Mapping) else None
    if fam is None or not isinstance(layers, (list, tuple)):
        return set()
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        return set()
    idx = "|".join(str(i) for i in sorted(set(layers)))
    return {
        rf"(^|\.){re.escape(fam.layers_attr)}\.({idx})\.{re.escape(fam.attn_attr)}\."
        r"(feature_map\.|window_logit$)"
    }


def load_patched_hf_model(path, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """``model_class.from_pretrained(path, **kwargs)`` then :func:`repatch_hf_model` with the
    feature-map weights from ``path``.  ``model_class`` defaults to ``AutoModelForCausalLM``.

    Quiet: ``from_pretrained`` does not report the saved feature-map weights as unexpected keys
    (the softmax model it builds has no feature maps); they are declared as keys to ignore
    for this load (transformers' ``_keys_to_ignore_on_load_unexpected``) and loaded by the
    re-patch, which raises ``KeyError`` if any is missing.  Any other unexpected or missing key
    is still reported.  With ``output_loading_info=True`` it returns ``(model, loading_info)``.
    Raises ``ValueError`` before loading any weights when the saved config has no featattn
    record (not saved from a patched model).
    """
    _require_transformers()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a save_pretrained directory or a model id (str or os.PathLike), "
            f"got {type(path).__name__}"
        )
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kwargs = dict(from_pretrained_kwargs)
    config = _read_config(path, kwargs)
    if not isinstance(getattr(config, CONFIG_KEY, None), Mapping):
        raise ValueError(
            f"the config of {os.fspath(path)!r} has no featattn record: it was not saved from a "
            "patched model; load it with from_pretrained and use featattn.patch_hf_model"
        )
    cls = _concrete_class(model_class, config)
    patterns = _feature_map_patterns(config) - set(cls._keys_to_ignore_on_load_unexpected or ())
    # transformers' extension point for checkpoint keys a class knows it does not load is the
    # class attribute _keys_to_ignore_on_load_unexpected (read by from_pretrained on the instance
    # it builds).  Set it on a throwaway subclass, not on ``cls``, so that no other load is
    # affected, and give the instance its own class back once the weights are in.
    quiet = type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_keys_to_ignore_on_load_unexpected":
            sorted(set(cls._keys_to_ignore_on_load_unexpected or ()) | patterns),
    })
    loaded = quiet.from_pretrained(path, **kwargs)
    model, info = loaded if kwargs.get("output_loading_info") else (loaded, None)
    if type(model) is quiet:
        model.__class__ = cls
    ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    if isinstance(ignored, set):  # set per instance by post_init: what a plain load would leave
        ignored -= patterns
    local = os.path.isdir(os.fspath(path))
    repatch_hf_model(model, checkpoint=path if local else None)
    return (model, info) if info is not None else model
