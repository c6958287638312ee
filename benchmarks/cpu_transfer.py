"""Attention transfer's cost on the CPU, at the sizes of examples/linearize_llama.py.

    python benchmarks/cpu_transfer.py              # pure linear and with a window of 8
    python benchmarks/cpu_transfer.py --window 0 --steps 100

Prints milliseconds per ``transfer_attention`` step (loss "xent", the example's random-init
Llama: hidden 64, 2 layers, 4 heads with 2 k/v heads, T = 64, batch 16, Hedgehog maps) and
per forward+backward of one layer's xent loss alone (``featattn.hf.transfer._attention_kl``),
each the minimum over ``--repeats`` runs (CPU timings spread: compare variants alternated).
One intra-op thread, as the example uses.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import linearize_llama as example  # noqa: E402

from featattn.hf import patch_hf_model, transfer_attention  # noqa: E402
from featattn.hf.transfer import _attention_kl  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    args = example.parse_args([])
    model = example.make_model(args)
    lang = example.Language.build(seed=0, vocab=args.vocab)
    data = example.batches_of(lang.sample(args.transfer_batch * 8, args.seq_len, seed=1),
                              args.transfer_batch)
    hd = args.hidden // args.heads
    q = torch.randn(args.transfer_batch, args.heads, args.seq_len, hd)
    k = torch.randn(args.transfer_batch, args.kv_heads, args.seq_len, hd)
    for w in a.window:
        patched = patch_hf_model(copy.deepcopy(model), "hedgehog", window=w)
        transfer_attention(patched, data, steps=3, loss="xent", progress=False)  # warm up
        step = loss = float("inf")
        attn = patched.model.layers[0].self_attn
        for _ in range(a.repeats):
            t = time.perf_counter()
            transfer_attention(patched, data, steps=a.steps, loss="xent", progress=False)
            step = min(step, (time.perf_counter() - t) / a.steps * 1e3)
            t = time.perf_counter()
            for _ in range(30):
                _attention_kl(attn, q, k, None).backward()
            loss = min(loss, (time.perf_counter() - t) / 30 * 1e3)
        print(f"window {w}: transfer step {step:.2f} ms, one layer's xent loss fwd+bwd "
              f"{loss:.2f} ms")


if __name__ == "__main__":
    main()
