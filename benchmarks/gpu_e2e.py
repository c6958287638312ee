"""End-to-end timings at the level users call (H200, bf16): the op with a map name, the op on
features computed beforehand, fla with the map in PyTorch, and whole layers (FeatureAttention,
fla's LinearAttention layer, a softmax SDPA layer), in one run.

    python benchmarks/gpu_e2e.py                 # everything (fla when importable)
    python benchmarks/gpu_e2e.py --only op       # the op table alone ("layer" for the layers)

Map rows run the default path (the map's Triton form as one elementwise pass, then the
chunked kernel); rows marked FEATATTN_FUSE_MAPS=kernel apply the map inside the kernel.
Each row: median ms of triton.testing.do_bench, forward (no grad) and forward+backward, and
the peak memory of forward+backward beyond the inputs.  Before timing, every map name is
checked once against the float64 reference (forward and gradients, through
featattn.linear_attention) so a fast wrong path cannot make the table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import featattn  # noqa: E402
from _timing import bench, peak_mib  # noqa: E402

DT = torch.bfloat16
MAPS = ("elu", "relu", "identity", "squared_relu")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_maps(T=1000):
    """Each map through linear_attention (bf16) against the float64 reference."""
    ok = True
    for fm in MAPS:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, T, 64, device="cuda", dtype=DT) for _ in range(3))
        if fm == "identity":
            q, k = q.abs(), k.abs()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = featattn.linear_attention(*leaves, feature_map=fm)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, leaves, do)
        r = [t.double().requires_grad_() for t in (q, k, v)]
        ro = featattn.linear_attention(*r, feature_map=fm, backend="reference")
        rg = torch.autograd.grad(ro, r, do.double())
        errs = [_rel(o, ro)] + [_rel(a, b) for a, b in zip(g, rg)]
        good = all(e < 2e-2 for e in errs) and all(torch.isfinite(t).all() for t in (o, *g))
        ok &= good
        kernel = featattn.select_kernel(q, k, v, feature_map=fm)
        print(f"check {fm:13s} {kernel.name}{' (map fused)' if kernel.map_fused else ''}: "
              f"o {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} "
              f"{'OK' if good else 'FAIL'}", flush=True)
    return ok


def _time(fwd, fwdbwd, leaves):
    fwdbwd()
    return bench(fwd), bench(fwdbwd, leaves), peak_mib(fwdbwd)


def print_table(rows):
    """The rows ``(name, fwd ms, fwd+bwd ms, peak MiB)`` as a markdown table."""
    print("\n| call | fwd ms | fwd+bwd ms | peak MiB |\n|---|---|---|---|")
    for name, f, fb, mem in rows:
        print(f"| {name} | {f:.3f} | {fb:.3f} | {mem:.0f} |")


def timed_case(rows, name, call, leaves, do):
    """Append ``(name, fwd ms, fwd+bwd ms, peak MiB)`` of ``call()`` (backpropagating ``do``)
    to ``rows`` and print it."""
    def fwd():
        with torch.no_grad():
            call()

    def fwdbwd():
        call().backward(do)

    rows.append((name, *_time(fwd, fwdbwd, leaves)))
    print(rows[-1], flush=True)


def op_rows(B=8, H=16, D=64, Ts=(4096, 16384)):
    rows = []
    for T in Ts:
        mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=DT).requires_grad_()  # noqa: E731
        q, k, v = mk(), mk(), mk()
        do = torch.randn(B, H, T, D, device="cuda", dtype=DT)

        def case(name, call, leaves):
            timed_case(rows, f"T={T} {name}", call, leaves, do)

        fq = (F.elu(q.detach().float()) + 1).to(DT).requires_grad_()
        fk = (F.elu(k.detach().float()) + 1).to(DT).requires_grad_()
        case("features computed beforehand", lambda: featattn.linear_attention(fq, fk, v), [fq, fk, v])
        for fm in MAPS:
            case(f'feature_map="{fm}"', lambda fm=fm: featattn.linear_attention(q, k, v, feature_map=fm),
                 [q, k, v])
        os.environ["FEATATTN_FUSE_MAPS"] = "kernel"  # the map inside the attention kernel
        for fm in ("elu", "identity"):
            case(f'feature_map="{fm}", FEATATTN_FUSE_MAPS=kernel',
                 lambda fm=fm: featattn.linear_attention(q, k, v, feature_map=fm), [q, k, v])
        del os.environ["FEATATTN_FUSE_MAPS"]
        try:
            from fla.ops.linear_attn import chunk_linear_attn
        except Exception as e:  # noqa: BLE001
            print(f"fla unavailable: {e}")
            continue
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        for fm, phi in (("elu", lambda x: F.elu(x) + 1), ("relu", F.relu)):
            def fla_call(phi=phi):
                return chunk_linear_attn(phi(qt), phi(kt), vt, scale=1.0, normalize=True)[0]

            def fwd(fla_call=fla_call):
                with torch.no_grad():
                    fla_call()

            def fwdbwd(fla_call=fla_call):
                fla_call().backward(dot)

            rows.append((f"T={T} fla chunk_linear_attn, {fm} in PyTorch", *_time(fwd, fwdbwd, [qt, kt, vt])))
            print(rows[-1], flush=True)
    return rows


class SoftmaxLayer(nn.Module):
    """One qkv Linear, causal SDPA (FlashAttention), an output Linear."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, C))


def layer_rows(dim=1024, heads=16, shapes=((4, 1024), (4, 4096), (1, 16384))):
    layers = {"FeatureAttention elu": lambda: featattn.FeatureAttention(dim, heads, "elu"),
              "softmax SDPA layer": lambda: SoftmaxLayer(dim, heads)}
    try:
        from fla.layers import LinearAttention

        layers["fla LinearAttention elu"] = lambda: LinearAttention(
            mode="chunk", hidden_size=dim, num_heads=heads, feature_map="elu",
            output_norm="identity")
    except Exception as e:  # noqa: BLE001
        print(f"fla layer unavailable: {e}")
    rows = []
    for B, T in shapes:
        x = torch.randn(B, T, dim, device="cuda", dtype=DT, requires_grad=True)
        dy = torch.randn(B, T, dim, device="cuda", dtype=DT)
        for name, make in layers.items():
            layer = make().to("cuda", DT)

            def call(layer=layer):
                y = layer(x)
                return y[0] if isinstance(y, tuple) else y

            def fwd(call=call):
                with torch.no_grad():
                    call()

            def fwdbwd(call=call):
                call().backward(dy)

            try:
                rows.append((f"B={B} T={T} {name}", *_time(fwd, fwdbwd, [x, *layer.parameters()])))
            except Exception as e:  # noqa: BLE001
                rows.append((f"B={B} T={T} {name} FAILED {type(e).__name__}: {str(e)[:80]}",
                             math.nan, math.nan, math.nan))
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("op", "layer"), default=None)
    ap.add_argument("--no-checks", action="store_true")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    ok = True if args.no_checks else (check_maps() & check_maps(1024))  # (1024: whole chunks)
    rows = []
    if args.only in (None, "op"):
        rows += op_rows()
    if args.only in (None, "layer"):
        rows += layer_rows()
    print_table(rows)
    if not ok:
        sys.exit("a map failed its float64 check (see above)")


if __name__ == "__main__":
    main()
