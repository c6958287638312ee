"""featattn: causal linear attention with pluggable feature maps and fused Triton kernels.

Shape legend used throughout: B batch, H query heads, Hkv key/value heads, T time,
Dqk raw q/k head dim, Dk expanded feature dim, Dv value head dim.
"""

from .dispatch import KernelChoice, select_kernel
from .feature_maps import (
    ElementwiseTritonForm,
    ProjectionTritonForm,
    FeatureMap,
    get_feature_map,
    list_feature_maps,
    register_feature_map,
)
from .functional import decode_step, linear_attention
from .layers import FeatureAttention
from .state import LinearAttentionState

__version__ = "0.1.0"

#: names served from featattn.hf, imported on first access so that ``import featattn`` never
#: imports the Hugging Face integration (a leaf the core does not need)
_HF_NAMES = (
    "patch_hf_model",
    "unpatch_hf_model",
    "repatch_hf_model",
    "load_patched_hf_model",
    "transfer_attention",
)

#: featattn.hf's model classes, served the same way; left out of ``__all__`` because they need
#: transformers (``from featattn import *`` must work without it)
_HF_MODEL_NAMES = (
    "FeatureAttentionConfig",
    "FeatureAttentionModel",
    "FeatureAttentionForCausalLM",
)

__all__ = [
    "__version__",
    "linear_attention",
    "decode_step",
    "LinearAttentionState",
    "FeatureAttention",
    "FeatureMap",
    "ElementwiseTritonForm",
    "ProjectionTritonForm",
    "register_feature_map",
    "get_feature_map",
    "list_feature_maps",
    "select_kernel",
    "KernelChoice",
    # featattn.hf's, served lazily (listed literally so that tools read them; the same as _HF_NAMES)
    "patch_hf_model",
    "unpatch_hf_model",
    "repatch_hf_model",
    "load_patched_hf_model",
    "transfer_attention",
]


def __getattr__(name):  # PEP 562: load featattn.hf only when one of its names is used
    if name in _HF_NAMES or name in _HF_MODEL_NAMES:
        from . import hf

        value = getattr(hf, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HF_NAMES) | set(_HF_MODEL_NAMES))
