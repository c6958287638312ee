"""Context parallelism (featattn/distributed.py) with gloo on 127.0.0.1: 2 and 4 processes,
each holding a slice of one sequence, against the single-process call on the whole sequence.

One spawn per world size runs every case (a process start costs seconds on the CI machine);
each rank writes its errors to a JSON file the tests read."""

from __future__ import annotations

import json
import os
import socket
import traceback

import pytest
import torch

import featattn
from featattn.feature_maps import resolve_feature_map

# name -> (world slices (tokens per rank), dtype, feature map, normalize, B, H, Hkv, Dqk, Dv,
#          with an initial state, return_state used in the loss)
CASES = {
    "elu_f64_init": ([5, 12], torch.float64, "elu", True, 2, 2, 2, 8, 8, True, False),
    "taylor_f64": ([9, 7], torch.float64, "taylor", True, 1, 2, 2, 4, 6, True, True),
    "hedgehog_f64_params": ([6, 11], torch.float64, "hedgehog", True, 1, 2, 2, 8, 8, False, False),
    "plain_gqa_f64": ([10, 3], torch.float64, None, False, 1, 4, 2, 6, 5, True, True),
    "one_token_rank_f32": ([1, 30], torch.float32, "elu", True, 2, 2, 2, 8, 4, True, True),
    "four_ranks_f64": ([3, 1, 7, 10], torch.float64, "elu", True, 1, 2, 1, 8, 8, True, True),
    "four_ranks_taylor_f32": ([4, 9, 2, 5], torch.float32, "taylor", True, 1, 2, 2, 4, 4, False, True),
    "four_ranks_hedgehog_f64": ([2, 5, 1, 6], torch.float64, "hedgehog", True, 1, 2, 2, 4, 4, True, False),
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _make_map(name, dqk, dtype):
    if name != "hedgehog":
        return name
    torch.manual_seed(11)
    fm = featattn.get_feature_map("hedgehog", head_dim=dqk, heads=2).to(dtype)
    with torch.no_grad():  # away from the identity init, so its gradient is not special
        for p in fm.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return fm


def run_case(name, rank, group):
    """Errors of this rank's slice (output, gradients) against the whole sequence."""
    import torch.distributed as dist

    slices, dtype, fmname, normalize, B, H, Hkv, Dqk, Dv, with_init, use_state = CASES[name]
    world = len(slices)
    T = sum(slices)
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(B, H, T, Dqk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, T, Dqk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    fm = _make_map(fmname, Dqk, dtype)
    Dk = resolve_feature_map(fm).output_dim(Dqk) if fm is not None else Dqk
    if with_init:
        sdt = torch.float64 if dtype == torch.float64 else torch.float32
        kv0 = torch.rand(B, H, Dk, Dv, generator=g, dtype=torch.float64).to(sdt)
        z0 = torch.rand(B, H, Dk, generator=g, dtype=torch.float64).to(kv0.dtype) if normalize else None
    wkv = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)

    def loss_of(o, state, last):
        loss = (o * w_slice).sum()
        if use_state and last:
            loss = loss + (state.kv * wkv.to(state.kv.dtype)).sum()
        return loss

    def leaves(q_, k_, v_):
        ls = [t.clone().requires_grad_() for t in (q_, k_, v_)]
        st = None
        if with_init:
            st = featattn.LinearAttentionState(kv0.clone().requires_grad_(),
                                               None if z0 is None else z0.clone().requires_grad_())
        return ls, st

    # the whole sequence in one process
    (qf, kf, vf), st_full = leaves(q, k, v)
    params = list(fm.parameters()) if isinstance(fm, torch.nn.Module) else []
    for p in params:
        p.grad = None
    w_slice = w
    o_full, s_full = featattn.linear_attention(qf, kf, vf, feature_map=fm, normalize=normalize,
                                               initial_state=st_full, return_state=True)
    loss_of(o_full, s_full, True).backward()
    want = {"dq": qf.grad, "dk": kf.grad, "dv": vf.grad}
    if with_init:
        want["dkv0"] = st_full.kv.grad
        if normalize:
            want["dz0"] = st_full.z.grad
    want_params = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # this rank's slice
    a = sum(slices[:rank])
    sl = slice(a, a + slices[rank])
    (ql, kl, vl), st = leaves(q[:, :, sl], k[:, :, sl], v[:, :, sl])
    w_slice = w[:, :, sl]
    o, s = featattn.linear_attention(ql, kl, vl, feature_map=fm, normalize=normalize,
                                     initial_state=st, return_state=True, cp_group=group)
    loss_of(o, s, rank == world - 1).backward()
    err = {"o": _rel(o, o_full[:, :, sl]), "dq": _rel(ql.grad, want["dq"][:, :, sl]),
           "dk": _rel(kl.grad, want["dk"][:, :, sl]), "dv": _rel(vl.grad, want["dv"][:, :, sl])}
    if with_init:
        err["dkv0"] = _rel(st.kv.grad, want["dkv0"])
        if normalize:
            err["dz0"] = _rel(st.z.grad, want["dz0"])
    if rank == world - 1:
        err["final kv"] = _rel(s.kv, s_full.kv)
    for i, p in enumerate(params):  # DDP would sum these over the ranks
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        err[f"param {i}"] = _rel(total, want_params[i])
    return err


# name -> (world slices, whole row's cu_seqlens, dtype, map, normalize, H, Hkv, with an
#          initial state).  Sequences cross rank boundaries; in the four-rank case one rank
#          lies inside one sequence and another starts exactly where a sequence does.
PACKED = {
    "packed_elu_init": ([7, 9], [0, 3, 10, 12, 16], torch.float64, "elu", True, 2, 2, True),
    "packed_four_ranks_gqa": ([4, 3, 5, 6], [0, 1, 9, 12, 18], torch.float64, "elu", True, 4, 2,
                              True),
    "packed_hedgehog_plain": ([5, 6], [0, 8, 11], torch.float64, "hedgehog", False, 2, 2, False),
}


def packed_case(name, rank, group):
    """One packed row split across the ranks against the whole row in one process. The loss
    takes every rank's output slice and its returned states (each local document's state after
    the rank's last token of it), so gradients also flow back to earlier ranks through the
    states; checked: output, states, q/k/v gradients, the per-document initial state's
    gradient (whole on every rank) and the map's parameter gradients (summed over ranks)."""
    import torch.distributed as dist

    slices, cu, dtype, fmname, normalize, H, Hkv, with_init = PACKED[name]
    T, N, Dqk, Dv = sum(slices), len(cu) - 1, 8, 6
    g = torch.Generator().manual_seed(99)
    q = torch.randn(1, H, T, Dqk, generator=g, dtype=dtype)
    k = torch.randn(1, Hkv, T, Dqk, generator=g, dtype=dtype)
    v = torch.randn(1, Hkv, T, Dv, generator=g, dtype=dtype)
    w = torch.randn(1, H, T, Dv, generator=g, dtype=dtype)
    fm = _make_map(fmname, Dqk, dtype)
    params = list(fm.parameters()) if isinstance(fm, torch.nn.Module) else []
    Dk = resolve_feature_map(fm).output_dim(Dqk) if fm is not None else Dqk
    kv0 = torch.rand(N, H, Dk, Dv, generator=g, dtype=dtype) if with_init else None
    z0 = torch.rand(N, H, Dk, generator=g, dtype=dtype) if with_init and normalize else None
    ends = [sum(slices[:r + 1]) for r in range(len(slices))]
    starts = [e - t for e, t in zip(ends, slices)]
    firsts = [len([c for c in cu if c <= a]) - 1 for a in starts]
    lasts = [len([c for c in cu if c < b]) - 1 for b in ends]
    wst = [torch.randn(lasts[r] - firsts[r] + 1, H, Dk, Dv + 1, generator=g, dtype=dtype)
           for r in range(len(slices))]  # weights of each rank's returned states in the loss

    def state_loss(st, r, rows):
        loss = (st.kv[rows] * wst[r][..., :Dv]).sum()
        return loss + ((st.z[rows] * wst[r][..., Dv]).sum() if normalize else 0.0)

    def call(qs, ks, vs, cu_, init, group_=None):
        n = len(cu_) - 1  # a row cut after a rank holds fewer documents
        st = None if init is None else featattn.LinearAttentionState(
            init[0][:n], None if init[1] is None else init[1][:n])
        return featattn.linear_attention(qs, ks, vs, feature_map=fm, normalize=normalize,
                                         initial_state=st, return_state=True,
                                         cu_seqlens=torch.tensor(cu_), cp_group=group_)

    def leaves(*ts):
        return [None if t is None else t.clone().requires_grad_() for t in ts]

    # the whole row in one process, and each rank's states from the row cut after the rank
    qf, kf, vf, kvf, zf = leaves(q, k, v, kv0, z0)
    init_f = (kvf, zf) if with_init else None
    o_f, _ = call(qf, kf, vf, cu, init_f)
    loss = (o_f * w).sum()
    want_states = []
    for r, b in enumerate(ends):
        _, s_cut = call(qf[:, :, :b], kf[:, :, :b], vf[:, :, :b],
                        [c for c in cu if c < b] + [b], init_f)
        loss = loss + state_loss(s_cut, r, slice(firsts[r], None))
        want_states.append(s_cut)
    for p in params:
        p.grad = None
    loss.backward()
    want_params = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    sl = slice(starts[rank], ends[rank])
    ql, kl, vl, kvl, zl = leaves(q[:, :, sl], k[:, :, sl], v[:, :, sl], kv0, z0)
    o, s = call(ql, kl, vl, cu, (kvl, zl) if with_init else None, group)
    ((o * w[:, :, sl]).sum() + state_loss(s, rank, slice(None))).backward()
    want = want_states[rank]
    err = {"o": _rel(o, o_f[:, :, sl]), "dq": _rel(ql.grad, qf.grad[:, :, sl]),
           "dk": _rel(kl.grad, kf.grad[:, :, sl]), "dv": _rel(vl.grad, vf.grad[:, :, sl]),
           "states": _rel(s.kv, want.kv[firsts[rank]:])
           if s.kv.shape == want.kv[firsts[rank]:].shape else float("inf")}
    if normalize:
        err["states z"] = _rel(s.z, want.z[firsts[rank]:])
    if with_init:
        err["dkv0"] = _rel(kvl.grad, kvf.grad)
        if normalize:
            err["dz0"] = _rel(zl.grad, zf.grad)
    for i, p in enumerate(params):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        err[f"param {i}"] = _rel(total, want_params[i])
    return err


# name -> (world slices, dtype, map, window, B, H, Hkv, Dqk, Dv, with an initial state).  In
# the four-rank case two slices are shorter than the window, so a rank's window spans ranks.
HYBRID = {
    "hybrid_elu_f64_init": ([9, 14], torch.float64, "elu", 5, 2, 2, 2, 8, 8, True),
    "hybrid_four_ranks_gqa": ([3, 2, 7, 10], torch.float64, "elu", 6, 1, 4, 2, 8, 6, True),
    "hybrid_hedgehog_params": ([6, 11], torch.float64, "hedgehog", 4, 1, 2, 2, 8, 8, False),
    "hybrid_f32_long_window": ([20, 25], torch.float32, "elu", 32, 1, 2, 1, 8, 8, True),
}


def hybrid_case(name, rank, group):
    """A hybrid (window) call split across the ranks against the whole sequence: output, the
    last rank's state (linear part and window), and every gradient (q, k, v, the learnable
    mixing weight and the map's parameters summed over the ranks, the initial state), with
    the returned window in the loss so gradients also cross ranks through it."""
    import torch.distributed as dist

    slices, dtype, fmname, W, B, H, Hkv, Dqk, Dv, with_init = HYBRID[name]
    world, T = len(slices), sum(slices)
    g = torch.Generator().manual_seed(4321)
    q = torch.randn(B, H, T, Dqk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, T, Dqk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64).to(dtype)
    logit = torch.randn(H, generator=g, dtype=torch.float64)
    fm = _make_map(fmname, Dqk, dtype)
    Dk = resolve_feature_map(fm).output_dim(Dqk) if fm is not None else Dqk
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    kv0 = torch.rand(B, H, Dk, Dv, generator=g, dtype=torch.float64).to(sdt)
    z0 = torch.rand(B, H, Dk, generator=g, dtype=torch.float64).to(sdt)
    wkv = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64).to(sdt)
    wwin = torch.randn(B, Hkv, min(W, T), Dv, generator=g, dtype=torch.float64).to(dtype)
    params = list(fm.parameters()) if isinstance(fm, torch.nn.Module) else []

    def run(qs, ks, vs, ws, last, group_=None):
        lv = [t.clone().requires_grad_() for t in (qs, ks, vs)]
        lg = logit.clone().to(sdt).requires_grad_()
        st = featattn.LinearAttentionState(kv0.clone().requires_grad_(),
                                           z0.clone().requires_grad_()) if with_init else None
        for p in params:
            p.grad = None
        o, s = featattn.linear_attention(*lv, feature_map=fm, window=W,
                                         window_weight=torch.sigmoid(lg), initial_state=st,
                                         return_state=True, cp_group=group_)
        loss = (o * ws).sum()
        if last:
            loss = loss + (s.kv * wkv).sum() + (s.window_v * wwin).sum()
        loss.backward()
        grads = {"dq": lv[0].grad, "dk": lv[1].grad, "dv": lv[2].grad, "dlogit": lg.grad}
        if with_init:
            grads["dkv0"], grads["dz0"] = st.kv.grad, st.z.grad
        grads.update({f"param {i}": p.grad.clone() for i, p in enumerate(params)})
        return o, s, grads

    o_f, s_f, want = run(q, k, v, w, True)
    a = sum(slices[:rank])
    sl = slice(a, a + slices[rank])
    o, s, got = run(q[:, :, sl], k[:, :, sl], v[:, :, sl], w[:, :, sl], rank == world - 1, group)
    err = {"o": _rel(o, o_f[:, :, sl])}
    for key in ("dq", "dk", "dv"):
        err[key] = _rel(got[key], want[key][:, :, sl])
    for key in got:  # shared leaves: each rank's share, summed over the ranks (as DDP does)
        if key.startswith("param") or key == "dlogit":
            total = got[key].clone()
            dist.all_reduce(total, group=group)
            err[key] = _rel(total, want[key])
    if with_init:  # the caller's state: its whole gradient on every rank
        err["dkv0"], err["dz0"] = _rel(got["dkv0"], want["dkv0"]), _rel(got["dz0"], want["dz0"])
    if rank == world - 1:
        err["final kv"], err["final z"] = _rel(s.kv, s_f.kv), _rel(s.z, s_f.z)
        err["final window k"] = _rel(s.window_k, s_f.window_k)
        err["final window v"] = _rel(s.window_v, s_f.window_v)
    return err


def layer_case(rank, group):
    """FeatureAttention(cp_group=...): each rank's output slice, and the parameter gradients
    summed over the ranks, equal the layer on the whole sequence."""
    import torch.distributed as dist

    slices = [7, 9]
    torch.manual_seed(5)
    layer = featattn.FeatureAttention(16, 2, "hedgehog").double()
    x = torch.randn(2, sum(slices), 16, dtype=torch.float64)
    w = torch.randn_like(x)
    (layer(x) * w).sum().backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    a = sum(slices[:rank])
    sl = slice(a, a + slices[rank])
    y = layer(x[:, sl], cp_group=group)
    (y * w[:, sl]).sum().backward()
    err = {"o": _rel(y, layer(x)[:, sl].detach())}
    for i, p in enumerate(layer.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total, group=group)
        err[f"param {i}"] = _rel(total, want[i])
    return err


def mismatch_case(rank, group):
    """Rank 1 passes another Dv: every rank must raise the same ValueError (no hang)."""
    q = torch.randn(1, 2, 4, 8)
    v = torch.randn(1, 2, 4, 8 if rank == 0 else 6)
    try:
        featattn.linear_attention(q, q, v, feature_map="elu", cp_group=group)
    except ValueError as e:
        return str(e)
    return "no error"


def _worker(rank, world, port, names, outdir):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results = {}
    for name in names:
        try:
            extra = {"mismatch": mismatch_case, "layer": layer_case}
            if name in extra:
                results[name] = extra[name](rank, group)
            elif name in PACKED:
                results[name] = packed_case(name, rank, group)
            elif name in HYBRID:
                results[name] = hybrid_case(name, rank, group)
            else:
                results[name] = run_case(name, rank, group)
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"error": traceback.format_exc()}
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, names, tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp(f"cp{world}")
    mp.spawn(_worker, args=(world, _free_port(), names, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    two = [n for n, c in CASES.items() if len(c[0]) == 2] + ["mismatch", "layer"]
    two += [n for n, c in PACKED.items() if len(c[0]) == 2]
    two += [n for n, c in HYBRID.items() if len(c[0]) == 2]
    four = [n for n, c in CASES.items() if len(c[0]) == 4]
    four += [n for n, c in PACKED.items() if len(c[0]) == 4]
    four += [n for n, c in HYBRID.items() if len(c[0]) == 4]
    return {2: _spawn(2, two, tmp_path_factory), 4: _spawn(4, four, tmp_path_factory)}


@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_equals_the_whole_sequence(name, results):
    """Output, q/k/v gradients, the initial state's gradient (full on every rank), the map's
    parameter gradients (summed over ranks) and the last rank's final state, on every rank."""
    world = len(CASES[name][0])
    tol = TOL[CASES[name][1]]
    for rank, res in enumerate(results[world]):
        err = res[name]
        assert "error" not in err, f"rank {rank}:\n{err.get('error')}"
        assert {"o", "dq", "dk", "dv"} <= set(err)
        bad = {k: v for k, v in err.items() if not v <= tol}
        assert not bad, f"rank {rank}: {bad} (tolerance {tol})"


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_row_across_ranks_equals_the_whole_row(name, results):
    """cu_seqlens with cp_group: sequences crossing rank boundaries (and a rank inside one)."""
    world = len(PACKED[name][0])
    for rank, res in enumerate(results[world]):
        err = res[name]
        assert "error" not in err, f"rank {rank}:\n{err.get('error')}"
        assert {"o", "dq", "dk", "dv", "states"} <= set(err)
        bad = {k: v for k, v in err.items() if not v <= 1e-10}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("name", list(HYBRID))
def test_hybrid_across_ranks_equals_the_whole_sequence(name, results):
    """window > 0 with cp_group: each rank's window from the ranks before it (across two
    ranks where slices are shorter than the window), its linear state less that window."""
    slices, dtype = HYBRID[name][0], HYBRID[name][1]
    for rank, res in enumerate(results[len(slices)]):
        err = res[name]
        assert "error" not in err, f"rank {rank}:\n{err.get('error')}"
        assert {"o", "dq", "dk", "dv", "dlogit"} <= set(err)
        if rank == len(slices) - 1:
            assert {"final kv", "final window k", "final window v"} <= set(err)
        bad = {k: v for k, v in err.items() if not v <= TOL[dtype]}
        assert not bad, f"rank {rank}: {bad}"


def test_feature_attention_layer_with_cp_group(results):
    for rank, res in enumerate(results[2]):
        err = res["layer"]
        assert "error" not in err, f"rank {rank}:\n{err.get('error')}"
        bad = {k: v for k, v in err.items() if not v <= 1e-10}
        assert not bad and len(err) > 3, f"rank {rank}: {err}"


def test_mismatched_ranks_raise_the_same_clear_error(results):
    msgs = [res["mismatch"] for res in results[2]]
    for m in msgs:
        assert "disagree on Dv" in m and "rank 0 8" in m and "rank 1 6" in m, m
    assert msgs[0] == msgs[1]


def test_cp_group_errors_without_a_group():
    q = torch.randn(1, 1, 4, 4)
    import torch.distributed as dist

    assert not dist.is_initialized()  # the ranks live in spawned processes
    with pytest.raises(ValueError, match="init_process_group"):
        featattn.linear_attention(q, q, q, cp_group=object())
    # a window with context parallelism: one sequence, a plain initial state (said before
    # any collective, so every rank raises alike)
    with pytest.raises(ValueError, match="not supported with cu_seqlens yet"):
        featattn.linear_attention(q, q, q, window=2, cp_group=object(),
                                  cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    _, st = featattn.linear_attention(q, q, q, feature_map="elu", window=2, return_state=True)
    with pytest.raises(ValueError, match="initial_state holding window keys"):
        featattn.linear_attention(q, q, q, feature_map="elu", window=2, initial_state=st,
                                  cp_group=object())


def test_example_runs_under_torchrun():
    """examples/context_parallel.py as docs/distributed.md runs it (gloo, 2 ranks)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    for attempt in range(3):
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(_free_port()), str(root / "examples" / "context_parallel.py"),
             "--tokens", "300"], capture_output=True, text=True, env=env, timeout=180)
        # A rank aborting in PyTorch's gloo teardown (its worker threads at interpreter exit,
        # after barrier and destroy_process_group; seen once in a dozen runs on the 2-core
        # machine) is not featattn's: run again; anything else fails at once.
        if out.returncode == 0 or "terminate called without an active exception" not in out.stderr:
            break
    assert out.returncode == 0, out.stderr[-3000:]
    errs = [float(e) for e in re.findall(r"error (\S+?)[,\s]", out.stdout + "\n")]
    assert len(errs) == 3 and max(errs) < 1e-5, out.stdout
