"""featattn.hf.load_patched_hf_model: a quiet load (no load report about the feature-map weights)
that still loads every weight.

Tiny random-init models built from configs (offline), float64.
"""

import contextlib
import logging
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import featattn  # noqa: E402
from featattn.hf import is_patched, patch_hf_model, patched_layers  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]
NOISE = re.compile(r"unexpected|missing", re.IGNORECASE)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from hf_models.one_thread()


@contextlib.contextmanager
def captured(capfd):
    """Everything a block emits: stdout/stderr at the file-descriptor level (transformers'
    handler writes to the stderr it found at import), the records of the transformers logger
    and Python warnings.  Yields a dict whose "text" is filled in on exit."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("transformers")
    out = {}
    capfd.readouterr()  # drop what came before
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield out
    finally:
        logger.removeHandler(handler)
    streams = capfd.readouterr()
    out["text"] = "\n".join([streams.out, streams.err, *records, *(str(w.message) for w in caught)])


def saved_patched(family, tmp_path, layers=None):
    model = hf_models.make_model(family)
    patch_hf_model(model, "hedgehog", layers=layers, feature_map_kwargs={"feature_dim": 5})
    with torch.no_grad():  # trained-looking feature maps, so that loading them matters
        for n, p in model.named_parameters():
            if ".feature_map." in n:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def ids_batch(B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, hf_models.VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_is_quiet_and_loads_every_weight(family, tmp_path, capfd):
    model = saved_patched(family, tmp_path, layers=[1] if family == "gpt2" else None)
    cls = type(model)
    ids = ids_batch()
    with torch.no_grad():
        expected = model(ids).logits

    # the capture sees transformers' report: a plain from_pretrained names the feature-map
    # weights UNEXPECTED (they are loaded only by the re-patch)
    with captured(capfd) as plain:
        cls.from_pretrained(tmp_path, dtype=torch.float64)
    assert "UNEXPECTED" in plain["text"] and "feature_map" in plain["text"]

    with captured(capfd) as quiet:  # the default model_class: AutoModelForCausalLM
        loaded = featattn.load_patched_hf_model(tmp_path, dtype=torch.float64)
    assert not NOISE.search(quiet["text"]), quiet["text"]
    assert "feature_map" not in quiet["text"], quiet["text"]

    assert type(loaded) is cls and is_patched(loaded)
    assert patched_layers(loaded) == patched_layers(model)
    # the instance is left as a plain load leaves it: its own class, transformers' own ignore list
    fresh = cls.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded._keys_to_ignore_on_load_unexpected == fresh._keys_to_ignore_on_load_unexpected
    assert not any("feature_map" in k for k in loaded._keys_to_ignore_on_load_unexpected)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # the weights are bit-identical; the logits may differ in the last bits (BLAS's summation
    # order can depend on how the loaded tensors are laid out in memory)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-12, atol=1e-12)


def test_load_with_class_and_loading_info(tmp_path, capfd):
    model = saved_patched("llama", tmp_path)
    ids = ids_batch(1, 7)
    with torch.no_grad():
        expected = model(ids).logits
    with captured(capfd) as quiet:
        loaded, info = featattn.load_patched_hf_model(
            str(tmp_path), transformers.LlamaForCausalLM, dtype=torch.float64, output_loading_info=True
        )
    assert not NOISE.search(quiet["text"]), quiet["text"]
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()
    assert type(loaded) is transformers.LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-12, atol=1e-12)
    # the base model from the causal LM's checkpoint: the feature maps load too; only the head
    # (which LlamaModel has no place for) is reported, as by any from_pretrained
    with captured(capfd) as base_load:
        base = featattn.load_patched_hf_model(tmp_path, transformers.AutoModel, dtype=torch.float64)
    assert type(base) is transformers.LlamaModel and patched_layers(base) == [0, 1]
    assert "lm_head" in base_load["text"] and "feature_map" not in base_load["text"]
    for k, v in model.model.state_dict().items():
        assert torch.equal(base.state_dict()[k], v), k


def test_other_unexpected_keys_are_still_reported(tmp_path, capfd):
    saved_patched("llama", tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)
    sd["model.layers.0.self_attn.stray"] = torch.zeros(3, dtype=torch.float64)
    save_file(sd, weights, metadata={"format": "pt"})
    with captured(capfd) as out:
        loaded = featattn.load_patched_hf_model(tmp_path, dtype=torch.float64)
    assert "UNEXPECTED" in out["text"] and "stray" in out["text"]
    assert "feature_map" not in out["text"]
    assert is_patched(loaded)


def test_bad_input_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(TypeError, match="path"):
        featattn.load_patched_hf_model(3)
    saved_patched("llama", tmp_path / "patched")
    with pytest.raises(TypeError, match="model_class"):
        featattn.load_patched_hf_model(tmp_path / "patched", "LlamaForCausalLM")
    with pytest.raises(TypeError, match="model_class"):
        featattn.load_patched_hf_model(tmp_path / "patched", torch.nn.Linear)
    # an Auto class with no model for this config
    with pytest.raises(ValueError, match="no model class"):
        featattn.load_patched_hf_model(tmp_path / "patched", transformers.AutoModelForImageClassification)
    # not saved from a patched model: a clear error before any weight is loaded
    hf_models.make_model("gpt2").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no featattn record"):
        featattn.load_patched_hf_model(tmp_path / "plain")
    # a checkpoint that lost a feature-map weight: the re-patch names it
    weights = tmp_path / "patched" / "model.safetensors"
    sd = load_file(weights)
    del sd["model.layers.1.self_attn.feature_map.q_weight"]
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(KeyError, match="layers.1.self_attn.feature_map.q_weight"):
        featattn.load_patched_hf_model(tmp_path / "patched", dtype=torch.float64)


def test_a_damaged_record_is_explained():
    """repatch_hf_model on a config whose featattn record lost its map, or names one that
    cannot be imported: a ValueError saying to pass feature_map=, the model left unpatched."""
    from featattn.hf import CONFIG_KEY, repatch_hf_model

    for bad in ({"layers": [0, 1]}, {"layers": [0, 1], "feature_map": "no_such_pkg:Map"},
                {"layers": [0, 1], "feature_map": "featattn:NoSuchMap"}):
        model = hf_models.make_model("llama")
        setattr(model.config, CONFIG_KEY, bad)
        with pytest.raises(ValueError, match="feature_map="):
            repatch_hf_model(model)
        assert not is_patched(model)
