"""A ready ``transformers`` model built on feature attention, to train from scratch inside the
Hugging Face ecosystem (``Trainer``, ``generate()``, ``save_pretrained`` / ``from_pretrained``,
the Auto classes), as fla ships its ``*ForCausalLM`` classes.

- :class:`FeatureAttentionConfig` (``model_type = "featattn"``): sizes, the feature map (any
  registered name, with its ``feature_map_kwargs``), ``normalize``, ``window`` (the softmax-window
  hybrid), the layer options (``rotary``, ``qk_norm``, ``output_norm``, ``output_gate``,
  ``attention_dropout``; all off by default), the MLP width, tied or untied embeddings.
- :class:`FeatureAttentionModel`: embeddings, ``num_hidden_layers`` pre-norm blocks
  (``x + attn(RMSNorm x)``, ``x + SwiGLU(RMSNorm x)``, the attention a
  :class:`featattn.FeatureAttention`), a final RMSNorm.  No position embeddings by default:
  the causal recurrence orders the tokens; ``rotary=True`` rotates q and k at each row's own
  token positions (counted from its first real token, kept by the cache).  ``position_ids`` is
  accepted and ignored.
- :class:`FeatureAttentionForCausalLM`: the base model plus a vocabulary head; ``labels`` give
  the shifted next-token loss like every ``*ForCausalLM``.

The cache is :class:`featattn.hf.FeatureAttentionCache`, one
:class:`~featattn.hf.FeatureAttentionCacheLayer` per block holding the layer's
:class:`~featattn.LinearAttentionState` (a fixed size, whatever the number of tokens; a hybrid
layer's state also keeps the last ``window`` keys/values).  ``generate()`` creates a
``DynamicCache`` by itself; each block turns its empty layer of it into a recurrent one on first
use (as a patched model does).

Importing this module imports transformers and registers the classes with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``; ``featattn.hf`` imports it on first access of one of
its names (``featattn.hf.FeatureAttentionForCausalLM``, ...).
"""

from __future__ import annotations

import json
import numbers
from typing import Optional

import torch
from torch import nn

from ..blocks import SwiGLU, swiglu_hidden_size
from ..dispatch import _check_backend
from ..feature_maps import list_feature_maps
from ..layers import OUTPUT_NORMS, TAYLOR_DEFAULT_QK_DIM, FeatureAttention
from ._common import _require_transformers
from .cache import _cache_classes, _state_layer

_require_transformers()
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import (  # noqa: E402
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

__all__ = [
    "FeatureAttentionConfig",
    "FeatureAttentionPreTrainedModel",
    "FeatureAttentionModel",
    "FeatureAttentionForCausalLM",
]

#: the outputs' cache field: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.17)
_OUT_CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _bad(name: str, expected: str, value, fix: str = "") -> str:
    got = f"{type(value).__name__} {value!r}"
    return f"FeatureAttentionConfig: {name} must be {expected}, got {got}" + (f"; {fix}" if fix else "")


def _check_int(name: str, value, *, minimum: int = 1, optional: bool = False, fix: str = ""):
    if value is None and optional:
        return
    expected = f"{'None or ' if optional else ''}an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_bad(name, expected, value, fix))
    if value < minimum:
        raise ValueError(_bad(name, expected, value, fix))


def _check_float(name: str, value, *, positive: bool = True):
    expected = "a finite float > 0" if positive else "a finite float >= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(_bad(name, expected, value))
    v = float(value)
    if not (v == v and abs(v) != float("inf")) or v < 0 or (positive and v == 0):
        raise ValueError(_bad(name, expected, value))


def _check_bool(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(_bad(name, "a bool", value))


class FeatureAttentionConfig(PretrainedConfig):
    """Configuration of :class:`FeatureAttentionForCausalLM` / :class:`FeatureAttentionModel`.

    Args:
        vocab_size: number of tokens.
        hidden_size: model width ``dim``.
        num_hidden_layers: number of blocks.
        num_attention_heads: query heads ``H`` of each :class:`featattn.FeatureAttention`.
        num_key_value_heads: key/value heads (grouped-query attention; default ``H``).
        head_dim: value head dim (default ``hidden_size // num_attention_heads``).
        qk_dim: raw q/k head dim before the feature map (default: 16 for ``"taylor"``, else
            ``head_dim``), as ``FeatureAttention(qk_dim=)``.
        feature_map: a registered feature-map name (``featattn.list_feature_maps()``; register a
            custom map before building or loading the config).
        feature_map_kwargs: the map's constructor options (JSON-serialisable, saved in
            config.json), e.g. ``{"feature_dim": 32}`` for ``"hedgehog"``.
        normalize: linear attention's denominator (``FeatureAttention(normalize=)``).
        attention_eps: the denominator's epsilon.
        window: 0, or ``W > 0`` for the softmax-window hybrid (``FeatureAttention(window=W)``).
        attention_bias: bias in the q/k/v and output projections.
        rotary: rotary position embeddings on q and k (``FeatureAttention(rotary=)``).
        rope_theta: the rotary base.
        qk_norm: RMSNorm of each head's q and k (``FeatureAttention(qk_norm=)``).
        output_norm: None or ``"rmsnorm"``, per-head output norm (``FeatureAttention(output_norm=)``).
        output_gate: ``silu(x W_g)`` output gate (``FeatureAttention(output_gate=)``).
        attention_dropout: dropout on each attention layer's output (``FeatureAttention(dropout=)``),
            training mode only.
        intermediate_size: the SwiGLU hidden width (default ``8 * hidden_size / 3`` rounded up to
            a multiple of 8).
        mlp_bias: bias in the MLP's projections.
        rms_norm_eps: the RMSNorms' epsilon.
        initializer_range: std of the normal init of the linear and embedding weights.
        backend: ``FeatureAttention(backend=)`` (``"auto"`` picks the fused kernels on CUDA).
        tie_word_embeddings: the output head shares the input embedding's weight.
        use_cache: return the recurrent cache by default (evaluation mode only; training
            forwards skip it unless ``use_cache=True`` is passed).
    """

    model_type = "featattn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        qk_dim: Optional[int] = None,
        feature_map: str = "taylor",
        feature_map_kwargs: Optional[dict] = None,
        normalize: bool = True,
        attention_eps: float = 1e-6,
        window: int = 0,
        attention_bias: bool = False,
        rotary: bool = False,
        rope_theta: float = 10000.0,
        qk_norm: bool = False,
        output_norm: Optional[str] = None,
        output_gate: bool = False,
        attention_dropout: float = 0.0,
        intermediate_size: Optional[int] = None,
        mlp_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        backend: str = "auto",
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: Optional[int] = None,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        **kwargs,
    ):
        _check_int("vocab_size", vocab_size)
        _check_int("hidden_size", hidden_size)
        _check_int("num_hidden_layers", num_hidden_layers)
        _check_int("num_attention_heads", num_attention_heads)
        _check_int("num_key_value_heads", num_key_value_heads, optional=True,
                   fix="it must divide num_attention_heads (None: as many as query heads)")
        _check_int("head_dim", head_dim, optional=True)
        _check_int("qk_dim", qk_dim, optional=True)
        _check_int("intermediate_size", intermediate_size, optional=True)
        _check_int("window", window, minimum=0, fix="0 for pure linear attention, W > 0 for "
                   "a softmax over the last W tokens (docs/hybrid.md)")
        if head_dim is None and hidden_size % num_attention_heads:
            raise ValueError(
                f"FeatureAttentionConfig: hidden_size must be divisible by num_attention_heads "
                f"when head_dim is not given, got hidden_size={hidden_size} and "
                f"num_attention_heads={num_attention_heads}; change one, or pass head_dim")
        if num_key_value_heads is not None and num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"FeatureAttentionConfig: num_key_value_heads must divide num_attention_heads "
                f"({num_attention_heads}), got {num_key_value_heads}")
        maps = list_feature_maps()
        if not isinstance(feature_map, str):
            raise TypeError(_bad("feature_map", f"a registered feature-map name ({', '.join(maps)})",
                                 feature_map, "a custom FeatureMap class must be registered with "
                                 "featattn.register_feature_map and named here"))
        if feature_map not in maps:
            raise ValueError(_bad("feature_map", f"a registered feature-map name ({', '.join(maps)})",
                                  feature_map, "register a custom map with "
                                  "featattn.register_feature_map before building or loading "
                                  "the config"))
        if feature_map_kwargs is None:
            feature_map_kwargs = {}
        if not isinstance(feature_map_kwargs, dict) or not all(
                isinstance(k, str) for k in feature_map_kwargs):
            raise TypeError(_bad("feature_map_kwargs", "None or a dict with str keys",
                                 feature_map_kwargs))
        try:
            json.dumps(feature_map_kwargs)
        except (TypeError, ValueError) as e:
            raise TypeError(_bad("feature_map_kwargs", "JSON-serialisable (it is saved in "
                                 "config.json)", feature_map_kwargs, str(e))) from None
        for name, value in (("normalize", normalize), ("attention_bias", attention_bias),
                            ("mlp_bias", mlp_bias), ("tie_word_embeddings", tie_word_embeddings),
                            ("use_cache", use_cache), ("rotary", rotary), ("qk_norm", qk_norm),
                            ("output_gate", output_gate)):
            _check_bool(name, value)
        _check_float("rope_theta", rope_theta)
        _check_float("attention_dropout", attention_dropout, positive=False)
        if attention_dropout >= 1:
            raise ValueError(_bad("attention_dropout", "a float in [0, 1)", attention_dropout,
                                  "0 turns dropout off"))
        if output_norm is not None and output_norm not in OUTPUT_NORMS:
            err = TypeError if not isinstance(output_norm, str) else ValueError
            raise err(_bad("output_norm", f"None or one of {OUTPUT_NORMS}", output_norm,
                           "pass output_norm='rmsnorm' or None"))
        if rotary:
            qk = qk_dim if qk_dim is not None else (
                TAYLOR_DEFAULT_QK_DIM if feature_map == "taylor" else
                (head_dim if head_dim is not None else hidden_size // num_attention_heads))
            if qk % 2:
                raise ValueError(_bad("qk_dim", "even with rotary=True (rotary rotates pairs of "
                                      "q/k dims)", qk, "pass an even qk_dim (or head_dim)"))
        if window and not normalize:
            raise ValueError("FeatureAttentionConfig: window > 0 needs normalize=True (the "
                             f"softmax and linear parts share one denominator), got window={window} "
                             "and normalize=False; set normalize=True or window=0")
        _check_float("attention_eps", attention_eps)
        _check_float("rms_norm_eps", rms_norm_eps)
        _check_float("initializer_range", initializer_range, positive=False)
        if not isinstance(backend, str):
            raise TypeError(_bad("backend", "a backend name such as 'auto'", backend))
        _check_backend(backend)

        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = (self.num_attention_heads if num_key_value_heads is None
                                    else int(num_key_value_heads))
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else int(head_dim)
        self.qk_dim = None if qk_dim is None else int(qk_dim)
        self.feature_map = feature_map
        self.feature_map_kwargs = dict(feature_map_kwargs)
        self.normalize = normalize
        self.attention_eps = float(attention_eps)
        self.window = int(window)
        self.attention_bias = attention_bias
        self.rotary = rotary
        self.rope_theta = float(rope_theta)
        self.qk_norm = qk_norm
        self.output_norm = output_norm
        self.output_gate = output_gate
        self.attention_dropout = float(attention_dropout)
        self.intermediate_size = (swiglu_hidden_size(hidden_size) if intermediate_size is None
                                  else int(intermediate_size))
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = float(rms_norm_eps)
        self.initializer_range = float(initializer_range)
        self.backend = backend
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings,
                         **kwargs)

    def attention_kwargs(self) -> dict:
        """The :class:`featattn.FeatureAttention` keyword arguments of one block."""
        return dict(
            feature_map=self.feature_map, head_dim=self.head_dim, qk_dim=self.qk_dim,
            kv_heads=self.num_key_value_heads, normalize=self.normalize, eps=self.attention_eps,
            bias=self.attention_bias, feature_map_kwargs=dict(self.feature_map_kwargs) or None,
            backend=self.backend, window=self.window,
            rotary=self.rotary, rope_theta=self.rope_theta, qk_norm=self.qk_norm,
            output_norm=self.output_norm, output_gate=self.output_gate,
            dropout=self.attention_dropout,
        )


class FeatureAttentionBlock(nn.Module):
    """``x + attn(RMSNorm x)``, then ``x + SwiGLU(RMSNorm x)``."""

    def __init__(self, config: FeatureAttentionConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        dim = config.hidden_size
        self.attn_norm = nn.RMSNorm(dim, eps=config.rms_norm_eps)
        self.attn = FeatureAttention(dim, config.num_attention_heads, **config.attention_kwargs())
        self.mlp_norm = nn.RMSNorm(dim, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(dim, config.intermediate_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, cache_layer=None, cu_seqlens=None, seen: int = 0):
        h = self.attn_norm(x)
        if cache_layer is None:
            a = self.attn(h, cu_seqlens=cu_seqlens)
        else:
            a = self._cached_attention(h, cache_layer, cu_seqlens, seen)
        x = x + a
        return x + self.mlp(self.mlp_norm(x))

    def _cached_attention(self, h, cache_layer, cu_seqlens, seen):
        state = cache_layer.state
        if state is not None:
            n = h.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
            if state.kv.shape[0] != n:
                raise ValueError(
                    f"the cache of layer {self.layer_idx} holds {state.kv.shape[0]} sequences but "
                    f"the input has {n}; pass a fresh cache for a new batch")
            if state.kv.device != h.device:
                state = state.to(h.device)
        if state is not None and cu_seqlens is None and not torch.is_grad_enabled():
            # decoding: the state advances in place (one step kernel on CUDA)
            a = self.attn(h, state, update_state=True)
            new = state
        else:
            a, new = self.attn(h, state, return_state=True, cu_seqlens=cu_seqlens)
        cache_layer.store(new, seen)
        return a


class FeatureAttentionPreTrainedModel(PreTrainedModel):
    config_class = FeatureAttentionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FeatureAttentionBlock"]
    #: a running-sum state cannot be rolled back: transformers refuses assisted generation
    _is_stateful = True

    def _init_weights(self, module):
        # a learnable feature map keeps its own initialisation (hedgehog starts at the identity)
        if getattr(module, "_featattn_own_init", False):
            return
        super()._init_weights(module)


def _mark_feature_maps(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FeatureAttention):
            for sub in m.feature_map.modules():
                sub._featattn_own_init = True


def _key_mask(attention_mask, B: int, T: int, seen: int):
    """``[B, T]`` bool (True = real token) of the current tokens, or None when none is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        got = (f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
               else type(attention_mask).__name__)
        raise ValueError(
            f"FeatureAttentionModel takes a 2-D attention_mask [batch, tokens] (1 = real token, "
            f"0 = padding), got {got}; it builds no 4-D masks (the attention is causal by "
            "construction)")
    if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, seen + T):
        raise ValueError(
            f"attention_mask must be [B, T] = [{B}, {T}] or, with a cache of {seen} tokens, "
            f"[B, past + T] = [{B}, {seen + T}], got {list(attention_mask.shape)}")
    keep = attention_mask[:, -T:] != 0
    return None if bool(keep.all()) else keep


class FeatureAttentionModel(FeatureAttentionPreTrainedModel):
    """Embeddings, :class:`FeatureAttentionBlock` s, final RMSNorm: ``input_ids [B, T]`` ->
    ``last_hidden_state [B, T, hidden_size]``."""

    def __init__(self, config: FeatureAttentionConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         config.pad_token_id)
        self.layers = nn.ModuleList(FeatureAttentionBlock(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        _mark_feature_maps(self)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def new_cache(self):
        """An empty :class:`featattn.hf.FeatureAttentionCache` with one recurrent layer per block."""
        return _cache_classes()[1](config=self.config, layers=range(self.config.num_hidden_layers))

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        past_key_values=None,
        **kwargs,
    ):
        """``position_ids`` is accepted and ignored: the model has no position embeddings.

        ``cache`` (``past_key_values`` in transformers 5.17): a ``FeatureAttentionCache``, an empty
        ``DynamicCache`` (converted layer by layer) or None (a new cache is made when
        ``use_cache``; ``use_cache`` defaults to ``config.use_cache`` in eval mode, False in
        training mode).  ``attention_mask``: 2-D, 1 = real token; padded rows (left or right) are
        packed into one sequence each (``cu_seqlens``) so each gives exactly its unpadded output
        (padded positions give zeros); with ``window > 0`` and a cache every row needs at least
        W real tokens (its cache keeps the last W keys).
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache as cache= or past_key_values=, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, tokens, hidden_size], got shape "
                             f"{tuple(inputs_embeds.shape)}")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache and cache is None:
            cache = self.new_cache()
        if not use_cache:
            cache = None
        B, T, D = inputs_embeds.shape
        seen = 0
        if cache is not None:
            try:
                seen = int(cache.get_seq_length())
            except Exception:  # pragma: no cover - a cache that cannot tell
                seen = 0
        keep = _key_mask(attention_mask, B, T, seen)
        x, cu, idx = inputs_embeds, None, None
        if keep is not None:
            lengths = keep.sum(1)
            if not bool((lengths > 0).all()):
                empty = (lengths == 0).nonzero().flatten().tolist()
                raise ValueError(
                    f"attention_mask: rows {empty} have no real token among the {T} given; every "
                    "row needs at least one (drop empty rows from the batch)")
            W = self.config.window
            if W and cache is not None:  # each row's cache keeps its last min(W, tokens) keys
                st = _state_layer(cache, 0).state if self.layers else None
                have = st.window_k.shape[2] if st is not None and st.window_k is not None else 0
                held = [min(W, n + have) for n in lengths.tolist()]
                if len(set(held)) > 1:
                    short = [b for b, n in enumerate(held) if n < W]
                    raise ValueError(
                        f"a padded attention_mask with window = {W} and a cache: each row's "
                        f"cache keeps its last {W} keys, so every row needs at least {W} tokens "
                        f"(real ones, with the {have} its cache holds: rows {short[:8]} have "
                        f"fewer); pass use_cache=False (training, scoring), or batch rows of at "
                        f"least {W} tokens")
            # unpad: each row's real tokens become one packed sequence (cu_seqlens), attended
            # alone; the outputs are put back in place (repad) at the end
            idx = keep.reshape(-1).nonzero().squeeze(1)
            cu = torch.zeros(B + 1, dtype=torch.int32, device=x.device)
            cu[1:] = torch.cumsum(lengths, 0)
            x = x.reshape(B * T, D).index_select(0, idx).unsqueeze(0)

        def repad(h):
            if idx is None:
                return h
            return h.new_zeros(B * T, h.shape[-1]).index_copy(0, idx, h[0]).view(B, T, -1)

        hidden = [repad(x)] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            layer = _state_layer(cache, i) if cache is not None else None
            x = block(x, layer, cu_seqlens=cu, seen=T)
            if output_hidden_states:
                hidden.append(repad(x))
        x = repad(self.norm(x))
        if output_hidden_states:
            hidden[-1] = x  # as the other models: the last entry has the final norm applied
        out = BaseModelOutputWithPast(last_hidden_state=x, hidden_states=tuple(hidden)
                                      if hidden else None, **{_OUT_CACHE: cache})
        return out if return_dict else out.to_tuple()


class FeatureAttentionForCausalLM(FeatureAttentionPreTrainedModel, GenerationMixin):
    """:class:`FeatureAttentionModel` and a vocabulary head (tied to the embedding when
    ``config.tie_word_embeddings``); ``labels`` give the next-token loss (-100 ignored)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FeatureAttentionConfig):
        super().__init__(config)
        self.model = FeatureAttentionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def new_cache(self):
        """An empty :class:`featattn.hf.FeatureAttentionCache` for this model."""
        return self.model.new_cache()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache=None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int = 0,
        past_key_values=None,
        **kwargs,
    ):
        """As :meth:`FeatureAttentionModel.forward`; ``labels [B, T]`` (-100 = ignored) give the
        shifted cross-entropy ``loss``; ``logits_to_keep=k`` computes the logits of the last k
        positions only (0: all)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        res = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                     **{_OUT_CACHE: getattr(out, _OUT_CACHE)})
        return res if return_dict else res.to_tuple()


AutoConfig.register(FeatureAttentionConfig.model_type, FeatureAttentionConfig, exist_ok=True)
AutoModel.register(FeatureAttentionConfig, FeatureAttentionModel, exist_ok=True)
AutoModelForCausalLM.register(FeatureAttentionConfig, FeatureAttentionForCausalLM, exist_ok=True)
