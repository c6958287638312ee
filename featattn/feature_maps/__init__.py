"""Feature maps and their registry.  Importing this package registers the built-in maps."""

from .base import ElementwiseTritonForm, FeatureMap, ProjectionTritonForm
from .registry import (
    build_feature_map,
    get_feature_map,
    list_feature_maps,
    register_feature_map,
    resolve_feature_map,
)
from . import (  # noqa: F401  (registration side effect)
    dpfp,
    elu,
    hedgehog,
    identity,
    performer,
    polysketch,
    rebased,
    relu,
    squared_relu,
    t2r,
    taylor,
)
from .dpfp import DPFPFeatureMap
from .elu import EluFeatureMap
from .hedgehog import HedgehogFeatureMap
from .identity import IdentityFeatureMap
from .performer import PerformerFeatureMap
from .polysketch import PolySketchFeatureMap
from .rebased import ReBasedFeatureMap
from .relu import ReluFeatureMap
from .squared_relu import SquaredReluFeatureMap
from .t2r import T2RFeatureMap
from .taylor import TaylorFeatureMap, taylor_features

__all__ = [
    "FeatureMap",
    "ElementwiseTritonForm",
    "ProjectionTritonForm",
    "register_feature_map",
    "get_feature_map",
    "list_feature_maps",
    "build_feature_map",
    "resolve_feature_map",
    "DPFPFeatureMap",
    "EluFeatureMap",
    "HedgehogFeatureMap",
    "IdentityFeatureMap",
    "PerformerFeatureMap",
    "PolySketchFeatureMap",
    "ReBasedFeatureMap",
    "ReluFeatureMap",
    "SquaredReluFeatureMap",
    "T2RFeatureMap",
    "TaylorFeatureMap",
    "taylor_features",
]
