"""CUDA-graph decoding (featattn.hf.enable_cuda_graphs).

On CPU the graph is a stand-in that re-runs the captured call on the static buffers at each
replay, which checks the plumbing a real replay relies on (inputs copied into static buffers,
states advanced in place in the graph's buffers, token counts kept by the wrapper, a cache
handing the buffers to another and getting its states back); the ``cuda`` test captures real
graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import featattn  # noqa: E402
from featattn.hf import (FeatureAttentionCache, cache_kwarg_name, disable_cuda_graphs,  # noqa: E402
                         enable_cuda_graphs)
from featattn.hf.graphs import CUDAGraphDecoding  # noqa: E402
from hf_models import VOCAB, make_model  # noqa: E402


class ReRun:
    """A stand-in CUDA graph: capture runs the call; replay runs it again and writes its
    outputs into the captured ones (a replay re-issues the captured kernels on the same
    buffers, outputs included)."""

    def __init__(self, pool=None):
        self.fn = self.out = None

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        new = self.fn()
        for k, v in self.out.items():
            if isinstance(v, torch.Tensor):
                v.copy_(new[k])


class Broken(ReRun):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


def _patched(fm="elu", layers=None, dtype=torch.float32):
    model = make_model("llama", dtype=dtype)
    return featattn.patch_hf_model(model, fm, layers=layers)


def _graphs(model, cls=ReRun):
    dec = enable_cuda_graphs(model)
    dec.graph_class = cls
    return dec


def _generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("fm", ["elu", "taylor"])
def test_generate_with_graphs_equals_eager(fm):
    model = _patched(fm)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    want = _generate(model, ids, 12)
    dec = _graphs(model)
    got = _generate(model, ids, 12)
    assert torch.equal(got, want)
    (entry,) = dec.entries.values()
    assert entry.replays == 11  # every step after the prefill replays the graph
    assert all("prefill" in r or "one new token" in r for r in dec.eager_reasons), dec.eager_reasons
    # a second generate (a new cache) takes the same graph over
    got2 = _generate(model, ids, 12, **{cache_kwarg_name(model): FeatureAttentionCache(model)})
    assert torch.equal(got2, want) and len(dec.entries) == 1 and entry.replays == 22


@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
def test_windowed_models_replay_once_the_window_is_full(fm):
    """A hybrid model (window 8): a 5-token prompt decodes eagerly while its window fills
    (the state grows), then every step replays, the window's rows moving in the graph's
    buffers; tokens equal eager decoding, and a second cache with a longer prompt replays
    from its first step."""
    model = featattn.patch_hf_model(make_model("llama", dtype=torch.float32), fm, window=8)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, VOCAB, (2, 5), generator=g)
    want = _generate(model, ids, 12)
    dec = _graphs(model)
    assert torch.equal(_generate(model, ids, 12), want)
    (entry,) = dec.entries.values()
    assert entry.replays == 12 - 4  # tokens 6..8 fill the window eagerly
    assert any("still filling" in r for r in dec.eager_reasons), dec.eager_reasons
    assert all(w is not None and w.shape[2] == 8 for w in entry.wk)
    long = torch.randint(1, VOCAB, (2, 11), generator=g)
    want_long = _generate(disable_cuda_graphs(copy.deepcopy(model)), long, 6)
    assert torch.equal(_generate(model, long, 6), want_long) and entry.replays == 8 + 5


def test_alternating_caches_keep_their_own_states():
    """Two caches stepped in turn through one graph equal each stepped alone: the cache that
    loses the graph's buffers gets its states back, and token counts stay per cache."""
    model = _patched("elu")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(1, VOCAB, (2, 5), generator=g), torch.randint(1, VOCAB, (2, 9), generator=g)
    toks = torch.randint(1, VOCAB, (6, 2, 1), generator=g)
    kw = cache_kwarg_name(model)

    def run(prompts_order):
        caches, logits = {}, {"a": [], "b": []}
        with torch.no_grad():
            for name, prompt in (("a", a), ("b", b)):
                caches[name] = FeatureAttentionCache(model)
                model(prompt, **{kw: caches[name]}, use_cache=True)
            for i, name in enumerate(prompts_order):
                c = caches[name]
                n = c.get_seq_length()
                out = model(toks[i], **{kw: c}, use_cache=True,
                            position_ids=torch.full((2, 1), n),
                            cache_position=torch.tensor([n]))
                logits[name].append(out.logits)
        return caches, logits

    order = ["a", "b", "a", "a", "b", "b"]
    want_c, want = run(order)
    dec = _graphs(model)
    got_c, got = run(order)
    for name in "ab":
        for x, y in zip(got[name], want[name]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        assert got_c[name].get_seq_length() == want_c[name].get_seq_length()
        for lx, ly in zip(got_c[name].layers, want_c[name].layers):
            torch.testing.assert_close(lx.state.kv, ly.state.kv, rtol=1e-5, atol=1e-5)
    assert sum(e.replays for e in dec.entries.values()) == 6
    disable_cuda_graphs(model)
    assert "forward" not in model.__dict__ and not hasattr(model, "_featattn_graphs")
    # the cache that held the graph's buffers last still works, eagerly
    with torch.no_grad():
        model(toks[0], **{kw: got_c["b"]}, use_cache=True)


def test_a_step_that_cannot_be_captured_runs_eagerly_with_the_reason():
    model = _patched("elu")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    want = _generate(model, ids, 5)
    dec = _graphs(model, Broken)
    assert torch.equal(_generate(model, ids, 5), want)  # states restored after the failure
    assert any("could not be captured" in r for r in dec.eager_reasons), dec.eager_reasons


def test_training_and_prefill_calls_run_the_models_forward():
    model = _patched("elu")
    dec = _graphs(model)
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    out.loss.backward()  # gradients flow: the model's own forward ran
    assert not dec.entries and any("labels" in r or "grad" in r for r in dec.eager_reasons)


def test_a_copied_model_gets_its_own_wrapper():
    model = _patched("elu")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    want = _generate(model, ids, 6)
    dec = _graphs(model)
    _generate(model, ids, 6)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)  # the copy's weights differ: its steps must use them
    want_twin = _generate(disable_cuda_graphs(copy.deepcopy(twin)), ids, 6)
    new = twin._featattn_graphs
    assert new is not dec and new.model is twin and not new.entries
    new.graph_class = ReRun
    assert torch.equal(_generate(twin, ids, 6), want_twin)
    assert not torch.equal(want_twin, want) and sum(e.replays for e in new.entries.values()) == 5
    assert torch.equal(_generate(model, ids, 6), want)


def test_enable_cuda_graphs_explains_what_it_needs():
    with pytest.raises(ValueError, match="patched by featattn"):
        enable_cuda_graphs(make_model("llama"))
    with pytest.raises(ValueError, match="1 of 2 decoder layers"):
        enable_cuda_graphs(_patched("elu", layers=[0]))
    model = _patched("elu")
    assert enable_cuda_graphs(model) is enable_cuda_graphs(model)
    assert isinstance(model._featattn_graphs, CUDAGraphDecoding)
    import inspect
    assert "logits_to_keep" in inspect.signature(model.forward).parameters  # generate reads it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fm", ["elu", "hedgehog"])
@pytest.mark.parametrize("window", [0, 16])
def test_gpu_generate_with_cuda_graphs_equals_eager(fm, window):
    model = featattn.patch_hf_model(make_model("llama", dtype=torch.float32), fm,
                                    window=window).cuda()
    ids = torch.randint(1, VOCAB, (2, 40), device="cuda")
    want = _generate(model, ids, 16)
    dec = enable_cuda_graphs(model)
    got = _generate(model, ids, 16)
    assert torch.equal(got, want), dec.eager_reasons
    assert sum(e.replays for e in dec.entries.values()) == 15, dec.eager_reasons


def test_graphs_follow_the_model_and_the_call():
    """The review's cases: a model moved to another dtype captures again (a graph replays
    the old weights' addresses); non-fp32 states, a mask without positions and
    return_dict=False are honoured; a state object a caller holds keeps its values when
    another cache takes the graph; buffers made under inference_mode work after it; a
    pickled model drops its graphs."""
    import pickle

    model = _patched("elu")
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    dec = _graphs(model)
    with torch.inference_mode():
        first = _generate(model, ids, 4)
    assert torch.equal(_generate(model, ids, 4), first)  # no inference-tensor errors
    (entry,) = dec.entries.values()
    assert entry.replays == 6
    captured = entry.graph
    model.to(torch.float64)
    disable_cuda_graphs(twin := copy.deepcopy(model))
    want = _generate(twin, ids, 4)
    got = _generate(model, ids, 4)
    assert torch.equal(got, want)
    assert any("not fp32" in r for r in dec.eager_reasons), dec.eager_reasons  # fp64 states
    model.to(torch.float32)
    old = model.lm_head.weight  # kept alive: the new Parameter lives elsewhere
    model.lm_head.weight = torch.nn.Parameter(old.detach().clone())
    assert torch.equal(_generate(model, ids, 4), first)
    assert entry.graph is not captured and old is not None  # weights moved: captured again
    kw = cache_kwarg_name(model)
    a, b = FeatureAttentionCache(model), FeatureAttentionCache(model)
    step = torch.randint(1, VOCAB, (2, 1), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model(ids, **{kw: a}, use_cache=True)
        model(ids, **{kw: b}, use_cache=True)
        pos = torch.full((2, 1), 6)
        model(step, **{kw: a}, use_cache=True, position_ids=pos)
        held = a.layers[0].state  # a caller holding a's state object
        before = held.kv.clone()
        model(step, **{kw: b}, use_cache=True, position_ids=pos)  # b takes the graph over
        assert torch.equal(held.kv, before)
        out = model(step, **{kw: b}, use_cache=True, position_ids=pos + 1, return_dict=False)
        assert isinstance(out, tuple) and out[0].shape == (2, 1, VOCAB)
        n = dec.eager_reasons.get(
            "attention_mask without position_ids (positions would come from the mask)", 0)
        model(step, **{kw: b}, use_cache=True, attention_mask=torch.ones(2, 9, dtype=torch.long))
        assert dec.eager_reasons[
            "attention_mask without position_ids (positions would come from the mask)"] == n + 1
    again = pickle.loads(pickle.dumps(model))
    assert again._featattn_graphs.entries == {} and again._featattn_graphs.model is again
