"""HyperNetwork baseline for fine-tuning initialization (Ha, Dai & Le 2017, the paper's Figure 4).

The paper compares fine-tuning from SANE-generated weights with fine-tuning from HyperNetwork-generated
weights; the reference code has no HyperNetwork. This module trains one on the target task and hands its
generated weights to the same fine-tuning call every other start goes through (``evaluate/finetune.py``).

Variant: Ha et al.'s *static* hypernetwork with one learned embedding per **output row** (output channel of
a conv, output unit of a linear layer; one row for a 1-D parameter such as a BatchNorm scale), and one
generator shared by every layer. The generator follows their two-layer linear form, ``row = W2 (W1 z + b1)
+ b2``, producing ``K`` numbers (``K`` = the longest row of the architecture) of which a row keeps its
first ``row_len``. Each tensor then gets ``base + gain * scale * row`` where ``base``/``scale`` are the
mean/std of PyTorch's default init of that tensor (so the untrained hypernetwork already emits weights of
a sensible size) and ``gain`` is a learned scalar per tensor. Why per row: a row is also SANE's token unit
(tokens are chunks of output channels), so both methods describe a network by the same pieces; and one
generator for all layers is what makes it a hypernetwork rather than a re-parametrized network (Ha et
al.'s per-kernel-slice embeddings assume equal 3x3 kernel slices, which CNN-s's 5x5/2x2 kernels and
linear layers do not have). On these small nets the hypernetwork is not a compression (CNN-s: ~14k
hypernetwork parameters for 2,464 weights); it is an initialization baseline, which is what Figure 4 uses.

Training: end to end on the target dataset's TRAIN split (a seeded subset of ``max_train_images``) with
Adam, ``steps`` minibatches of ``batch_size`` and cross-entropy, the target network run functionally on
the generated weights. The budget is recorded in every result (``HypernetSettings``). One hypernetwork
per seed gives one generated model, so "mean +- std over seeds" is over independently trained ones.

BatchNorm: running statistics are not generated. During training the target net is in train mode (batch
statistics); the emitted state_dict carries fresh statistics (mean 0, var 1) and the caller re-estimates
them on training images with the same routine and settings as every other start (``baselines.conditioned``).

Legend: R generated rows over all tensors, E embedding width, H generator width, K longest row,
B images in a batch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mzsane.errors import ConfigError


@dataclass(frozen=True)
class HypernetSettings:
    """The hypernetwork's size and its training budget (stated in every result that uses it)."""

    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    embed_dim: int = 16
    hidden: int = 64
    max_train_images: int = 5000  # -1 = the whole train split
    # torch threads while training (restored after): the ops are tiny, and like the zoo build
    # (ZooConfig.num_threads) one thread is 4x faster than two on 2 shared, loaded cores (13 s vs 59 s)
    num_threads: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.embed_dim < 1 or self.hidden < 1 or self.lr <= 0:
            raise ConfigError(f"hypernetwork settings {asdict(self)} are invalid; use steps >= 0, batch_size >= 1, "
                              "embed_dim >= 1, hidden >= 1 and lr > 0")


@dataclass(frozen=True)
class _Slot:
    """Where one parameter tensor's rows sit among the R generated rows."""

    key: str
    shape: tuple[int, ...]
    first_row: int
    rows: int
    row_len: int


def _slots(params: dict[str, torch.Tensor]) -> list[_Slot]:
    out, first = [], 0
    for key, p in params.items():
        rows = int(p.shape[0]) if p.dim() >= 2 else 1
        out.append(_Slot(key, tuple(p.shape), first, rows, p.numel() // rows))
        first += rows
    return out


class HyperNetwork(nn.Module):
    """Row embeddings ``z_RE`` + one shared two-layer linear generator -> every parameter of the target net."""

    def __init__(self, reference: dict[str, torch.Tensor], embed_dim: int = 16, hidden: int = 64,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.slots = _slots(reference)
        num_rows = sum(s.rows for s in self.slots)
        width = max(s.row_len for s in self.slots)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.z_RE = nn.Parameter(torch.randn(num_rows, embed_dim, generator=g))
        self.w1_EH = nn.Parameter(torch.randn(embed_dim, hidden, generator=g) / embed_dim ** 0.5)
        self.b1_H = nn.Parameter(torch.zeros(hidden))
        self.w2_HK = nn.Parameter(torch.randn(hidden, width, generator=g) / hidden ** 0.5)
        self.b2_K = nn.Parameter(torch.zeros(width))
        self.gain = nn.Parameter(torch.ones(len(self.slots)))
        base = [float(reference[s.key].float().mean()) for s in self.slots]
        # constant tensors (BN scale 1, bias 0) have no init spread: give them a small one to move within
        scale = [max(float(reference[s.key].float().std()) if reference[s.key].numel() > 1 else 0.0, 0.0) or 0.1
                 for s in self.slots]
        self.register_buffer("base", torch.tensor(base))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self) -> dict[str, torch.Tensor]:
        rows_RK = (self.z_RE @ self.w1_EH + self.b1_H) @ self.w2_HK + self.b2_K
        out = {}
        for i, s in enumerate(self.slots):
            rows = rows_RK[s.first_row:s.first_row + s.rows, :s.row_len]
            out[s.key] = (self.base[i] + self.gain[i] * self.scale[i] * rows).reshape(s.shape)
        return out


def _target(kwargs: dict[str, Any], seed: int) -> nn.Module:
    """The target network with PyTorch's default init (its parameters set base/scale, its buffers are kept)."""
    from mzsane.zoo.architectures import build_model

    build = {k: v for k, v in kwargs.items() if k not in ("architecture", "init")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(kwargs["architecture"], **build)


def train_hypernet(kwargs: dict[str, Any], dataset: Any, settings: HypernetSettings) -> tuple[HyperNetwork, dict]:
    """Train one hypernetwork end to end on ``dataset.train``; returns it and its training record."""
    settings.check()
    threads = torch.get_num_threads()
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    try:
        return _train(kwargs, dataset, settings)
    finally:
        torch.set_num_threads(threads)


def _train(kwargs: dict[str, Any], dataset: Any, settings: HypernetSettings) -> tuple[HyperNetwork, dict]:
    from mzsane.zoo.datasets import iterate_batches

    net = _target(kwargs, settings.seed).train()
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    hyper = HyperNetwork(params, settings.embed_dim, settings.hidden, torch.Generator().manual_seed(settings.seed))
    optimizer = torch.optim.Adam(hyper.parameters(), lr=settings.lr)
    train = dataset.train.subset(settings.max_train_images, seed=settings.seed)
    order = torch.Generator().manual_seed(settings.seed + 1)
    losses, step, start = [], 0, time.perf_counter()
    while step < settings.steps:
        drop_last = len(train) > settings.batch_size
        for x_BCHW, y_B in iterate_batches(train, settings.batch_size, order, drop_last=drop_last):
            loss = nn.functional.cross_entropy(functional_call(net, ({**hyper(), **buffers},), (x_BCHW,)), y_B)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= settings.steps:
                break
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    record = {"settings": asdict(settings), "optimizer": "adam", "train_images": len(train),
              "hypernet_params": sum(p.numel() for p in hyper.parameters()),
              "target_params": sum(p.numel() for p in params.values()),
              "first_loss": losses[0] if losses else float("nan"), "final_loss": sum(tail) / len(tail),
              "train_s": round(time.perf_counter() - start, 2)}
    return hyper, record


def generated_state_dict(hyper: HyperNetwork, kwargs: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """The target's state_dict in module key order: generated parameters, fresh buffers (BN mean 0, var 1)."""
    with torch.no_grad():
        weights = {k: v.detach().clone() for k, v in hyper().items()}
    fresh = _target(kwargs, seed).state_dict()
    return {k: weights.get(k, v) for k, v in fresh.items()}


def hypernet_models(kwargs: dict[str, Any], dataset: Any, settings: HypernetSettings,
                    num: int) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    """``num`` generated models, one per independently trained hypernetwork (seeds ``settings.seed + i``)."""
    models, records = [], []
    for i in range(max(num, 0)):
        s = HypernetSettings(**{**asdict(settings), "seed": settings.seed + i})
        hyper, record = train_hypernet(kwargs, dataset, s)
        models.append(generated_state_dict(hyper, kwargs, s.seed))
        records.append(record)
    return models, records
