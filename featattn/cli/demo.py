"""``featattn demo``: train small models that differ only in their attention layer on
multi-query associative recall (MQAR) and compare them.

MQAR (Zoology, Arora et al. 2023; Based, Arora et al. 2024) is the synthetic task on which the
recall gap between softmax attention and linear attention shows up at tiny scale.  A sequence
is ``N`` key-value pairs followed by queries, each query a key seen earlier::

    k1 v1 k2 v2 ... kN vN | q1 q2 ... qM        (qj is one of the k_i)

and the model must output, *at each query position*, the value bound to that key.  Keys and
values come from disjoint halves of the vocabulary; a fresh set of pairs is drawn for every
sequence, so nothing can be memorised in the weights: the layer has to store the pairs in its
state and read them back.  Loss and accuracy count only the query positions.

The model (identical for every attention layer; its modules live in :mod:`featattn.blocks`, beside
the pieces of the Hugging Face model class, and import nothing from transformers)::

    Embedding -> [x + ShortConv(LN x); x + Attention(LN x); x + MLP(LN x)] * layers -> LN -> Linear

The short causal depthwise convolution (kernel 3, as in Based / Zoology's "BaseConv") lets a
value token see the key just before it; the attention layer then has to do the recall.  The
attention layer is a :class:`featattn.FeatureAttention` with the given feature map, or
``softmax``: torch's ``scaled_dot_product_attention(..., is_causal=True)`` with the same
projections.

Everything is seeded: the weights (each model is built from the global RNG reset to ``seed``,
inside ``torch.random.fork_rng`` so the caller's RNG state is neither read nor changed), the
training batches (a fresh ``torch.Generator`` seeded with ``seed`` per model, so every model
sees the same data) and the evaluation set (a generator seeded with ``seed + 1``).  A model's
result depends on nothing else in the process: not on the models trained before it, nor on
the order.  It does depend on how the arithmetic is rounded, so it is reproducible for the same
seed, torch version, thread count and CPU instruction set (:func:`run_environment`); another
thread count splits the matrix products' sums differently, and a few models (relu, elu) end
at visibly different accuracies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import RecallBlock as Block  # noqa: F401 (the demo's names, kept)
from ..blocks import RecallModel, ShortConv  # noqa: F401
from ..layers import FeatureAttention

__all__ = [
    "DemoConfig",
    "DEFAULT_CONFIG",
    "QUICK_CONFIG",
    "mqar_batch",
    "SoftmaxAttention",
    "RecallModel",
    "build_model",
    "train_one",
    "TrainResult",
    "plot_curves",
    "run_environment",
]

SOFTMAX = "softmax"
IGNORE = -100
#: steps left out of tokens/s (they include Triton's compilation and autotuning on a GPU)
WARMUP_STEPS = 3


@dataclass
class DemoConfig:
    """Task, model and training sizes of one demo run (every model uses the same)."""

    steps: int = 800
    seq_len: int = 80
    kv_pairs: int = 24
    vocab: int = 129            # token 0 unused, 64 keys, 64 values
    batch: int = 64
    dim: int = 64
    heads: int = 2
    layers: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_size: int = 256
    seed: int = 0

    @property
    def num_keys(self) -> int:
        return (self.vocab - 1) // 2

    @property
    def num_queries(self) -> int:
        return self.seq_len - 2 * self.kv_pairs

    def problems(self) -> List[str]:
        """Human-readable reasons why this config cannot run (empty when it can)."""
        out = []
        for name in ("steps", "seq_len", "kv_pairs", "batch", "dim", "heads", "layers",
                     "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if out:
            return out
        if self.vocab < 5:
            out.append(f"vocab must be >= 5, got {self.vocab}")
        elif self.kv_pairs > self.num_keys:
            out.append(f"--kv-pairs {self.kv_pairs} exceeds the {self.num_keys} distinct keys "
                       f"of the vocabulary ({self.vocab} tokens)")
        if self.seq_len < 2 * self.kv_pairs + 1:
            out.append(
                f"--seq-len {self.seq_len} is too short for {self.kv_pairs} key-value pairs: "
                f"MQAR needs 2 * kv_pairs tokens of pairs plus at least one query, i.e. "
                f"--seq-len >= {2 * self.kv_pairs + 1} (or lower --kv-pairs)")
        if self.dim % self.heads:
            out.append(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            out.append(f"--lr must be a finite number > 0, got {self.lr}")
        return out


#: what ``featattn demo`` runs (a few minutes on a 2-core CPU)
DEFAULT_CONFIG = DemoConfig()
#: what ``featattn demo --quick`` runs (seconds per model: a smoke test, not a result)
QUICK_CONFIG = DemoConfig(steps=250, seq_len=24, kv_pairs=6, vocab=33, batch=32, dim=32,
                          lr=5e-3, eval_every=25, eval_size=64)


# --------------------------------------------------------------------------- data


def mqar_batch(gen: torch.Generator, batch: int, seq_len: int, kv_pairs: int, vocab: int):
    """A batch of MQAR sequences: ``(inputs, targets)``, both ``[batch, seq_len]`` int64.

    Keys are tokens ``1 .. nk`` and values ``nk+1 .. 2nk`` with ``nk = (vocab - 1) // 2``;
    each sequence draws ``kv_pairs`` distinct keys, a random value for each, lays them out as
    ``k1 v1 ... kN vN`` and fills the remaining ``seq_len - 2N`` positions with queries (a
    random permutation of its keys, repeated if there are more queries than keys).
    ``targets`` holds the bound value at query positions and -100 (ignored) elsewhere.
    """
    nk = (vocab - 1) // 2
    keys = torch.argsort(torch.rand(batch, nk, generator=gen), dim=-1)[:, :kv_pairs] + 1
    values = torch.randint(nk + 1, 2 * nk + 1, (batch, kv_pairs), generator=gen)
    context = torch.stack([keys, values], dim=-1).flatten(1)            # k1 v1 k2 v2 ...
    n_queries = seq_len - 2 * kv_pairs
    order = torch.argsort(torch.rand(batch, kv_pairs, generator=gen), dim=-1)
    order = order.repeat(1, -(-n_queries // kv_pairs))[:, :n_queries]
    inputs = torch.cat([context, keys.gather(1, order)], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 2 * kv_pairs:] = values.gather(1, order)
    return inputs, targets


# --------------------------------------------------------------------------- model


class SoftmaxAttention(nn.Module):
    """The softmax baseline: ``FeatureAttention``'s projections around torch's
    ``scaled_dot_product_attention(q, k, v, is_causal=True)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def split(t):
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


def build_attention(name: str, dim: int, heads: int) -> nn.Module:
    """``softmax`` or a FeatureAttention with feature map ``name`` (``identity`` without
    normalisation: its denominator can be <= 0)."""
    if name == SOFTMAX:
        return SoftmaxAttention(dim, heads)
    return FeatureAttention(dim, heads, name, normalize=name != "identity")


def build_model(name: str, cfg: DemoConfig) -> RecallModel:
    return RecallModel(cfg.vocab, cfg.dim, cfg.layers,
                       lambda: build_attention(name, cfg.dim, cfg.heads))


def state_bytes(model: RecallModel, seq_len: int) -> int:
    """Bytes a sequence's inference state takes, over all attention layers: the recurrent
    state (fp32 kv and z, the same at any length) for feature maps; the fp32 K/V cache after
    ``seq_len`` tokens for softmax (it grows with the length)."""
    total = 0
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, FeatureAttention):
            total += attn.init_state(1).nbytes()
        else:
            total += 2 * seq_len * attn.k_proj.weight.shape[0] * 4  # K and V, all heads
    return total


def feature_dim(model: RecallModel) -> Optional[int]:
    """Dk per head of the first attention layer (None for softmax)."""
    attn = model.blocks[0].attn
    return attn.feature_dim if isinstance(attn, FeatureAttention) else None


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    name: str
    accuracy: float                 # recall accuracy on the eval set after the last step
    final_loss: float               # training loss of the last step
    params: int
    feature_dim: Optional[int]      # Dk per head (None for softmax)
    state_bytes: int                # inference state of one sequence (softmax: K/V at seq_len)
    tokens_per_s: float             # training tokens/s after WARMUP_STEPS steps (eval excluded)
    train_seconds: float            # all training steps (eval excluded)
    curve: List[List[float]] = field(default_factory=list)  # [[step, accuracy], ...]
    best_accuracy: float = 0.0      # best eval accuracy along the way (incl. the last)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             chunk: int = 128) -> float:
    """Fraction of query positions where the argmax prediction is the bound value."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for i in range(0, inputs.shape[0], chunk):
        x, y = inputs[i:i + chunk], targets[i:i + chunk]
        mask = y != IGNORE
        pred = model(x).argmax(-1)
        correct += (pred[mask] == y[mask]).sum().item()
        total += mask.sum().item()
    model.train(was_training)
    return correct / max(total, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    name: str,
    cfg: DemoConfig,
    device: torch.device,
    eval_set=None,
    on_step: Optional[Callable[[int, float, Optional[float]], None]] = None,
) -> TrainResult:
    """Train the ``name`` model for ``cfg.steps`` steps and evaluate it.

    ``on_step(step, loss, accuracy_or_None)`` is called after every step (``accuracy`` is
    given on evaluation steps).  Deterministic given ``cfg.seed`` and :func:`run_environment`
    (torch version, thread count, CPU instruction set; the GPU on CUDA); the global RNG
    state is left unchanged.
    """
    if eval_set is None:
        eval_set = make_eval_set(cfg, device)
    ex, ey = eval_set
    # the weights come from the seed alone, whatever the caller's RNG did before, and the
    # caller's RNG is left where it was (the CPU generator only: the model is built on the CPU)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(name, cfg)
    model = model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps,
                                                pct_start=0.1)
    curve = [[0, evaluate(model, ex, ey)]]
    train_s, loss_val, acc = 0.0, float("nan"), curve[0][1]
    # tokens/s leaves out the first steps: on a GPU they compile and autotune the kernels
    warmup = WARMUP_STEPS if cfg.steps > 4 * WARMUP_STEPS else 0
    steady_s = 0.0
    for step in range(1, cfg.steps + 1):
        x, y = mqar_batch(gen, cfg.batch, cfg.seq_len, cfg.kv_pairs, cfg.vocab)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_val = loss.item()          # synchronises
        dt = time.perf_counter() - t0
        train_s += dt
        if step > warmup:
            steady_s += dt
        acc_now = None
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = acc_now = evaluate(model, ex, ey)
            curve.append([step, acc])
        if on_step is not None:
            on_step(step, loss_val, acc_now)
    tokens = (cfg.steps - warmup) * cfg.batch * cfg.seq_len
    return TrainResult(
        name=name,
        accuracy=acc,
        final_loss=loss_val,
        params=sum(p.numel() for p in model.parameters()),
        feature_dim=feature_dim(model),
        state_bytes=state_bytes(model, cfg.seq_len),
        tokens_per_s=tokens / max(steady_s, 1e-9),
        train_seconds=train_s,
        curve=curve,
        best_accuracy=max(a for _, a in curve),
    )


def run_environment(device: torch.device) -> dict:
    """What a demo result depends on besides its config: it is bit-for-bit reproducible when
    these match (the CPU's instruction set picks the vectorised kernels, so their rounding)."""
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["threads"] = torch.get_num_threads()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def make_eval_set(cfg: DemoConfig, device: torch.device):
    """The fixed evaluation set (seeded with ``cfg.seed + 1``)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x, y = mqar_batch(gen, cfg.eval_size, cfg.seq_len, cfg.kv_pairs, cfg.vocab)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------- output


def plot_curves(results: List[TrainResult], cfg: DemoConfig, path: Path, title: str) -> Path:
    """Accuracy against training steps, one line per model (matplotlib, Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: the Agg canvas, no global state
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in results:
        steps, accs = zip(*r.curve)
        ax.plot(steps, accs, marker="o", markersize=2.5, linewidth=1.5,
                label=f"{r.name} ({r.accuracy:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("recall accuracy (eval set)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, cfg.steps)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_json(results: List[TrainResult], cfg: DemoConfig, device: torch.device,
               path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": dataclasses.asdict(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "environment": run_environment(device),
        "results": [r.as_dict() for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
