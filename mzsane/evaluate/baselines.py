"""Baselines generated models are compared against: random init, the anchors, and weight averaging.

Why these: the paper reports that MZ-SANE beats "naive weight averaging" of the anchors (spec section 8.5,
not in the reference code) and that averaging more models *lowers* accuracy (Figure 1). A uniform soup of
independently trained networks mixes unrelated hidden units; aligning them first with weight matching
(git re-basin) to one reference removes the permutation part of that mismatch. Every soup and every
random model gets the same BN re-estimation as the generated models, so the comparison isolates the
weights, not the normalization statistics.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mzsane.model.backbone import condition_bn
from mzsane.sample.generate import build_kwargs


def soup(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform average of floating-point entries; integer entries (BN step counters) from the first model."""
    if not state_dicts:
        raise ValueError("a soup needs at least one model")
    out = {}
    for key, first in state_dicts[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([sd[key].float() for sd in state_dicts]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def align_all(state_dicts: list[dict[str, torch.Tensor]], architecture: str, seed: int = 0) -> list[dict]:
    """Every model permuted to match the first one (weight matching); the first is returned unchanged."""
    from mzsane.tokens.alignment import align

    if len(state_dicts) < 2:
        return list(state_dicts)
    ref = state_dicts[0]
    return [ref] + [align(sd, ref, architecture, seed=seed) for sd in state_dicts[1:]]


def random_models(kwargs: dict[str, Any], init: str, num: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``num`` freshly initialized models (the zoo's own init scheme), seeded."""
    from mzsane.zoo.architectures import build_model

    out = []
    build = {k: v for k, v in kwargs.items() if k != "architecture"}
    for i in range(num):
        gen = torch.Generator().manual_seed(seed * 7919 + i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + i)
            model = build_model(kwargs["architecture"], init=init or "default", generator=gen, **build)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def soup_models(pool: list[dict], architecture: str, sizes: list[int], seed: int,
                aligned: bool) -> list[tuple[int, dict]]:
    """Soups of the first n models of ``pool`` for each n in ``sizes`` (n clipped to the pool).

    With ``aligned`` every model is aligned to ``pool[0]`` once, so the soups are nested: the soup of n+1
    models adds one model to the soup of n, as in the paper's Figure 1.
    """
    models = align_all(pool, architecture, seed) if aligned else pool
    out = []
    for n in sorted({min(max(int(s), 1), len(models)) for s in sizes}):
        out.append((n, soup(models[:n])))
    return out


def conditioned(kwargs: dict[str, Any], state_dicts: list[dict], dataset: Any, sample_cfg: Any) -> list[dict]:
    """The same BN re-estimation the generated models got (train images, same iterations and batch)."""
    from mzsane.sample.generate import conditioning_images

    images = conditioning_images(dataset, sample_cfg.bn_iterations * sample_cfg.bn_batch_size, sample_cfg.seed)
    return condition_bn(kwargs, state_dicts, images, sample_cfg.bn_iterations, sample_cfg.bn_batch_size,
                        sample_cfg.seed)


def order_pool(anchor_ids: list[str], other_ids: list[str], seed: int) -> list[str]:
    """Anchors first (in their drawn order), then the other train/val models in a seeded order."""
    rest = [m for m in sorted(other_ids) if m not in anchor_ids]
    order = np.random.default_rng(seed).permutation(len(rest))
    return list(anchor_ids) + [rest[i] for i in order]


def zoo_kwargs(results: dict) -> dict[str, Any]:
    """Population keyword arguments of the target architecture, as written by ``mzsane sample``."""
    return build_kwargs(results["architecture"], results.get("arch_kwargs", {}), results.get("hparams", {}))
