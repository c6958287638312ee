"""Context parallelism: one long sequence split across the ranks of a torch.distributed group.

Causal linear attention has no decay, so what a rank needs from the ranks before it is the sum
of their states: ``kv = sum phi(k_s)^T v_s`` and ``z = sum phi(k_s)`` over their tokens.  With
``linear_attention(q, k, v, ..., cp_group=group)`` each rank holds a contiguous slice of the
sequence (rank order is sequence order) and gets its slice of the whole sequence's output:

1. its slice's own state, ``phi(k)^T v`` and ``sum phi(k)`` in fp32 (a few GEMMs in chunks of
   T, recomputed in the backward instead of kept);
2. one ``all_gather`` of every rank's ``[kv | z]`` (fp32, ``B * Hkv * Dk * (Dv + 1)`` floats
   per rank, independent of T), whose exclusive prefix sum over the earlier ranks (plus the
   caller's ``initial_state``) is the rank's initial state;
3. the usual call on the slice with that initial state (any backend and map).

The backward sends the gradient of each rank's initial state back: one ``all_gather`` of those
gradients (fp32, ``B * H * Dk * (Dv + 1)`` floats per rank), summed over the later ranks into
the slice's state gradient, and over every rank into the caller's ``initial_state`` gradient.
Before all that, a 96-byte ``all_gather`` compares every rank's shapes and options, so a
mismatch raises the same ValueError on every rank instead of hanging in a collective.

The collectives are torch.distributed's (NCCL on GPUs, gloo on CPU).  Contract (as for DDP):
every rank of the group makes the call, with the same shapes except T, the same options and
the same ``initial_state``; when the call needs a gradient every rank backpropagates through
its output.  See docs/distributed.md.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

__all__ = ["check_group", "slice_state", "rank_initial_state", "STATE_CHUNK_ELEMENTS"]

#: The slice's state is summed over chunks of T holding at most this many feature elements
#: (B * Hkv * chunk * Dk), so the fp32 features of one chunk stay near 64 MiB.
STATE_CHUNK_ELEMENTS = 1 << 24

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """Every rank's ``x`` concatenated into ``out`` (torch >= 2.12 names it all_gather_single;
    all_gather_into_tensor, its older name, warns there)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.reshape(-1), group=group)


def check_group(group) -> None:
    """A process group of an initialised default group, or a TypeError/ValueError saying what
    to pass instead."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cp_group needs torch.distributed initialised: call "
                         "torch.distributed.init_process_group(...) first (torchrun sets it up)")
    if not isinstance(group, dist.ProcessGroup):
        hint = " (for a DeviceMesh, pass mesh.get_group(dim))" \
            if type(group).__name__ == "DeviceMesh" else ""
        raise TypeError(f"cp_group must be a torch.distributed.ProcessGroup{hint}, "
                        f"got {type(group).__name__}")


def agree(group, device, *, what: dict) -> None:
    """One small all_gather of ``what`` (name -> int): a ValueError on every rank, naming the
    ranks and values, when the ranks disagree (before a collective whose sizes would)."""
    names = list(what)
    mine = torch.tensor([int(what[n]) for n in names], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    every = torch.empty(world * len(names), dtype=torch.int64, device=device)
    _all_gather(every, mine, group)
    rows = every.view(world, len(names)).tolist()
    bad = [n for i, n in enumerate(names) if len({r[i] for r in rows}) > 1]
    if bad:
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r} {_show(n, row[names.index(n)])}"
                                               for r, row in enumerate(rows)) for n in bad)
        raise ValueError(
            f"context parallelism: the ranks of cp_group disagree on {', '.join(bad)} "
            f"({detail}). Every rank must call with the same B, heads, head dims, dtype, "
            f"feature map and options (only T may differ) and the same initial_state")


def _show(name, value):
    if name == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else str(value)
    return str(value)


def call_facts(q, k, v, fm, normalize, Dk, has_init, needs_grad, return_state) -> dict:
    """What every rank must agree on (T excluded)."""
    B, H, _, Dqk = q.shape
    name = type(fm).__name__ + ":" + getattr(fm, "name", "") if fm is not None else "features"
    return {"B": B, "H": H, "Hkv": k.shape[1], "Dqk": Dqk, "Dk": Dk, "Dv": v.shape[-1],
            "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99,
            "feature map (crc32 of its class and name)": zlib.crc32(name.encode()),
            "normalize": normalize, "initial_state given": has_init,
            "needs a gradient": needs_grad, "return_state": return_state}


def slice_state(k, v, fm, normalize):
    """This rank's own state, ``(kv [B, Hkv, Dk, Dv], z [B, Hkv, Dk] or None)`` in fp32
    (float64 for float64 inputs), differentiable in k, v and the map's parameters.

    Summed over chunks of T; with a gradient each chunk is checkpointed, so only k and v are
    kept and the chunk's features are recomputed in the backward."""
    from .state import compute_dtype

    B, Hkv, T, _ = k.shape
    up = compute_dtype(k)

    def chunk(kc, vc):
        f = fm.forward_key(kc.to(up)) if fm is not None else kc.to(up)
        kv = torch.einsum("bhtd,bhte->bhde", f, vc.to(up))
        return (kv, f.sum(2)) if normalize else (kv,)

    probe = fm.output_dim(k.shape[-1]) if fm is not None else k.shape[-1]
    step = max(1, min(T, STATE_CHUNK_ELEMENTS // max(1, B * Hkv * probe)))
    grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or (
        fm is not None and any(p.requires_grad for p in fm.parameters())))
    kv = z = None
    for a in range(0, T, step):
        kc, vc = k[:, :, a:a + step], v[:, :, a:a + step]
        out = checkpoint(chunk, kc, vc, use_reentrant=False) if grad else chunk(kc, vc)
        kv = out[0] if kv is None else kv + out[0]
        if normalize:
            z = out[1] if z is None else z + out[1]
    return kv, z


class _RankPrefix(torch.autograd.Function):
    """``flat init (per query head) + sum over earlier ranks of their flat states (per k/v
    head, expanded to the query heads)``: one all_gather each way (see the module doc)."""

    @staticmethod
    def forward(ctx, local, init, group, H, G):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        every = local.new_empty(world * local.numel())
        _all_gather(every, local.contiguous(), group)
        every = every.view(world, *local.shape)
        prefix = every[:rank].sum(0) if rank > 0 else torch.zeros_like(local)
        out = _expand(prefix, G)
        if init is not None:
            out = out + init
        ctx.group, ctx.rank, ctx.world, ctx.G = group, rank, world, G
        ctx.has_init = init is not None
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        every = g.new_empty(ctx.world * g.numel())
        _all_gather(every, g, ctx.group)
        every = every.view(ctx.world, *g.shape)
        later = every[ctx.rank + 1:].sum(0) if ctx.rank + 1 < ctx.world else torch.zeros_like(g)
        d_local = _reduce(later, ctx.G)
        d_init = every.sum(0) if ctx.has_init else None
        return d_local, d_init, None, None, None


def _expand(x, G):
    """[B, Hkv, ...] -> [B, Hkv * G, ...], query head h reading k/v head h // G."""
    return x if G == 1 else x.repeat_interleave(G, dim=1)


def _reduce(x, G):
    """The adjoint of :func:`_expand`: [B, H, ...] summed over each group of G heads."""
    return x if G == 1 else x.unflatten(1, (-1, G)).sum(2)


def rank_initial_state(kv, z, kv0, z0, group, H):
    """(kv, z) this rank starts from: ``initial_state + sum of the earlier ranks' states``,
    from the slice's own ``kv [B, Hkv, Dk, Dv]`` / ``z [B, Hkv, Dk]`` (see :func:`slice_state`)
    and the caller's ``kv0 [B, H, Dk, Dv]`` / ``z0`` (None when not given)."""
    B, Hkv, Dk, Dv = kv.shape
    G = H // Hkv
    parts = [kv.reshape(B, Hkv, -1)] + ([z] if z is not None else [])
    local = torch.cat(parts, -1)  # [B, Hkv, Dk * Dv (+ Dk)]
    init = None
    if kv0 is not None:
        ip = [kv0.to(local.dtype).reshape(B, H, -1)]
        if z is not None:
            ip.append(z0.to(local.dtype))
        init = torch.cat(ip, -1)
    flat = _RankPrefix.apply(local, init, group, H, G)
    kv_r = flat[..., :Dk * Dv].reshape(B, H, Dk, Dv)
    z_r = flat[..., Dk * Dv:] if z is not None else None
    return kv_r, z_r
