"""Fine-tuning comparison: which starting weights reach the best accuracy under one fine-tuning budget.

The paper's Figure 4 fine-tunes SANE-generated weights, HyperNetwork-generated weights and random
initializations on five datasets. Here every start (generated, hypernet, random, anchors, soup,
soup_aligned) goes through ONE call of ``zoo.evaluation.finetune`` per method with identical arguments:
same epochs, learning rate, optimizer, batch size, weight decay, seed (so the same image order) and the
same seeded subset of the train split, all from ``evaluate`` (fixed per target, never from an anchor).
Starts that need BatchNorm statistics (hypernet, random, soups) got the same re-estimation as the
generated models before they arrive here, so curves differ only in the weights they start from. At most
``num_finetune_models`` models per method are fine-tuned (the generated ones best-by-validation first), so
every method has the same number of curves where it can.

What this module adds to ``mzsane evaluate`` (``report.py`` calls ``compare``): the HyperNetwork start
(``evaluate/hypernet.py``, its training budget recorded under ``finetune.hypernet``), the anchors as a
start, and the across-targets view: ``comparison_rows`` / ``format_comparison`` / ``write_comparison_plot``
turn several ``results.json`` (one per target zoo, i.e. per dataset) into one table and one figure.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np

from mzsane import storage

METHODS = ("generated", "hypernet", "random", "anchors", "soup", "soup_aligned")
_HYPERNETS: dict[str, tuple[list[dict], list[dict]]] = {}


def curve_stats(rows: list[list[dict]]) -> dict[str, Any]:
    """Per-epoch mean and std of test accuracy over the fine-tuned models (diverged ones end early: NaN)."""
    epochs = max((len(r) for r in rows), default=0)
    acc = np.full((len(rows), epochs), np.nan)
    for i, r in enumerate(rows):
        for j, row in enumerate(r):
            acc[i, j] = float(row.get("test_acc", np.nan))
    with warnings.catch_warnings():  # an epoch every model diverged before is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(acc, 0), np.nanstd(acc, 0)
    return {"epoch": list(range(epochs)), "test_acc_mean": mean.tolist(), "test_acc_std": std.tolist(),
            "n": len(rows), "per_model": acc.tolist()}


def finetune_settings(ecfg: Any) -> dict[str, Any]:
    """The one budget every start gets, all from ``evaluate``: fixed per target, so it cannot change with the
    seed (it was the first anchor's optimizer, batch size and weight decay: a seed drawing an SGD-trained
    anchor fine-tuned every start with SGD)."""
    return {"epochs": int(ecfg.finetune_epochs), "lr": float(ecfg.finetune_lr),
            "optimizer": str(ecfg.finetune_optimizer), "batch_size": int(ecfg.finetune_batch_size),
            "weight_decay": float(ecfg.finetune_weight_decay), "seed": int(ecfg.seed),
            "max_train_images": int(ecfg.finetune_max_train_images)}


def curves(kwargs: dict, starts: dict[str, list[dict]], dataset: Any, settings: dict[str, Any]) -> dict[str, dict]:
    """One curve summary per method; every method is fine-tuned with exactly ``settings``."""
    from mzsane.zoo.evaluation import finetune

    out = {}
    for method, state_dicts in starts.items():
        if not state_dicts:
            continue
        rows = finetune(kwargs, state_dicts, dataset, epochs=settings["epochs"], lr=settings["lr"],
                        optimizer=settings["optimizer"], batch_size=settings["batch_size"],
                        weight_decay=settings["weight_decay"], seed=settings["seed"],
                        max_train_images=settings["max_train_images"])
        out[method] = curve_stats(rows)
    return out


def hypernet_starts(kwargs: dict, dataset: Any, ecfg: Any, sample_cfg: Any, num: int) -> tuple[list[dict], dict]:
    """``num`` HyperNetwork-generated models with the shared BN re-estimation, and their training record."""
    from mzsane.evaluate import baselines
    from mzsane.evaluate.hypernet import HypernetSettings, hypernet_models

    settings = HypernetSettings(steps=int(ecfg.hypernet_steps), max_train_images=int(ecfg.finetune_max_train_images),
                                seed=int(ecfg.seed))
    if settings.steps <= 0 or num <= 0:
        return [], {"settings": asdict(settings), "runs": []}
    # hypernetworks depend on the target task, not on the backbone: a process evaluating one target for
    # several backbones (the demo) trains them once
    key = json.dumps([kwargs, getattr(dataset, "name", id(dataset)), asdict(settings), num], sort_keys=True,
                     default=str)
    if key not in _HYPERNETS:
        while len(_HYPERNETS) >= 8:  # a few targets' small models, not an unbounded cache
            _HYPERNETS.pop(next(iter(_HYPERNETS)))
        _HYPERNETS[key] = hypernet_models(kwargs, dataset, settings, num)
    models, records = _HYPERNETS[key]
    return baselines.conditioned(kwargs, models, dataset, sample_cfg), {"settings": asdict(settings), "runs": records}


def compare(kwargs: dict, per_method: dict[str, list[dict]], dataset: Any, ecfg: Any, sample_cfg: Any
            ) -> dict[str, Any]:
    """The ``finetune`` section of ``results.json``: settings, hypernet record, one curve per start."""
    settings = finetune_settings(ecfg)
    out: dict[str, Any] = {**settings, "methods": list(METHODS), "curves": {}, "hypernet": {}}
    if settings["epochs"] <= 0:
        return out
    k = max(int(ecfg.num_finetune_models), 1)
    starts = {m: list(per_method.get(m, []))[:k] for m in METHODS if m != "hypernet"}
    starts["hypernet"], out["hypernet"] = hypernet_starts(kwargs, dataset, ecfg, sample_cfg, k)
    out["curves"] = curves(kwargs, {m: starts[m] for m in METHODS}, dataset, settings)
    return out


# ------------------------------------------------------------------------------- across targets


def comparison_rows(results: list[dict]) -> list[dict]:
    """One row per (target, backbone, method): test accuracy before fine-tuning and after the last epoch."""
    rows = []
    for res in results:
        for method, c in res.get("finetune", {}).get("curves", {}).items():
            means, stds = c["test_acc_mean"], c["test_acc_std"]
            if not means:
                continue
            rows.append({"dataset": res.get("dataset", ""), "target": res["target_zoo"], "backbone": res["backbone"],
                         "in_distribution": bool(res.get("in_distribution")), "method": method, "n": c["n"],
                         "epochs": len(means) - 1, "start_mean": means[0], "start_std": stds[0],
                         "final_mean": means[-1], "final_std": stds[-1], "curve_mean": means, "curve_std": stds})
    return rows


def format_comparison(rows: list[dict], label: str = "") -> str:
    """Table: one line per target/backbone, per method ``start -> final (+- std)`` test accuracy."""
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["target"], label or r["backbone"], r["in_distribution"]), {})[r["method"]] = r
    methods = [m for m in METHODS if any(m in cells for cells in by.values())]
    epochs = max((r["epochs"] for r in rows), default=0)
    head = f"{'target':<26}{'backbone':<22}" + "".join(f"{m:>24}" for m in methods)
    lines = [f"fine-tuning: test accuracy at epoch 0 -> epoch {epochs} (mean +- std over models/seeds)", head,
             "-" * len(head)]
    for (target, backbone, ind), cells in sorted(by.items()):
        vals = "".join(f"{cells[m]['start_mean']:>9.3f} ->{cells[m]['final_mean']:6.3f}+-{cells[m]['final_std']:.3f}"
                       if m in cells else f"{'-':>24}" for m in methods)
        lines.append(f"{('ID ' if ind else 'OOD ') + target:<26}{backbone[-21:]:<22}{vals}")
    return "\n".join(lines)


def write_comparison_plot(rows: list[dict], url: str) -> str:
    """One panel per target zoo (dataset), curves with std bands per method and backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, max(len(targets), 1), figsize=(4.2 * max(len(targets), 1), 3.4), squeeze=False)
    backbones = sorted({r["backbone"] for r in rows})
    for ax, target in zip(axes[0], targets):
        for r in (r for r in rows if r["target"] == target):
            if r["method"] != "generated" and r["backbone"] != backbones[0]:
                continue  # baselines do not depend on the backbone: draw them once
            mean, std = np.array(r["curve_mean"]), np.array(r["curve_std"])
            label = r["method"] if r["method"] != "generated" or len(backbones) == 1 else \
                f"generated ({r['backbone'].rstrip('/').split('/')[-1][:18]})"
            ax.plot(range(len(mean)), mean, marker="o", label=label)
            ax.fill_between(range(len(mean)), mean - std, mean + std, alpha=0.15)
        ax.set_title(target)
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
    return storage.write_figure(url, fig, tight=True)
