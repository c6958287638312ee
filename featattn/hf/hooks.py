"""The base-model hook of :mod:`featattn.hf`: a forward pre-hook on the patched model's base model
that hands the decoder layers the key padding of the current tokens and, for padded input without
``position_ids``, computes positions from the attention mask as ``generate()`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import PADDING_KWARG
from .attention import _param_names
from .cache import _seq_length


def _base_model_pre_hook(module, args, kwargs):
    """Runs before the base model's forward (LlamaModel, GPT2Model, ...).

    With a 2-D ``attention_mask`` covering ``past + T`` tokens it
      * hands the decoder layers the key mask of the current tokens (:data:`PADDING_KWARG`,
        ``False`` when nothing is padded), so the patched attention zeroes padded keys;
      * when the mask has zeros and no ``position_ids`` were given, sets
        ``position_ids = cumsum(mask) - 1`` (0 on padding), as ``generate()`` does, so rotary /
        learned positions of a padded sequence match the unpadded run.

    A one-token call with ``position_ids`` (``generate()``'s decoding steps) is taken as a real
    token without reading the mask: reading it is a host synchronisation per step, which
    stalls eager decoding and breaks a ``torch.compile``d (CUDA-graph) step.  ``generate()``
    never steps a padding token; a caller stepping one by hand must leave ``position_ids``
    out so the mask is read.
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
    if T == 1 and get("position_ids") is not None:  # a decoding step: no host sync
        return args, {**kwargs, PADDING_KWARG: False}
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
