"""Registers, spills and instructions per loop iteration of featattn's Triton kernels, on a
machine without a GPU.

The chunked forward on the H200 runs one warp per scheduler and waits on one dependent
instruction after another (docs/benchmarks.md, "an ncu profile"), so what an edit does to a
kernel's main loop (its instruction count, registers, spills) is the first thing to know, and
it can be known anywhere: this runs a kernel entry point on CPU tensors with the launches
caught instead of run, compiles each caught launch for sm_90a exactly as the launcher would
have specialised it (Triton's wheel carries ptxas and nvdisasm), and counts the SASS of its
loops.  The outputs are garbage; only the compiled code is looked at.

    python benchmarks/sass_count.py                           # chunked, bf16, normalised
    python benchmarks/sass_count.py --map elu                 # the map inside the kernels
    python benchmarks/sass_count.py --op hybrid --config 2    # the window kernels, 3rd config
    python benchmarks/sass_count.py --op taylor --T 4096      # the chunked Taylor form
    python benchmarks/sass_count.py --op hedgehog --list      # the configs of each launch
    python benchmarks/sass_count.py --op hedgehog_pass        # Hedgehog's projection pass
    python benchmarks/sass_count.py --op hedgehog_op          # the pass, then the chunked kernels
    python benchmarks/sass_count.py --op decode --dk 128      # the decode steps (plain, hybrid)
    python benchmarks/sass_count.py --const chunked.DEN_IN_MMA=0  # a module switch flipped
    python benchmarks/sass_count.py --map elu --loops 1 --dump  # the loop's instructions

The counts come from this machine's Triton, which may not be the GPU machine's: compare
variants compiled here with each other, and time the winner on the GPU before keeping it.
The GPU machine's own Triton (3.6) installs beside this one and compiles the same way:

    python -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/sass_count.py ...
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sass_count.py compiles real kernels: unset TRITON_INTERPRET")

import featattn  # noqa: E402
from featattn import kernels  # noqa: E402
from featattn.kernels import maps  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


# --------------------------------------------------------------------------- the calls
def _inputs(a, d=64, dv=64, H=16):
    dt = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(a.B, H, a.T, n, generator=g).to(dt).requires_grad_()
               for n in (d, d, dv))
    return q, k, v


def _map_key(name):
    return maps.fused_key(featattn.get_feature_map(name)) if name else None


def call_chunked(a):
    q, k, v = _inputs(a, a.dk, a.dv)
    fm = featattn.get_feature_map(a.map) if a.map else None
    o = kernels.chunked_attention(q, k, v, normalize=not a.plain, eps=1e-6, feature_map=fm)[0]
    o.backward(torch.ones_like(o))


def call_hybrid(a):
    q, k, v = _inputs(a)
    o = kernels.hybrid_attention(q, k, v, weight=torch.full((16,), 0.5), window=64,
                                 window_scale=0.125, eps=1e-6,
                                 feature_map=_map_key(a.map or "elu"))[0]
    o.backward(torch.ones_like(o))


def call_hybrid_packed(a):
    """The hybrid on packed sequences (VARLEN window kernels, the chunked kernels' packed
    form with the key shift): two sequences of T / 2 tokens in a row."""
    q, k, v = _inputs(a)
    q, k, v = (x[:1].detach().requires_grad_() for x in (q, k, v))
    T = q.shape[2]
    cu = torch.tensor([0, T // 2, T], dtype=torch.int32)
    o = kernels.hybrid_attention(q, k, v, weight=torch.full((16,), 0.5), window=64,
                                 window_scale=0.125, eps=1e-6, cu_seqlens=cu,
                                 feature_map=_map_key(a.map or "elu"))[0]
    o.backward(torch.ones_like(o))


def call_taylor(a):
    q, k, v = _inputs(a, 16, 64)
    o = kernels.taylor_attention(q, k, v, normalize=not a.plain, eps=1e-6)[0]
    o.backward(torch.ones_like(o))


def call_hedgehog(a):
    q, k, v = _inputs(a)
    fm = featattn.get_feature_map("hedgehog", head_dim=64, feature_dim=64, heads=16)
    o = kernels.projected_attention(q, k, v, fm.triton_projection(),
                                    normalize=not a.plain, eps=1e-6)[0]
    o.backward(torch.ones_like(o))


def call_hedgehog_pass(a):
    """The projection pass (map_path "triton_pass"): features forward, dx / dW backward."""
    from featattn.kernels.projected import projection_features

    q, k, _ = _inputs(a)
    fm = featattn.get_feature_map("hedgehog", head_dim=64, feature_dim=64, heads=16)
    fq, _ = projection_features(q, k, fm.triton_projection())
    fq.backward(torch.ones_like(fq))


def call_hedgehog_op(a):
    """The whole pass path of linear_attention with a Hedgehog map: the projection passes,
    the chunked kernels on the 128-wide features, their backward and the passes' backward
    (as one node, the backward making the logits' gradients, with --const
    projected.PAIR_EPILOGUE=1)."""
    from featattn.kernels import projected

    q, k, v = _inputs(a)
    fm = featattn.get_feature_map("hedgehog", head_dim=64, feature_dim=64, heads=16)
    form = fm.triton_projection()
    if projected.pair_epilogue_applies(form, q):
        o = projected.projection_pass_attention(q, k, v, form, normalize=not a.plain,
                                                eps=1e-6)[0]
    else:
        fq, fk = projected.projection_features(q, k, form)
        o = kernels.chunked_attention(fq, fk, v, normalize=not a.plain, eps=1e-6)[0]
    o.backward(torch.ones_like(o))


def call_decode(a):
    """One decoding token (--dk = --dv head dims): the plain step kernel, then the hybrid
    step (window 64, full) with 4 query heads a k/v head (two launches) and with one."""
    from featattn.kernels import decode

    d, H, Hkv = a.dk, 16, 4
    dt = getattr(torch, a.dtype)
    q, k, v = (torch.randn(a.B, h, 1, d).to(dt) for h in (H, Hkv, Hkv))
    kv, z = torch.rand(a.B, H, d, d), torch.rand(a.B, H, d) + 1
    fm = featattn.get_feature_map(a.map or "elu")
    decode.recurrent_step(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                          normalize=True, eps=1e-6, initial_kv=kv, initial_z=z, feature_map=fm)
    wk, wv = (torch.randn(a.B, Hkv, 64, d).to(dt) for _ in range(2))
    decode.hybrid_step(q, k, v, kv, z, wk, wv, window=64, weight=0.5, window_scale=d ** -0.5,
                       eps=1e-6, feature_map=fm)
    # one query head a k/v head: one launch (MODE 0), the window moved by the same program
    wk1, wv1 = (torch.randn(a.B, H, 64, d).to(dt) for _ in range(2))
    decode.hybrid_step(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), kv, z, wk1, wv1,
                       window=64, weight=0.5, window_scale=d ** -0.5, eps=1e-6, feature_map=fm)
    # features made before it (a projection map), a weight per head
    decode.hybrid_step(q, k, v, kv, z, wk, wv, window=64, weight=torch.full((H,), 0.5),
                       window_scale=d ** -0.5, eps=1e-6, fq=q.float().exp().to(dt),
                       fk_evict=wk[:, :, :1].float().exp().to(dt))


CALLS = {"chunked": call_chunked, "hybrid": call_hybrid, "taylor": call_taylor,
         "hedgehog": call_hedgehog, "hedgehog_pass": call_hedgehog_pass,
         "hedgehog_op": call_hedgehog_op, "decode": call_decode,
         "hybrid_packed": call_hybrid_packed}


# --------------------------------------------------------------------------- catching
def catch(call, a, config: int, overrides=None):
    """[(JITFunction, bound arguments, options, configs)] of every launch ``call`` makes;
    autotuned launches use config number ``config`` of their space, with ``overrides``
    (``{"BT": 32, "num_warps": 8}``: a config outside the space) applied to it."""
    caught = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        caught.append((self, args, kwargs, None))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        cfg = self.configs[min(config, len(self.configs) - 1)]
        self.best_config = cfg
        chosen = {**cfg.all_kwargs(), **(overrides or {})}
        caught.append((self.fn, args, {**kwargs, **chosen}, self.configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        call(a)
    finally:
        JITFunction.run, Autotuner.run = saved
    return caught


def compile_launch(fn, args, kwargs):
    """The launch compiled for sm_90a with the launcher's specialisation."""
    bound = dict(zip(fn.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        val = bound.get(p.name, p.default)
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", val
            continue
        ty, key = native_specialize_impl(BaseBackend, val, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            sig[p.name], consts[p.name] = "constexpr", val
            continue
        sig[p.name] = ty
        if key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages", "maxnreg") if kwargs.get(k) is not None}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=TARGET, options=opts), consts, opts


def _tool(name):
    d = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    for n in (f"{name}-blackwell", name):  # a newer ptxas reads the PTX Triton 3.9 writes
        if os.path.exists(os.path.join(d, n)):
            return os.path.join(d, n)
    raise FileNotFoundError(f"{name} is not in {d}")


def resources(compiled):
    """(ptxas's register/spill line and perf warnings, SASS text)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        info = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("nvdisasm"), "-c", cubin], capture_output=True,
                              text=True).stdout
    usage = " ".join(line.split("info    : ")[-1].strip() for line in info.splitlines()
                     if "registers" in line or "spill" in line)
    usage += "".join(f"\n    ptxas: {line.split('warning : ')[-1].strip()}"
                     for line in info.splitlines() if "warning" in line)
    return usage, sass


#: sm_90 (H100 / H200) limits a program's residency is counted against
SM_REGS, SM_SMEM, SM_WARPS, SM_PROGRAMS, SMEM_RESERVED = 65536, 233472, 64, 32, 1024


def occupancy(usage: str, compiled, warps: int) -> str:
    """Programs resident per SM (and what limits them), from ptxas's register count and
    the kernel's shared memory: a kernel whose programs loop over only a few tiles hides
    its loads' latency with other programs, not within one."""
    m = re.search(r"Used (\d+) registers", usage)
    if not m:
        return "occupancy: no register count"
    regs = int(m.group(1))
    per_warp = -(-regs * 32 // 256) * 256  # registers are given to warps in 256s
    smem = int(getattr(compiled.metadata, "shared", 0))
    by = {"registers": SM_REGS // per_warp // warps, "warps": SM_WARPS // warps,
          "shared memory": SM_SMEM // (smem + SMEM_RESERVED), "programs": SM_PROGRAMS}
    limit = min(by, key=by.get)
    return (f"shared memory {smem} B; {by[limit]} programs ({by[limit] * warps} warps) per "
            f"SM, limited by {limit}")


def loops(sass: str) -> list:
    """The bodies (instruction lists) of the loops, longest first: every backward branch's
    span of instructions."""
    ins, at, pending = [], {}, []
    for line in sass.splitlines():
        lab = re.match(r"\s*\.(L_x_\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            addr = int(m.group(1), 16)
            for p in pending:
                at[p] = addr
            pending = []
            ins.append((addr, m.group(2)))
    out = []
    for addr, text in ins:
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", text)
        if m and at.get(m.group(1), addr + 1) < addr:
            out.append([t for a, t in ins if at[m.group(1)] <= a <= addr])
    return sorted(out, key=len, reverse=True)


def _opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=sorted(CALLS), default="chunked")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--plain", action="store_true", help="normalize=False")
    ap.add_argument("--map", default=None, help="an elementwise map inside the kernels (elu, ...)")
    ap.add_argument("--B", type=int, default=2, help="2: B = 1 would specialise as a constant")
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--dk", type=int, default=64, help="chunked only")
    ap.add_argument("--dv", type=int, default=64, help="chunked only")
    ap.add_argument("--config", type=int, default=0, help="which autotune config (index)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="override the autotuned configs' values, e.g. BT=32 num_warps=8")
    ap.add_argument("--const", nargs="*", default=[], metavar="MODULE.NAME=INT",
                    help="set a featattn.kernels constant first, e.g. chunked.DEN_IN_MMA=0")
    ap.add_argument("--list", action="store_true", help="also list each launch's configs")
    ap.add_argument("--loops", type=int, default=2, help="loops to show per kernel")
    ap.add_argument("--top", type=int, default=10, help="opcodes to list per loop")
    ap.add_argument("--dump", action="store_true",
                    help="print each shown loop's instructions (where the waits and the "
                         "tensor-core ops fall)")
    a = ap.parse_args(argv)
    from _timing import set_constants

    set_constants(a.const)
    seen = set()
    print(f"{a.op} {a.dtype} {'plain' if a.plain else 'normalised'} map={a.map} B={a.B} "
          f"T={a.T} config #{a.config} (triton {triton.__version__}, sm_90a)")
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in a.set)}
    for fn, args, kwargs, configs in catch(CALLS[a.op], a, a.config, overrides):
        compiled, consts, opts = compile_launch(fn, args, kwargs)
        tiles = {k: v for k, v in consts.items() if isinstance(v, int)}  # bools are ints
        key = (fn.__name__, tuple(sorted(tiles.items())), tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        usage, sass = resources(compiled)
        total = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line))
        print(f"\n{fn.__name__} {opts} " + " ".join(f"{k}={v}" for k, v in tiles.items()))
        print(f"  {usage}; {total} instructions in all")
        print(f"  {occupancy(usage, compiled, opts.get('num_warps', 4))}")
        if a.list and configs:
            print("  configs: " + "; ".join(str(c) for c in configs))
        for body in loops(sass)[:a.loops]:
            ops = collections.Counter(_opcode(t) for t in body)
            print(f"  a loop: {len(body)} instructions; "
                  + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
            if a.dump:
                print("\n".join(f"    {i:4d}  {t}" for i, t in enumerate(body)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
