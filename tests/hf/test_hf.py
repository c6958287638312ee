"""featattn.hf: patching transformers models (Llama, Mistral, Qwen2, GPT-2) with feature attention.

Tiny random-init models built from configs (offline), float64 unless a test is about dtypes.
"""

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

import featattn  # noqa: E402
from featattn import hf  # noqa: E402
from featattn.hf import (  # noqa: E402
    HFFeatureAttention,
    is_patched,
    patch_hf_model,
    patched_layers,
    repatch_hf_model,
    unpatch_hf_model,
)

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]
VOCAB = hf_models.VOCAB


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


def make_model(family="llama", layers=2, dtype=torch.float64, seed=0):
    return hf_models.make_model(family, layers=layers, dtype=dtype, seed=seed)


def ids_batch(B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (B, T), generator=g)


def attn_of(model, i):
    base = model.base_model
    layer = (base.h if model.config.model_type == "gpt2" else base.layers)[i]
    return layer.attn if model.config.model_type == "gpt2" else layer.self_attn


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def cache_kw(model, cache):
    """``cache=`` (transformers >= 5.2x) or ``past_key_values=`` (5.17), whichever forward takes."""
    return {hf.cache_kwarg_name(model): cache}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


# --------------------------------------------------------------------------- import / errors


def run_python(code):
    """Run ``code`` in a fresh interpreter (same sys.path); fail with its stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import featattn, featattn.hf\n"
        "from featattn.hf import patch_hf_model\n"
        "try:\n"
        "    patch_hf_model(None)\n"
        "except ImportError as e:\n"
        "    assert 'featattn[hf]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    run_python(code)


HF_TOP_LEVEL = ["patch_hf_model", "unpatch_hf_model", "repatch_hf_model", "load_patched_hf_model",
                "transfer_attention"]


def test_import_featattn_does_not_import_hf():
    # featattn.patch_hf_model, load_patched_hf_model, ... are served lazily (PEP 562): the core
    # package never imports its Hugging Face leaf until one of those names is used
    code = (
        f"names = {HF_TOP_LEVEL!r}\n"
        "import featattn, sys\n"
        "assert 'featattn.hf' not in sys.modules, 'import featattn imported featattn.hf'\n"
        "assert sorted(featattn._HF_NAMES) == sorted(names), featattn._HF_NAMES\n"
        "assert set(names) <= set(featattn.__all__) and set(names) <= set(dir(featattn))\n"
        "fn = featattn.load_patched_hf_model\n"
        "assert 'featattn.hf' in sys.modules\n"
        "import featattn.hf\n"
        "assert fn is featattn.hf.load_patched_hf_model\n"
        "for name in names:\n"
        "    assert getattr(featattn, name) is getattr(featattn.hf, name), name\n"
        "    assert name in featattn.hf.__all__, name\n"
        "from featattn import *\n"
        "try:\n"
        "    featattn.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    run_python(code)


def test_unsupported_model_names_the_families():
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    with pytest.raises(NotImplementedError, match="supported families: llama .*gpt2 \\(GPT2LMHeadModel\\)"):
        patch_hf_model(transformers.BertForMaskedLM(cfg))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM"):
        patch_hf_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        patch_hf_model("llama")


def test_argument_errors():
    model = make_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        patch_hf_model(model, layers=[2])
    with pytest.raises(ValueError, match="twice"):
        patch_hf_model(model, layers=[0, -2])
    with pytest.raises(ValueError, match="unknown feature map"):
        patch_hf_model(model, "no_such_map")
    with pytest.raises(TypeError, match="JSON"):
        patch_hf_model(model, "elu", feature_map_kwargs={"bad": torch.float32})
    with pytest.raises(ValueError, match="eps"):
        patch_hf_model(model, eps=0.0)
    assert not is_patched(model) and not hasattr(model.config, "featattn")  # nothing half-done


def _snapshot(model, ids):
    """Everything a failed patch_hf_model could have changed."""
    base = model.base_model
    layers = base.h if model.config.model_type == "gpt2" else base.layers
    attn_name = "attn" if model.config.model_type == "gpt2" else "self_attn"
    with torch.no_grad():
        logits = model(ids).logits.clone()
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attn": [(id(getattr(layer, attn_name)), type(getattr(layer, attn_name)).__name__)
                 for layer in layers],
        "config": model.config.to_dict(),
        "hooks": (len(base._forward_pre_hooks), len(model._forward_pre_hooks)),
        "logits": logits,
    }


def _assert_same(before, after):
    assert after["attn"] == before["attn"]
    assert after["hooks"] == before["hooks"]
    assert after["config"] == before["config"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)


# (args, kwargs, exception, what the message must name)
BAD_PATCH_ARGS = [
    (("elu",), {"scale": "x"}, TypeError, r"scale must be None or a real number, got str 'x'"),
    (("elu",), {"scale": True}, TypeError, r"scale .* got bool True"),
    (("elu",), {"scale": float("nan")}, ValueError, r"scale must be None or a finite number, got nan"),
    (("elu",), {"eps": "x"}, TypeError, r"eps must be a finite float > 0, got str 'x'"),
    (("elu",), {"eps": -1.0}, ValueError, r"eps must be a finite float > 0, got -1.0"),
    (("elu",), {"normalize": "yes"}, TypeError, r"normalize must be a bool, got str 'yes'"),
    (("elu",), {"backend": "nope"}, ValueError, r"backend must be one of 'auto'.*got str 'nope'"),
    (("elu",), {"backend": None}, TypeError, r"backend must be one of .*got NoneType None"),
    (("elu",), {"layers": 1.5}, TypeError, r"layers must be None, an int or a list of ints.*got float 1.5"),
    (("elu",), {"layers": "01"}, TypeError, r"layers must be .*got str '01'"),
    (("elu",), {"layers": [0, "1"]}, TypeError, r"layers .*got an element str '1'"),
    (("elu",), {"layers": [0, 5]}, ValueError, r"layers: index 5 is out of range .* 2 decoder layers"),
    (("elu",), {"layers": []}, ValueError, r"layers is empty"),
    ((3,), {}, TypeError, r"feature_map must be a registered name .*got int 3"),
    (("no_such_map",), {}, ValueError, r"feature_map: unknown feature map 'no_such_map'"),
    (("hedgehog",), {"feature_map_kwargs": [("feature_dim", 4)]}, TypeError,
     r"feature_map_kwargs must be a dict or None, got list"),
    (("hedgehog",), {"feature_map_kwargs": {"no_such_arg": 1}}, TypeError,
     r"feature_map_kwargs: HedgehogFeatureMap\(.*no_such_arg=1.*\) failed"),
    (("hedgehog",), {"feature_map_kwargs": {"feature_dim": torch.float32}}, TypeError,
     r"feature_map_kwargs must be JSON-serialisable"),
    ((featattn.get_feature_map("elu"),), {"feature_map_kwargs": {"x": 1}}, ValueError,
     r"feature_map_kwargs=\{'x': 1\} only applies when feature_map is a name or a class"),
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bad_patch_arguments_raise_and_leave_the_model_untouched(family):
    model = make_model(family)
    ids = ids_batch(2, 6)
    before = _snapshot(model, ids)
    for args, kwargs, exc, message in BAD_PATCH_ARGS:
        with pytest.raises(exc, match=message):
            patch_hf_model(model, *args, **kwargs)
        _assert_same(before, _snapshot(model, ids))
    assert not is_patched(model) and not hasattr(model.config, "featattn")
    # and the same model still patches with good arguments
    patch_hf_model(model, "elu", scale=0.5, layers=[-1], backend="torch")
    assert patched_layers(model) == [1] and attn_of(model, 1).q_scale == 0.5
    assert model.config.featattn["scale"] == 0.5


# --------------------------------------------------------------------------- structure, exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_structure_and_forward(family):
    model = make_model(family)
    keys_before = set(model.state_dict())
    originals = [attn_of(model, i) for i in range(2)]
    assert patch_hf_model(model) is model
    assert is_patched(model) and patched_layers(model) == [0, 1]
    for i, orig in enumerate(originals):
        attn = attn_of(model, i)
        assert isinstance(attn, HFFeatureAttention) and attn.original is orig
        for name, child in orig.named_children():  # the projections are shared, not copied
            assert getattr(attn, name) is child
        assert attn.q_scale == 1.0  # taylor: the model's 1/sqrt(d) is the map's built-in one
    assert set(model.state_dict()) == keys_before  # taylor has no parameters
    rec = model.config.featattn
    assert rec["feature_map"] == "taylor" and rec["layers"] == [0, 1] and rec["normalize"] is True
    out = model(ids_batch(3, 11))
    assert out.logits.shape == (3, 11, VOCAB) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_attention_equals_linear_attention(family):
    """The patched layer == featattn.linear_attention on the projected (and rotated) q/k/v."""
    model = make_model(family)
    patch_hf_model(model)
    attn = attn_of(model, 1)
    x, pe, out = hf_models.attention_io(model, attn, ids_batch(2, 13))
    B, T = 2, 13
    if family == "gpt2":
        q, k, v = attn.c_attn(x).split(32, dim=2)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.view(B, T, -1, 8).transpose(1, 2)
    k = k.view(B, T, -1, 8).transpose(1, 2)
    v = v.view(B, T, -1, 8).transpose(1, 2)
    assert q.shape[1] == 4 and k.shape[1] == (4 if family == "gpt2" else 2)  # grouped heads kept
    if family != "gpt2":
        mod = sys.modules[type(attn.original).__module__]
        cos, sin = pe
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    o = featattn.linear_attention(q, k, v, feature_map="taylor", backend="reference")
    o = o.transpose(1, 2).reshape(B, T, 32)
    expected = attn.c_proj(o) if family == "gpt2" else attn.o_proj(o)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_reaches_learnable_feature_map(family):
    model = make_model(family, dtype=torch.float32).train()
    patch_hf_model(model, "hedgehog", feature_map_kwargs={"feature_dim": 6})
    fm = attn_of(model, 0).feature_map
    assert type(fm).__name__ == "HedgehogFeatureMap"
    kv_heads = 4 if family == "gpt2" else 2
    assert fm.q_weight.shape == (4, 8, 6) and fm.k_weight.shape == (kv_heads, 8, 6)  # GQA sizes filled in
    assert attn_of(model, 0).q_scale == pytest.approx(8 ** -0.5)  # the model's softmax scaling
    assert any(".feature_map." in k for k in model.state_dict())
    ids = ids_batch(2, 10)
    loss = model(ids, labels=ids).loss
    loss.backward()
    for i in range(2):
        attn = attn_of(model, i)
        for p in attn.feature_map.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        proj = attn.c_attn if family == "gpt2" else attn.q_proj
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # one optimiser step over the feature maps changes the loss
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".feature_map." in n], lr=1.0)
    opt.step()
    with torch.no_grad():
        assert model(ids, labels=ids).loss != loss


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_sequences(family, side):
    # elu is not invariant to shifting every position (taylor of rotary q.k is), so this also
    # checks that positions of a padded row match the unpadded run
    model = make_model(family)
    patch_hf_model(model, "elu")
    seqs = [ids_batch(1, n, seed=10 + n)[0] for n in (9, 5, 7)]
    ids, mask, places = hf_models.padded_batch(seqs, side)
    logits = model(ids, attention_mask=mask).logits
    for b, (s, sl) in enumerate(zip(seqs, places)):
        alone = model(s[None]).logits[0]
        torch.testing.assert_close(logits[b, sl], alone, rtol=1e-9, atol=1e-10)


def test_direct_layer_call_reads_padding_from_the_attention_mask():
    """Without the base-model hook (a layer called by hand), the patched attention takes the key
    padding from the mask it is given: 2-D, 4-D bool or 4-D additive float."""
    model = make_model("llama")
    patch_hf_model(model, "elu")
    attn = attn_of(model, 0)
    B, T = 2, 6
    x = torch.randn(B, T, 32, dtype=torch.float64)
    pos = torch.arange(T)[None].expand(B, T)
    pe = model.model.rotary_emb(x, pos)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, :2] = False
    want, _ = attn(hidden_states=x, position_embeddings=pe, attention_mask=None,
                   **{hf.PADDING_KWARG: keep})
    nopad, _ = attn(hidden_states=x, position_embeddings=pe, attention_mask=None)
    assert not torch.allclose(want[1], nopad[1])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    bool4d = causal[None, None] & keep[:, None, None, :]
    float4d = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~bool4d, torch.finfo(torch.float64).min)
    for mask in (keep.long(), bool4d, float4d):
        got, _ = attn(hidden_states=x, position_embeddings=pe, attention_mask=mask)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_recompute(family):
    model = make_model(family)
    patch_hf_model(model)
    ids = ids_batch(2, 6)
    calls = []
    h = attn_of(model, 0).register_forward_pre_hook(
        lambda m, a, k: calls.append(k.get("hidden_states", a[0] if a else None).shape[1]), with_kwargs=True)
    out = greedy(model, ids, 8, return_dict_in_generate=True)
    h.remove()
    assert calls == [6] + [1] * 7  # one prefill, then one token per step
    cache = returned_cache(out)
    states = [layer.state for layer in cache.layers]
    assert all(s is not None and s.kv.shape == (2, 4, 73, 8) for s in states)  # taylor: 1 + 8 + 64
    assert cache.get_seq_length() == 6 + 7
    recompute = greedy(model, ids, 8, use_cache=False)
    assert torch.equal(out.sequences, recompute)
    # a manual loop re-running the whole prefix agrees too
    seq = ids
    for _ in range(8):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_left_padded_batch_equals_alone(family):
    model = make_model(family)
    patch_hf_model(model, "elu")
    a, b = ids_batch(1, 7, seed=3)[0], ids_batch(1, 4, seed=4)[0]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    batch = greedy(model, ids, 6, attention_mask=mask)
    assert torch.equal(batch[0, 7:], greedy(model, a[None], 6)[0, 7:])
    assert torch.equal(batch[1, 7:], greedy(model, b[None], 6)[0, 4:])
    assert torch.equal(batch, greedy(model, ids, 6, attention_mask=mask, use_cache=False))


def test_padded_batch_is_packed_not_masked(monkeypatch):
    """A padded prefill goes unpad -> cu_seqlens -> repad (no padded token is computed, the
    map still runs in its own path), and gives each row the logits of that row alone."""
    from featattn.hf.attention import HFFeatureAttention

    model = make_model(FAMILIES[0])
    patch_hf_model(model, "elu")
    packed = []
    real = HFFeatureAttention._attend_packed

    def spy(self, q, k, v, keep, *rest):
        packed.append(keep.sum(1).tolist())
        return real(self, q, k, v, keep, *rest)

    monkeypatch.setattr(HFFeatureAttention, "_attend_packed", spy)
    a, b = ids_batch(1, 7, seed=5)[0], ids_batch(1, 4, seed=6)[0]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        alone_b = model(b[None]).logits
    assert packed and all(p == [7, 4] for p in packed)
    torch.testing.assert_close(logits[1, 3:], alone_b[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_memory_constant_in_generated_length(family):
    model = make_model(family, dtype=torch.float32)
    patch_hf_model(model)
    ids = ids_batch(2, 5)
    sizes = {}
    for n in (2, 9, 20):
        cache = returned_cache(greedy(model, ids, n, return_dict_in_generate=True))
        assert cache.get_seq_length() == 5 + n - 1
        for layer in cache.layers:
            assert layer.state.kv.dtype == torch.float32 and layer.state.z.dtype == torch.float32
        sizes[n] = hf.cache_nbytes(cache)
    per_layer = 2 * 4 * 73 * (8 + 1) * 4  # B * H * Dk * (Dv + 1) fp32, kv and z
    assert sizes[2] == sizes[9] == sizes[20] == 2 * per_layer
    # the softmax model's cache grows with the generated length
    unpatch_hf_model(model)
    grow = [hf.cache_nbytes(returned_cache(greedy(model, ids, n, return_dict_in_generate=True))) for n in (2, 6)]
    assert grow[1] > grow[0]


def test_state_is_fp32_for_bf16_model():
    model = make_model("llama", dtype=torch.bfloat16)
    patch_hf_model(model)
    cache = hf.FeatureAttentionCache(model)
    out = model(ids_batch(1, 6), use_cache=True, **cache_kw(model, cache))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert all(s.kv.dtype == torch.float32 for s in cache.states.values())
    assert cache.nbytes() == 2 * (1 * 4 * 73 * 9 * 4)


def test_explicit_cache_and_manual_decode_loop():
    """A FeatureAttentionCache passed by hand: prefill once, then feed one token at a time."""
    model = make_model("llama")
    patch_hf_model(model, "elu")
    ids = ids_batch(2, 9)
    full = model(ids, use_cache=False).logits
    cache = hf.FeatureAttentionCache(model)
    first = model(ids[:, :5], use_cache=True, **cache_kw(model, cache)).logits
    steps = [model(ids[:, t:t + 1], use_cache=True, **cache_kw(model, cache)).logits for t in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-9, atol=1e-10)
    assert cache.get_seq_length() == 9


def test_partial_patch_and_mixed_cache():
    model = make_model("llama", layers=3)
    patch_hf_model(model, layers=[-1, 0])
    assert patched_layers(model) == [0, 2]
    assert type(attn_of(model, 1)).__name__ == "LlamaAttention"
    ids = ids_batch(2, 5)
    out = greedy(model, ids, 6, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, ids, 6, use_cache=False))
    cache = returned_cache(out)
    assert cache.layers[1].keys.shape[-2] == 5 + 5  # softmax layer: growing keys/values
    assert cache.layers[0].state is not None and cache.layers[2].state is not None


def test_beam_search_with_recurrent_cache():
    model = make_model("qwen2")
    patch_hf_model(model)
    ids = ids_batch(2, 5)
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, early_stopping=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


# --------------------------------------------------------------------------- patch twice / unpatch / save


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_twice_raises_and_unpatch_restores(family):
    model = make_model(family)
    ids = ids_batch(2, 8)
    before = model(ids).logits
    originals = [attn_of(model, i) for i in range(2)]
    patch_hf_model(model, "elu")
    patched = model(ids).logits
    assert not torch.allclose(patched, before)
    with pytest.raises(RuntimeError, match="already patched"):
        patch_hf_model(model)
    assert unpatch_hf_model(model) is model
    assert not is_patched(model) and not hasattr(model.config, "featattn")
    assert [attn_of(model, i) for i in range(2)] == originals
    assert not model.base_model._forward_pre_hooks
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_hf_model(model)
    # and it can be patched again, giving the same outputs as before
    patch_hf_model(model, "elu")
    torch.testing.assert_close(model(ids).logits, patched, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    model = make_model(family)
    patch_hf_model(model, "hedgehog", feature_map_kwargs={"feature_dim": 5})
    with torch.no_grad():  # trained-looking feature maps, so that loading them matters
        for n, p in model.named_parameters():
            if ".feature_map." in n:
                p.add_(0.5 * torch.randn_like(p))
    ids = ids_batch(2, 9)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)

    cls = type(model)
    fresh = cls.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert not is_patched(fresh)
    assert fresh.config.featattn["feature_map"] == "hedgehog"
    assert fresh.config.featattn["feature_map_kwargs"] == {"feature_dim": 5}
    repatch_hf_model(fresh)  # checkpoint: the directory it was loaded from
    assert patched_layers(fresh) == [0, 1]
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-10, atol=1e-12)

    again = hf.load_patched_hf_model(tmp_path, model_class=cls, dtype=torch.float64).eval()
    torch.testing.assert_close(again(ids).logits, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(greedy(again, ids, 4), greedy(model, ids, 4))


def test_repatch_without_checkpoint_for_learnable_map_raises(tmp_path):
    model = make_model("llama")
    patch_hf_model(model, "hedgehog")
    state = {k: v for k, v in model.state_dict().items() if ".feature_map." in k}
    record = dict(model.config.featattn)
    unpatch_hf_model(model)
    model.config.featattn = record
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="checkpoint"):
        repatch_hf_model(model)
    assert not is_patched(model)
    repatch_hf_model(model, checkpoint=state)  # a state dict works as a checkpoint
    assert is_patched(model)
    with pytest.raises(ValueError, match="no featattn record"):
        repatch_hf_model(make_model("gpt2"))


# --------------------------------------------------------------------------- CUDA (Triton kernels)


@pytest.mark.cuda
@pytest.mark.parametrize("feature_map", ["taylor", "elu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_padded_decode_matches_full_forward(feature_map, dtype):
    model = make_model("llama", dtype=dtype).cuda()
    patch_hf_model(model, feature_map)
    ids = ids_batch(2, 40).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: the masked-feature path; row 0 alone: the fused/unmasked path
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits.float()
        alone = model(ids[:1]).logits.float()
        cache = hf.FeatureAttentionCache(model)
        pre = model(ids[:, :30], attention_mask=mask[:, :30], use_cache=True, **cache_kw(model, cache)).logits
        steps = [pre.float()]
        for t in range(30, 40):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True, **cache_kw(model, cache))
            steps.append(out.logits.float())
    # bf16: the whole model rounds to bf16 between ops, so compare norms rather than elements
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    decoded = torch.cat(steps, dim=1)
    assert rel_err(decoded[0], full[0]) < tol and rel_err(decoded[1, 9:], full[1, 9:]) < tol
    assert rel_err(full[0], alone[0]) < tol
    assert all(s.kv.dtype == torch.float32 and s.kv.is_cuda for s in cache.states.values())
    gen = greedy(model, ids[:, :8], 6)
    assert gen.shape == (2, 14)


class ScaledElu(featattn.FeatureMap):
    """An unregistered learnable map, to check how a class (not a name) is recorded."""

    def __init__(self, head_dim, gain=1.0):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.full((head_dim,), float(gain)))

    def output_dim(self, head_dim):
        return head_dim

    def forward(self, x):
        return torch.nn.functional.elu(x * self.gain) + 1


def test_unregistered_map_class_is_recorded_by_import_path(tmp_path):
    model = make_model("gpt2")
    patch_hf_model(model, ScaledElu, feature_map_kwargs={"gain": 0.5})
    assert model.config.featattn["feature_map"] == f"{__name__}:ScaledElu"
    assert attn_of(model, 0).feature_map is not attn_of(model, 1).feature_map  # one map per layer
    with torch.no_grad():
        attn_of(model, 1).feature_map.gain.mul_(3.0)
    ids = ids_batch(1, 8)
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path, dtype=torch.float64).eval()
    repatch_hf_model(fresh, checkpoint=tmp_path / "model.safetensors")
    assert isinstance(attn_of(fresh, 0).feature_map, ScaledElu)
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-10, atol=1e-12)
    # an instance is deep-copied into every layer
    model2 = make_model("gpt2")
    fm = ScaledElu(8)
    patch_hf_model(model2, fm)
    assert attn_of(model2, 0).feature_map is not fm and isinstance(attn_of(model2, 1).feature_map, ScaledElu)


def test_a_map_for_other_heads_leaves_the_model_unpatched():
    """patch_hf_model checks every argument, the map's sizes included, before it replaces a
    module (a hedgehog built for 2 heads used to patch, then fail at every forward)."""
    model = make_model("llama")
    hh = featattn.get_feature_map("hedgehog", head_dim=8, heads=2)
    with pytest.raises(ValueError, match=r"patch_hf_model \(layer 0\).*built for heads=2"):
        patch_hf_model(model, hh)
    with pytest.raises(ValueError, match="built for heads=2"):
        patch_hf_model(model, "hedgehog", feature_map_kwargs={"heads": 2})
    assert not hf.is_patched(model)
