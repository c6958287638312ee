"""The Hedgehog map inside the kernels (featattn/kernels/projected.py) against the map in
PyTorch, the kernel on precomputed features, fla and softmax, in one run (H200, bf16).

    python benchmarks/gpu_hedgehog.py                # checks, op, layers, a training step
    python benchmarks/gpu_hedgehog.py --only op      # "layer" / "train" for one table
    python benchmarks/gpu_hedgehog.py --only op --quick --set projected.PAIR_EPILOGUE=1

Op rows: B = 8, H = 16, head dim 64 -> 128 features (feature_dim 64), normalised,
``[B, H, T, D]`` inputs; ms fwd / fwd+bwd (median of triton.testing.do_bench) and the peak
memory of forward+backward beyond the inputs.  "map in PyTorch" is what the call did before
the map ran in the kernel (the map's own forward, then the chunked kernel on its features).
Before timing, the fused call is checked in bf16 against float64 (output and the gradients
of q, k, v and the map's weights and biases; grouped heads too).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import featattn  # noqa: E402
from featattn.feature_maps import HedgehogFeatureMap  # noqa: E402
from gpu_e2e import SoftmaxLayer, _time, print_table, timed_case  # noqa: E402

DT = torch.bfloat16
QUICK = False  # --quick: no "before" (map in PyTorch) or fla rows


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _unfused(fm):
    """The same map (shared parameters) with the kernel form hidden: the PyTorch path."""
    other = copy.copy(fm)
    other.triton_projection = lambda: None
    return other


def check(T=1000, mode="auto"):
    """The map through linear_attention (bf16) against float64, with FEATATTN_FUSE_MAPS=mode
    (at these small sizes "auto" puts the projection in the kernels; "pass" is the large
    calls' path, projected.PAIR_EPILOGUE's when it is on)."""
    os.environ["FEATATTN_FUSE_MAPS"] = mode
    ok = True
    for H, Hkv, tie in ((4, 4, False), (4, 2, False), (4, 4, True)):
        torch.manual_seed(0)
        fm = HedgehogFeatureMap(64, heads=H, kv_heads=Hkv, tie_qk=tie).cuda()
        with torch.no_grad():
            for p in fm.parameters():
                p.add_(0.2 * torch.randn_like(p))
        q = torch.randn(2, H, T, 64, device="cuda", dtype=DT)
        k, v = (torch.randn(2, Hkv, T, 64, device="cuda", dtype=DT) for _ in range(2))
        params = list(fm.parameters())
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*leaves, feature_map=fm, scale=0.125)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, leaves + params, do)
        fm64 = copy.deepcopy(fm).double()
        r = [t.double().requires_grad_() for t in (q, k, v)]
        ro = featattn.linear_attention(*r, feature_map=fm64, backend="reference", scale=0.125)
        rg = torch.autograd.grad(ro, r + list(fm64.parameters()), do.double())
        names = ["o", "dq", "dk", "dv"] + [n for n, _ in fm.named_parameters()]
        errs = [_rel(o, ro)] + [_rel(a, b) for a, b in zip(g, rg)]
        good = all(e < 2e-2 for e in errs) and all(torch.isfinite(t).all() for t in (o, *g))
        ok &= good
        kernel = featattn.select_kernel(q, k, v, feature_map=fm)
        print(f"check H={H} Hkv={Hkv} tie={tie}: {kernel.name}/{kernel.map_path} "
              + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs))
              + f" {'OK' if good else 'FAIL'}", flush=True)
    os.environ.pop("FEATATTN_FUSE_MAPS")
    return ok


def op_rows(B=8, H=16, D=64, Ts=(4096, 16384)):
    rows = []
    fm = HedgehogFeatureMap(D, heads=H).cuda()
    slow = _unfused(fm)
    params = list(fm.parameters())
    for T in Ts:
        mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=DT).requires_grad_()  # noqa: E731
        q, k, v = mk(), mk(), mk()
        do = torch.randn(B, H, T, D, device="cuda", dtype=DT)

        def case(name, call, leaves):
            timed_case(rows, f"T={T} {name}", call, leaves, do)

        for mode in ("auto", "kernel", "pass"):
            os.environ["FEATATTN_FUSE_MAPS"] = mode
            path = featattn.select_kernel(q, k, v, fm).map_path
            case(f"feature_map=<Hedgehog>, FEATATTN_FUSE_MAPS={mode} ({path})",
                 lambda: featattn.linear_attention(q, k, v, feature_map=fm), [q, k, v, *params])
        os.environ["FEATATTN_FUSE_MAPS"] = "auto"
        if not QUICK:
            case("feature_map=<Hedgehog>, map in PyTorch (before)",
                 lambda: featattn.linear_attention(q, k, v, feature_map=slow), [q, k, v, *params])
        with torch.no_grad():
            fq = fm.forward_query(q).detach().requires_grad_()
            fk = fm.forward_key(k).detach().requires_grad_()
        case("on the same features computed beforehand",
             lambda: featattn.linear_attention(fq, fk, v), [fq, fk, v])
        try:
            from fla.ops.linear_attn import chunk_linear_attn
        except Exception as e:  # noqa: BLE001
            print(f"fla unavailable: {e}")
            continue
        if QUICK:
            continue
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (fq, fk, v))
        dot = do.transpose(1, 2).contiguous()

        def fla_fwd():
            with torch.no_grad():
                chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=True)

        def fla_fb():
            chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=True)[0].backward(dot)

        rows.append((f"T={T} fla chunk_linear_attn on the same features",
                     *_time(fla_fwd, fla_fb, [qt, kt, vt])))
        print(rows[-1], flush=True)
    return rows


def layer_rows(dim=1024, heads=16, shapes=((4, 1024), (4, 4096), (1, 16384))):
    if QUICK:
        shapes = shapes[1:]
    rows = []
    for B, T in shapes:
        x = torch.randn(B, T, dim, device="cuda", dtype=DT, requires_grad=True)
        dy = torch.randn(B, T, dim, device="cuda", dtype=DT)
        hh = featattn.FeatureAttention(dim, heads, "hedgehog").to("cuda", DT)
        slow = copy.deepcopy(hh)
        slow.feature_map.triton_projection = lambda: None
        cases = [("FeatureAttention hedgehog", hh, "auto"),
                 ("FeatureAttention hedgehog, FEATATTN_FUSE_MAPS=kernel", hh, "kernel"),
                 ("FeatureAttention hedgehog, FEATATTN_FUSE_MAPS=pass", hh, "pass")]
        if not QUICK:
            cases.append(("FeatureAttention hedgehog, map in PyTorch (before)", slow, "auto"))
        cases.append(("softmax SDPA layer", SoftmaxLayer(dim, heads).to("cuda", DT), "auto"))
        for name, layer, mode in cases:
            os.environ["FEATATTN_FUSE_MAPS"] = mode

            def fwd(layer=layer):
                with torch.no_grad():
                    layer(x)

            def fwdbwd(layer=layer):
                layer(x).backward(dy)

            rows.append((f"B={B} T={T} {name}", *_time(fwd, fwdbwd, [x, *layer.parameters()])))
            print(rows[-1], flush=True)
        os.environ["FEATATTN_FUSE_MAPS"] = "auto"
    return rows


def train_rows(T=2048, B=4, steps=6):
    """Training steps of a patched random Llama (hidden 1024, 8 layers) with hedgehog, map in
    the kernel vs in PyTorch: ms per optimizer step."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=8, num_attention_heads=16,
                                   num_key_value_heads=4, max_position_embeddings=1 << 16)
    rows = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to("cuda", DT)
        from featattn.hf import patch_hf_model

        patch_hf_model(model, feature_map="hedgehog")
        if not fused:
            for m in model.modules():
                if isinstance(m, HedgehogFeatureMap):
                    m.triton_projection = lambda: None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, 32000, (B, T), device="cuda")

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / steps * 1e3
        name = f"B={B} T={T} train step, patched Llama 8x1024, hedgehog " + \
            ("in the kernel" if fused else "in PyTorch (before)")
        rows.append((name, float("nan"), ms, float("nan")))
        print(rows[-1], flush=True)
        del model, opt
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("op", "layer", "train"), default=None)
    ap.add_argument("--no-checks", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], metavar="MODULE.NAME=INT",
                    help="featattn.kernels constants first, e.g. projected.PAIR_EPILOGUE=1")
    ap.add_argument("--quick", action="store_true",
                    help="leave out the before (map in PyTorch) and fla rows, and T = 1024 layers")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    from _timing import set_constants

    set_constants(args.set)
    # (1024: whole chunks, chunked.FULL_TILES)
    ok = True if args.no_checks else all([check(T, m) for T in (1000, 1024)
                                          for m in ("auto", "pass")])
    rows = []
    if args.only in (None, "op"):
        rows += op_rows()
    if args.only in (None, "layer"):
        rows += layer_rows()
    if args.only in (None, "train"):
        try:
            rows += train_rows()
        except ImportError as e:
            print(f"training rows skipped: {e}")
    print_table(rows)
    if not ok:
        sys.exit("the fused map failed its float64 check (see above)")


if __name__ == "__main__":
    main()
