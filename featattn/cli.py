"""Command line: ``featattn demo`` (``python -m featattn demo``)."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import FeatureAttention, list_feature_maps


def _model(vocab: int, dim: int, heads: int, fm: str, layers: int) -> nn.Module:
    blocks = [nn.Embedding(vocab, dim)]
    for _ in range(layers):
        blocks += [FeatureAttention(dim, heads, fm, normalize=fm != "identity"), nn.LayerNorm(dim)]
    blocks.append(nn.Linear(dim, vocab))
    return nn.Sequential(*blocks)


def _batch(gen, batch, seq_len, vocab):
    """Copy task: the second half of each sequence repeats the first half."""
    half = seq_len // 2
    x = torch.randint(1, vocab, (batch, half), generator=gen)
    seq = torch.cat([x, x], dim=1)
    return seq[:, :-1], seq[:, 1:]


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab, dim, heads = 16, 64, 4
    print(f"featattn demo on {device}: {args.steps} steps of a copy task, seq_len {args.seq_len}")
    rows = []
    for fm in args.feature_maps:
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = _model(vocab, dim, heads, fm, layers=2).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y = (t.to(device) for t in _batch(gen, 16, args.seq_len, vocab))
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        dt = time.perf_counter() - t0
        with torch.no_grad():
            x, y = (t.to(device) for t in _batch(gen, 64, args.seq_len, vocab))
            half = args.seq_len // 2
            acc = (model(x).argmax(-1)[:, half:] == y[:, half:]).float().mean().item()
        n_params = sum(p.numel() for p in model.parameters())
        toks = args.steps * 16 * (args.seq_len - 1) / dt
        rows.append((fm, loss.item(), acc, n_params, toks))
    print(f"{'feature map':<12} {'final loss':>10} {'copy acc':>9} {'params':>8} {'tokens/s':>10}")
    for fm, loss, acc, n, toks in rows:
        print(f"{fm:<12} {loss:>10.3f} {acc:>9.3f} {n:>8d} {toks:>10.0f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="featattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train tiny models, one per feature map, and compare")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--feature-maps", nargs="+", default=["elu", "taylor", "identity", "relu"],
                   choices=list_feature_maps())
    args = parser.parse_args(argv)
    return demo(args)
