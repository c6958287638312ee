"""Constructor-argument checks shared by the learnable / sized feature maps."""

from __future__ import annotations

from typing import Optional


def positive_int(map_name: str, arg: str, val, fix: str) -> int:
    """``val`` as an int >= 1, else TypeError (not an int) / ValueError (< 1) naming the map,
    the argument, what it expects, what it got and ``fix``."""
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(
            f"{map_name}: {arg} must be an int >= 1, got {type(val).__name__} {val!r}; {fix}"
        )
    if val < 1:
        raise ValueError(f"{map_name}: {arg} must be an int >= 1, got {val}; {fix}")
    return val


def head_counts(map_name: str, head_dim, heads, kv_heads: Optional[int]) -> tuple[int, int, int]:
    """Checked ``(head_dim, heads, kv_heads)``; kv_heads defaults to heads and must divide it
    (grouped-query attention: query head h reads kv head ``h // (heads // kv_heads)``)."""
    fix = ("FeatureAttention(dim, heads, ...) fills head_dim/heads/kv_heads in; "
           f"by hand: get_feature_map({map_name!r}, head_dim=64, heads=8)")
    head_dim = positive_int(map_name, "head_dim", head_dim, fix)
    heads = positive_int(map_name, "heads", heads, fix)
    kv_heads = heads if kv_heads is None else positive_int(map_name, "kv_heads", kv_heads, fix)
    if heads % kv_heads:
        raise ValueError(
            f"{map_name}: kv_heads must divide heads (grouped-query attention), got "
            f"heads={heads}, kv_heads={kv_heads}; pass kv_heads equal to heads or to a divisor of it"
        )
    return head_dim, heads, kv_heads


def check_bhtd(map_name: str, x, heads: int, head_dim: int, what: str):
    """A ``[B, heads, T, head_dim]`` floating-point tensor, else ValueError/TypeError."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{map_name} expects a torch.Tensor of {what}, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != heads or x.shape[-1] != head_dim:
        raise ValueError(
            f"{map_name} expects {what} of shape [B, {heads}, T, {head_dim}] (its parameters are "
            f"per head), got {tuple(x.shape)}; build the map with the layer's sizes"
        )
    if not x.is_floating_point():
        raise TypeError(f"{map_name} expects floating-point {what}, got {x.dtype}")


def check_input(map_name: str, x, head_dim: int) -> None:
    """A floating-point tensor whose last dim is the map's ``head_dim``, else TypeError /
    ValueError (for maps built for one head dim: performer, polysketch)."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{map_name} expects a floating-point torch.Tensor, got {got}")
    if x.shape[-1:] != (head_dim,):
        raise ValueError(
            f"{map_name} was built for head_dim={head_dim}, got input of shape "
            f"{tuple(x.shape)}; build one with head_dim={x.shape[-1] if x.dim() else 0}"
        )
