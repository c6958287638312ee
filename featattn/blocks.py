"""Model pieces around :class:`featattn.FeatureAttention`, shared by the ``featattn demo`` recall
model and the Hugging Face model class (:mod:`featattn.hf.model`).

Plain PyTorch: nothing here imports transformers, so the demo (which must run without it) and the
``transformers`` model build from the same modules.

- :class:`SwiGLU`: the gated MLP of Llama-style decoders (the HF model's MLP).
- :class:`ShortConv`: a causal depthwise convolution over time (Based / Zoology's short conv).
- :class:`RecallBlock` and :class:`RecallModel`: the demo's model (short conv, attention and a GELU
  MLP per block, LayerNorm pre-norms), moved here from ``featattn.cli.demo`` unchanged: the same
  modules created in the same order, so a seed gives the same weights as before.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "ShortConv", "RecallBlock", "RecallModel", "swiglu_hidden_size"]


def swiglu_hidden_size(dim: int, multiple_of: int = 8) -> int:
    """The SwiGLU hidden width with about the parameters of a 4x GELU MLP: ``8 * dim / 3``,
    rounded up to a multiple of ``multiple_of``."""
    hidden = -(-8 * dim // 3)
    return -(-hidden // multiple_of) * multiple_of


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int, hidden: Optional[int] = None, *, bias: bool = False):
        super().__init__()
        hidden = swiglu_hidden_size(dim) if hidden is None else hidden
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ShortConv(nn.Module):
    """Causal depthwise convolution over time: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, dim: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x.transpose(1, 2), (self.kernel - 1, 0))).transpose(1, 2)


class RecallBlock(nn.Module):
    """The demo's block: ``x + ShortConv(LN x)``, ``x + attention(LN x)``, ``x + MLP(x)`` (the
    MLP's LayerNorm is its first layer)."""

    def __init__(self, dim: int, attention: nn.Module):
        super().__init__()
        self.norm_conv, self.conv = nn.LayerNorm(dim), ShortConv(dim)
        self.norm_attn, self.attn = nn.LayerNorm(dim), attention
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(self.norm_conv(x))
        x = x + self.attn(self.norm_attn(x))
        return x + self.mlp(x)


class RecallModel(nn.Module):
    """Embedding, ``layers`` blocks (short conv, attention, MLP), norm, vocabulary head."""

    def __init__(self, vocab: int, dim: int, layers: int, make_attention: Callable[[], nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(RecallBlock(dim, make_attention()) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
