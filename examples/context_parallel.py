"""Context parallelism: one sequence split across the ranks of a process group.

    torchrun --nproc_per_node 2 examples/context_parallel.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/context_parallel.py --cuda     # one GPU a rank, NCCL

Each rank holds a contiguous slice of one sequence (rank order is sequence order), runs a
FeatureAttention layer on it with ``cp_group``, and checks its slice of the output (and, on
the last rank, the final state) against the whole sequence run on one rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import featattn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    ap.add_argument("--tokens", type=int, default=4096, help="whole sequence length")
    args = ap.parse_args()
    cuda = args.cuda
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same layer and the same whole sequence on every rank
    layer = featattn.FeatureAttention(256, 4, "elu").to(device, dtype)
    x = torch.randn(1, args.tokens, 256, device=device, dtype=dtype)
    # this rank's slice: ranks may hold different lengths
    bounds = [round(i * args.tokens / world) for i in range(world + 1)]
    mine = x[:, bounds[rank]:bounds[rank + 1]]

    y, state = layer(mine, return_state=True, cp_group=dist.group.WORLD)
    y.float().square().mean().backward()  # every rank backpropagates (as with DDP)

    with torch.no_grad():
        whole, whole_state = layer(x, return_state=True)
    err = ((y.float() - whole[:, bounds[rank]:bounds[rank + 1]].float()).norm()
           / whole[:, bounds[rank]:bounds[rank + 1]].float().norm()).item()
    line = f"rank {rank}/{world}: tokens {bounds[rank]}..{bounds[rank + 1]}, output error {err:.2e}"
    if rank == world - 1:
        s_err = ((state.kv - whole_state.kv).norm() / whole_state.kv.norm()).item()
        line += f", final state error {s_err:.2e} (the last rank's state is the whole sequence's)"
    lines = [None] * world  # rank 0 prints every rank's line, in rank order (no interleaving)
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
