"""Evaluation primitives on finished weights, batched over models: loss/accuracy, BatchNorm
re-estimation and fine-tuning.

Why: sampling scores every generated model, and evaluation scores anchors, soups, baselines and
fine-tuning curves; all of them go through the same stacked, vmapped calls as zoo training
(``stacked.py``, ``population.py``) instead of a loop over models. Mixed per-model specs (activation,
dropout) are grouped by structure internally.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from mzsane.errors import DataError
from mzsane.zoo.datasets import ImageDataset
from mzsane.zoo.population import train_population
from mzsane.zoo.stacked import (
    evaluate_group,
    group_by_structure,
    models_per_call,
    split_params,
    stack_state_dicts,
    template_for,
    unstack_state_dict,
    vmapped,
)


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
    for _, index in group_by_structure(specs).items():
        loss_M, acc_M = evaluate_group(specs[index[0]], stack_state_dicts([state_dicts[i] for i in index]),
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
    for _, index in group_by_structure(specs).items():
        template = copy.deepcopy(template_for(specs[index[0]])).eval()
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
        params, buffers = split_params(template, stacked)
        fn = vmapped(template, shared_input=True)
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
