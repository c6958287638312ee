"""``generate()`` speed of a patched Hugging Face model against the unpatched softmax model, in
one run: ms per new token (greedy) after a prompt, for each prompt length and batch size.

    python benchmarks/gpu_generate.py                      # the decoding issue's model (GPU, bf16)
    python benchmarks/gpu_generate.py --tiny --device cpu  # a smoke run of the harness
    python benchmarks/gpu_generate.py --windows 0,64       # hybrid (LoLCATs) models too

The model is a random-init Llama (hidden 1024, 12 layers, 16 heads, 4 kv heads, vocab 32000),
so no download is needed; the prompt is random tokens.  Per row: the prefill time (one forward
over the prompt, through ``generate(max_new_tokens=1)``) and the per-token time, measured as
``(time of generate(N new) - time of generate(1 new)) / (N - 1)`` so the prefill cancels (each
the fastest of three runs).
Before timing, each patched model's greedy tokens with the recurrent cache are checked against
``use_cache=False`` recomputation on a short prompt, and (CUDA) the same model with
``featattn.hf.enable_cuda_graphs`` against the eager one; "+ CUDA graphs" rows replay one
captured decoding step per token.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import featattn
from featattn.hf import enable_cuda_graphs


def build(args, device, dtype):
    import transformers

    if args.tiny:
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=1 << 16)
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                       num_hidden_layers=12, num_attention_heads=16,
                                       num_key_value_heads=4, max_position_embeddings=1 << 16)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device, dtype).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate_s(model, ids, n, device, repeats=3):
    """The fastest of ``repeats`` greedy generations of ``n`` new tokens, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def check(model, vocab, device):
    ids = torch.randint(1, vocab, (2, 12), device=device)
    a = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    b = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    return bool(torch.equal(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (smoke run)")
    ap.add_argument("--prompts", default="1024,16384")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64, help="new tokens per timed generate")
    ap.add_argument("--maps", default="elu,hedgehog")
    ap.add_argument("--windows", default="0",
                    help="softmax windows of the patched models (0: pure linear; e.g. 0,64)")
    ap.add_argument("--no-graphs", action="store_true",
                    help="no rows with featattn.hf.enable_cuda_graphs (CUDA only)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build(args, device, dtype)
    vocab = base.config.vocab_size
    models = {"softmax (unpatched)": base}
    variants = [(fm, int(w)) for w in args.windows.split(",") for fm in args.maps.split(",")]
    for fm, W in variants:
        m = featattn.patch_hf_model(copy.deepcopy(base), fm, window=W)
        name = f"{fm} window {W}" if W else fm
        print(f"{name}: cached greedy == recompute: {check(m, vocab, device)}", flush=True)
        models[f"patched {name}"] = m
        if device.type == "cuda" and not args.no_graphs:
            g = copy.deepcopy(m)
            enable_cuda_graphs(g)
            ids = torch.randint(1, vocab, (2, 40), device=device)
            with torch.no_grad():
                same = torch.equal(
                    g.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False),
                    m.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False))
            dec = g._featattn_graphs
            print(f"{name} + CUDA graphs: greedy == eager: {same}, replays "
                  f"{sum(e.replays for e in dec.entries.values())}, eager calls "
                  f"{dec.eager_reasons}", flush=True)
            models[f"patched {name} + CUDA graphs"] = g
    rows = []
    for T in (int(t) for t in args.prompts.split(",")):
        for B in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(1, vocab, (B, T), device=device)
            for name, m in models.items():
                try:
                    with torch.no_grad():
                        generate_s(m, ids, 2, device, repeats=1)  # warm-up
                        one = generate_s(m, ids, 1, device)
                        many = generate_s(m, ids, args.new, device)
                    per = (many - one) / (args.new - 1) * 1e3
                    rows.append((T, B, name, one * 1e3, per, B * 1e3 / per))
                except torch.cuda.OutOfMemoryError:
                    rows.append((T, B, name, float("nan"), float("nan"), float("nan")))
                    torch.cuda.empty_cache()
                print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}, "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters, "
          f"{args.new} new tokens\n")
    print("| prompt | B | model | prefill ms | ms / new token | tokens/s |")
    print("|---|---|---|---|---|---|")
    for T, B, name, pre, per, tps in rows:
        print(f"| {T} | {B} | {name} | {pre:.1f} | {per:.2f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
