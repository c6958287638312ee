"""featattn.hf.model with FeatureAttention's layer options (rotary, qk_norm, output_norm,
output_gate, attention_dropout): config fields, save/load, cached generation and padding,
where rotary positions count from each row's first real token.

Tiny configs (width 32, 2 layers), float64 where numbers are compared.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

from featattn.hf.model import (  # noqa: E402
    FeatureAttentionConfig,
    FeatureAttentionForCausalLM,
)

VOCAB = 64
OPTIONS = dict(rotary=True, rope_theta=50.0, qk_norm=True, output_norm="rmsnorm",
               output_gate=True, attention_dropout=0.2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


def make_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, feature_map="elu", pad_token_id=0)
    base.update(kw)
    return FeatureAttentionConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = FeatureAttentionForCausalLM(make_config(**{**OPTIONS, **kw}))
    with torch.no_grad():  # spread, so that the positions and the cache show in argmax
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.to(torch.float64).eval()


def tokens(*shape, seed=1):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_the_options_reach_every_layer():
    model = make_model()
    for blk in model.model.layers:
        a = blk.attn
        assert (a.rotary, a.rope_theta, a.qk_norm, a.output_norm, a.output_gate, a.dropout) == \
            (True, 50.0, True, "rmsnorm", True, 0.2)
    plain = FeatureAttentionForCausalLM(make_config()).model.layers[0].attn
    assert (plain.rotary, plain.qk_norm, plain.output_norm, plain.output_gate, plain.dropout) == \
        (False, False, None, False, 0.0)
    assert not any(n.startswith(("q_norm", "k_norm", "o_norm", "g_proj"))
                   for n, _ in plain.named_parameters())


def test_save_and_load_round_trip(tmp_path):
    model = make_model()
    ids = tokens(2, 9)
    model.save_pretrained(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    for key in OPTIONS:
        assert getattr(cfg, key) == OPTIONS[key], key
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and "model.layers.0.attn.q_norm.weight" in sd
    for k in sd:
        torch.testing.assert_close(ld[k], sd[k], rtol=0, atol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_a_config_saved_without_the_options_loads_with_them_off():
    cfg = make_config()
    d = cfg.to_dict()
    for key in OPTIONS:
        d.pop(key)  # as written before the fields existed
    old = FeatureAttentionConfig.from_dict(d)
    assert (old.rotary, old.qk_norm, old.output_norm, old.output_gate,
            old.attention_dropout, old.rope_theta) == (False, False, None, False, 0.0, 10000.0)


def test_cached_generation_equals_recomputing_the_whole_sequence():
    model = make_model()
    prompt = tokens(2, 5)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False)
    ids = prompt
    for _ in range(8):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    torch.testing.assert_close(cached, ids, rtol=0, atol=0)
    # and the logits, prefill in pieces then token by token
    seq = tokens(2, 11, seed=7)
    with torch.no_grad():
        full = model(seq).logits
        cache = model.new_cache()
        parts = [model(seq[:, lo:hi], cache=cache, use_cache=True).logits
                 for lo, hi in ((0, 4), (4, 7), (7, 8), (8, 9), (9, 10), (10, 11))]
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_padded_rows_and_left_padded_generation_equal_each_prompt_alone():
    """Rotary positions start at each row's first real token, whatever the padding."""
    model = make_model()
    a, b = tokens(1, 6, seed=4), tokens(1, 3, seed=5)
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[1, 3:], model(b).logits[0])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out[0, 6:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 6:],
                               rtol=0, atol=0)
    torch.testing.assert_close(out[1, 6:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 3:],
                               rtol=0, atol=0)


def test_attention_dropout_only_in_training():
    model = make_model()
    ids = tokens(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(rotary=1), TypeError, "rotary must be a bool, got int 1"),
    (dict(qk_norm="no"), TypeError, "qk_norm must be a bool"),
    (dict(output_gate=None), TypeError, "output_gate must be a bool"),
    (dict(rope_theta=0), ValueError, "rope_theta must be a finite float > 0"),
    (dict(attention_dropout=1.0), ValueError, "attention_dropout must be a float in [0, 1)"),
    (dict(attention_dropout=-0.5), ValueError, "attention_dropout must be a finite float >= 0"),
    (dict(output_norm="layernorm"), ValueError, "pass output_norm='rmsnorm' or None"),
    (dict(output_norm=1), TypeError, "output_norm must be None or one of"),
    (dict(rotary=True, qk_dim=5), ValueError, "qk_dim must be even with rotary=True"),
])
def test_bad_option_values_raise_clearly(kwargs, exc, text):
    with pytest.raises(exc) as info:
        make_config(**kwargs)
    assert text in str(info.value)
