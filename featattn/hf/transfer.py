"""Attention transfer for :mod:`featattn.hf`: :func:`transfer_attention` trains the feature maps
of a patched model to mimic the softmax attention they replace (Hedgehog / LoLCATs), with its
losses, batch handling and :class:`TransferResult`.  Its progress bar is featattn's terminal UI,
:mod:`featattn.cli.ui`, imported when a transfer shows progress.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._common import PADDING_KWARG, _require_transformers
from .attention import HFFeatureAttention
from .patch import _normalize_layers, _patched_modules, _resolve


#: the ``loss=`` values :func:`transfer_attention` accepts
TRANSFER_LOSSES = ("mse", "xent", "mse+xent")


class _StopForward(Exception):
    """Raised after the last layer being trained: the rest of the model is not needed."""


@dataclass
class TransferResult:
    """What :func:`transfer_attention` returns.

    ``losses[layer_idx][step]`` is the transfer loss of that patched layer at that step (before
    the step's update); ``total`` sums the layers per step.  ``initial`` / ``final`` average each
    layer's loss over the first / last tenth of the steps (at least one step), which smooths the
    batch-to-batch noise.
    """

    losses: dict
    loss: str
    steps: int
    seconds: float

    @property
    def total(self) -> list:
        """Sum over layers of the loss, per step."""
        return [sum(per[s] for per in self.losses.values()) for s in range(self.steps)]

    def _window(self) -> int:
        return max(1, self.steps // 10)

    @property
    def initial(self) -> dict:
        """``{layer_idx: mean loss over the first tenth of the steps}``."""
        n = self._window()
        return {i: sum(per[:n]) / len(per[:n]) for i, per in self.losses.items() if per}

    @property
    def final(self) -> dict:
        """``{layer_idx: mean loss over the last tenth of the steps}``."""
        n = self._window()
        return {i: sum(per[-n:]) / len(per[-n:]) for i, per in self.losses.items() if per}

    def __str__(self) -> str:
        init, fin = self.initial, self.final
        rows = [f"attention transfer ({self.loss}, {self.steps} steps, {self.seconds:.1f} s)"]
        rows += [f"  layer {i:>3}: {init[i]:.4g} -> {fin[i]:.4g}" for i in sorted(fin)]
        return "\n".join(rows)


class _TransferRun:
    """Installed on every patched layer during :func:`transfer_attention`: the layer returns the
    original softmax attention's output (so the model runs as the softmax model it was), and a
    layer being trained also computes its feature attention on the same inputs, its loss against
    the softmax one, and back-propagates it into its feature map."""

    def __init__(self, loss: str, train_layers, stop_after: Optional[int]):
        self.loss = loss
        self.train_layers = set(train_layers)
        self.stop_after = stop_after
        self.step_losses: dict = {}

    def layer_forward(self, attn: "HFFeatureAttention", bound: dict, key_mask):
        kwargs = {k: v for k, v in bound.items() if k != PADDING_KWARG}
        for name in ("cache", "past_key_values", "layer_past"):
            if name in kwargs:
                kwargs[name] = None
        with torch.no_grad():
            out = attn.original(**kwargs)
        target = out[0] if isinstance(out, tuple) else out
        if attn.layer_idx in self.train_layers:
            with torch.no_grad():
                q, k, v = attn.project(bound["hidden_states"], bound.get("position_embeddings"))
            with torch.enable_grad():
                value = _transfer_loss(attn, q, k, v, key_mask, target, self.loss)
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"attention transfer: the loss of layer {attn.layer_idx} is "
                        f"{value.item()}; lower lr="
                    )
                value.backward()  # one independent graph per layer: freed right away
            self.step_losses[attn.layer_idx] = float(value.detach())
        if attn.layer_idx == self.stop_after:
            raise _StopForward
        return out


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _masked_mean(x: torch.Tensor, query_mask) -> torch.Tensor:
    """Mean of ``x [B, ..., T]`` over real query positions (``query_mask [B, T]``)."""
    if query_mask is None:
        return x.mean()
    m = query_mask.to(device=x.device, dtype=x.dtype)
    m = m.view(query_mask.shape[0], *([1] * (x.dim() - 2)), -1)
    m = m.expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1)


def _transfer_loss(attn, q, k, v, key_mask, target, kind: str) -> torch.Tensor:
    parts = []
    if "mse" in kind.split("+"):
        pred = attn.output(attn.attend(q, k, v, key_mask))
        dt = _acc_dtype(target)
        err = (pred.to(dt) - target.to(dt)).pow(2).mean(-1)  # [B, T]
        parts.append(_masked_mean(err, key_mask))
    if "xent" in kind.split("+"):
        parts.append(_attention_kl(attn, q, k, key_mask))
    return parts[0] if len(parts) == 1 else sum(parts)


class _LinearWeightsXent(torch.autograd.Function):
    """``-sum_s a_ts log s_ts + log sum_s s_ts`` per row [B, H, T] of weights ``s`` [B, H, T, T]
    (differentiable) restricted to ``allowed``, under target weights ``a`` (0 off
    ``allowed``, given as ``keep``, 1 there and 0 elsewhere): the cross-entropy part of the
    transfer KL, with its gradient ``1 / sum_s s - a / s`` (0 off ``allowed``) written in one
    buffer instead of autograd's
    chain of masks, clamps, logs and sums over [B, H, T, T] tensors (CPU transfer, the
    example's sizes: see docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, s, a, keep):
        s = s * keep  # keep: 1 on `allowed`, else 0
        tiny = torch.finfo(s.dtype).tiny
        total = s.sum(-1).clamp_min_(tiny)
        # a = 0 off `allowed`, where the clamped log is finite: those terms are 0
        out = total.log() - torch.linalg.vecdot(a, s.clamp_min(tiny).log_())
        ctx.save_for_backward(s, a, keep, total)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, a, keep, total = ctx.saved_tensors
        g = s.clamp_min(torch.finfo(s.dtype).tiny)
        torch.div(a, g, out=g).neg_().add_(total.reciprocal()[..., None]).mul_(grad[..., None])
        return g.mul_(keep), None, None


class _NegWeightedLog(torch.autograd.Function):
    """``-sum_s a_ts log s_ts`` per row [B, H, T] of weights ``s`` [B, H, T, T]
    (differentiable) under target weights ``a`` (no gradient; 0 off the allowed keys, where
    ``s`` is clamped to the smallest normal number so that those terms are 0, not NaN),
    with its gradient ``-a / s`` written in one buffer: the pure-linear transfer's
    cross-entropy term, its ``log sum_s s`` term coming from the features (O(T) per row)."""

    @staticmethod
    def forward(ctx, s, a):
        ctx.save_for_backward(s, a)
        return -torch.linalg.vecdot(a, s.clamp_min(torch.finfo(s.dtype).tiny).log_())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s, a = ctx.saved_tensors
        g = s.clamp_min(torch.finfo(s.dtype).tiny)
        return torch.div(a, g, out=g).mul_(grad.neg()[..., None]), None


def _attention_kl(attn, q, k, key_mask) -> torch.Tensor:
    """Hedgehog's attention-weight loss: cross-entropy between the softmax weights (target, no
    grad) and the normalised linear weights ``phi(q_t).phi(k_s) / sum_s' phi(q_t).phi(k_s')``,
    minus the softmax entropy (so it is the KL divergence, 0 for a perfect fit: same gradient).
    With a softmax window the linear weights are the hybrid's (``f exp(a_ts - m_t)`` inside the
    window, ``(1 - f) phi(q_t).phi(k_s)`` before it, normalised; ``m_t`` without gradient here:
    only the weights' shape is fitted).
    Materialises ``[B, H, T, T]`` weights: meant for the short sequences of transfer."""
    dt = _acc_dtype(q)
    B, H, T, _ = q.shape
    Hkv = attn.kv_heads
    g = H // Hkv
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_mask is not None:
        km = key_mask.to(device=q.device, dtype=torch.bool)
        eye = torch.eye(T, dtype=torch.bool, device=q.device)[None, None]
        # a padded query row keeps its diagonal so that every row is finite (it is not counted)
        allowed = (allowed & km[:, None, None, :]) | (eye & ~km[:, None, :, None])

    def scores(x, y):
        """[B, H, T, T] products of x [B, H, T, .] with y [B, Hkv, T, .] (each q head against
        its k/v group's head, no repeated copy of y)."""
        x = x.reshape(B, Hkv, g * T, x.shape[-1])
        return (x @ y.transpose(-1, -2)).view(B, H, T, T)

    # Masks as multiplicative (0 / 1) and additive (0 / -inf) tensors: a broadcast multiply or
    # add is ~8x cheaper than masked_fill on the CPU, and nothing here takes exp of finite
    # numbers so negative they underflow (30x slower there than exp of -inf).
    keep = allowed.to(dt)
    block = torch.zeros_like(keep).masked_fill_(~allowed, float("-inf"))
    with torch.no_grad():
        logits = scores(q.to(dt) * attn.scaling, k.to(dt))  # the scale on q: [.., T, d], not T x T
        masked = logits + block
        log_a = masked.log_softmax(-1)
        a = masked.softmax(-1)  # 0 off `allowed` (cheaper than exp(log_a) over the -inf)
        # sum_s a log a = sum_s a logits - lse (sum_s a = 1; a = 0 off `allowed`), with
        # lse_t = logits_tt - log_a_tt from the diagonal, always allowed and finite in log space
        diag = torch.diagonal(logits, dim1=-2, dim2=-1) - torch.diagonal(log_a, dim1=-2, dim2=-1)
        negent = torch.linalg.vecdot(a, logits) - diag  # the KL's constant part: 0 at a fit
    fm = attn.feature_map
    fq = fm.forward_query(q * attn.q_scale if attn.q_scale != 1.0 else q).to(dt)
    fk = fm.forward_key(k).to(dt)
    s = scores(fq, fk)
    if not attn.window:
        # KL_t = sum_s a log a - sum_s a log s + log sum_s s, the row sum over the allowed
        # keys from the features: phi(q_t) . sum_{s <= t, real} phi(k_s) (+ s_tt on a padded
        # query row, whose one allowed key is its own), not from the [B, H, T, T] weights
        kk = fk if key_mask is None else fk * km[:, None, :, None].to(dt)
        cum = kk.cumsum(2)  # [B, Hkv, T, F]
        total = (fq.reshape(B, Hkv, g, T, -1) * cum[:, :, None]).sum(-1).reshape(B, H, T)
        if key_mask is not None:
            total = total + torch.diagonal(s, dim1=-2, dim2=-1) * (~km)[:, None, :].to(dt)
        tiny = torch.finfo(dt).tiny
        kl = negent + total.clamp_min(tiny).log() + _NegWeightedLog.apply(s, a)
        return _masked_mean(kl, key_mask)
    # the hybrid's weights: f exp(a - m) in the window, (1 - f) phi.phi before
    t = torch.arange(T, device=q.device)
    in_window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - attn.window)
    with torch.no_grad():
        # e = exp(win - m), written as softmax(win) exp(lse - m): most of win is -inf,
        # where exp is slow and softmax is not (lse from the diagonal, as above)
        win = masked.masked_fill(~in_window, float("-inf"))
        lse_w = (torch.diagonal(win, dim1=-2, dim2=-1)
                 - torch.diagonal(win.log_softmax(-1), dim1=-2, dim2=-1))
        e = win.softmax(-1).mul_(torch.exp(lse_w - win.amax(-1))[..., None])
    f = torch.sigmoid(attn.window_logit.to(dt)).view(1, H, 1, 1)
    s = torch.lerp(s * (~in_window).to(dt), e, f)  # (1 - f) phi.phi + f e
    # KL_t = sum_s a log a - sum_s a log s + log sum_s s, s the weights on `allowed` only
    kl = negent + _LinearWeightsXent.apply(s, a, keep)  # [B, H, T]
    return _masked_mean(kl, key_mask)


def _batch_inputs(batch, device) -> dict:
    if isinstance(batch, torch.Tensor):
        inputs = {"input_ids": batch}
    elif isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
    else:
        raise TypeError(
            "each transfer batch must be an input_ids tensor [B, T] or a dict of model inputs "
            f"(input_ids, attention_mask, ...), got {type(batch).__name__}"
        )
    if device is not None:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 1:  # one sequence: a batch of one
        for name in ("input_ids", "attention_mask", "position_ids"):
            x = inputs.get(name)
            if isinstance(x, torch.Tensor) and x.dim() == 1:
                inputs[name] = x[None]
    return inputs


def _batch_stream(batches, steps: Optional[int]):
    """(number of steps, iterator of batches): ``steps=None`` is one pass; otherwise the
    batches are cycled (a one-shot iterator that runs out raises)."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    if steps is None:
        items = list(batches)
        if not items:
            raise ValueError("transfer_attention got no batches")
        return len(items), iter(items)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")

    def gen():
        done = 0
        while True:
            it = iter(batches)
            reiterable = it is not batches
            got = 0
            for b in it:
                got += 1
                yield b
                done += 1
                if done >= steps:
                    return
            if got == 0 or not reiterable:
                raise ValueError(
                    f"the transfer batches ran out after {done} of {steps} steps: pass a list "
                    "(it is cycled), a longer iterator, or steps=None for one pass"
                )

    return int(steps), gen()


#: the plain progress line of a transfer (no rich or no terminal), every tenth of the run
_PROGRESS_LINE = "{name}: step {step}/{total}  {info}"


@contextlib.contextmanager
def _progress(enabled: bool, total: int, description: str):
    """Yields ``update(step, info)``: featattn's terminal UI on stderr (rich's bar on a
    terminal when rich is installed, else a plain line every tenth of the run), or nothing."""
    if not enabled:
        yield lambda step, info="": None
        return
    from ..cli.ui import UI  # here, not at the top: importing featattn.hf never loads the CLI

    with UI(stderr=True).progress(line=_PROGRESS_LINE) as add:
        yield add(description, total)


#: parameter dtypes trained through fp32 master copies
_LOW = (torch.float16, torch.bfloat16)


def transfer_attention(
    model: nn.Module,
    batches,
    *,
    steps: Optional[int] = None,
    lr: float = 1e-2,
    loss: str = "mse",
    layers: Optional[Iterable[int]] = None,
    weight_decay: float = 0.0,
    lr_schedule: str = "constant",
    progress: bool = True,
) -> TransferResult:
    """Attention transfer: train the feature maps of a patched model to mimic its softmax attention.

    Each step runs the model once, with no gradient, *as the softmax model*: every patched layer
    returns its original softmax attention's output (``attn.original``), so each layer sees the
    hidden states of the model it was patched from.  A layer being trained also computes its
    feature attention on the same inputs and a loss against the softmax one; each layer's loss
    is back-propagated into its own feature map only, and one Adam step updates all of them.
    Layers are thus trained together, in one forward per step.  The forward stops after the last
    layer being trained.  Afterwards the model runs its linear path again, as before the call.

    Args:
        model: a model patched by :func:`patch_hf_model` with a learnable map (``"hedgehog"``).
        batches: an ``input_ids`` tensor ``[B, T]``, a dict of model inputs (``input_ids``,
            ``attention_mask``, ...; ``labels`` is ignored), or an iterable of either.  Padding
            given by ``attention_mask`` is left out of the loss.
        steps: number of optimiser steps; the batches are cycled (a one-shot iterator that runs
            out raises ``ValueError``).  None: one step per batch, one pass.
        lr: Adam learning rate.
        loss: ``"mse"``: mean squared error between the layer's outputs (after the output
            projection), linear vs softmax, averaged over tokens and hidden units.  ``"xent"``:
            Hedgehog's loss on the attention weights, the cross-entropy of the normalised linear
            weights ``phi(q_t).phi(k_s) / sum_s' phi(q_t).phi(k_s')`` under the softmax weights,
            reported minus the softmax entropy (i.e. the KL divergence, 0 for a perfect fit);
            it materialises ``[B, H, T, T]`` weights, so use short sequences.  ``"mse+xent"``:
            their sum (LoLCATs-style).
        layers: the patched layers to train (default: all of them).  All patched layers run
            softmax attention during transfer whether trained or not.
        weight_decay: Adam's (L2) weight decay.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over ``steps``).
        progress: show a progress bar: rich's on a terminal when rich is installed, otherwise a
            plain line on stderr every tenth of the run.

    Returns:
        a :class:`TransferResult`: ``.losses[layer_idx]`` (one float per step), ``.total``,
        ``.initial``, ``.final``; ``print()`` it for a summary.

    Only the feature-map parameters of the trained layers change: every other parameter has
    ``requires_grad`` off during the call and its ``.grad`` untouched; the ``requires_grad``
    flags and the train/eval mode of the model (and of the original attentions) are restored
    afterwards, and the feature maps' ``.grad`` is left as None.  Dropout is off during transfer.
    """
    _require_transformers()
    _resolve(model)
    mods = _patched_modules(model)
    if not mods:
        raise RuntimeError("transfer_attention needs a model patched by featattn.hf.patch_hf_model")
    if loss not in TRANSFER_LOSSES:
        raise ValueError(
            f"loss must be one of {', '.join(map(repr, TRANSFER_LOSSES))}, got {loss!r}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if (
        isinstance(lr, bool) or not isinstance(lr, numbers.Real)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if (
        isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
        or not (math.isfinite(weight_decay) and weight_decay >= 0)
    ):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if layers is None:
        train = sorted(mods)
    else:
        train = _normalize_layers(layers, len(_resolve(model)[2]))
        missing = [i for i in train if i not in mods]
        if missing:
            raise ValueError(f"layers {missing} are not patched (patched: {sorted(mods)})")
    fm_params = []
    for i in train:  # the maps' parameters and, with a softmax window, the mixing weights
        extra = [mods[i].window_logit] if mods[i].window else []
        for p in [*mods[i].feature_map.parameters(), *extra]:
            if p.is_floating_point() and all(p is not q for q in fm_params):
                fm_params.append(p)
    if not fm_params:
        name = type(mods[train[0]].feature_map).__name__
        raise ValueError(
            f"the feature map ({name}) has no parameters to train: attention transfer needs a "
            "learnable map, e.g. patch_hf_model(model, 'hedgehog')"
        )
    n_steps, stream = _batch_stream(batches, steps)
    device = next(iter(fm_params)).device

    all_params = list(model.parameters())
    for m in mods.values():  # an original's parameters are the patched module's: nothing new
        all_params += [p for p in m.original.parameters()]
    flags = {id(p): (p, p.requires_grad) for p in all_params}
    modes = [(m, m.training) for m in model.modules()]
    modes += [(sub, sub.training) for m in mods.values() for sub in m.original.modules()]

    run = _TransferRun(loss, train, stop_after=max(train))
    result = {i: [] for i in train}
    t0 = time.perf_counter()
    try:
        for p, _ in flags.values():
            p.requires_grad_(False)
        for p in fm_params:
            p.requires_grad_(True)
            p.grad = None
        model.eval()
        for m in mods.values():
            m.original.eval()
            m.__dict__["_transfer"] = run
        # fp16 / bf16 maps train fp32 master copies (Adam's eps and small second moments
        # round to 0 in fp16: one step turned a float16 Hedgehog map to inf / NaN), copied
        # into the model's parameters after each step
        masters = [p.detach().float().clone() if p.dtype in _LOW else p for p in fm_params]
        opt = torch.optim.Adam(masters, lr=float(lr), weight_decay=float(weight_decay))
        sched = None
        if lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, n_steps) / n_steps))
            )
        with _progress(bool(progress), n_steps, f"attention transfer ({loss})") as update:
            for step in range(1, n_steps + 1):
                inputs = _batch_inputs(next(stream), device)
                inputs["use_cache"] = False
                run.step_losses = {}
                with torch.no_grad():
                    try:
                        model(**inputs)
                    except _StopForward:
                        pass
                if set(run.step_losses) != set(train):  # pragma: no cover - a layer was skipped
                    missing = sorted(set(train) - set(run.step_losses))
                    raise RuntimeError(
                        f"attention transfer: layers {missing} did not run in the forward pass"
                    )
                for p, w in zip(fm_params, masters):
                    if w is not p:
                        w.grad = None if p.grad is None else p.grad.float()
                before = [w.detach().clone() for w in masters]
                opt.step()
                if not bool(torch.stack([torch.isfinite(w).all() for w in masters]).all()):
                    with torch.no_grad():
                        for w, b in zip(masters, before):
                            w.copy_(b)
                    raise FloatingPointError(
                        f"attention transfer: step {step} made a feature-map parameter inf / "
                        f"NaN (left at its value before the step); lower lr= ({lr})")
                with torch.no_grad():
                    for p, w in zip(fm_params, masters):
                        if w is not p:
                            p.copy_(w)
                            p.grad = None
                opt.zero_grad(set_to_none=True)
                if sched is not None:
                    sched.step()
                for i in train:
                    result[i].append(run.step_losses[i])
                update(step, f"loss {sum(run.step_losses.values()):.4g}")
    finally:
        for m in mods.values():
            m.__dict__.pop("_transfer", None)
        for p, flag in flags.values():
            p.requires_grad_(flag)
        for p in fm_params:
            p.grad = None
        for m, mode in modes:
            m.training = mode
    return TransferResult(losses=result, loss=loss, steps=n_steps, seconds=time.perf_counter() - t0)
