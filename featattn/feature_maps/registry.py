"""Name -> FeatureMap class registry."""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Type

from .base import FeatureMap

__all__ = ["register_feature_map", "get_feature_map", "list_feature_maps", "resolve_feature_map"]

_REGISTRY: Dict[str, Type[FeatureMap]] = {}


def register_feature_map(name: str, override: bool = False) -> Callable[[type], type]:
    """Class decorator registering a :class:`FeatureMap` subclass under ``name``.

    >>> @register_feature_map("square")          # doctest: +SKIP
    ... class Square(FeatureMap):
    ...     def output_dim(self, d): return d
    ...     def forward(self, x): return x * x

    Registering a name twice raises ``ValueError`` unless ``override=True``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"feature map name must be a non-empty str, got {name!r}")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, FeatureMap)):
            raise TypeError(
                f"register_feature_map({name!r}) decorates FeatureMap subclasses, got {cls!r}; "
                "subclass featattn.FeatureMap and implement forward and output_dim"
            )
        missing = [m for m in ("output_dim",) if getattr(cls, m) is getattr(FeatureMap, m)]
        if cls.forward is FeatureMap.forward and (
                cls.forward_query is FeatureMap.forward_query
                or cls.forward_key is FeatureMap.forward_key):
            missing.append("forward (or both forward_query and forward_key)")
        if missing:
            raise TypeError(f"register_feature_map({name!r}): {cls.__name__} does not implement "
                            f"{' and '.join(missing)}, which every feature map defines")
        if name in _REGISTRY and not override and _REGISTRY[name] is not cls:
            raise ValueError(
                f"a feature map named {name!r} is already registered ({_REGISTRY[name].__name__}); "
                "pick another name or pass override=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_feature_maps() -> list[str]:
    """Names of the registered feature maps, sorted."""
    return sorted(_REGISTRY)


def get_feature_map(name: str, **kwargs) -> FeatureMap:
    """Instantiate the feature map registered as ``name`` with ``kwargs``."""
    if not isinstance(name, str):
        raise TypeError(f"feature map name must be a str, got {type(name).__name__}")
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown feature map {name!r}; known feature maps: {', '.join(list_feature_maps())} "
            "(register your own with @featattn.register_feature_map)"
        ) from None
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        # e.g. a learnable map built by name, as linear_attention(feature_map="t2r") does:
        # Python's "missing 1 required positional argument" says neither what nor how
        sized = "head_dim" in inspect.signature(cls).parameters
        raise TypeError(
            f"feature map {name!r} ({cls.__name__}{inspect.signature(cls)}) cannot be built from "
            f"{kwargs or 'no arguments'}: {e}; "
            + (f"it is sized by the layer that owns it: use FeatureAttention(dim, heads, {name!r}) "
               f"or pass an instance, e.g. get_feature_map({name!r}, head_dim=64)"
               if sized else "pass the constructor arguments it takes")
        ) from None
    return cls(**kwargs)


def build_feature_map(
    name: str, head_dim: int, heads: int, kv_heads: int | None = None, **kwargs
) -> FeatureMap:
    """Like :func:`get_feature_map`, filling in ``head_dim`` / ``heads`` / ``kv_heads`` when the
    map's constructor takes them (learnable maps are sized by the layer that owns them)."""
    cls = _REGISTRY.get(name)
    if cls is not None:
        params = inspect.signature(cls.__init__).parameters
        filled = {"head_dim": head_dim, "heads": heads, "kv_heads": kv_heads}
        for key, val in filled.items():
            if key in params and key not in kwargs and val is not None:
                kwargs[key] = val
    return get_feature_map(name, **kwargs)


def check_map_fits(fm: FeatureMap, head_dim: int, heads: int, kv_heads: int, where: str) -> int:
    """``fm.output_dim(head_dim)`` after checking the map fits an attention of ``heads`` query
    and ``kv_heads`` key/value heads of dim ``head_dim`` (a map sized for other heads would
    only fail at the first forward): a ValueError/TypeError naming ``where``, else the feature
    dim."""
    name = f"{type(fm).__name__} ({getattr(fm, 'name', 'custom')!r})"
    # an attribute is read as the map's size only when its constructor takes that argument
    # (the layers fill head_dim / heads / kv_heads in by name); other maps may use the names
    # for something else
    params = inspect.signature(type(fm).__init__).parameters
    for attr, want in (("head_dim", head_dim), ("heads", heads), ("kv_heads", kv_heads)):
        if attr not in params:
            continue
        got = getattr(fm, attr, None)
        if isinstance(got, int) and not isinstance(got, bool) and got != want:
            raise ValueError(
                f"{where}: the feature map {name} was built for {attr}={got}, but the attention "
                f"has {attr}={want}; build it with {attr}={want} (or pass its name and let "
                f"{where} size it)")
    try:
        dk = fm.output_dim(head_dim)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the feature map {name} does not take head_dim={head_dim}: "
                         f"{e}") from None
    if isinstance(dk, bool) or not isinstance(dk, int) or dk < 1:
        raise TypeError(f"{where}: {name}.output_dim({head_dim}) must be an int >= 1, got "
                        f"{type(dk).__name__} {dk!r}")
    return dk


def resolve_feature_map(feature_map) -> FeatureMap | None:
    """None -> None, a name -> a fresh instance, a FeatureMap -> itself; else TypeError."""
    if feature_map is None or isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        return get_feature_map(feature_map)
    raise TypeError(
        "feature_map must be None, a registered name (one of "
        f"{', '.join(list_feature_maps())}) or a featattn.FeatureMap instance, "
        f"got {type(feature_map).__name__}"
    )
