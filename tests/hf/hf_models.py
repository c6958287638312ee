"""Tiny random-init transformers models for the offline HF tests (no downloads)."""

import torch
import transformers

VOCAB = 64


#: the families beyond the first four: (transformers class prefix, extra config) of a tiny
#: model each; every one has 4 query and 2 key/value heads of 8 dims
EXTRA = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=2, num_experts_per_tok=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=50.0, sliding_window=4)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # no grouped heads in GPT-NeoX; a partial rotary (half the head dims)
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5})),
}
#: families whose CPU kernels refuse float64 (Mixtral's grouped expert GEMM): built in float32
NO_FLOAT64 = {"mixtral"}


def make_model(family="llama", layers=2, dtype=torch.float64, seed=0):
    """A 2-layer, 32-wide model of ``family`` (llama, mistral, qwen2, gpt2, or one of
    :data:`EXTRA`) with 4 query and 2 key/value heads, in eval mode and ``dtype``."""
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
    elif family in EXTRA:
        cfg_name, model_name, extra = EXTRA[family]
        model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**{**common, **extra}))
        if family in NO_FLOAT64 and dtype == torch.float64:
            dtype = torch.float32
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


def padded_batch(seqs, side):
    """``(ids, mask, places)``: the 1-D token tensors ``seqs`` padded to the longest, on the
    ``side`` ("left" or "right"), with their attention mask and each row's slice of real tokens."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    places = [slice(T - len(s), T) if side == "left" else slice(0, len(s)) for s in seqs]
    for b, (s, sl) in enumerate(zip(seqs, places)):
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask, places


def attention_io(model, attn, ids):
    """``(hidden_states, position_embeddings, output)`` the attention module ``attn`` of
    ``model`` sees and returns when the model runs on ``ids``."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pe"] = kwargs.get("position_embeddings")
        seen["out"] = out[0]

    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        model(ids)
    finally:
        h.remove()
    return seen["x"], seen["pe"], seen["out"]
