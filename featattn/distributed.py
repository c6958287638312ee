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
Before all that, a small (128-byte) ``all_gather`` compares every rank's shapes and options, so a
mismatch raises the same ValueError on every rank instead of hanging in a collective.

A hybrid call (``window=W``) also needs the W raw keys and values before the rank's first
token, which may lie on several earlier ranks: one more ``all_gather`` of every rank's last
``min(W, T)`` rows of k and v (``B * Hkv * W * (Dqk + Dv)`` values per rank), from which
each rank takes its window (:func:`window_initial_state`); the backward gathers the windows' gradients the
same way and each rank adds those of its own rows.  The rank then starts from the earlier
ranks' states less the window's part (those keys are the softmax's, not yet the linear
part's) and that window, as a windowed ``initial_state``.

A packed row (``cu_seqlens``, the whole row's boundaries on every rank) is cut the same way;
documents may cross rank boundaries.  Only the state of the document running over a boundary
crosses it, so the forward all_gather carries each rank's state of its last document's part,
and a rank's first document starts from the parts of it on earlier ranks
(:func:`packed_plan`, :func:`packed_initial_states`).

The collectives are torch.distributed's (NCCL on GPUs, gloo on CPU).  Contract (as for DDP):
every rank of the group makes the call, with the same shapes except T, the same options and
the same ``initial_state``; when the call needs a gradient every rank backpropagates through
its output.  See docs/distributed.md.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

__all__ = ["check_group", "slice_state", "rank_initial_state", "packed_plan",
           "packed_initial_states", "window_initial_state", "halo_plans",
           "STATE_CHUNK_ELEMENTS"]

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


def agree(group, device, *, what: dict, share: Optional[dict] = None) -> dict:
    """One small all_gather of ``what`` (name -> int): a ValueError on every rank, naming the
    ranks and values, when the ranks disagree (before a collective whose sizes would).  The
    values of ``share`` (name -> int) travel in the same collective without being compared:
    returns name -> [every rank's value]."""
    share = share or {}
    names = list(what) + list(share)
    values = {**what, **share}
    mine = torch.tensor([int(values[n]) for n in names], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    every = torch.empty(world * len(names), dtype=torch.int64, device=device)
    _all_gather(every, mine, group)
    rows = every.view(world, len(names)).tolist()
    bad = [n for i, n in enumerate(names) if n in what and len({r[i] for r in rows}) > 1]
    if bad:
        detail = "; ".join(f"{n}: " + ", ".join(f"rank {r} {_show(n, row[names.index(n)])}"
                                               for r, row in enumerate(rows)) for n in bad)
        raise ValueError(
            f"context parallelism: the ranks of cp_group disagree on {', '.join(bad)} "
            f"({detail}). Every rank must call with the same B, heads, head dims, dtype, "
            f"feature map and options (only T may differ) and the same initial_state")
    return {n: [r[names.index(n)] for r in rows] for n in share}


def _show(name, value):
    if name == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else str(value)
    return str(value)


def call_facts(q, k, v, fm, normalize, Dk, has_init, needs_grad, return_state,
               cu: Optional[list] = None, state_grad: bool = False, window: int = 0) -> dict:
    """What every rank must agree on (T excluded); ``cu``: the packed row's boundaries;
    ``needs_grad``: q, k, v or the map need a gradient, ``state_grad``: the initial state
    does (separately: each decides which collectives the backward runs)."""
    B, H, _, Dqk = q.shape
    name = type(fm).__name__ + ":" + getattr(fm, "name", "") if fm is not None else "features"
    return {"B": B, "H": H, "Hkv": k.shape[1], "Dqk": Dqk, "Dk": Dk, "Dv": v.shape[-1],
            "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else 99,
            "feature map (crc32 of its class and name)": zlib.crc32(name.encode()),
            "normalize": normalize, "initial_state given": has_init,
            "q, k, v or the map need a gradient": needs_grad,
            "initial_state needs a gradient": state_grad, "return_state": return_state,
            "cu_seqlens (crc32 of its entries; -1: none)":
                -1 if cu is None else zlib.crc32(",".join(map(str, cu)).encode()),
            "window": window}


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
    """``flat init (per query head) + sum over the ranks r' that feed this rank of their flat
    states (per k/v head, expanded to the query heads)``: one all_gather each way (see the
    module doc).  ``feeds[r][r']`` (the same on every rank) is 1 when rank r' feeds rank r:
    every earlier rank for one sequence, the ranks holding earlier parts of the same sequence
    for a packed row."""

    @staticmethod
    def forward(ctx, local, init, group, H, G, feeds):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        every = local.new_empty(world * local.numel())
        _all_gather(every, local.contiguous(), group)
        every = every.view(world, *local.shape)
        src = [r for r in range(world) if feeds[rank][r]]
        prefix = every[src].sum(0) if src else torch.zeros_like(local)
        out = _expand(prefix, G)
        if init is not None:
            out = out + init
        ctx.group, ctx.rank, ctx.world, ctx.G, ctx.feeds = group, rank, world, G, feeds
        ctx.has_init = init is not None
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        every = g.new_empty(ctx.world * g.numel())
        _all_gather(every, g, ctx.group)
        every = every.view(ctx.world, *g.shape)
        dst = [r for r in range(ctx.world) if ctx.feeds[r][ctx.rank]]
        later = every[dst].sum(0) if dst else torch.zeros_like(g)
        d_local = _reduce(later, ctx.G)
        d_init = every.sum(0) if ctx.has_init else None
        return d_local, d_init, None, None, None, None


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
    world = dist.get_world_size(group)
    earlier = [[int(r2 < r) for r2 in range(world)] for r in range(world)]
    flat = _RankPrefix.apply(local, init, group, H, G, earlier)
    kv_r = flat[..., :Dk * Dv].reshape(B, H, Dk, Dv)
    z_r = flat[..., Dk * Dv:] if z is not None else None
    return kv_r, z_r


# --------------------------------------------------------------------------- packed rows
class PackedPlan(NamedTuple):
    """How one rank's slice of a packed row meets the sequences (all from the whole row's
    ``cu_seqlens`` and every rank's T, so every rank computes every rank's plan alike).

    ``local_cu``: the boundaries of the sequences this rank holds a part of, in its own
    tokens; ``first`` / ``last``: the indices of the first and last of them; ``tail_start``:
    where the last one's part begins (the only part whose state a later rank can need);
    ``feeds[r][r']``: rank r' holds an earlier part of rank r's first sequence."""

    local_cu: list
    first: int
    last: int
    tail_start: int
    feeds: list


def packed_plan(cu: list, Ts: list, rank: int) -> PackedPlan:
    """The :class:`PackedPlan` of ``rank`` for a row with boundaries ``cu`` cut into slices of
    ``Ts`` tokens (rank order is row order)."""
    import bisect

    offs = [0]
    for t in Ts:
        offs.append(offs[-1] + t)

    def seq_at(pos):  # the sequence holding token pos of the row
        return bisect.bisect_right(cu, pos) - 1

    first = [seq_at(offs[r]) for r in range(len(Ts))]
    last = [seq_at(offs[r + 1] - 1) for r in range(len(Ts))]
    feeds = [[int(r2 < r and last[r2] == first[r] and cu[first[r]] < offs[r])
              for r2 in range(len(Ts))] for r in range(len(Ts))]
    a, b = offs[rank], offs[rank + 1]
    local = [0] + [cu[n] - a for n in range(first[rank] + 1, last[rank] + 1)] + [b - a]
    return PackedPlan(local, first[rank], last[rank], local[-2], feeds)


def packed_initial_states(kv, z, kv0, z0, group, H, plan: PackedPlan):
    """(kv [n, H, Dk, Dv], z [n, H, Dk] or None): the states this rank's n local sequences start
    from: the caller's per-sequence ``initial_state`` rows (``kv0 [N, H, Dk, Dv]``, ``z0``; None
    when not given), and for the first one the states of its earlier parts on earlier ranks.
    ``kv [1, Hkv, Dk, Dv]`` / ``z``: this rank's state of its last sequence's part (see
    :func:`slice_state`).  One all_gather forward (the parts' states), one backward (the
    first local sequence's state gradients)."""
    _, Hkv, Dk, Dv = kv.shape
    G = H // Hkv
    n = plan.last - plan.first + 1
    local = torch.cat([kv.reshape(1, Hkv, -1)] + ([z] if z is not None else []), -1)
    flat = _RankPrefix.apply(local, None, group, H, G, plan.feeds)  # [1, H, X]
    if kv0 is not None:
        rows = [kv0.to(local.dtype).reshape(kv0.shape[0], H, -1)]
        if z is not None:
            rows.append(z0.to(local.dtype))
        # every rank's use of the caller's state is summed into its gradient on every rank
        init = _SumGradOverRanks.apply(torch.cat(rows, -1), group)[plan.first:plan.last + 1]
        flat = torch.cat([flat + init[:1], init[1:]])
    elif n > 1:
        flat = torch.cat([flat, flat.new_zeros(n - 1, *flat.shape[1:])])
    kv_r = flat[..., :Dk * Dv].reshape(n, H, Dk, Dv)
    z_r = flat[..., Dk * Dv:] if z is not None else None
    return kv_r, z_r


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward (the caller's per-sequence state, all N rows); backward: the gradient
    summed over the ranks (one all_reduce), so every rank gets the whole gradient of the state
    it was given, as every rank of one sequence does."""

    @staticmethod
    def forward(ctx, full, group):
        ctx.group = group
        return full.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


# --------------------------------------------------------------------------- the hybrid's window
def halo_plans(Ts: list, W: int) -> list:
    """For every rank, where the W tokens before its first one lie: ``[(rank, rows), ...]``
    in sequence order, ``rows`` from the end of that rank's slice (fewer than W in all at
    the start of the sequence)."""
    plans = []
    for r in range(len(Ts)):
        need, parts, src = min(W, sum(Ts[:r])), [], r - 1
        while need > 0:
            take = min(need, Ts[src])
            if take:
                parts.append((src, take))
            need -= take
            src -= 1
        plans.append(parts[::-1])
    return plans


class _Halo:
    """The W keys and values before this rank's first token: one all_gather of every rank's
    last min(W, T) rows of ``[k | v]`` (front-padded to W rows) forward, one of every rank's
    window gradient (back-aligned to W rows) backward, of which each rank sums the rows
    that came from its own slice.  Run inside :class:`_WindowPrefix`, whose single backward
    makes every rank's collectives come in the same order."""

    @staticmethod
    def forward(ctx, tail, group, Ts, W):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        B, Hkv, n, X = tail.shape
        buf = tail.new_zeros(B, Hkv, W, X)
        buf[:, :, W - n:] = tail
        every = tail.new_empty(world * buf.numel())
        _all_gather(every, buf.contiguous(), group)
        every = every.view(world, B, Hkv, W, X)
        plans = halo_plans(Ts, W)
        parts = [every[src, :, :, W - take:] for src, take in plans[rank]]
        ctx.group, ctx.rank, ctx.world, ctx.plans, ctx.W, ctx.n = group, rank, world, plans, W, n
        ctx.shape = (B, Hkv, X)
        return torch.cat(parts, 2) if parts else tail.new_zeros(B, Hkv, 0, X)

    @staticmethod
    def backward(ctx, g, like):
        B, Hkv, X = ctx.shape
        W = ctx.W
        buf = like.new_zeros(B, Hkv, W, X)
        if g is not None:
            buf[:, :, W - g.shape[2]:] = g
        every = buf.new_empty(ctx.world * buf.numel())
        _all_gather(every, buf.contiguous(), ctx.group)
        every = every.view(ctx.world, B, Hkv, W, X)
        mine = buf.new_zeros(B, Hkv, W, X)  # the gradient of this rank's front-padded tail
        for r, parts in enumerate(ctx.plans):
            at = W - sum(take for _, take in parts)
            for src, take in parts:
                if src == ctx.rank:
                    mine[:, :, W - take:] += every[r, :, :, at:at + take]
                at += take
        return mine[:, :, W - ctx.n:]


class _WindowPrefix(torch.autograd.Function):
    """:class:`_RankPrefix` and :class:`_Halo` as one node: (this rank's initial state
    from the earlier ranks, the keys and values of its window).  One node, so every rank's
    backward runs the two all_gathers in the same order (two nodes could run in a different
    order on ranks whose graphs differ, and the collectives would mismatch)."""

    @staticmethod
    def forward(ctx, local, init, tail, group, H, G, feeds, Ts, W):
        ctx.prefix, ctx.halo = _Ctx(), _Ctx()
        flat = _RankPrefix.forward(ctx.prefix, local, init, group, H, G, feeds)
        win = _Halo.forward(ctx.halo, tail, group, Ts, W)
        ctx.like, ctx.flat_shape, ctx.prefix_dtype = tail.new_empty(0), flat.shape, flat.dtype
        return flat, win

    @staticmethod
    def backward(ctx, g_flat, g_win):
        if g_flat is None:  # (every rank must still run both collectives)
            g_flat = ctx.like.new_zeros(ctx.flat_shape, dtype=ctx.prefix_dtype)
        d_local, d_init = _RankPrefix.backward(ctx.prefix, g_flat)[:2]
        d_tail = _Halo.backward(ctx.halo, g_win, ctx.like)
        return d_local, d_init, d_tail, None, None, None, None, None, None


class _Ctx:
    """A plain attribute holder standing in for an autograd ctx."""


def window_initial_state(kv, z, kv0, z0, k, v, group, H, Ts: list, W: int):
    """:func:`rank_initial_state` for a hybrid call, and the window: ``(kv_r, z_r, window_k
    [B, Hkv, P, Dqk], window_v [B, Hkv, P, Dv])`` with P = min(W, tokens before the slice),
    the window differentiable (its gradients go back to the ranks that hold it).  kv_r, z_r
    still include the window's keys (the caller takes them out).  Every rank must call it."""
    B, Hkv, Dk, Dv = kv.shape
    G = H // Hkv
    local = torch.cat([kv.reshape(B, Hkv, -1)] + ([z] if z is not None else []), -1)
    init = None
    if kv0 is not None:
        init = torch.cat([kv0.to(local.dtype).reshape(B, H, -1)]
                         + ([z0.to(local.dtype)] if z is not None else []), -1)
    world = dist.get_world_size(group)
    earlier = [[int(r2 < r) for r2 in range(world)] for r in range(world)]
    n = min(W, k.shape[2])
    Dqk = k.shape[-1]
    tail = torch.cat([k[:, :, k.shape[2] - n:], v[:, :, v.shape[2] - n:].to(k.dtype)], -1)
    flat, win = _WindowPrefix.apply(local, init, tail, group, H, G, earlier, list(Ts), int(W))
    kv_r = flat[..., :Dk * Dv].reshape(B, H, Dk, Dv)
    z_r = flat[..., Dk * Dv:] if z is not None else None
    return kv_r, z_r, win[..., :Dqk], win[..., Dqk:].to(v.dtype)
