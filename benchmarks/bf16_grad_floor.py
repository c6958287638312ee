"""Where the bf16 error of dq comes from (CPU, float64 emulation; seconds).

The normalised backward's dq_t = [sum_s (do_t . (v_s - o_t)) phi(k_s)] / den_t sums terms
whose mean part cancels (phi(k) > 0 has a large mean), so rounding phi(k) to bf16 (what any
kernel feeding bf16 tensor cores does) is amplified.  This emulates the chunked backward's dq
sweep in float64 with chosen bf16 roundings and reports dq's relative error against float64
on the same bf16 inputs (as benchmarks/gpu_long_errors.py measures on the GPU):

* features only: phi(q), phi(k) rounded to bf16, everything else exact -- the floor;
* + S: the state rounded to bf16 for do @ S^T (the kernel's tensor-core operand);
* + o: delta = do . o from the stored (bf16) output;
* + dA: dA - delta rounded to bf16 for dA @ phi(k).

    python benchmarks/bf16_grad_floor.py --T 4096 16384 65536

Session 13 (elu, B1 H2 D64): features only 3.33e-3 / 3.44e-3 / 3.29e-3 at T = 4096 / 16384 /
65536; all four roundings 5.32e-3 / 5.47e-3 / 4.99e-3, against 5.75e-3 measured on the H200
at T = 65536 (which also stores dq in bf16, and whose dq is the raw q's: these times
elu'(q), so the comparison is approximate).  So dq cannot reach 3e-3 in bf16 with bf16 features, whatever the
kernel does; fp16 (8x finer) can and does (8.5e-4).
"""

from __future__ import annotations

import argparse

import torch

BT = 64


def _bf(x):
    return x.to(torch.bfloat16).double()


def _phi(x):  # elu(x) + 1
    return torch.where(x > 0, x + 1, torch.exp(x))


def _forward(fq, fk, v):
    """(o, den): normalised causal linear attention, chunk by chunk, float64."""
    B, H, T, D = fq.shape
    S = fq.new_zeros(B, H, D, v.shape[-1])
    z = fq.new_zeros(B, H, D)
    o, den = torch.empty_like(v), fq.new_empty(B, H, T, 1)
    causal = torch.ones(BT, BT, dtype=torch.bool).tril()
    for i in range(0, T, BT):
        q, k, vv = fq[..., i:i + BT, :], fk[..., i:i + BT, :], v[..., i:i + BT, :]
        A = (q @ k.transpose(-1, -2)).masked_fill(~causal[:q.shape[-2], :q.shape[-2]], 0)
        d = A.sum(-1, keepdim=True) + (q * z[..., None, :]).sum(-1, keepdim=True)
        o[..., i:i + BT, :] = (A @ vv + q @ S) / d
        den[..., i:i + BT, :] = d
        S = S + k.transpose(-1, -2) @ vv
        z = z + k.sum(-2)
    return o, den


def _dq(fk, v, do, o, den, round_S=False, round_o=False, round_dA=False):
    B, H, T, D = fk.shape
    out = torch.empty_like(fk)
    S = fk.new_zeros(B, H, D, v.shape[-1])
    z = fk.new_zeros(B, H, D)
    ob = _bf(o) if round_o else o
    causal = torch.ones(BT, BT, dtype=torch.bool).tril()
    for i in range(0, T, BT):
        sl = slice(i, i + BT)
        dl = (ob[..., sl, :] * do[..., sl, :]).sum(-1, keepdim=True)
        dA = (do[..., sl, :] @ v[..., sl, :].transpose(-1, -2) - dl).masked_fill(~causal, 0)
        dA = _bf(dA) if round_dA else dA
        St = _bf(S) if round_S else S
        out[..., sl, :] = (dA @ fk[..., sl, :] + do[..., sl, :] @ St.transpose(-1, -2)
                           - dl * z[..., None, :]) / den[..., sl, :]
        S = S + fk[..., sl, :].transpose(-1, -2) @ v[..., sl, :]
        z = z + fk[..., sl, :].sum(-2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096])
    ap.add_argument("--heads", type=int, default=2)
    a = ap.parse_args(argv)
    print("| T | features only | + S | + o | + dA (all) |\n|---|---|---|---|---|")
    for T in a.T:
        if T % BT:
            raise SystemExit(f"--T must be a multiple of {BT}, got {T}")
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (_bf(torch.randn(1, a.heads, T, 64, generator=g)) for _ in range(4))
        ref_o, ref_den = _forward(_phi(q), _phi(k), v)
        ref = _dq(_phi(k), v, do, ref_o, ref_den)
        fq, fk = _bf(_phi(q)), _bf(_phi(k))
        o, den = _forward(fq, fk, v)
        errs = [_dq(fk, v, do, o, den, *flags)
                for flags in ((False,) * 3, (True, False, False), (True, True, False),
                              (True, True, True))]
        print(f"| {T} | " + " | ".join(f"{((e - ref).norm() / ref.norm()).item():.2e}"
                                      for e in errs) + " |")


if __name__ == "__main__":
    main()
