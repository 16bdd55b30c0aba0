"""``mzsane evaluate``: test accuracy of generated models against baselines, fine-tuning, novelty, plots.

This is the only stage that reads the test split of the target dataset (sampling never does). Everything
that needs BatchNorm statistics (soups, random inits) gets the same re-estimation the generated models got,
from the settings recorded in ``sample_results.json``, so rows differ only in their weights.

Output: ``{out}/evaluate/results.json``, ``results.csv`` and PNG plots (``accuracy.png`` bars,
``finetune.png`` curves, ``soup.png`` accuracy vs number of averaged models). ``results.json`` is what
``mzsane sweep report`` reads::

    {"target_zoo", "dataset", "architecture", "backbone", "in_distribution": bool,
     "rows": [{"method": "generated" | "anchors" | "soup" | "soup_aligned" | "random",
               "test_acc_mean", "test_acc_std", "n"}, ...],
     "soup_curve": [...], "finetune": {...}, "novelty": {...}}
"""
from __future__ import annotations

import copy
import csv
import io
import json
from typing import Any

import numpy as np

from mzsane import storage
from mzsane.config import EvaluateConfig, SampleConfig
from mzsane.evaluate import baselines
from mzsane.evaluate.novelty import novelty
from mzsane.sample.generate import load_results, read_state_dict

METHODS = ("generated", "anchors", "soup", "soup_aligned", "random")


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.array(values, dtype=float)
    return {"test_acc_mean": float(np.nanmean(arr)) if arr.size else float("nan"),
            "test_acc_std": float(np.nanstd(arr)) if arr.size else float("nan"), "n": int(arr.size)}


def _sample_cfg(results: dict) -> SampleConfig:
    known = {k: v for k, v in results.get("sample", {}).items() if k in SampleConfig.__dataclass_fields__}
    return SampleConfig(**known)


def _test_accs(kwargs: dict, state_dicts: list[dict], dataset: Any) -> list[float]:
    from mzsane.zoo.evaluation import evaluate_models

    if not state_dicts:
        return []
    return [float(a) for _, a in evaluate_models(kwargs, state_dicts, dataset.test.x, dataset.test.y, 1000)]


def _curves(kwargs: dict, state_dicts: list[dict], dataset: Any, ecfg: EvaluateConfig, hparams: dict) -> dict:
    from mzsane.zoo.evaluation import finetune

    rows = finetune(kwargs, state_dicts, dataset, epochs=ecfg.finetune_epochs, lr=ecfg.finetune_lr,
                    optimizer=str(hparams.get("optimizer", "adam")), batch_size=int(hparams.get("batch_size", 32)),
                    weight_decay=float(hparams.get("weight_decay", 0.0)), seed=ecfg.seed,
                    max_train_images=ecfg.finetune_max_train_images)
    epochs = max(len(r) for r in rows)
    acc = np.full((len(rows), epochs), np.nan)
    for i, r in enumerate(rows):
        for j, row in enumerate(r):
            acc[i, j] = float(row.get("test_acc", np.nan))
    return {"epoch": list(range(epochs)), "test_acc_mean": np.nanmean(acc, 0).tolist(),
            "test_acc_std": np.nanstd(acc, 0).tolist(), "n": len(rows)}


def evaluate(samples_url: str, zoo_url: str, eval_cfg: EvaluateConfig | None = None, *, dataset: Any = None,
             out_url: str = "", plots: bool = True) -> dict:
    """Compare the models in ``samples_url`` with the baselines on the target zoo's test split."""
    from mzsane.sample.anchors import model_splits, usable_records
    from mzsane.zoo.datasets import load_dataset
    from mzsane.zoo.store import open_zoo

    ecfg = copy.deepcopy(eval_cfg or EvaluateConfig())
    res = load_results(samples_url)
    out_url = out_url or storage.join(samples_url, "evaluate")
    scfg = _sample_cfg(res)
    kwargs = baselines.zoo_kwargs(res)
    hparams = res.get("hparams", {})
    dataset = dataset if dataset is not None else load_dataset(res["dataset"])
    reader = open_zoo(zoo_url)
    epoch = int(res["anchors"]["epoch"])
    anchor_ids = list(res["anchors"]["model_ids"])

    records = usable_records(reader)
    splittable = [r.model_id for r in reader.models() if r.status != "failed"]
    splits = model_splits(splittable, res["split"]["fractions"], res["split"]["seed"], reader.info.zoo)
    have_epoch = {r.model_id for r in records if epoch in (r.checkpoint_epochs or [e["epoch"] for e in r.epochs])}
    pool_ids = baselines.order_pool(anchor_ids, [m for m in have_epoch if splits.get(m) in ("train", "val")], ecfg.seed)
    train_ids = [m for m in pool_ids if splits.get(m) == "train"][:max(ecfg.max_train_models, 0)]
    cache: dict[str, dict] = {}

    def load(m: str) -> dict:
        if m not in cache:
            cache[m] = reader.load_checkpoint(m, epoch)
        return cache[m]

    anchors = [load(m) for m in anchor_ids]
    order = list(anchors[0])  # safetensors stores keys sorted; populations need the module's key order
    generated = [{k: sd[k] for k in order} for sd in
                 (read_state_dict(storage.join(samples_url, g["file"])) for g in res["generated"])]
    randoms = baselines.conditioned(kwargs, baselines.random_models(kwargs, hparams.get("init", "default"),
                                                                    ecfg.num_random, ecfg.seed), dataset, scfg)
    soup_pool = [load(m) for m in pool_ids[:max(max(ecfg.soup_sizes, default=1), len(anchor_ids))]]
    curve, soups = [], {}
    for aligned in (False, True):
        sizes = sorted(set(ecfg.soup_sizes) | {len(anchor_ids)})
        made = baselines.soup_models(soup_pool, kwargs["architecture"], sizes, ecfg.seed, aligned)
        conditioned = baselines.conditioned(kwargs, [sd for _, sd in made], dataset, scfg)
        accs = _test_accs(kwargs, conditioned, dataset)
        for (n, _), sd, acc in zip(made, conditioned, accs):
            curve.append({"n": n, "aligned": aligned, "test_acc": acc})
            if n == len(anchor_ids):
                soups["soup_aligned" if aligned else "soup"] = sd

    per_method = {"generated": generated, "anchors": anchors, "soup": [soups["soup"]],
                  "soup_aligned": [soups["soup_aligned"]], "random": randoms}
    accs = {m: _test_accs(kwargs, sds, dataset) for m, sds in per_method.items()}
    rows = [{"method": m, **_stats(accs[m])} for m in METHODS]

    finetune: dict[str, Any] = {"epochs": ecfg.finetune_epochs, "lr": ecfg.finetune_lr, "curves": {}}
    if ecfg.finetune_epochs > 0:
        k = max(ecfg.num_finetune_models, 1)
        for m in ("generated", "soup", "soup_aligned", "random"):
            finetune["curves"][m] = _curves(kwargs, per_method[m][:k], dataset, ecfg, hparams)

    x_nov = dataset.test.x[:max(ecfg.num_novelty_images, 1)]
    nov = novelty(kwargs, generated, dict(zip(anchor_ids, anchors)), {m: load(m) for m in train_ids}, x_nov)

    results = {
        "schema_version": 1, "target_zoo": res["target_zoo"], "dataset": res["dataset"],
        "architecture": res["architecture"], "backbone": res["backbone"],
        "in_distribution": bool(res["in_distribution"]), "epoch": epoch, "anchors": anchor_ids,
        "rows": rows, "per_model": {m: accs[m] for m in METHODS},
        "generated_val_acc": [g["val_acc"] for g in res["generated"]],
        "soup_curve": curve, "finetune": finetune, "novelty": nov,
        "config": {k: getattr(ecfg, k) for k in EvaluateConfig.__dataclass_fields__},
    }
    storage.write_text(storage.join(out_url, "results.json"), json.dumps(results, indent=2, default=str))
    storage.write_text(storage.join(out_url, "results.csv"), rows_csv(results))
    if plots:
        results["plots"] = write_plots(results, out_url)
    return results


def rows_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target_zoo", "in_distribution", "backbone", "method", "test_acc_mean", "test_acc_std", "n"])
    for r in results["rows"]:
        w.writerow([results["target_zoo"], results["in_distribution"], results["backbone"], r["method"],
                    f"{r['test_acc_mean']:.6f}", f"{r['test_acc_std']:.6f}", r["n"]])
    return buf.getvalue()


def _save(fig: Any, url: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())
    return url


def write_plots(results: dict, out_url: str) -> dict[str, str]:
    """accuracy.png (bars with std), finetune.png (test acc per epoch), soup.png (acc vs models averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{results['target_zoo']} ({'ID' if results['in_distribution'] else 'OOD'})"
    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rows = results["rows"]
    ax.bar([r["method"] for r in rows], [r["test_acc_mean"] for r in rows], yerr=[r["test_acc_std"] for r in rows],
           color=["tab:green", "tab:blue", "tab:orange", "tab:red", "tab:gray"][:len(rows)], capsize=4)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"zero-shot, {title}")
    out["accuracy"] = _save(fig, storage.join(out_url, "accuracy.png"))
    curves = results["finetune"]["curves"]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m, c in curves.items():
            mean, std = np.array(c["test_acc_mean"]), np.array(c["test_acc_std"])
            ax.plot(c["epoch"], mean, marker="o", label=m)
            ax.fill_between(c["epoch"], mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("fine-tuning epoch")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"fine-tuning, {title}")
        ax.legend()
        out["finetune"] = _save(fig, storage.join(out_url, "finetune.png"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for aligned in (False, True):
        pts = sorted((p["n"], p["test_acc"]) for p in results["soup_curve"] if p["aligned"] == aligned)
        if pts:
            ax.plot(*zip(*pts), marker="o", label="aligned soup" if aligned else "soup")
    ax.set_xlabel("models averaged")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"uniform soup, {title}")
    ax.legend()
    out["soup"] = _save(fig, storage.join(out_url, "soup.png"))
    return out


def format_table(results: dict) -> str:
    """One block: method, mean +- std test accuracy, n; then fine-tuning and novelty in one line each."""
    lines = [f"{results['target_zoo']} [{'ID' if results['in_distribution'] else 'OOD'}] backbone {results['backbone']}",
             f"  {'method':<14}{'test acc':>10}{'std':>9}{'n':>5}"]
    for r in results["rows"]:
        lines.append(f"  {r['method']:<14}{r['test_acc_mean']:>10.4f}{r['test_acc_std']:>9.4f}{r['n']:>5}")
    for m, c in results["finetune"]["curves"].items():
        lines.append(f"  finetune {m:<13}" + " ".join(f"{a:.3f}" for a in c["test_acc_mean"]))
    s = results["novelty"]["summary"]
    lines.append("  novelty: generated->anchor dist {:.3f} disagree {:.3f} | generated->train dist {:.3f} disagree "
                 "{:.3f} | zoo pairs dist {:.3f} disagree {:.3f}".format(
                     s["generated_to_anchor_distance"]["mean"], s["generated_to_anchor_disagreement"]["mean"],
                     s["generated_to_train_distance"]["mean"], s["generated_to_train_disagreement"]["mean"],
                     s["zoo_pair_distance"]["mean"], s["zoo_pair_disagreement"]["mean"]))
    return "\n".join(lines)


def evaluate_cli(args: Any) -> None:
    """``mzsane evaluate --samples OUT --zoo ZOO``: prints the table and where the files are."""
    results = evaluate(args.samples, args.zoo, args.cfg.evaluate)
    print(format_table(results))
    out = storage.join(args.samples, "evaluate")
    print(f"results: {storage.join(out, 'results.json')} (+ results.csv); plots: "
          + ", ".join(results.get("plots", {}).values()))
