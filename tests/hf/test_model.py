"""featattn.hf.model: the ready FeatureAttentionForCausalLM model class (config, Auto classes,
save/load, generate with the recurrent cache, padding, loss, the Trainer's calls).

Tiny configs (width 32, 2 layers), float64 where numbers are compared.
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
from featattn.hf import cache_nbytes  # noqa: E402
from featattn.hf.model import (  # noqa: E402
    FeatureAttentionConfig,
    FeatureAttentionForCausalLM,
    FeatureAttentionModel,
)

VOCAB = 64

#: configs the numeric tests run over: plain, a learnable map with grouped k/v heads and its
#: own options, the Taylor map with a small q/k dim, the softmax-window hybrid, untied head
CONFIGS = {
    "elu": dict(feature_map="elu"),
    "hedgehog-gqa": dict(feature_map="hedgehog", num_attention_heads=4, num_key_value_heads=2,
                         feature_map_kwargs={"feature_dim": 6}),
    "taylor": dict(feature_map="taylor", qk_dim=4, tie_word_embeddings=False),
    "window": dict(feature_map="relu", window=3),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


def make_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                pad_token_id=0)
    base.update(kw)
    return FeatureAttentionConfig(**base)


def make_model(name="elu", seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    model = FeatureAttentionForCausalLM(make_config(**{**CONFIGS[name], **kw}))
    # more spread than the 0.02 init, so that the attention (and a wrong cache) shows in argmax
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()


def tokens(*shape, seed=1):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config and Auto


def test_auto_classes_build_the_model():
    cfg = make_config()
    assert cfg.model_type == "featattn"
    assert isinstance(transformers.AutoConfig.for_model("featattn", vocab_size=VOCAB),
                      FeatureAttentionConfig)
    assert type(transformers.AutoModelForCausalLM.from_config(cfg)) is FeatureAttentionForCausalLM
    assert type(transformers.AutoModel.from_config(cfg)) is FeatureAttentionModel
    # the lazy names are these classes
    assert featattn.FeatureAttentionForCausalLM is FeatureAttentionForCausalLM
    assert hf.FeatureAttentionConfig is FeatureAttentionConfig
    assert hf.FeatureAttentionModel is FeatureAttentionModel


def test_model_is_built_from_feature_attention_layers():
    model = make_model("hedgehog-gqa")
    blocks = model.model.layers
    assert len(blocks) == 2
    attn = blocks[0].attn
    assert isinstance(attn, featattn.FeatureAttention)
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (4, 2, 8)
    assert attn.feature_map.feature_dim == 6 and attn.feature_map.heads == 4
    assert isinstance(blocks[0].attn_norm, torch.nn.RMSNorm)
    win = make_model("window").model.layers[1].attn
    assert win.window == 3 and win.window_logit is not None
    taylor = make_model("taylor").model.layers[0].attn
    assert taylor.qk_dim == 4 and taylor.feature_dim == 1 + 4 + 16


def test_learnable_map_keeps_its_own_init():
    """post_init's normal init covers the projections, not the maps (hedgehog starts at the
    identity, as a standalone FeatureAttention's)."""
    torch.manual_seed(0)
    model = FeatureAttentionForCausalLM(make_config(**CONFIGS["hedgehog-gqa"]))
    torch.manual_seed(0)
    ref = featattn.FeatureAttention(32, 4, "hedgehog", kv_heads=2,
                                    feature_map_kwargs={"feature_dim": 6})
    for name, p in ref.feature_map.named_parameters():
        torch.testing.assert_close(dict(model.model.layers[0].attn.feature_map.named_parameters())
                                   [name], p, rtol=0, atol=0)
    std = model.model.layers[0].attn.qkv_proj.weight.std().item()
    assert abs(std - 0.02) < 0.005, std


def test_tied_and_untied_embeddings():
    tied = make_model("elu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = make_model("taylor")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_and_load_round_trip(name, tmp_path):
    model = make_model(name)
    ids = tokens(2, 9)
    model.save_pretrained(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, FeatureAttentionConfig)
    for key in ("feature_map", "feature_map_kwargs", "window", "num_key_value_heads", "qk_dim",
                "tie_word_embeddings", "intermediate_size"):
        assert getattr(cfg, key) == getattr(model.config, key), key
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded) is FeatureAttentionForCausalLM
    with torch.no_grad():
        # the weights are equal bit for bit (below); the logits up to float64 rounding (the
        # loaded tensors' memory layout may pick another summation order)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    for k in sd:
        torch.testing.assert_close(ld[k], sd[k], rtol=0, atol=0, msg=k)
    base = transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(base) is FeatureAttentionModel
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state,
                                   model.model(ids).last_hidden_state)


def test_registration_and_lazy_names_in_a_fresh_process():
    """``import featattn`` / ``featattn.hf`` import no transformers; the first access of a model
    name imports featattn.hf.model, which registers the Auto classes."""
    code = (
        "import sys\n"
        "import featattn, featattn.hf\n"
        "assert 'transformers' not in sys.modules\n"
        "assert 'FeatureAttentionForCausalLM' in dir(featattn)\n"
        "assert 'FeatureAttentionForCausalLM' not in featattn.__all__\n"
        "cls = featattn.FeatureAttentionForCausalLM\n"
        "import transformers\n"
        "cfg = transformers.AutoConfig.for_model('featattn', vocab_size=16, hidden_size=8,\n"
        "    num_hidden_layers=1, num_attention_heads=2, feature_map='elu')\n"
        "assert type(transformers.AutoModelForCausalLM.from_config(cfg)) is cls\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr


def test_demo_uses_the_shared_blocks_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import featattn.blocks, featattn.cli.demo as demo\n"
        "assert demo.RecallModel is featattn.blocks.RecallModel\n"
        "assert demo.ShortConv is featattn.blocks.ShortConv\n"
        "assert demo.Block is featattn.blocks.RecallBlock\n"
        "m = demo.build_model('elu', demo.QUICK_CONFIG)\n"
        "assert isinstance(m, featattn.blocks.RecallModel)\n"
        "import torch\n"
        "print(tuple(m(torch.randint(0, 33, (2, 5))).shape))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(2, 5, 33)"


BAD_CONFIGS = [
    (dict(hidden_size=0), ValueError, "hidden_size must be an int >= 1, got int 0"),
    (dict(hidden_size=32.0), TypeError, "hidden_size must be an int >= 1, got float 32.0"),
    (dict(num_attention_heads=3), ValueError, "hidden_size must be divisible by num_attention_heads"),
    (dict(num_attention_heads=4, num_key_value_heads=3), ValueError,
     "num_key_value_heads must divide num_attention_heads (4), got 3"),
    (dict(feature_map="nope"), ValueError, "feature_map must be a registered feature-map name"),
    (dict(feature_map=featattn.get_feature_map("elu")), TypeError, "featattn.register_feature_map"),
    (dict(feature_map_kwargs=[1]), TypeError, "feature_map_kwargs must be None or a dict"),
    (dict(feature_map_kwargs={"f": object()}), TypeError, "JSON-serialisable"),
    (dict(window=-1), ValueError, "window must be an int >= 0, got int -1; 0 for pure linear"),
    (dict(window=4, normalize=False), ValueError, "window > 0 needs normalize=True"),
    (dict(normalize=1), TypeError, "normalize must be a bool, got int 1"),
    (dict(attention_eps=float("nan")), ValueError, "attention_eps must be a finite float > 0"),
    (dict(rms_norm_eps="1e-6"), TypeError, "rms_norm_eps must be a finite float > 0, got str"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'; expected one of"),
]


@pytest.mark.parametrize("kwargs, exc, text", BAD_CONFIGS,
                         ids=[f"{list(k)[-1]}={v!r}"[:40] for k, _, _ in BAD_CONFIGS
                              for v in [list(k.values())[-1]]])
def test_bad_config_values_raise_clearly(kwargs, exc, text):
    with pytest.raises(exc) as info:
        make_config(**kwargs)
    assert text in str(info.value)


def test_bad_feature_map_option_fails_when_the_model_is_built():
    cfg = make_config(feature_map="hedgehog", feature_map_kwargs={"no_such_option": 1})
    with pytest.raises(TypeError, match="no_such_option"):
        FeatureAttentionForCausalLM(cfg)


# --------------------------------------------------------------------------- forward and loss


def test_labels_give_the_shifted_cross_entropy():
    model = make_model("elu")
    ids = tokens(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits.float()  # transformers' loss upcasts the logits to float32
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                                            labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    assert out.loss.requires_grad


def test_matches_a_hand_written_forward():
    """The blocks are ``x + attn(norm x)``, ``x + mlp(norm x)``; final norm; head."""
    model = make_model("hedgehog-gqa")
    ids = tokens(2, 7)
    x = model.model.embed_tokens(ids)
    for blk in model.model.layers:
        x = x + blk.attn(blk.attn_norm(x))
        h = blk.mlp_norm(x)
        x = x + blk.mlp.down_proj(torch.nn.functional.silu(blk.mlp.gate_proj(h)) * blk.mlp.up_proj(h))
    ref = model.model.norm(x) @ model.lm_head.weight.T
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.detach())


def test_logits_to_keep_and_hidden_states():
    model = make_model("elu")
    ids = tokens(2, 6)
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])
    assert len(full.hidden_states) == 3
    torch.testing.assert_close(full.hidden_states[0], model.model.embed_tokens(ids))


def _padded_pair(side):
    """Rows a (7 tokens) and b (4, padded on ``side``) as one batch: (a, b, ids, mask, b's
    slice)."""
    a, b = tokens(1, 7, seed=2), tokens(1, 4, seed=3)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    sl = slice(3, 7) if side == "left" else slice(0, 4)
    ids[1, sl], mask[1, sl] = b, 1
    return a, b, ids, mask, sl


@pytest.mark.parametrize("name", ["elu", "hedgehog-gqa", "window"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_their_unpadded_runs(name, side):
    model = make_model(name)
    a, b, ids, mask, sl = _padded_pair(side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], model(a).logits[0])
        torch.testing.assert_close(logits[1, sl], model(b).logits[0])
        pad = ~mask.bool()
        assert torch.all(logits[pad] == 0)  # padded positions give zeros, not garbage
    # an all-ones mask is no padding at all
    with torch.no_grad():
        torch.testing.assert_close(model(a, attention_mask=torch.ones_like(a)).logits, model(a).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_then_cached_decoding_with_a_window(side):
    """A padded batch through the window model with a cache, then three cached steps: each
    row's logits equal that row run alone; a later padded call that would leave a row's
    cache with fewer window keys than another's is refused, counting the keys it holds."""
    model = make_model("window")
    a, b, ids, mask, _ = _padded_pair(side)
    nxt = tokens(2, 3, seed=9)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        logits = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out = model(nxt[:, t:t + 1], attention_mask=mask, past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits)
        got = torch.cat(logits, 1)
        torch.testing.assert_close(got[0], model(torch.cat([a, nxt[:1]], 1)).logits[0, -3:])
        torch.testing.assert_close(got[1], model(torch.cat([b, nxt[1:]], 1)).logits[0, -3:])
        c = model(tokens(2, 2), attention_mask=torch.tensor([[0, 1], [0, 1]]),
                  use_cache=True).past_key_values  # one real token a row: 1 window key held
        with pytest.raises(ValueError, match=r"with the 1 its cache holds: rows \[1\]"):
            model(tokens(2, 2, seed=5), attention_mask=torch.tensor([[0, 1, 1, 1], [0, 1, 0, 1]]),
                  past_key_values=c, use_cache=True)


def test_padding_errors():
    ids = tokens(2, 5)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    short = mask.clone()
    short[1, :3] = 0  # 2 real tokens, below the window of 3, with a cache
    with pytest.raises(ValueError, match=r"every row needs at least 3 tokens .*rows \[1\]"):
        make_model("window")(ids, attention_mask=short, use_cache=True)
    empty = torch.ones_like(mask)
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        make_model("elu")(ids, attention_mask=empty)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        make_model("elu")(ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \[2, 5\]"):
        make_model("elu")(ids, attention_mask=torch.ones(2, 4))


# --------------------------------------------------------------------------- cache and generate


def greedy_recompute(model, ids, steps):
    """Greedy decoding that reruns the whole sequence every step (no cache at all)."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_greedy_generation_equals_uncached(name):
    model = make_model(name)
    prompt = tokens(2, 6)
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    torch.testing.assert_close(cached, greedy_recompute(model, prompt, 10), rtol=0, atol=0)


def test_cached_logits_equal_a_full_forward_chunk_by_chunk():
    """Prefill in pieces, then one token at a time, with the cache: the logits of one forward
    over everything, with and without autograd."""
    for name in ("hedgehog-gqa", "window"):
        model = make_model(name)
        ids = tokens(2, 12)
        with torch.no_grad():
            full = model(ids).logits
        for grad in (False, True):
            cache = model.new_cache()
            parts = []
            with torch.set_grad_enabled(grad):
                for lo, hi in ((0, 5), (5, 9), (9, 10), (10, 11), (11, 12)):
                    out = model(ids[:, lo:hi], cache=cache, use_cache=True)
                    assert out.cache is cache
                    parts.append(out.logits.detach())
            torch.testing.assert_close(torch.cat(parts, 1), full)
            assert cache.get_seq_length() == 12


def test_left_padded_batch_generation_equals_each_prompt_alone():
    model = make_model("elu")
    a, b = tokens(1, 6, seed=4), tokens(1, 3, seed=5)
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    torch.testing.assert_close(out[0, 6:], model.generate(a, max_new_tokens=7, do_sample=False)[0, 6:],
                               rtol=0, atol=0)
    torch.testing.assert_close(out[1, 6:], model.generate(b, max_new_tokens=7, do_sample=False)[0, 3:],
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ["elu", "window"])
def test_cache_memory_is_constant_in_the_generated_length(name):
    model = make_model(name)
    W = model.config.window
    cache = model.new_cache()
    ids = tokens(2, 4)
    sizes = []
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        for _ in range(20):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache).logits
            sizes.append(cache_nbytes(cache))
    assert len(set(sizes[max(W - 4, 0):])) == 1, sizes
    assert sizes[-1] > 0
    # the same through generate(): the returned cache weighs the same after 4 or 24 new tokens
    short = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    long = model.generate(ids, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    field = "cache" if hasattr(short, "cache") else "past_key_values"
    s_cache, l_cache = getattr(short, field), getattr(long, field)
    assert cache_nbytes(s_cache) == cache_nbytes(l_cache) == sizes[-1]
    assert l_cache.get_seq_length() == 4 + 24 - 1
    assert all(isinstance(layer, hf.FeatureAttentionCacheLayer) for layer in l_cache.layers)


def test_cache_for_another_batch_is_refused():
    model = make_model("elu")
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens(2, 4), cache=cache)
        with pytest.raises(ValueError, match="holds 2 sequences but the input has 3"):
            model(tokens(3, 1), cache=cache)


def test_training_mode_builds_no_cache_by_default():
    model = make_model("elu").train()
    out = model(tokens(2, 5), labels=tokens(2, 5))
    assert out.cache is None
    assert model.eval()(tokens(2, 5)).cache is not None


# --------------------------------------------------------------------------- training


def test_trainer_style_steps_reduce_the_loss():
    """What transformers.Trainer does with the model, without Trainer itself (it needs the
    `accelerate` package): a collated batch (input_ids, attention_mask, labels with -100 on
    padding) through ``model(**batch, num_items_in_batch=n)`` in train mode, backward, AdamW.
    The loss is finite and falls on a fixed batch."""
    torch.manual_seed(0)
    model = FeatureAttentionForCausalLM(make_config(feature_map="hedgehog")).train()
    ids = tokens(4, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[3, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = model(**batch, num_items_in_batch=int((labels[:, 1:] != -100).sum()))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    fm = model.model.layers[0].attn.feature_map
    assert fm.q_weight.grad is None and fm.q_weight.requires_grad  # zeroed, and it trained
