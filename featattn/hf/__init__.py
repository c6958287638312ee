"""Linearise a Hugging Face ``transformers`` model: swap its softmax attention for feature
attention.

``patch_hf_model(model)`` replaces the self-attention of each selected decoder layer by a
:class:`HFFeatureAttention` that reuses the layer's own projections (the same ``nn.Module``
objects, so the weights are shared, not copied), its rotary embeddings, grouped k/v heads and
attention scaling, and runs :func:`featattn.linear_attention` on them.  ``generate()`` then keeps
one :class:`~featattn.LinearAttentionState` per patched layer in the cache instead of growing
key/value tensors: prefill runs the chunked kernel once, every new token is an O(1) update.

Supported families (:data:`SUPPORTED_FAMILIES`; docs/hf.md says what each keeps and drops):
Llama, Mistral, Mixtral, Qwen2, Qwen3, OLMo 2, Gemma 2, Gemma 3, Phi-3, GPT-NeoX (``*ForCausalLM`` and
their base ``*Model``) and GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``), with transformers 5.x (the ``past_key_values`` -> ``cache``
keyword rename of 5.2x included).  ``transformers`` is an optional dependency
(``pip install featattn[hf]``): importing this module never imports it, calling the functions does.

``transfer_attention(model, batches, steps=...)`` trains the feature maps of a patched model (a
learnable map such as ``"hedgehog"``), and nothing else, to mimic the softmax attention they
replace (Hedgehog / LoLCATs attention transfer).

See docs/hf.md for the workflow, attention transfer, the save/load round trip and the limitations.

The package is split along the module's sections: ``_common`` (families, config key,
``transformers`` check), ``attention`` (:class:`HFFeatureAttention`), ``cache`` (the recurrent
cache; the transformers-dependent classes in ``_cache_types``, built on first access), ``hooks``
(the base-model pre-forward hook), ``graphs`` (CUDA-graph decoding), ``patch`` (patch / unpatch), ``save`` (save / load) and
``transfer`` (attention transfer), and ``model`` (:class:`FeatureAttentionForCausalLM`, a ready
model class registered with the Auto classes; imported, with transformers, on first access of
its names).  This ``__init__`` re-exports their public names, and the
private ones the tests use.
"""

from __future__ import annotations

from . import cache as _cache
from ._common import CONFIG_KEY, PADDING_KWARG, SUPPORTED_FAMILIES
from .attention import HFFeatureAttention
from .cache import cache_kwarg_name, cache_nbytes
from .graphs import disable_cuda_graphs, enable_cuda_graphs
from .patch import is_patched, patch_hf_model, patched_layers, unpatch_hf_model
from .save import load_feature_maps, load_patched_hf_model, repatch_hf_model
from .transfer import TRANSFER_LOSSES, TransferResult, transfer_attention

# private names the tests use as featattn.hf._patched_modules / featattn.hf._attention_kl
from .patch import _patched_modules  # noqa: F401
from .transfer import _attention_kl  # noqa: F401

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
    "enable_cuda_graphs",
    "disable_cuda_graphs",
    "SUPPORTED_FAMILIES",
    "CONFIG_KEY",
    "PADDING_KWARG",
]


#: the model classes of featattn.hf.model, imported on first access (the module imports
#: transformers and registers them with AutoConfig / AutoModel / AutoModelForCausalLM)
_MODEL_CLASSES = (
    "FeatureAttentionConfig",
    "FeatureAttentionModel",
    "FeatureAttentionForCausalLM",
    "FeatureAttentionPreTrainedModel",
)


# FeatureAttentionCache / FeatureAttentionCacheLayer and the model classes are not in __all__ so
# that a star import does not import transformers; they are built on first access.
def __getattr__(name):  # PEP 562: these classes need transformers, so build them lazily
    if name in _cache._LAZY_CLASSES:
        return getattr(_cache, name)
    if name in _MODEL_CLASSES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
