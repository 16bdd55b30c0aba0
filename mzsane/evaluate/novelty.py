"""Novelty of generated models: are they new networks, or copies of the anchors they were prompted with?

Why: a generator that decodes its anchors almost unchanged would score exactly like the anchors and look
good in an accuracy table. Two figures expose that, for every generated model, against the nearest anchor
and against the nearest training model of the zoo:
  * prediction disagreement: the fraction of evaluation images whose predicted class differs;
  * aligned weight distance: ``||align(w, ref) - ref|| / ||ref||`` over the token weights (weights, biases,
    BN affine; not running statistics), after weight matching removes neuron permutations.
The same two figures for pairs of zoo models (each training model to its nearest other training model)
give the scale: a copy has ~0 on both, a genuinely new model sits near the zoo-pair figures.

Legend: M models, N evaluation images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

_SKIP = ("running_mean", "running_var", "num_batches_tracked")


def predictions(kwargs: dict[str, Any], state_dicts: list[dict], x_NCHW: torch.Tensor,
                batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes ``[M, N]`` of every model (eval mode)."""
    from mzsane.zoo.architectures import build_model

    build = {k: v for k, v in kwargs.items() if k != "architecture"}
    model = build_model(kwargs["architecture"], **build).eval()
    out = []
    with torch.no_grad():
        for sd in state_dicts:
            model.load_state_dict(sd)
            out.append(torch.cat([model(x_NCHW[i:i + batch_size]).argmax(-1) for i in range(0, len(x_NCHW), batch_size)]))
    return torch.stack(out) if out else torch.zeros((0, len(x_NCHW)), dtype=torch.long)


def flat_weights(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.detach().float().reshape(-1) for k, v in state_dict.items()
                      if v.is_floating_point() and not k.endswith(_SKIP)])


def relative_distance(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    wa, wr = flat_weights(a), flat_weights(ref)
    return float((wa - wr).norm() / wr.norm().clamp_min(1e-12))


def aligned_distance(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], architecture: str) -> float:
    """Relative L2 distance after permuting ``a`` to best match ``ref`` (weight matching)."""
    from mzsane.tokens.alignment import align

    try:
        a = align(a, ref, architecture)
    except Exception:  # noqa: BLE001 - non-finite generated weights cannot be matched; compare unaligned
        pass
    return relative_distance(a, ref)


def nearest(sd: dict, pred_N: torch.Tensor, pool: dict[str, dict], pool_pred: dict[str, torch.Tensor],
            architecture: str) -> dict[str, Any]:
    """Nearest pool model by aligned weight distance, and the smallest prediction disagreement in the pool."""
    if not pool:
        return {"model": "", "distance": float("nan"), "disagreement": float("nan")}
    dists = {m: aligned_distance(sd, ref, architecture) for m, ref in pool.items()}
    disagree = {m: float((pred_N != p).float().mean()) for m, p in pool_pred.items()}
    best = min(dists, key=lambda m: (dists[m], m))
    return {"model": best, "distance": dists[best], "disagreement": min(disagree.values()),
            "disagreement_with_nearest": disagree[best]}


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.array([v for v in values if v == v], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max())}


def novelty(kwargs: dict[str, Any], generated: list[dict], anchors: dict[str, dict], train: dict[str, dict],
            x_NCHW: torch.Tensor) -> dict[str, Any]:
    """Per generated model: nearest anchor and nearest training model; plus zoo-pair reference figures."""
    arch = kwargs["architecture"]
    every = {**anchors, **train}
    ids = list(every)
    preds = predictions(kwargs, [every[m] for m in ids] + generated, x_NCHW)
    pred_of = dict(zip(ids, preds[:len(ids)]))
    gen_preds = preds[len(ids):]
    per_model = []
    for i, (sd, p) in enumerate(zip(generated, gen_preds)):
        per_model.append({
            "index": i,
            "anchor": nearest(sd, p, anchors, {m: pred_of[m] for m in anchors}, arch),
            "train": nearest(sd, p, train, {m: pred_of[m] for m in train}, arch),
        })
    pairs = []
    for m, sd in train.items():
        others = {o: v for o, v in train.items() if o != m}
        if others:
            pairs.append(nearest(sd, pred_of[m], others, {o: pred_of[o] for o in others}, arch))
    return {
        "num_images": int(len(x_NCHW)),
        "generated": per_model,
        "summary": {
            "generated_to_anchor_distance": _summary([g["anchor"]["distance"] for g in per_model]),
            "generated_to_anchor_disagreement": _summary([g["anchor"]["disagreement"] for g in per_model]),
            "generated_to_train_distance": _summary([g["train"]["distance"] for g in per_model]),
            "generated_to_train_disagreement": _summary([g["train"]["disagreement"] for g in per_model]),
            "zoo_pair_distance": _summary([p["distance"] for p in pairs]),
            "zoo_pair_disagreement": _summary([p["disagreement"] for p in pairs]),
        },
    }
