"""The transformers-dependent cache classes of :mod:`featattn.hf`:
:class:`FeatureAttentionCacheLayer` (one patched layer's recurrent state) and
:class:`FeatureAttentionCache` (a ``DynamicCache`` holding them).  Importing this module imports
transformers, so nothing imports it eagerly: :mod:`featattn.hf.cache` (and the package) load it on
first access of the two names.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ..state import LinearAttentionState
from ._common import CONFIG_KEY, _require_transformers
from .cache import cache_nbytes
from .patch import patched_layers

_require_transformers()
from transformers.cache_utils import CacheLayerMixin, DynamicCache  # noqa: E402


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
            self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.map(lambda t: t[indices])

    def offload(self):
        if self.state is not None:
            self.state = self.state.to("cpu", non_blocking=True)

    def prefetch(self):
        if (
            self.state is not None and self.device is not None
            and self.state.kv.device != self.device
        ):
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

    def __init__(
        self, model: Optional[nn.Module] = None, *, config=None,
        layers: Optional[Iterable[int]] = None,
    ):
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


# shown and pickled as featattn.hf.<name>, as when the classes were built inside featattn/hf.py
for _cls in (FeatureAttentionCacheLayer, FeatureAttentionCache):
    _cls.__module__ = __package__
del _cls
