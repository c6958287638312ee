"""patch_hf_model(..., window=W): the hybrid layer (a softmax window plus linear attention) in
Hugging Face models: forward, cached generation, save/load and attention transfer."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402

import featattn  # noqa: E402
from featattn.hf import patch_hf_model, transfer_attention  # noqa: E402

VOCAB = hf_models.VOCAB


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


def _ids(B=1, T=9, seed=1):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _attn(model, i):
    return model.base_model.layers[i].self_attn


def _patched(window=4, fm="hedgehog", dtype=torch.float64):
    model = hf_models.make_model("llama", layers=2, dtype=dtype, seed=0)
    patch_hf_model(model, fm, window=window)
    torch.manual_seed(5)
    with torch.no_grad():
        for i in range(2):
            _attn(model, i).window_logit.normal_()
    return model


def test_patched_layer_equals_the_hybrid_call():
    """The patched layer == linear_attention(window=W) on the projected, rotated q/k/v, with
    the model's softmax scaling in the window and f = sigmoid(window_logit)."""
    model = _patched()
    attn = _attn(model, 1)
    assert "window=4" in repr(attn)
    x, pe, out = hf_models.attention_io(model, attn, _ids(2, 13))
    B, T = 2, 13
    q = attn.q_proj(x).view(B, T, -1, 8).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, 8).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, 8).transpose(1, 2)
    mod = sys.modules[type(attn.original).__module__]
    q, k = mod.apply_rotary_pos_emb(q, k, *pe)
    o = featattn.linear_attention(q, k, v, feature_map=attn.feature_map, scale=attn.q_scale,
                                  window=4, window_weight=torch.sigmoid(attn.window_logit),
                                  window_scale=attn.scaling, backend="reference")
    want = attn.o_proj(o.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


def test_cached_generate_equals_recompute():
    """The recurrent cache carries the window's keys and values across generation steps."""
    model = _patched(window=3)
    ids = _ids(2, 5)
    out = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                         return_dict_in_generate=True)
    again = model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                           use_cache=False)
    assert torch.equal(out.sequences, again)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    state = cache.layers[0].state
    assert state.window_k.shape == (2, 2, 3, 8)  # the last W = 3 keys of the 2 kv heads


def test_save_load_restores_the_window_weights_quietly(tmp_path, capfd):
    model = _patched()
    ids = _ids(1, 11)
    want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = featattn.load_patched_hf_model(tmp_path, torch_dtype=torch.float64)
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err and "unexpected" not in err.lower(), err
    for i in range(2):
        torch.testing.assert_close(_attn(loaded, i).window_logit, _attn(model, i).window_logit)
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_transfer_trains_the_mixing_weight(loss):
    model = _patched(dtype=torch.float32)
    before = [_attn(model, i).window_logit.detach().clone() for i in range(2)]
    res = transfer_attention(model, [_ids(2, 12, s) for s in range(3)], steps=4, lr=0.05,
                             loss=loss, progress=False)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res.losses.values())
    for i in range(2):
        assert not torch.equal(_attn(model, i).window_logit, before[i])


def test_bad_window_arguments_and_padding_are_explained():
    model = hf_models.make_model("llama", layers=2, dtype=torch.float64, seed=0)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        patch_hf_model(model, "elu", window=-1)
    with pytest.raises(ValueError, match="needs normalize=True"):
        patch_hf_model(model, "elu", window=4, normalize=False)
    assert not featattn.hf.is_patched(model)
    patch_hf_model(model, "elu", window=4)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 holds 3 real tokens, fewer than the window
    model(ids, attention_mask=mask, use_cache=False)  # without a cache: fine
    with pytest.raises(ValueError, match=r"needs at least 4 real tokens \(rows \[0\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side):
    """A padded batch through the windowed model (unpad -> packed sequences -> repad) gives
    each row the logits of that row alone; cached greedy generation of a left-padded batch
    whose prompts all reach the window equals each prompt alone."""
    model = _patched(window=4, fm="elu")
    seqs = [_ids(1, n, seed=10 + n)[0] for n in (9, 5, 7)]
    ids, mask, places = hf_models.padded_batch(seqs, side)
    T = ids.shape[1]
    logits = model(ids, attention_mask=mask).logits
    for b, (s, sl) in enumerate(zip(seqs, places)):
        torch.testing.assert_close(logits[b, sl], model(s[None]).logits[0], rtol=1e-9, atol=1e-10)
    if side == "right":
        return

    def greedy(ids, **kw):
        return model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, **kw)

    batch = greedy(ids, attention_mask=mask)
    for b, s in enumerate(seqs):
        assert torch.equal(batch[b, T:], greedy(s[None])[0, len(s):])
