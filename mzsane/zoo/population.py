"""Train a population of models of one structure together, batched over models.

Why: one step of the training loop should advance every model of a zoo at once, on the stacked
tensors of ``stacked.py``. Optimizers (Adam, SGD with momentum, L2 weight decay as in ``torch.optim``)
are implemented on the stacked tensors with per-model learning rate and weight decay, so each model
follows exactly the update it would get alone.

Measured on this project's 2-core CPU (``mzsane bench zoo``, one thread each side): for the feed-forward
CNNs (``grouped.py``) the batched step is ~3.6x a plain one-model loop at the protocol's batch 10 and
~1.8x at batch 64. Nets that stay on ``vmap`` (BatchNorm, residuals) gain ~1.3-1.5x at batch 10 and lose
at large batches, where the CPU is memory-bandwidth bound; there a model-by-model step over views of the
stacked tensors (``backend="loop"``) is used instead, at par with the plain loop.

Per-model semantics are kept: model m is initialized under ``torch.manual_seed(seed_m)`` (the Model
Zoos convention), sees its own shuffled image order (``datasets.epoch_order(seed_m, epoch)``) and, in
the grouped CNNs, draws its dropout masks from its own generator, so its weights do not depend on which
models it was trained with. Only nets that stay on vmap (the ResNets' optional dropout) draw masks from one
generator per group.

Shape legend: M models, B images per batch, K classes, N images in a split.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mzsane.errors import DataError
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import ImageDataset, Split, epoch_order
from mzsane.zoo.grouped import grouped_forward
from mzsane.zoo.stacked import (
    TRAIN_BUDGET_BYTES,
    evaluate_group,
    model_kwargs,
    models_per_call,
    split_params,
    stack_state_dicts,
    template_for,
    training_call,
    unstack_state_dict,
)

OPTIMIZERS = ("adam", "sgd")
BACKENDS = ("batched", "loop")
# above this per-model batch the model-by-model step beat a vmapped one on CPU (bench zoo); the grouped
# channels-last step of feed-forward CNNs stays ahead at every batch size measured (1.8x at batch 64)
BATCHED_MAX_BATCH = 16
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class MemberResult:
    """One trained model: status, per-epoch metrics (epoch 0 included) and the saved checkpoints."""

    hparams: dict
    status: str = "ok"  # ok | diverged
    error: str = ""
    epochs: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def auto_backend(spec: dict, batch_size: int) -> str:
    """``batched`` for grouped feed-forward CNNs and for small batches, ``loop`` for vmapped nets at large ones."""
    if batch_size <= BATCHED_MAX_BATCH or grouped_forward(template_for(spec)) is not None:
        return "batched"
    return "loop"


def train_chunk_size(spec: dict, batch_size: int, population_batch: int) -> int:
    """Models per trained population: at most ``population_batch``, fewer when batched activations would spill."""
    if auto_backend(spec, batch_size) == "loop":  # the model-by-model step holds one model's activations at a time
        return max(1, population_batch)
    return max(1, min(population_batch, models_per_call(spec, batch_size, TRAIN_BUDGET_BYTES)))


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the kernel (once per process).

    Why: a population step allocates and frees the same few MB-sized activation buffers thousands of
    times; glibc serves those with fresh ``mmap`` pages, so every step paid page faults on them (zeroing a
    6 MB gradient map took 2 ms, ~5x its memory time). Raising the mmap and trim thresholds to 1 GiB took
    a grouped step of 32 CNN-s from 0.70 to 0.46 ms per model (one thread, batch 10). The cost: the
    process keeps its peak heap. A no-op where libc has no ``mallopt`` (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def init_population(spec: dict, seeds: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Initial state_dicts: model m built under ``torch.manual_seed(seeds[m])`` (Model Zoos convention)."""
    name, kwargs = model_kwargs(spec)
    out = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            out.append({k: v.detach().clone() for k, v in build_model(name, **kwargs).state_dict().items()})
    return out


def _per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A [M] vector shaped [M, 1, 1, ...] to broadcast against a stacked tensor ``like``."""
    return torch.tensor(list(values), dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class _StackedOptimizer:
    """Adam / SGD-momentum on stacked tensors with per-model lr, weight decay and momentum (torch.optim math)."""

    def __init__(self, params: dict[str, torch.Tensor], hparams: Sequence[dict]):
        for h in hparams:
            if h["optimizer"] not in OPTIMIZERS:
                raise DataError(f"unknown optimizer '{h['optimizer']}'; use one of {', '.join(OPTIMIZERS)}")
        self.params, self.step_count = params, 0
        self.is_adam = [h["optimizer"] == "adam" for h in hparams]
        self.lr = {k: _per_model([h["lr"] for h in hparams], p) for k, p in params.items()}
        self.wd = {k: _per_model([h.get("weight_decay", 0.0) for h in hparams], p) for k, p in params.items()}
        self.mom = {k: _per_model([h.get("momentum", 0.9) for h in hparams], p) for k, p in params.items()}
        self.adam_mask = {k: _per_model(self.is_adam, p).bool() for k, p in params.items()}
        self.state = {k: (torch.zeros_like(p), torch.zeros_like(p)) for k, p in params.items()}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], active_M: torch.Tensor) -> None:
        self.step_count += 1
        b1, b2 = ADAM_BETAS
        bc1, bc2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        any_adam, any_sgd = any(self.is_adam), not all(self.is_adam)
        all_active = bool(active_M.all())
        for key, p in self.params.items():
            g = grads[key] + self.wd[key] * p
            first, second = self.state[key]
            if any_adam:  # exp_avg / exp_avg_sq, bias-corrected as in torch.optim.Adam
                first_a = first.lerp(g, 1 - b1)
                second_a = second * b2 + (1 - b2) * g * g
                adam = (self.lr[key] / bc1) * first_a / ((second_a.sqrt() / math.sqrt(bc2)) + ADAM_EPS)
            if any_sgd:  # momentum buffer starts at zero, so the first step equals torch's clone(grad)
                buf = first * self.mom[key] + g
                sgd = self.lr[key] * buf
            if any_adam and any_sgd:
                mask = self.adam_mask[key]
                first.copy_(torch.where(mask, first_a, buf))
                second.copy_(torch.where(mask, second_a, second))
                update = torch.where(mask, adam, sgd)
            elif any_adam:
                first.copy_(first_a)
                second.copy_(second_a)
                update = adam
            else:
                first.copy_(buf)
                update = sgd
            if all_active:
                p.sub_(update)
            else:  # diverged models stay frozen at their last weights
                p.sub_(torch.where(active_M.view(-1, *([1] * (p.dim() - 1))), update, torch.zeros_like(update)))


def _metrics(prefix: str, loss_M: torch.Tensor, acc_M: torch.Tensor) -> list[dict]:
    return [{f"{prefix}_loss": float(loss), f"{prefix}_acc": float(acc)} for loss, acc in zip(loss_M, acc_M)]


def _dropout_seed(model_seed: int, base: int) -> int:
    digest = hashlib.sha256(json.dumps(["dropout", base, model_seed]).encode()).hexdigest()
    return int(digest[:12], 16)


def _group_seed(hparams: Sequence[dict], base: int) -> int:
    digest = hashlib.sha256(json.dumps([base, [h.get("seed", 0) for h in hparams]]).encode()).hexdigest()
    return int(digest[:12], 16)


def train_population(spec: dict, hparams: Sequence[dict], dataset: ImageDataset, num_epochs: int,
                     save_epochs: Sequence[int] | None = None, *, train: Split | None = None,
                     eval_splits: dict[str, Split] | None = None,
                     init_state_dicts: Sequence[dict] | None = None, eval_batch_size: int = 200,
                     epoch0_train_images: int = 10_000, seed: int = 0,
                     progress: Callable[[float], None] | None = None, backend: str = "auto") -> list[MemberResult]:
    """Train M models of one structure together; returns one MemberResult per ``hparams`` entry.

    ``spec`` is ``{"architecture": name, **shared build_model kwargs}``; each ``hparams`` dict holds
    seed, lr, optimizer (adam|sgd), weight_decay, momentum, batch_size, activation, dropout, init, and
    all of them must share activation, dropout and batch_size (``build.py`` groups them). Epoch 0 is
    evaluated before any step (train metrics on up to ``epoch0_train_images`` images in eval mode); later
    epochs log the running train average over the epoch's minibatches (Model Zoos semantics) and an
    eval-mode pass over every split in ``eval_splits`` (default val and test).

    ``backend``: ``batched`` runs one step for all models (grouped channels-last convolutions, or vmap
    for nets ``grouped.py`` does not cover; faster at small batches such as the protocol's 10), ``loop``
    steps model by model on views of the stacked tensors (faster at large batches on CPU, measured by
    ``mzsane bench zoo``); ``auto`` picks by network and batch size (``auto_backend``).
    """
    structure = {(h.get("activation"), h.get("dropout", 0.0), h["batch_size"]) for h in hparams}
    if len(structure) != 1:
        raise DataError(f"train_population got mixed activation/dropout/batch_size {sorted(map(str, structure))};"
                        " group models first")
    first = hparams[0]
    spec = {**spec, "activation": first.get("activation"), "dropout": float(first.get("dropout", 0.0))}
    train = dataset.train if train is None else train
    eval_splits = {"val": dataset.val, "test": dataset.test} if eval_splits is None else eval_splits
    save = set(range(num_epochs + 1)) if save_epochs is None else set(save_epochs)
    batch_size, num_models = int(first["batch_size"]), len(hparams)
    if backend == "auto":
        backend = auto_backend(spec, batch_size)
    if backend not in BACKENDS:
        raise DataError(f"unknown population backend {backend!r}; use one of auto, {', '.join(BACKENDS)}")
    results = [MemberResult(hparams=dict(h)) for h in hparams]

    if init_state_dicts is None:
        init_state_dicts = []
        for h in hparams:
            init_state_dicts += init_population({**spec, "init": h.get("init", "default")}, [h["seed"]])
    keys = list(init_state_dicts[0])
    stacked = stack_state_dicts(init_state_dicts)
    template = template_for(spec)
    params, buffers = split_params(template, stacked)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = _StackedOptimizer(params, hparams)
    active_M = torch.ones(num_models, dtype=torch.bool)
    param_list = list(params.values())
    if backend == "batched":  # per-model dropout generators only where there is dropout to draw
        generators = ([torch.Generator().manual_seed(_dropout_seed(h.get("seed", 0), seed)) for h in hparams]
                      if spec["dropout"] > 0 else None)
        fn = training_call(template, generators)
    retain_freed_memory()

    def step_batched(x_MB, y_MB):  # one forward/backward for all models (grouped convolutions)
        logits_MBK = fn(params, buffers, x_MB)
        loss_M = F.cross_entropy(logits_MBK.transpose(1, 2), y_MB, reduction="none").mean(1)
        finite = torch.isfinite(loss_M.detach()) & active_M
        grads = torch.autograd.grad(torch.where(finite, loss_M, torch.zeros_like(loss_M)).sum(), param_list)
        return loss_M.detach(), (logits_MBK.detach().argmax(-1) == y_MB).sum(1), dict(zip(params, grads))

    def step_loop(x_MB, y_MB):  # model by model on views of the stacked tensors (large batches)
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        loss_M, correct_M = torch.zeros(num_models), torch.zeros(num_models, dtype=torch.long)
        for m in range(num_models):
            own = {k: p[m].detach().requires_grad_(True) for k, p in params.items()}
            logits_BK = functional_call(template, (own, {k: b[m] for k, b in buffers.items()}), (x_MB[m],))
            loss = F.cross_entropy(logits_BK, y_MB[m])
            for k, g in zip(own, torch.autograd.grad(loss, list(own.values()))):
                grads[k][m] = g
            loss_M[m], correct_M[m] = loss.detach(), (logits_BK.detach().argmax(-1) == y_MB[m]).sum()
        return loss_M, correct_M, grads

    step = step_batched if backend == "batched" else step_loop

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: (params[k] if k in params else buffers[k]).detach() for k in keys}

    def evaluate(epoch: int, train_metrics: list[dict] | None) -> None:
        current = snapshot()
        rows = [{"epoch": epoch} for _ in range(num_models)]
        if train_metrics is None:
            sub = train.subset(epoch0_train_images, seed=0)
            train_metrics = _metrics("train", *evaluate_group(spec, current, sub.x, sub.y, eval_batch_size))
        for row, m in zip(rows, train_metrics):
            row.update(m)
        for name, split in eval_splits.items():
            for row, m in zip(rows, _metrics(name, *evaluate_group(spec, current, split.x, split.y, eval_batch_size))):
                row.update(m)
        for j, res in enumerate(results):
            if not active_M[j]:
                continue
            if not all(math.isfinite(v) for v in rows[j].values()) or not all(
                    torch.isfinite(current[k][j]).all() for k in params):
                active_M[j] = False
                res.status, res.error = "diverged", f"non-finite weights or metrics after epoch {epoch}"
                continue
            res.epochs.append(rows[j])
            if epoch in save:
                res.checkpoints[epoch] = unstack_state_dict(current, j)

    steps = math.ceil(len(train) / batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_group_seed(hparams, seed))  # dropout masks of nets on vmap (drawn for the group)
        evaluate(0, None)
        for epoch in range(1, num_epochs + 1):
            template.train()
            order_MN = torch.stack([epoch_order(len(train), h["seed"], epoch) for h in hparams])
            loss_sum = torch.zeros(num_models, dtype=torch.float64)
            correct = torch.zeros(num_models, dtype=torch.float64)
            for s in range(steps):
                index_MB = order_MN[:, s * batch_size:(s + 1) * batch_size]
                x_MB, y_MB = train.x[index_MB], train.y[index_MB]
                loss_M, correct_M, grads = step(x_MB, y_MB)
                for j in (active_M & ~torch.isfinite(loss_M)).nonzero().flatten().tolist():
                    active_M[j] = False
                    results[j].status = "diverged"
                    results[j].error = f"non-finite training loss in epoch {epoch} step {s} (lr={hparams[j]['lr']})"
                optimizer.step(grads, active_M)
                loss_sum += loss_M.double() * len(y_MB[0])
                correct += correct_M.double()
                if progress is not None:
                    progress(num_models / steps)
            template.eval()
            n = len(train)
            evaluate(epoch, _metrics("train", (loss_sum / n).float(), (correct / n).float()))
    return results
