"""Shared pieces of :mod:`featattn.hf`: the supported model families (:data:`SUPPORTED_FAMILIES`),
the config key and padding keyword the patch uses (:data:`CONFIG_KEY`, :data:`PADDING_KWARG`), and
the check that the optional dependency ``transformers`` is installed.  Imports nothing from
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

#: attribute of ``model.config`` where the patch is recorded (saved in config.json)
CONFIG_KEY = "featattn"
#: keyword the patched model's pre-forward hook hands to every decoder layer: the 2-D key mask of
#: the current tokens (bool ``[B, T]``, True = real token), or ``False`` when nothing is padded
PADDING_KWARG = "featattn_padding_mask"


@dataclass(frozen=True)
class _Family:
    model_type: str
    example: str          # the causal-LM class users know the family by
    layers_attr: str      # decoder layers on the base model
    attn_attr: str        # self-attention on a decoder layer
    rotary: bool          # q/k get rotary embeddings (position_embeddings=(cos, sin))
    #: how q/k/v are projected: "separate" (q_proj/k_proj/v_proj, o_proj: transformers' standard
    #: attention module; q_norm/k_norm are applied where the module has them, per head or over
    #: the whole projection as their size says), "fused" (one qkv_proj, rows q, k, v: Phi-3),
    #: "neox" (one query_key_value, [q | k | v] per head, output through ``dense``: GPT-NeoX),
    #: "c_attn" (GPT-2)
    qkv: str = "separate"
    #: what the linear layer does not reproduce (the supported-family table of docs/hf.md)
    dropped: str = ""


_FAMILIES = {f.model_type: f for f in (
    _Family("llama", "LlamaForCausalLM", "layers", "self_attn", True),
    _Family("mistral", "MistralForCausalLM", "layers", "self_attn", True,
            dropped="the sliding window"),
    _Family("mixtral", "MixtralForCausalLM", "layers", "self_attn", True,
            dropped="the sliding window (the experts' MLPs are untouched)"),
    _Family("qwen2", "Qwen2ForCausalLM", "layers", "self_attn", True,
            dropped="the sliding window"),
    _Family("qwen3", "Qwen3ForCausalLM", "layers", "self_attn", True,
            dropped="the sliding window"),
    _Family("olmo2", "Olmo2ForCausalLM", "layers", "self_attn", True),
    _Family("gemma2", "Gemma2ForCausalLM", "layers", "self_attn", True,
            dropped="attention logit softcapping, the sliding-window layers' window"),
    _Family("gemma3_text", "Gemma3ForCausalLM", "layers", "self_attn", True,
            dropped="the sliding-window layers' window"),
    _Family("phi3", "Phi3ForCausalLM", "layers", "self_attn", True, qkv="fused",
            dropped="the sliding window"),
    _Family("gpt_neox", "GPTNeoXForCausalLM", "layers", "attention", True, qkv="neox"),
    _Family("gpt2", "GPT2LMHeadModel", "h", "attn", False, qkv="c_attn"),
)}
#: ``{model_type: causal-LM class name}`` of the families patch_hf_model knows
SUPPORTED_FAMILIES = {name: fam.example for name, fam in _FAMILIES.items()}


def _supported_text() -> str:
    return ", ".join(f"{name} ({cls})" for name, cls in SUPPORTED_FAMILIES.items())


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test environment has transformers
        raise ImportError(
            "featattn.hf needs the optional dependency `transformers`: pip install 'featattn[hf]'"
        ) from e
    return transformers
