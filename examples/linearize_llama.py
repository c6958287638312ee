"""Linearise a small Llama three ways and compare held-out loss (featattn attention transfer).

1. Train a small Llama (random init from ``LlamaConfig``) with softmax attention on a synthetic
   language generated in code: topic-dependent Markov text with copied spans (so the model needs
   both averaging attention, to infer the topic, and sharp content-based attention, to copy).
2. Linearise copies of it with ``featattn.hf.patch_hf_model``:
   * ``elu``: plain swap to the ``elu`` feature map;
   * ``hedgehog``: swap to the learnable ``hedgehog`` map, untrained (its identity init);
   * ``hedgehog + transfer``: the same, then ``featattn.hf.transfer_attention`` fits the maps
     to the softmax attention (nothing else is trained);
   * ``hedgehog + window + transfer``: the hybrid layer (``window=W``: softmax over the last W
     tokens, linear attention before them, LoLCATs), its maps and mixing weights transferred
     the same way.
3. Print the held-out loss of the softmax original and of each variant (same held-out batches,
   fixed seeds), and the gap to the original.

Run:  python examples/linearize_llama.py            (under a minute on 2 CPU cores)
      python examples/linearize_llama.py --quick    (a few seconds; a smoke test)

No downloads: the model is random-init and the data is generated from a fixed seed.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import dataclass

import torch

from featattn.hf import patch_hf_model, transfer_attention


# --------------------------------------------------------------------------- the synthetic language


@dataclass
class Language:
    """Topic-dependent Markov text with copied spans.

    Token 0 is BOS.  Each sequence picks one of ``topics`` topics; each topic has its own sparse
    bigram table (every token has ``branch`` possible successors with fixed probabilities).
    At each position, with probability ``copy_prob``, the sequence starts copying a span of
    ``copy_len`` tokens from a random earlier position (copied tokens are predictable from
    the earlier occurrence: an induction-head pattern).
    """

    successors: torch.Tensor   # [topics, vocab, branch] next-token candidates
    probs: torch.Tensor        # [topics, vocab, branch] their probabilities
    vocab: int
    copy_prob: float = 0.08
    copy_len: tuple = (4, 10)

    @classmethod
    def build(cls, seed: int = 0, vocab: int = 64, topics: int = 4, branch: int = 4, **kw) -> "Language":
        g = torch.Generator().manual_seed(seed)
        succ = torch.randint(1, vocab, (topics, vocab, branch), generator=g)
        probs = (torch.randn(topics, vocab, branch, generator=g) * 1.5).softmax(-1)
        return cls(succ, probs, vocab, **kw)

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """``[n, length]`` token ids (BOS first), deterministic given ``seed``."""
        g = torch.Generator().manual_seed(seed)
        topics, _, branch = self.successors.shape
        topic = torch.randint(0, topics, (n,), generator=g)
        out = torch.zeros(n, length, dtype=torch.long)
        out[:, 1] = torch.randint(1, self.vocab, (n,), generator=g)
        left = torch.zeros(n, dtype=torch.long)      # tokens still to copy
        src = torch.zeros(n, dtype=torch.long)       # position copied from
        rows = torch.arange(n)
        lo, hi = self.copy_len
        for t in range(2, length):
            prev = out[:, t - 1]
            choice = torch.multinomial(self.probs[topic, prev], 1, generator=g).squeeze(1)
            markov = self.successors[topic, prev, choice]
            start = (left == 0) & (torch.rand(n, generator=g) < self.copy_prob) & (t > 4)
            new_src = (torch.rand(n, generator=g) * (t - 2)).long() + 1   # in [1, t-2]
            src = torch.where(start, new_src, src)
            left = torch.where(start, torch.randint(lo, hi + 1, (n,), generator=g), left)
            copying = left > 0
            out[:, t] = torch.where(copying, out[rows, src.clamp(max=t - 1)], markov)
            src = torch.where(copying, src + 1, src)
            left = (left - 1).clamp(min=0)
        return out


# --------------------------------------------------------------------------- model, training, eval


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4 * args.seq_len,
        bos_token_id=0, eos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def batches_of(data: torch.Tensor, batch: int):
    return [data[i:i + batch] for i in range(0, len(data) - batch + 1, batch)]


def train_softmax(model, train_data, args, log) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, args.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.train_steps) / args.train_steps))
    )
    t0 = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        start = ((step - 1) * args.batch) % (len(train_data) - args.batch + 1)
        ids = train_data[start:start + args.batch]   # fresh sequences: one pass, no repeats
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % max(1, args.train_steps // 10) == 0 or step == args.train_steps:
            log(f"  softmax training: step {step}/{args.train_steps}  loss {loss.item():.3f}")
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, eval_batches) -> float:
    """Mean next-token cross-entropy (nats) over all held-out tokens."""
    model.eval()
    total, count = 0.0, 0
    for ids in eval_batches:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        count += target.numel()
    return total / count


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--copy-prob", type=float, default=0.08, help="chance per token of starting a copied span")
    p.add_argument("--feature-dim", type=int, default=None, help="hedgehog feature dim (default: head dim)")
    p.add_argument("--window", type=int, default=8,
                   help="softmax window of the hybrid variant (tokens; the sequence is --seq-len)")
    p.add_argument("--transfer-steps", type=int, default=300)
    p.add_argument("--transfer-lr", type=float, default=1e-2)
    p.add_argument("--transfer-loss", default="xent", choices=["mse", "xent", "mse+xent"])
    p.add_argument("--transfer-batch", type=int, default=16)
    p.add_argument("--eval-seqs", type=int, default=512)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the model is tiny, and a second thread "
                        "makes it many times slower on a busy machine); 0: torch's choice")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq_len = 32, 2, 32
        args.train_steps, args.transfer_steps, args.eval_seqs, args.batch = 60, 30, 64, 16
    return args


def main(argv=None, log=print) -> dict:
    """Run the example; returns ``{"losses": {variant: loss}, "gaps": ..., "transfer": TransferResult,
    "table": str, "seconds": ...}``."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    lang = Language.build(seed=args.seed, vocab=args.vocab, copy_prob=args.copy_prob)
    n_train = args.batch * args.train_steps
    train_data = lang.sample(n_train, args.seq_len, seed=args.seed + 100)
    eval_data = lang.sample(args.eval_seqs, args.seq_len, seed=args.seed + 200)   # held out
    eval_batches = batches_of(eval_data, 64)

    model = make_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"softmax Llama: {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
        f"({args.kv_heads} kv), {n_params / 1e3:.0f}k parameters; {n_train} training sequences of {args.seq_len}")
    train_s = train_softmax(model, train_data, args, log)

    losses = {"softmax (original)": evaluate(model, eval_batches)}
    fm_kwargs = {"feature_dim": args.feature_dim} if args.feature_dim else None

    elu = patch_hf_model(copy.deepcopy(model), "elu")
    losses["elu (plain swap)"] = evaluate(elu, eval_batches)

    hh = patch_hf_model(copy.deepcopy(model), "hedgehog", feature_map_kwargs=fm_kwargs)
    losses["hedgehog, no transfer"] = evaluate(hh, eval_batches)

    # transfer on training sequences (never the held-out ones)
    transfer_data = batches_of(train_data, args.transfer_batch)
    t0 = time.perf_counter()
    result = transfer_attention(
        hh, transfer_data, steps=args.transfer_steps, lr=args.transfer_lr, loss=args.transfer_loss,
        lr_schedule="cosine", progress=not args.no_progress,
    )
    transfer_s = time.perf_counter() - t0
    losses["hedgehog + transfer"] = evaluate(hh, eval_batches)

    hw = patch_hf_model(copy.deepcopy(model), "hedgehog", feature_map_kwargs=fm_kwargs,
                        window=args.window)
    t0 = time.perf_counter()
    window_result = transfer_attention(
        hw, transfer_data, steps=args.transfer_steps, lr=args.transfer_lr,
        loss=args.transfer_loss, lr_schedule="cosine", progress=not args.no_progress,
    )
    transfer_s += time.perf_counter() - t0
    wname = f"hedgehog + window {args.window} + transfer"
    losses[wname] = evaluate(hw, eval_batches)

    base = losses["softmax (original)"]
    gaps = {k: v - base for k, v in losses.items()}
    elu_gap = gaps["elu (plain swap)"]
    lines = [
        f"{'variant':<34}{'held-out loss':>14}{'gap':>9}{'gap / elu gap':>15}",
        "-" * 72,
    ]
    for k, v in losses.items():
        ratio = "" if k.startswith("softmax") else f"{gaps[k] / elu_gap:.2f}" if elu_gap > 0 else "n/a"
        gap = "" if k.startswith("softmax") else f"{gaps[k]:+.3f}"
        lines.append(f"{k:<34}{v:>14.3f}{gap:>9}{ratio:>15}")
    table = "\n".join(lines)
    seconds = time.perf_counter() - t_start
    log("")
    log(str(result))
    log("")
    log(table)
    ok = elu_gap > 0 and gaps["hedgehog + transfer"] <= 0.5 * elu_gap
    linear_gap = gaps["hedgehog + transfer"]
    window_ok = linear_gap > 0 and gaps[wname] <= 0.5 * linear_gap
    log("")
    note = " (--quick: too small to mean anything)" if args.quick else ""
    log(f"acceptance (transfer gap <= half the elu gap): {'holds' if ok else 'does NOT hold'}{note}")
    log(f"window (gap with the window <= half the pure-linear transferred gap: "
        f"{gaps[wname]:+.3f} vs {linear_gap:+.3f}): "
        f"{'holds' if window_ok else 'does NOT hold'}{note}")
    log(f"time: softmax training {train_s:.0f} s, transfer {transfer_s:.0f} s, total {seconds:.0f} s")
    return {"losses": losses, "gaps": gaps, "transfer": result, "table": table,
            "acceptance": ok, "window_transfer": window_result, "window_acceptance": window_ok,
            "seconds": seconds}


if __name__ == "__main__":
    main(sys.argv[1:])
