"""Feature maps and their registry.  Importing this package registers the built-in maps."""

from .base import ElementwiseTritonForm, FeatureMap
from .registry import (
    build_feature_map,
    get_feature_map,
    list_feature_maps,
    register_feature_map,
    resolve_feature_map,
)
from . import elu, hedgehog, identity, relu, squared_relu, taylor  # noqa: F401  (registration side effect)
from .elu import EluFeatureMap
from .hedgehog import HedgehogFeatureMap
from .identity import IdentityFeatureMap
from .relu import ReluFeatureMap
from .squared_relu import SquaredReluFeatureMap
from .taylor import TaylorFeatureMap, taylor_features

__all__ = [
    "FeatureMap",
    "ElementwiseTritonForm",
    "register_feature_map",
    "get_feature_map",
    "list_feature_maps",
    "build_feature_map",
    "resolve_feature_map",
    "EluFeatureMap",
    "HedgehogFeatureMap",
    "IdentityFeatureMap",
    "ReluFeatureMap",
    "SquaredReluFeatureMap",
    "TaylorFeatureMap",
    "taylor_features",
]
