"""Tiny random-init transformers models for the offline HF tests (no downloads)."""

import torch
import transformers

VOCAB = 64


def make_model(family="llama", layers=2, dtype=torch.float64, seed=0):
    """A 2-layer, 32-wide model of ``family`` (llama, mistral, qwen2, gpt2) with 4 query and
    2 key/value heads, in eval mode and ``dtype``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    # a random init with more spread than HF's 0.02, so that attention patterns matter
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def one_thread():
    """Generator for a module-scoped fixture: tiny models gain nothing from a second intra-op
    thread on a busy 2-core machine, only synchronisation."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
