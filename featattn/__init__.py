"""featattn: causal linear attention with pluggable feature maps and fused Triton kernels.

Shape legend used throughout: B batch, H query heads, Hkv key/value heads, T time,
Dqk raw q/k head dim, Dk expanded feature dim, Dv value head dim.
"""

from .dispatch import KernelChoice, select_kernel
from .feature_maps import (
    ElementwiseTritonForm,
    FeatureMap,
    get_feature_map,
    list_feature_maps,
    register_feature_map,
)
from .functional import linear_attention
from .hf import patch_hf_model, unpatch_hf_model
from .layers import FeatureAttention
from .state import LinearAttentionState

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "linear_attention",
    "LinearAttentionState",
    "FeatureAttention",
    "FeatureMap",
    "ElementwiseTritonForm",
    "register_feature_map",
    "get_feature_map",
    "list_feature_maps",
    "select_kernel",
    "KernelChoice",
    "patch_hf_model",
    "unpatch_hf_model",
]
