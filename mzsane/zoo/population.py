"""Train and evaluate a population of models of one architecture together, batched over models.

Why: a zoo is hundreds of tiny networks (CNN-s has 2,464 parameters); a Python loop per model spends
its time in interpreter and kernel-launch overhead. Here the M models' parameters are stacked into one
tensor per state_dict key and the forward pass is ``torch.vmap`` over ``torch.func.functional_call``
(which turns convolutions into grouped convolutions), so one step of the loop advances every model.
Optimizers (Adam, SGD with momentum, L2 weight decay as in ``torch.optim``) are implemented on the
stacked tensors with per-model learning rate and weight decay, so each model follows exactly the
update it would get alone.

Measured on this project's 2-core CPU (``mzsane bench zoo``, one thread each side): the vmapped step
is ~1.5x a plain one-model loop at the protocol's batch 10, but slower at batch 64, where the CPU is
memory-bandwidth bound; there a model-by-model step over views of the stacked tensors (``backend="loop"``)
is used instead, at par with the plain loop. MaxPool 2x2 is replaced by strided maxima with
``max_pool2d``'s own backward (10x faster forward on NCHW maps, identical values and gradients).

Per-model semantics are kept: model m is initialized under ``torch.manual_seed(seed_m)`` (the Model
Zoos convention) and sees its own shuffled image order (``datasets.epoch_order(seed_m, epoch)``). Only
dropout masks come from one generator per group (vmap draws them together), so with dropout > 0 a
model's weights depend on which models it was trained with; without dropout they do not.

Shape legend: M models, B images per batch, K classes, N images in a split.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mzsane.errors import DataError
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import ImageDataset, Split, epoch_order

STRUCTURAL_KEYS = ("architecture", "channels_in", "num_classes", "image_size", "activation", "dropout")
# Activation bytes per vmapped call. Small on purpose: this CPU is memory-bandwidth bound, and a call
# whose maps stay in cache ran ~6x faster than one 192 MiB call (measured); training keeps more alive.
ACTIVATION_BUDGET_BYTES = 8 * 2**20
TRAIN_BUDGET_BYTES = 16 * 2**20
MAX_EVAL_BATCH = 256


@dataclass
class MemberResult:
    """One trained model: status, per-epoch metrics (epoch 0 included) and the saved checkpoints."""

    hparams: dict
    status: str = "ok"  # ok | diverged
    error: str = ""
    epochs: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


# ------------------------------------------------------------------------------- model bookkeeping


def model_kwargs(spec: dict) -> tuple[str, dict]:
    """Split ``{"architecture": name, **build_model kwargs}`` into (name, kwargs)."""
    if "architecture" not in spec:
        raise DataError(f"arch_kwargs {sorted(spec)} lack 'architecture'; pass {{'architecture': 'cnn_s', ...}}")
    kwargs = {k: v for k, v in spec.items() if k != "architecture"}
    return spec["architecture"], kwargs


def _structure_key(spec: dict) -> str:
    return json.dumps({k: spec.get(k) for k in STRUCTURAL_KEYS}, sort_keys=True, default=str)


class _MaxPool2x2(torch.autograd.Function):
    """2x2/stride-2 max pooling from strided elementwise maxima: ~10x faster than ``max_pool2d`` on CPU
    for many-channel NCHW maps (measured). It also returns ``max_pool2d``'s flat argmax indices (first
    maximal element of each window), and the backward is ``max_pool2d``'s own, so gradients are exact."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2], x.shape[-1]
        xc = x[..., : h // 2 * 2, : w // 2 * 2]
        a, b, c, d = xc[..., 0::2, 0::2], xc[..., 0::2, 1::2], xc[..., 1::2, 0::2], xc[..., 1::2, 1::2]
        out = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        rows = torch.arange(0, h // 2 * 2, 2, device=x.device).view(-1, 1) * w
        base = rows + torch.arange(0, w // 2 * 2, 2, device=x.device).view(1, -1)
        offset = torch.where(a == out, 0, torch.where(b == out, 1, torch.where(c == out, w, w + 1)))
        return out, base + offset

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: ANN001 - autograd API
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_index):  # noqa: ANN001 - autograd API
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


class _StridedMaxPool2d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the values only, no argmax bookkeeping
            x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
            return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                                 torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))
        return _MaxPool2x2.apply(x)[0]


def _fast_pools(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if (isinstance(child, nn.MaxPool2d) and child.kernel_size in (2, (2, 2)) and child.stride in (2, (2, 2))
                and child.padding in (0, (0, 0)) and child.dilation in (1, (1, 1)) and not child.ceil_mode):
            setattr(module, name, _StridedMaxPool2d())
        else:
            _fast_pools(child)
    return module


@functools.lru_cache(maxsize=64)
def _template(structure: str, extra: str) -> nn.Module:
    """A meta-device module whose code functional_call runs with stacked tensors."""
    spec = {**json.loads(structure), **json.loads(extra)}
    spec = {k: v for k, v in spec.items() if v is not None}
    name, kwargs = model_kwargs(spec)
    return _fast_pools(build_model(name, **kwargs).to("meta"))


def _template_for(spec: dict) -> nn.Module:
    extra = {k: v for k, v in spec.items() if k not in STRUCTURAL_KEYS and k != "init"}
    return _template(_structure_key(spec), json.dumps(extra, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _activation_bytes(structure: str) -> int:
    """Bytes of activations one image produces in a forward pass (measured once with hooks)."""
    spec = {k: v for k, v in json.loads(structure).items() if v is not None}
    name, kwargs = model_kwargs(spec)
    model = build_model(name, **kwargs)
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, spec.get("channels_in", 1), spec.get("image_size", 28), spec.get("image_size", 28)))
    for h in hooks:
        h.remove()
    return 4 * max(total[0], 1)


def models_per_call(spec: dict, batch_size: int, budget: int = 0) -> int:
    """How many models to run at once so activations stay within ``budget`` (default: eval budget)."""
    per_model = _activation_bytes(_structure_key(spec)) * batch_size
    return max(1, (budget or ACTIVATION_BUDGET_BYTES) // max(per_model, 1))


def train_chunk_size(spec: dict, batch_size: int, population_batch: int) -> int:
    """Models per trained population: at most ``population_batch``, fewer when vmapped activations would spill."""
    if batch_size > VMAP_MAX_BATCH:  # the model-by-model step holds one model's activations at a time
        return max(1, population_batch)
    return max(1, min(population_batch, models_per_call(spec, batch_size, TRAIN_BUDGET_BYTES)))


def stack_state_dicts(state_dicts: Sequence[dict]) -> dict[str, torch.Tensor]:
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts):
        if list(sd) != keys:
            raise DataError(f"state_dict {i} has keys {sorted(sd)[:4]}... unlike the first; "
                            "group models by architecture")
    return {k: torch.stack([sd[k].detach().to(torch.float32 if sd[k].is_floating_point() else sd[k].dtype)
                            for sd in state_dicts]) for k in keys}


def unstack_state_dict(stacked: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {k: v[index].detach().clone() for k, v in stacked.items()}


def _split_params(template: nn.Module, stacked: dict[str, torch.Tensor]):
    param_names = [n for n, _ in template.named_parameters()]
    params = {n: stacked[n] for n in param_names}
    buffers = {n: v for n, v in stacked.items() if n not in params}
    return params, buffers


def _vmapped(template: nn.Module, shared_input: bool) -> Callable:
    def call(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    return torch.vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="different")


def init_population(spec: dict, seeds: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Initial state_dicts: model m built under ``torch.manual_seed(seeds[m])`` (Model Zoos convention)."""
    name, kwargs = model_kwargs(spec)
    out = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            out.append({k: v.detach().clone() for k, v in build_model(name, **kwargs).state_dict().items()})
    return out


# ------------------------------------------------------------------------------------- evaluation


def _evaluate_group(spec: dict, stacked: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy per model ([M], [M]) on a shared split, eval mode, no grad."""
    template = _template_for(spec).eval()
    num_models = next(iter(stacked.values())).shape[0]
    batch_size = min(batch_size, MAX_EVAL_BATCH)  # results do not depend on it; cache-sized calls are faster
    chunk = models_per_call(spec, batch_size)
    loss_sum, correct = torch.zeros(num_models, dtype=torch.float64), torch.zeros(num_models, dtype=torch.float64)
    fn = _vmapped(template, shared_input=True)
    with torch.no_grad():
        for m0 in range(0, num_models, chunk):
            part = {k: v[m0:m0 + chunk] for k, v in stacked.items()}
            params, buffers = _split_params(template, part)
            for start in range(0, len(y), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                logits_MBK = fn(params, buffers, xb)
                losses = F.cross_entropy(logits_MBK.transpose(1, 2), yb.expand(logits_MBK.shape[0], -1),
                                         reduction="none")
                loss_sum[m0:m0 + chunk] += losses.sum(1).double()
                correct[m0:m0 + chunk] += (logits_MBK.argmax(-1) == yb).sum(1).double()
    n = max(len(y), 1)
    return (loss_sum / n).float(), (correct / n).float()


def _groups(specs: Sequence[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        out.setdefault(_structure_key(spec), []).append(i)
    return out


def evaluate_models(arch_kwargs: dict | Sequence[dict], state_dicts: Sequence[dict], split_x: torch.Tensor,
                    split_y: torch.Tensor, batch_size: int = 200) -> list[tuple[float, float]]:
    """(cross-entropy loss, accuracy) of every state_dict on one split, vmapped over models.

    ``arch_kwargs`` is ``{"architecture": name, **build_model kwargs}`` for all models, or a list with
    one such dict per model (mixed activations or dropout are grouped internally).
    """
    specs = list(arch_kwargs) if isinstance(arch_kwargs, (list, tuple)) else [arch_kwargs] * len(state_dicts)
    if len(specs) != len(state_dicts):
        raise DataError(f"got {len(specs)} arch_kwargs for {len(state_dicts)} state_dicts; pass one per model")
    out: list[tuple[float, float]] = [(math.nan, math.nan)] * len(state_dicts)
    for _, index in _groups(specs).items():
        loss_M, acc_M = _evaluate_group(specs[index[0]], stack_state_dicts([state_dicts[i] for i in index]),
                                        split_x, split_y, batch_size)
        for j, i in enumerate(index):
            out[i] = (float(loss_M[j]), float(acc_M[j]))
    return out


def reestimate_bn(arch_kwargs: dict | Sequence[dict], state_dicts: Sequence[dict], x: torch.Tensor,
                  iterations: int = 50, batch_size: int = 64,
                  generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """Recompute BatchNorm running statistics from ``x`` (held-out training images), batched over models.

    Why: generated or averaged weights come with running statistics that do not match their weights;
    BN layers are reset and fed ``iterations`` seeded batches with a cumulative average (momentum 1/k),
    all other layers in eval mode. Models without BatchNorm are returned unchanged.
    """
    specs = list(arch_kwargs) if isinstance(arch_kwargs, (list, tuple)) else [arch_kwargs] * len(state_dicts)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    orders = [torch.randint(0, len(x), (batch_size,), generator=generator) for _ in range(max(iterations, 0))]
    out = [dict(sd) for sd in state_dicts]
    for _, index in _groups(specs).items():
        template = copy.deepcopy(_template_for(specs[index[0]])).eval()
        bns = [m for m in template.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            continue
        for bn in bns:
            bn.train()
        stacked = stack_state_dicts([state_dicts[i] for i in index])
        prefixes = [n for n, m in template.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for p in prefixes:
            stacked[f"{p}.running_mean"].zero_()
            stacked[f"{p}.running_var"].fill_(1.0)
            stacked[f"{p}.num_batches_tracked"].zero_()
        params, buffers = _split_params(template, stacked)
        fn = _vmapped(template, shared_input=True)
        chunk = models_per_call(specs[index[0]], batch_size)
        with torch.no_grad():
            for m0 in range(0, len(index), chunk):
                part_p = {k: v[m0:m0 + chunk] for k, v in params.items()}
                part_b = {k: v[m0:m0 + chunk] for k, v in buffers.items()}  # views: updated in place
                for k, batch in enumerate(orders):
                    for bn in bns:  # momentum 1/k = cumulative average (momentum=None calls .item(), not vmappable)
                        bn.momentum = 1.0 / (k + 1)
                    fn(part_p, part_b, x[batch])
        for j, i in enumerate(index):
            out[i] = unstack_state_dict(stacked, j)
    return out


# --------------------------------------------------------------------------------------- training

OPTIMIZERS = ("adam", "sgd")
VMAP_MAX_BATCH = 16  # above this per-model batch the model-by-model step was faster on CPU (bench zoo)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


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
            update = torch.zeros_like(p)
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
    return [{f"{prefix}_loss": float(l), f"{prefix}_acc": float(a)} for l, a in zip(loss_M, acc_M)]


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

    ``backend``: ``vmap`` runs one vectorized step for all models (grouped convolutions; faster at
    small batches such as the protocol's 10), ``loop`` steps model by model on views of the stacked
    tensors (faster at large batches on CPU, measured by ``mzsane bench zoo``); ``auto`` picks by batch size.
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
    results = [MemberResult(hparams=dict(h)) for h in hparams]

    if init_state_dicts is None:
        init_state_dicts = []
        for h in hparams:
            init_state_dicts += init_population({**spec, "init": h.get("init", "default")}, [h["seed"]])
    keys = list(init_state_dicts[0])
    stacked = stack_state_dicts(init_state_dicts)
    template = _template_for(spec)
    params, buffers = _split_params(template, stacked)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = _StackedOptimizer(params, hparams)
    active_M = torch.ones(num_models, dtype=torch.bool)
    fn = _vmapped(template, shared_input=False)
    param_list = list(params.values())
    if backend == "auto":
        backend = "vmap" if batch_size <= VMAP_MAX_BATCH else "loop"

    def step_vmap(x_MB, y_MB):  # one vmapped forward/backward for all models (grouped convolutions)
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

    step = step_vmap if backend == "vmap" else step_loop

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: (params[k] if k in params else buffers[k]).detach() for k in keys}

    def evaluate(epoch: int, train_metrics: list[dict] | None) -> None:
        current = snapshot()
        rows = [{"epoch": epoch} for _ in range(num_models)]
        if train_metrics is None:
            sub = train.subset(epoch0_train_images, seed=0)
            train_metrics = _metrics("train", *_evaluate_group(spec, current, sub.x, sub.y, eval_batch_size))
        for row, m in zip(rows, train_metrics):
            row.update(m)
        for name, split in eval_splits.items():
            for row, m in zip(rows, _metrics(name, *_evaluate_group(spec, current, split.x, split.y, eval_batch_size))):
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
        torch.manual_seed(_group_seed(hparams, seed))  # dropout masks (vmap draws them for the group)
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


def finetune(arch_kwargs: dict, state_dicts: Sequence[dict], dataset: ImageDataset, epochs: int = 1,
             lr: float = 1e-3, *, optimizer: str = "adam", weight_decay: float = 0.0, batch_size: int = 32,
             seed: int = 0, max_train_images: int = -1, eval_batch_size: int = 200) -> list[list[dict]]:
    """Fine-tune every state_dict for ``epochs`` epochs (same data order for all); one curve per model.

    A curve is the list of per-epoch rows ``{"epoch", "train_loss", "train_acc", "val_loss", "val_acc",
    "test_loss", "test_acc"}`` starting at epoch 0 (before any step). Diverged models end early.
    """
    hp = {"seed": seed, "lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "batch_size": batch_size,
          "activation": arch_kwargs.get("activation"), "dropout": arch_kwargs.get("dropout", 0.0)}
    train = dataset.train.subset(max_train_images, seed=seed)
    results = train_population(arch_kwargs, [dict(hp) for _ in state_dicts], dataset, epochs, save_epochs=[],
                               train=train, init_state_dicts=list(state_dicts), eval_batch_size=eval_batch_size,
                               seed=seed)
    return [r.epochs for r in results]
