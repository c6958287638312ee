"""CUDA-graph decoding for a patched Hugging Face model: :func:`enable_cuda_graphs`.

A patched model's decoding step (one new token per row against the recurrent states) does a
fixed amount of GPU work whatever the prompt length, and in eager mode its cost is host time:
a few hundred kernel launches from Python per token.  :func:`enable_cuda_graphs` wraps the
model's ``forward`` so that a one-token step with a :class:`~featattn.hf.FeatureAttentionCache`
(or the cache ``generate()`` makes) is captured once per batch size in a CUDA graph and
replayed; everything else (the prefill, training, CPU) runs the model's own forward.

How a replay works.  The graph reads the token ids, positions and cache position from static
input buffers and advances static fp32 state buffers in place (the step kernel writes the
state it reads; a softmax window's keys and values, once it is full, move in theirs).  On the first step of a cache its states are copied into those buffers and
the cache's layers are pointed at them, so every later step of that cache is a replay and
three input copies; if another cache takes the graph over, the first gets its own copies of
its states back.  The step's Python side effect, each layer's token count, is done by the
wrapper after the replay.

Why not transformers' own compile path (a cache with ``is_compileable = True``, then
``generate()`` compiles the decoding forward with CUDA graphs): the masks transformers builds
for every step take their sizes and query offset from the cache's token count, a Python int
that changes every step, and a CUDA graph recorded for one value cannot serve the next; the
patched attention never reads that mask when decoding, so the wrapper does not build it.
"""

from __future__ import annotations

import copy
import inspect
import types
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..state import LinearAttentionState
from .cache import _cache_classes, cache_kwarg_name
from .patch import _patched_modules

#: keyword arguments a captured step takes (anything else: the model's own forward)
_HANDLED = {"input_ids", "attention_mask", "position_ids", "cache_position", "use_cache",
            "return_dict", "logits_to_keep", "num_logits_to_keep", "past_key_values", "cache",
            "inputs_embeds", "labels", "output_attentions", "output_hidden_states"}


@dataclass
class _Entry:
    """One captured step: its graph, static buffers, and the cache that owns the states."""

    B: int
    keep: object
    ids: torch.Tensor
    pos: torch.Tensor
    cpos: Optional[torch.Tensor]
    kv: list
    z: list
    wk: list  # the windows' keys / values per layer (None: no window)
    wv: list
    cache: object = None  # the FeatureAttentionCache the graph was captured with (on kv / z)
    graph: object = None
    out: object = None
    owner: object = None  # weakref to the user's cache whose layers point at kv / z
    failed: Optional[str] = None
    replays: int = 0
    weights: tuple = ()


class _CUDAGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls the wrapper makes (tests substitute a
    stand-in that re-runs the captured function, to check the plumbing on CPU)."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn):
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):  # on its own capture stream
            out = fn()
        return out

    def replay(self):
        self.graph.replay()


class CUDAGraphDecoding:
    """The state of :func:`enable_cuda_graphs` on one model (``model._featattn_graphs``):
    its captured steps by (batch size, ``logits_to_keep``), and why steps ran eagerly."""

    graph_class = _CUDAGraph

    def __init__(self, model: nn.Module):
        self.forward = model.forward  # the bound forward the wrapper replaces
        mods = _patched_modules(model)
        self.patched = len(mods)
        #: each cache layer's softmax window (0: none), in layer order
        self.windows = [mods[i].window for i in sorted(mods)]
        #: generate() reads the forward's signature (logits_to_keep, position_ids, ...)
        self.__signature__ = inspect.signature(self.forward)
        self.params = tuple(self.__signature__.parameters)
        self.cache_kw = cache_kwarg_name(model)
        self.entries: dict = {}
        self.eager_reasons: dict = {}
        self.pool = None

    @property
    def model(self) -> nn.Module:
        return self.forward.__self__

    def __deepcopy__(self, memo):
        """A copied model gets its own wrapper, on its own forward, with no graphs yet (the
        graphs replay the original's kernels on the original's buffers)."""
        model = copy.deepcopy(self.model, memo)  # the copy, already being built
        new = copy.copy(self)
        new.forward = types.MethodType(self.forward.__func__, model)
        new.entries, new.eager_reasons, new.pool = {}, {}, None
        return new

    def __getstate__(self):
        """Pickled without its graphs (CUDA graphs and their buffers do not pickle); the
        unpickled model captures again."""
        state = dict(self.__dict__)
        state.update(entries={}, eager_reasons={}, pool=None)
        return state

    # ------------------------------------------------------------------ eligibility
    def _why_eager(self, kwargs) -> Optional[str]:
        """None when this call is a step the graph can take, else why not."""
        extra = set(kwargs) - _HANDLED
        if extra:
            return f"arguments the captured step does not take: {sorted(extra)}"
        if torch.is_grad_enabled():
            return "grad mode is on (a captured step is inference only)"
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1:
            return "not one new token per row (input_ids [B, 1])"
        if ids.device.type != "cuda" and self.graph_class is _CUDAGraph:
            return "not on CUDA"
        for name in ("inputs_embeds", "labels"):
            if kwargs.get(name) is not None:
                return f"{name} is given"
        for name in ("output_attentions", "output_hidden_states"):
            if kwargs.get(name):
                return f"{name}=True"
        if kwargs.get("use_cache") is False:
            return "use_cache=False"
        if isinstance(kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep")),
                      torch.Tensor):
            return "logits_to_keep is a tensor"
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layer_cls = _cache_classes()[0]
        layers = getattr(cache, "layers", None)
        if not isinstance(layers, list) or not layers:
            return "no cache with per-layer states"
        if len(layers) != self.patched or not all(isinstance(x, layer_cls) for x in layers):
            return "some layers are not patched (their key/value cache grows every step)"
        for x, W in zip(layers, self.windows):
            s = x.state
            if s is None:
                return "the cache holds no state yet (prefill first)"
            if W and (s.window_k is None or s.window_k.shape[2] != W):
                return ("a softmax window still filling (its first tokens grow the state; "
                        "then its rows move in place)")
            if s.kv.shape[0] != ids.shape[0] or s.kv.device != ids.device:
                return "the cache's batch or device differs from input_ids"
            if s.kv.dtype != torch.float32 or (s.z is not None and s.z.dtype != torch.float32):
                return "the states are not fp32 (the step kernel advances fp32 states in place)"
        if kwargs.get("attention_mask") is not None and kwargs.get("position_ids") is None:
            return "attention_mask without position_ids (positions would come from the mask)"
        return None

    # ------------------------------------------------------------------ the step
    def __call__(self, *args, **kwargs):
        if args:  # generate() passes keywords; positional calls are bound by name
            kwargs = {**dict(zip(self.params, args)), **kwargs}
        why = self._why_eager(kwargs)
        if why is None:
            # buffers and graphs outlive the call: never inference tensors, which a later
            # call outside torch.inference_mode() could not update in place
            with torch.inference_mode(False), torch.no_grad():
                entry = self._entry(kwargs)
                if entry.failed is None:
                    return self._step(entry, kwargs)
            why = entry.failed
        self.eager_reasons[why] = self.eager_reasons.get(why, 0) + 1
        return self.forward(**kwargs)

    def _weights(self) -> tuple:
        """Where the model's parameters and buffers live: a graph replays the kernels it
        captured on those addresses, so a change (``model.to(...)``, a replaced Parameter)
        drops every graph."""
        m = self.model
        return tuple((t.data_ptr(), t.dtype) for t in (*m.parameters(), *m.buffers()))

    def _entry(self, kwargs) -> _Entry:
        B = kwargs["input_ids"].shape[0]
        keep = kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep"))
        entry = self.entries.get((B, keep))
        if entry is not None:
            return entry
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        dev = ids.device
        entry = _Entry(
            B, keep, torch.zeros(B, 1, dtype=torch.long, device=dev),
            torch.zeros(B, 1, dtype=torch.long, device=dev),
            torch.zeros(1, dtype=torch.long, device=dev) if "cache_position" in self.params
            else None,
            [torch.empty_like(x.state.kv, dtype=torch.float32,
                              memory_format=torch.contiguous_format) for x in cache.layers],
            [None if x.state.z is None else torch.empty_like(
                x.state.z, dtype=torch.float32, memory_format=torch.contiguous_format)
             for x in cache.layers],
            [None if x.state.window_k is None else torch.empty_like(
                x.state.window_k, memory_format=torch.contiguous_format) for x in cache.layers],
            [None if x.state.window_v is None else torch.empty_like(
                x.state.window_v, memory_format=torch.contiguous_format) for x in cache.layers])
        static = _cache_classes()[1](self.model)
        for x, kv, z, wk, wv in zip(static.layers, entry.kv, entry.z, entry.wk, entry.wv):
            x.store(LinearAttentionState(kv, z, wk, wv), 0)
        entry.cache = static
        self.entries[(B, keep)] = entry
        return entry

    def _adopt(self, entry: _Entry, cache) -> None:
        """Point ``cache``'s layers at the entry's state buffers (copying their states in),
        handing the previous owner its own copies first."""
        layers = cache.layers
        if all(_held(x.state, entry, i) for i, x in enumerate(layers)):
            return
        weights = self._weights()
        if entry.graph is not None and entry.weights != weights:
            entry.graph, entry.out = None, None  # the model moved: capture again
        entry.weights = weights
        for i, x in enumerate(layers):
            if any(_shape(a) != _shape(b) for a, b in zip(_buffers(x.state), _slots(entry, i))):
                raise _Mismatch("the cache's state shapes differ from the captured step's")
        prev = entry.owner() if entry.owner is not None else None
        if prev is not None and prev is not cache:
            _hand_back(entry, prev)
        for i, x in enumerate(layers):
            for buf, t in zip(_slots(entry, i), _buffers(x.state)):
                if buf is not None:
                    buf.copy_(t)
            # a held state object follows
            x.state.kv, x.state.z, x.state.window_k, x.state.window_v = _slots(entry, i)
        entry.owner = weakref.ref(cache)

    def _fill(self, entry: _Entry, kwargs, seen: int) -> None:
        entry.ids.copy_(kwargs["input_ids"])
        pos = kwargs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            entry.pos.copy_(pos.expand(entry.B, 1))
        else:
            entry.pos.fill_(seen)
        if entry.cpos is not None:
            cpos = kwargs.get("cache_position")
            if isinstance(cpos, torch.Tensor):
                entry.cpos.copy_(cpos.reshape(1))
            else:
                entry.cpos.fill_(seen)

    def _call_static(self, entry: _Entry, kwargs):
        """The model's forward on the static buffers and the entry's own cache (whose
        states are the buffers the user's cache points at), as captured."""
        static = {"input_ids": entry.ids, "position_ids": entry.pos, "attention_mask": None,
                  self.cache_kw: entry.cache, "use_cache": True, "return_dict": True}
        if entry.cpos is not None:
            static["cache_position"] = entry.cpos
        if entry.keep is not None:
            static["logits_to_keep" if "logits_to_keep" in kwargs else "num_logits_to_keep"] = \
                entry.keep
        return self.forward(**static)

    def _step(self, entry: _Entry, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        try:
            self._adopt(entry, cache)
        except _Mismatch as e:
            self.eager_reasons[str(e)] = self.eager_reasons.get(str(e), 0) + 1
            return self.forward(**kwargs)
        layers = cache.layers
        seen = [x.seen for x in layers]
        self._fill(entry, kwargs, seen[0])
        if entry.graph is None:
            if not self._capture(entry, kwargs, seen[0]):
                return self.forward(**kwargs)
        entry.graph.replay()
        entry.replays += 1
        for x, n in zip(layers, seen):
            x.seen = n + 1
        return self._output(entry, cache, kwargs.get("return_dict"))

    def _capture(self, entry: _Entry, kwargs, seen: int) -> bool:
        """Warm up (the kernels compile) and capture the step; the states are put back after
        each, so the replay that follows is the step itself."""
        saved = [[None if t is None else t.clone() for t in _slots(entry, i)]
                 for i in range(len(entry.kv))]

        def restore():
            for i, x in enumerate(entry.cache.layers):
                for buf, t in zip(_slots(entry, i), saved[i]):
                    if buf is not None:
                        buf.copy_(t)
                x.seen = seen

        try:
            restore()
            self._call_static(entry, kwargs)  # warm-up: Triton compiles its kernels
            restore()
            if self.pool is None and self.graph_class is _CUDAGraph:
                self.pool = torch.cuda.graph_pool_handle()
            graph = self.graph_class(self.pool)
            entry.out = graph.capture(lambda: self._call_static(entry, kwargs))
            restore()
            moved = [i for i, x in enumerate(entry.cache.layers) if not _held(x.state, entry, i)]
            if moved:  # the step replaced a state instead of updating it in place
                raise RuntimeError(f"layers {moved} did not update their state in place")
        except Exception as e:  # a step that cannot be captured (a host sync): run eagerly
            restore()
            entry.failed = f"the step could not be captured ({type(e).__name__}: {e})"
            self.eager_reasons[entry.failed] = self.eager_reasons.get(entry.failed, 0) + 1
            return False
        entry.graph = graph
        return True

    def _output(self, entry: _Entry, cache, return_dict):
        out = entry.out
        fields = {}
        for k, v in out.items():
            if k == "logits":
                v = v.clone()
            elif isinstance(v, torch.Tensor):
                v = v.clone()
            elif v is not None and hasattr(v, "layers"):
                v = cache
            fields[k] = v
        out = type(out)(**fields)
        if return_dict is None:
            cfg = getattr(self.model, "config", None)
            return_dict = getattr(cfg, "use_return_dict", getattr(cfg, "return_dict", True))
        return out if return_dict else out.to_tuple()


class _Mismatch(ValueError):
    pass


def _slots(entry: _Entry, i: int) -> tuple:
    """Layer i's state buffers of the entry: (kv, z, window keys, window values)."""
    return entry.kv[i], entry.z[i], entry.wk[i], entry.wv[i]


def _buffers(state) -> tuple:
    return state.kv, state.z, state.window_k, state.window_v


def _shape(t):
    return None if t is None else tuple(t.shape)


def _held(state, entry: _Entry, i: int) -> bool:
    """Whether ``state``'s tensors are the entry's buffers of layer i."""
    return all(a is b for a, b in zip(_buffers(state), _slots(entry, i)))


def _hand_back(entry: _Entry, cache) -> None:
    """Give ``cache``'s states that live in the entry's buffers tensors of their own (the
    state objects themselves, which a caller may hold, keep their values)."""
    for i, x in enumerate(cache.layers):
        s = getattr(x, "state", None)
        if s is not None and s.kv is entry.kv[i]:
            s.kv, s.z, s.window_k, s.window_v = (None if t is None else t.clone()
                                                 for t in _buffers(s))


def enable_cuda_graphs(model: nn.Module) -> CUDAGraphDecoding:
    """Decode a patched model's one-token steps by replaying CUDA graphs; returns the
    :class:`CUDAGraphDecoding` (also ``model._featattn_graphs``).

    ``model`` must be patched on every decoder layer (:func:`patch_hf_model` with the default
    ``layers``).  With a softmax window (``window=W``) the steps replay once the window is
    full (the first W tokens of a cache, prompt included, run eagerly: the state grows);
    the window's keys and values then move in place like the linear state.  After this, ``model.generate(...)`` (greedy,
    sampling, any batch size) and direct ``model(input_ids[B, 1], cache=...)`` calls under
    ``torch.no_grad()`` replay one captured step per (batch size, ``logits_to_keep``); the
    first step of each size captures it (a warm-up forward and a capture, tens of ms).
    Prefill, training, CPU and other calls run the model's own forward, and
    ``model._featattn_graphs.eager_reasons`` counts why.

    The one-token step is taken as a real token: ``generate()`` never steps a padding token
    (left-padded prompts are handled in the prefill).  :func:`disable_cuda_graphs` undoes
    this; the graphs hold their state buffers and a memory pool until then.

    Raises:
        ValueError: the model is not patched, or not on every layer.
    """
    mods = _patched_modules(model)
    if not mods:
        raise ValueError("enable_cuda_graphs needs a model patched by featattn.patch_hf_model")
    from .patch import _resolve

    _, _, decoder_layers = _resolve(model)
    if len(mods) != len(decoder_layers):
        raise ValueError(
            f"{len(mods)} of {len(decoder_layers)} decoder layers are patched: the softmax "
            "layers' key/value cache grows every step, which a CUDA graph cannot replay; "
            "patch every layer (patch_hf_model(model, ..., layers=None))")
    current = getattr(model, "_featattn_graphs", None)
    if isinstance(current, CUDAGraphDecoding):
        return current
    dec = CUDAGraphDecoding(model)
    model.__dict__["_featattn_graphs"] = dec
    model.forward = dec
    return dec


def disable_cuda_graphs(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_cuda_graphs` (the graphs and their buffers are freed); returns
    ``model``.  Caches whose layers point at the graphs' state buffers keep working."""
    dec = model.__dict__.pop("_featattn_graphs", None)
    if dec is not None:
        if model.__dict__.get("forward") is dec:
            del model.__dict__["forward"]
        for entry in dec.entries.values():
            owner = entry.owner() if entry.owner is not None else None
            if owner is not None:  # the cache keeps its states, now in tensors of its own
                _hand_back(entry, owner)
        dec.entries.clear()
    return model
