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

import contextlib
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
            out.append(torch.cat([model(x_NCHW[i:i + batch_size]).argmax(-1)
                                  for i in range(0, len(x_NCHW), batch_size)]))
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

    with contextlib.suppress(Exception):
        a = align(a, ref, architecture)
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
        "num_images": len(x_NCHW),
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


# ---------------------------------------------------------------------------- matched comparison

# a generated model counts as a near-copy when its distance to the nearest anchor and its disagreement with it
# are both below this fraction of what zoo models of matched accuracy show against their nearest neighbour
NEAR_COPY_RATIO = 0.5
# matched accuracy needs reference models near the generated ones: beyond this median gap there is no match
MAX_ACCURACY_GAP = 0.05


def _nearest_in(sd: dict, pred_N: torch.Tensor, pool: dict[str, dict], pool_pred: dict[str, torch.Tensor],
                architecture: str) -> tuple[float, float]:
    """(aligned distance to the nearest pool model, disagreement with that same model)."""
    dists = {m: aligned_distance(sd, ref, architecture) for m, ref in pool.items()}
    best = min(dists, key=lambda m: (dists[m], m))
    return dists[best], float((pred_N != pool_pred[best]).float().mean())


def matched_novelty(kwargs: dict[str, Any], generated: list[dict], generated_acc: list[float],
                    anchors: dict[str, dict], reference: dict[str, dict], reference_acc: dict[str, float],
                    x_NCHW: torch.Tensor, seed: int = 0) -> dict[str, Any]:
    """Generated-to-nearest-anchor figures against zoo pairs on equal footing.

    Why: disagreement is bounded below by the accuracy gap (two models at 0.9 and 0.6 disagree on >= 30% of
    images), and "nearest of 5 anchors" vs "nearest of 9 train models" compares pools of different sizes. So
    each reference zoo model (never an anchor) is compared with its nearest among K other reference models
    (K = number of anchors, a seeded draw: equal pool size), and each generated model with the reference
    model closest to it in test accuracy (matched accuracy). Distances are aligned (weight matching first).
    """
    arch = kwargs["architecture"]
    k = len(anchors)
    ref_ids = sorted(reference)
    if not generated or k == 0 or len(ref_ids) < 2:
        return {"verdict": "not measured (too few models)", "pool_size": k, "generated": [], "reference": []}
    ids = list(anchors) + ref_ids
    preds = predictions(kwargs, [anchors[m] for m in anchors] + [reference[m] for m in ref_ids] + generated, x_NCHW)
    pred_of = dict(zip(ids, preds[:len(ids)]))
    gen_preds = preds[len(ids):]
    rng = np.random.default_rng(seed)
    ref_rows = []
    for m in ref_ids:
        others = [o for o in ref_ids if o != m]
        pool = [others[i] for i in rng.permutation(len(others))[:min(k, len(others))]]
        d, q = _nearest_in(reference[m], pred_of[m], {o: reference[o] for o in pool}, pred_of, arch)
        ref_rows.append({"model": m, "test_acc": float(reference_acc[m]), "distance": d, "disagreement": q,
                         "pool_size": len(pool)})
    gen_rows = []
    for i, (sd, p, acc) in enumerate(zip(generated, gen_preds, generated_acc)):
        d, q = _nearest_in(sd, p, anchors, pred_of, arch)
        match = min(ref_rows, key=lambda r: (abs(r["test_acc"] - acc), r["model"]))
        gen_rows.append({"index": i, "test_acc": float(acc), "distance": d, "disagreement": q,
                         "matched_model": match["model"], "matched_test_acc": match["test_acc"],
                         "distance_ratio": d / max(match["distance"], 1e-12),
                         "disagreement_ratio": q / max(match["disagreement"], 1e-12)})
    dist_ratio = float(np.median([g["distance_ratio"] for g in gen_rows]))
    dis_ratio = float(np.median([g["disagreement_ratio"] for g in gen_rows]))
    gap = float(np.median([abs(g["test_acc"] - g["matched_test_acc"]) for g in gen_rows]))
    if gap > MAX_ACCURACY_GAP:
        verdict = (f"not comparable: generated accuracy is {gap:.2f} from the nearest zoo model's (no zoo model of "
                   f"matched accuracy)")
    elif dist_ratio < NEAR_COPY_RATIO and dis_ratio < NEAR_COPY_RATIO:
        verdict = "near-copies of their anchors"
    elif dist_ratio >= NEAR_COPY_RATIO and dis_ratio >= NEAR_COPY_RATIO:
        verdict = "new models"
    else:
        verdict = ("close to their anchors in weights but predicting differently" if dist_ratio < NEAR_COPY_RATIO
                   else "far from their anchors in weights but predicting like them")
    return {"verdict": verdict, "pool_size": k, "near_copy_ratio": NEAR_COPY_RATIO, "median_accuracy_gap": gap,
            "median_distance_ratio": dist_ratio, "median_disagreement_ratio": dis_ratio,
            "generated_distance": _summary([g["distance"] for g in gen_rows]),
            "generated_disagreement": _summary([g["disagreement"] for g in gen_rows]),
            "reference_distance": _summary([r["distance"] for r in ref_rows]),
            "reference_disagreement": _summary([r["disagreement"] for r in ref_rows]),
            "generated": gen_rows, "reference": ref_rows}
