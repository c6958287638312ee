"""Registers, spills and instructions per chunk of the chunked kernels, without a GPU.

The chunked forward on the H200 runs one warp per scheduler and issues one dependent
instruction after another (docs/benchmarks.md, "an ncu profile"), so what a kernel edit does
to its main loop's instruction count, registers and spills is the first thing to know, and
it can be known on any machine: Triton compiles the kernel for sm_90a here (its wheel
carries ptxas and nvdisasm), and this counts the SASS of the longest loop.

    python benchmarks/sass_count.py                           # forward, bf16, normalised
    python benchmarks/sass_count.py --kernel bwd --map elu    # backward with elu fused
    python benchmarks/sass_count.py --plain --bt 64 --warps 8 --stages 3 --top 30

The counts come from this machine's Triton, which may not be the GPU machine's: compare
variants compiled here with each other, and time the winner on the GPU before keeping it.
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
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from featattn.kernels import chunked
from featattn.kernels import maps

KERNELS = {"fwd": chunked._fwd_kernel, "bwd": chunked._bwd_kernel, "seg": chunked._seg_kernel}
# float pointers of the chunked kernels (the rest are the input dtype, cu int32)
FP32_PTRS = {"den", "delta", "kv0", "z0", "kvT", "zT", "segS", "segz", "segdS", "segdz",
             "dkvT", "dzT", "dkv0", "dz0", "outS", "outz"}
PTRS = FP32_PTRS | {"q", "k", "v", "o", "do", "dq", "dk", "dv", "cu", "a", "b"}
FLOATS = {"eps", "scale"}


def compile_sass(kernel: str, dtype: str, normalize: bool, fmap: str | None, bt: int,
                 warps: int, stages: int, dk: int, dv: int):
    """(n_regs line, SASS text) of one chunked kernel compiled for sm_90a."""
    fn = KERNELS[kernel]
    form = maps.lookup(maps.fused_key(_map(fmap)))[1] if fmap else None
    bk, bv = chunked._tiles(dk, dv, getattr(torch, dtype))
    consts = dict(NV=1, BT=bt, BK=bk, BV=bv, NORMALIZE=normalize, HAS_INIT=False,
                  STORE_FINAL=False, SPLIT_K=False, HAS_DFINAL=False, DELTA_O=normalize,
                  LOWP=dtype == "bfloat16", TF32X3=dtype == "float32", FUSED=fmap is not None,
                  PHI=form.phi if form else None, DPHI=form.dphi if form else None,
                  VARLEN=False, BWD=False, HAS_Z=normalize)
    elem = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[name] = "constexpr", consts[name]
            continue
        if name in PTRS:
            sig[name] = "*fp32" if name in FP32_PTRS else ("*i32" if name == "cu" else f"*{elem}")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
        # what the launcher specialises at a real call: 16-byte aligned pointers, strides and
        # head dims divisible by 16 (T, SEG, NS, KS are not specialised: do_not_specialize)
        if name in PTRS or (sig[name] == "i32" and re.fullmatch(r"s\w*[bht]|DK|DV", name)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    bindir = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    ptxas = next(os.path.join(bindir, p) for p in ("ptxas-blackwell", "ptxas")
                 if os.path.exists(os.path.join(bindir, p)))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        info = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True).stdout
    usage = " ".join(line.split("info    : ")[-1].strip() for line in info.splitlines()
                     if "registers" in line or "spill" in line)
    # ptxas's performance warnings (e.g. C7515: wgmma serialized) name what stalls the MMAs
    usage += "".join(f"\n  ptxas: {line.split('warning : ')[-1].strip()}"
                     for line in info.splitlines() if "warning" in line)
    return usage, sass


def _map(name):
    from featattn.feature_maps import get_feature_map

    return get_feature_map(name)


def loops(sass: str) -> list:
    """The bodies (instruction lists) of the loops, longest first: every backward branch's
    span of instructions (the chunk loops; the backward kernel has two, dq and dk/dv)."""
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="fwd")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--plain", action="store_true", help="normalize=False")
    ap.add_argument("--map", default=None, help="an elementwise map fused in the kernel (elu, relu, ...)")
    ap.add_argument("--bt", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--top", type=int, default=12, help="opcodes to list")
    a = ap.parse_args(argv)
    usage, sass = compile_sass(a.kernel, a.dtype, not a.plain, a.map, a.bt, a.warps, a.stages,
                               a.dk, a.dv)
    total = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line))
    print(f"{a.kernel} {a.dtype} {'plain' if a.plain else 'normalised'} map={a.map} "
          f"BT={a.bt} warps={a.warps} stages={a.stages} Dk={a.dk} Dv={a.dv} "
          f"(triton {triton.__version__}, sm_90a)")
    print(f"  {usage}; {total} instructions in all")
    for body in loops(sass)[:2 if a.kernel == "bwd" else 1]:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                                  for t in body)
        print(f"  a chunk loop: {len(body)} instructions; "
              + ", ".join(f"{op} {n}" for op, n in ops.most_common(a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
