"""patch_hf_model on the families beyond Llama/Mistral/Qwen2/GPT-2 (Mixtral, Qwen3, OLMo 2,
Gemma 2, Gemma 3, Phi-3, GPT-NeoX): tiny random models built from their configs (no downloads).

The patched layer must feed the feature map exactly the q/k/v the original module feeds its
attention function (its own q/k norms and rotary embeddings): that is checked through
transformers' attention-function registry, independently of featattn's projection code."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

import featattn  # noqa: E402
from featattn.hf import SUPPORTED_FAMILIES, patch_hf_model  # noqa: E402

FAMILIES = list(hf_models.EXTRA)
VOCAB = hf_models.VOCAB


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


def _ids(B=2, T=9, seed=1):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _tol(model):
    return dict(rtol=1e-10, atol=1e-11) if model.dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def test_every_family_is_listed():
    assert set(FAMILIES) <= set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_layer_attends_what_the_original_would(family):
    """Record what the original attention module hands its attention function (q, k, v after
    its norms and rotary embeddings), then check the patched layer's output is
    o_proj(linear_attention(q, k, v)) on exactly those."""
    model = hf_models.make_model(family)
    seen = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:  # its input is the same in both passes
            seen.update(q=query, k=key, v=value)
        B, H, T, d = query.shape
        return query.new_zeros(B, T, H, value.shape[-1]), None

    transformers.AttentionInterface.register("featattn_test_record", record)
    model.config._attn_implementation = "featattn_test_record"
    ids = _ids()
    model(ids)
    model.config._attn_implementation = "eager"
    patch_hf_model(model, "elu")
    layer0 = model.base_model.layers[0]
    attn = layer0.attention if family == "gpt_neox" else layer0.self_attn
    out = {}
    h = attn.register_forward_hook(lambda m, a, o: out.update(o=o[0]))
    model(ids)
    h.remove()
    o = featattn.linear_attention(seen["q"], seen["k"], seen["v"], feature_map="elu",
                                  scale=attn.q_scale, backend="reference")
    B, H, T, d = o.shape
    out_proj = attn.dense if family == "gpt_neox" else attn.o_proj
    want = out_proj(o.transpose(1, 2).reshape(B, T, H * d))
    torch.testing.assert_close(out["o"], want, **_tol(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_recompute(family):
    model = hf_models.make_model(family)
    patch_hf_model(model, "elu")
    ids = _ids(2, 6)
    assert torch.equal(_greedy(model, ids, 7), _greedy(model, ids, 7, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model = hf_models.make_model(family)
    patch_hf_model(model, "hedgehog", feature_map_kwargs={"feature_dim": 4})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".feature_map." in n:
                p.add_(0.5 * torch.randn_like(p))
    ids = _ids(1, 8)
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    again = featattn.load_patched_hf_model(tmp_path, model_class=type(model),
                                           dtype=model.dtype).eval()
    tol = _tol(model)
    if family.startswith("gemma"):  # Gemma's embed_scale buffer is computed at the build dtype:
        # built in fp32 then cast, it differs from a float64 load by ~1e-7 (unpatched too)
        tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again(ids).logits, want, **tol)


def test_left_padded_batch_equals_alone_on_gemma3():
    """Padding goes through the packed path for the new families too (one family is enough:
    the path is shared)."""
    model = hf_models.make_model("gemma3_text")
    patch_hf_model(model, "elu")
    a, b = _ids(1, 7, seed=3)[0], _ids(1, 4, seed=4)[0]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    batch = _greedy(model, ids, 5, attention_mask=mask)
    assert torch.equal(batch[0, 7:], _greedy(model, a[None], 5)[0, 7:])
    assert torch.equal(batch[1, 7:], _greedy(model, b[None], 5)[0, 4:])


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_memory_constant_and_unpatch_restores(family):
    """The recurrent cache does not grow with the generated length; unpatching gives the
    original logits back exactly (and the softmax cache grows again)."""
    from featattn import hf

    model = hf_models.make_model(family)
    ids = _ids(2, 5)
    before = model(ids).logits
    patch_hf_model(model, "elu")
    sizes = []
    for n in (2, 9):
        out = _greedy(model, ids, n, return_dict_in_generate=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        assert cache.get_seq_length() == 5 + n - 1
        sizes.append(hf.cache_nbytes(cache))
    assert sizes[0] == sizes[1] > 0
    featattn.unpatch_hf_model(model)
    assert not hf.is_patched(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
