"""``mzsane evaluate``: test accuracy of generated models against baselines, fine-tuning, novelty, plots.

This is the only stage that reads the test split of the target dataset (sampling never does). Everything
that needs BatchNorm statistics (soups, random inits) gets the same re-estimation the generated models got,
from the settings recorded in ``sample_results.json``, so rows differ only in their weights.

Honest figures, everywhere (issue 13): every selected figure stands beside its unselected one, and the
headline says whether its anchors were ever seen by the backbone:

* ``generated``: the top n of the candidates by validation accuracy (selected);
  ``generated_unselected``: the first n candidates by index (random draws, no selection); and the
  validation-accuracy distribution of all candidates (mean, median, 10/90% quantiles) beside the top n's;
* ``reconstruction``: the anchors decoded from their own latents without noise (decode(encode(m))): the
  ceiling of generation for this backbone, on held-out models when the anchors are held out;
* ``anchors`` (the K prompts, unselected) and ``anchors_selected``: the best n of the whole anchor pool by
  validation accuracy on the same validation images the candidates were ranked on (selection on equal
  footing);
* ``soup`` / ``soup_aligned``: the plain and weight-matched average of the K anchors' pool; ``soup_best``: of
  every soup made (plain and aligned, each size of ``evaluate.soup_sizes``), the one of best validation
  accuracy on those same images (selected like the generated top-k, not fixed at K models);
* ``headline``: the generated figure with a flag saying whether every anchor is held out (never in the
  backbone's training selection, verified from its shards);
* novelty ``matched``: generated-to-nearest-anchor distance and disagreement against zoo models of matched
  accuracy and equal pool size, with a verdict (new models or near-copies);
* ``exposure``: what each zoo contributed to the backbone's training (``{run}/exposure.json``).

Output: ``{out}/evaluate/results.json``, ``results.csv`` and PNG plots (``accuracy.png`` bars,
``finetune.png`` curves, ``soup.png`` accuracy vs number of averaged models). ``results.json`` is what
``mzsane sweep report`` reads::

    {"target_zoo", "dataset", "architecture", "backbone", "in_distribution": bool,
     "headline": {"method", "test_acc_mean", "anchors_held_out": bool, ...},
     "rows": [{"method": one of METHODS, "test_acc_mean", "test_acc_std", "n"}, ...],
     "candidates": {"val_acc": {...}, "kept_val_acc": {...}}, "anchors": {...}, "exposure": {...},
     "soup_curve": [...], "finetune": {...}, "novelty": {..., "matched": {...}}}
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
from mzsane.evaluate import finetune as finetune_mod
from mzsane.evaluate.novelty import matched_novelty, novelty
from mzsane.sample.generate import load_results, read_state_dict, score_candidates, selection_split

METHODS = ("generated", "generated_unselected", "reconstruction", "anchors", "anchors_selected", "soup",
           "soup_aligned", "soup_best", "random")


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.array(values, dtype=float)
    return {"test_acc_mean": float(np.nanmean(arr)) if arr.size else float("nan"),
            "test_acc_std": float(np.nanstd(arr)) if arr.size else float("nan"), "n": int(arr.size)}


def distribution(values: list[float]) -> dict[str, float]:
    """Mean, median and 10/90% quantiles (NaN-free values only)."""
    arr = np.array([v for v in values if v is not None and v == v], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "q10": float("nan"), "q90": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "q10": float(np.quantile(arr, 0.1)),
            "q90": float(np.quantile(arr, 0.9)), "n": int(arr.size)}


def select_best(ids: list[str], val_acc: list[float], k: int) -> list[str]:
    """The ``k`` ids of highest validation accuracy (ties: the smaller id), best first."""
    order = sorted(range(len(ids)), key=lambda i: (-val_acc[i], ids[i]))
    return [ids[i] for i in order[:max(k, 0)]]


def _exposure(backbone: str) -> dict:
    """The backbone run's per-zoo exposure (``{run}/exposure.json``); empty when the run predates it."""
    from mzsane.train.budget import EXPOSURE_FILE

    url = storage.join(backbone, EXPOSURE_FILE)
    try:
        return storage.read_json(url) if storage.exists(url) else {}
    except Exception:
        return {}


def _sample_cfg(results: dict) -> SampleConfig:
    known = {k: v for k, v in results.get("sample", {}).items() if k in SampleConfig.__dataclass_fields__}
    return SampleConfig(**known)


def _test_accs(kwargs: dict, state_dicts: list[dict], dataset: Any) -> list[float]:
    from mzsane.zoo.evaluation import evaluate_models

    if not state_dicts:
        return []
    return [float(a) for _, a in evaluate_models(kwargs, state_dicts, dataset.test.x, dataset.test.y, 1000)]


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

    def written(key: str) -> list[dict]:
        return [{k: sd[k] for k in order} for sd in
                (read_state_dict(storage.join(samples_url, g["file"])) for g in res.get(key, []))]

    generated, unselected, reconstructed = written("generated"), written("unselected"), written("reconstructed")
    # selection on equal footing: the best n of every model that could have been an anchor, ranked on the same
    # validation images the candidates were ranked on
    pool_all = [m for m in res["anchors"].get("pool_ids", anchor_ids) if m in have_epoch] or anchor_ids
    val_split = selection_split(dataset, scfg.max_val_images, scfg.seed)
    pool_val = [a for _, a in score_candidates(kwargs, [load(m) for m in pool_all], val_split)]
    best_ids = select_best(pool_all, pool_val, min(len(generated) or scfg.num_keep, len(pool_all)))
    randoms = baselines.conditioned(kwargs, baselines.random_models(kwargs, ecfg.random_init,
                                                                    ecfg.num_random, ecfg.seed), dataset, scfg)
    soup_pool = [load(m) for m in pool_ids[:max(max(ecfg.soup_sizes, default=1), len(anchor_ids))]]
    curve, soups, every_soup = [], {}, []
    for aligned in (False, True):
        sizes = sorted(set(ecfg.soup_sizes) | {len(anchor_ids)})
        made = baselines.soup_models(soup_pool, kwargs["architecture"], sizes, ecfg.seed, aligned)
        conditioned = baselines.conditioned(kwargs, [sd for _, sd in made], dataset, scfg)
        accs = _test_accs(kwargs, conditioned, dataset)
        vals = [a for _, a in score_candidates(kwargs, conditioned, val_split)]
        for (n, _), sd, acc, val in zip(made, conditioned, accs, vals):
            curve.append({"n": n, "aligned": aligned, "test_acc": acc, "val_acc": val})
            every_soup.append(sd)
            if n == len(anchor_ids):
                soups["soup_aligned" if aligned else "soup"] = sd
    best_soup = max(range(len(curve)), key=lambda i: (curve[i]["val_acc"], -i))  # ties: plain, fewer models

    per_method = {"generated": generated, "generated_unselected": unselected, "reconstruction": reconstructed,
                  "anchors": anchors, "anchors_selected": [load(m) for m in best_ids], "soup": [soups["soup"]],
                  "soup_aligned": [soups["soup_aligned"]], "soup_best": [every_soup[best_soup]], "random": randoms}
    accs = {m: _test_accs(kwargs, sds, dataset) for m, sds in per_method.items()}
    rows = [{"method": m, **_stats(accs[m])} for m in METHODS if per_method[m]]
    provenance = {k: v for k, v in res["anchors"].items() if k != "pool_ids"}
    held_out = bool(provenance.get("held_out_verified")) and not provenance.get("seen", anchor_ids)
    headline = {"method": "generated", **_stats(accs["generated"]), "anchors_held_out": held_out,
                "anchor_pool": provenance.get("pool", "any"),
                "unselected_test_acc_mean": _stats(accs["generated_unselected"])["test_acc_mean"],
                "reconstruction_test_acc_mean": _stats(accs["reconstruction"])["test_acc_mean"],
                "reconstruction_best_test_acc": max(accs["reconstruction"], default=float("nan"))}
    candidates = {"val_acc": distribution([c["val_acc"] for c in res.get("candidates", [])]),
                  "kept_val_acc": distribution([g["val_acc"] for g in res["generated"]]),
                  "anchor_pool_val_acc": distribution(pool_val), "anchors_selected": best_ids,
                  "soup_best": {k: curve[best_soup][k] for k in ("n", "aligned", "val_acc")}}

    # every start (generated, hypernet, random, anchors, soups) with one budget: evaluate/finetune.py
    finetune = finetune_mod.compare(kwargs, per_method, dataset, ecfg, scfg)

    x_nov = dataset.test.x[:max(ecfg.num_novelty_images, 1)]
    nov = novelty(kwargs, generated, dict(zip(anchor_ids, anchors)), {m: load(m) for m in train_ids}, x_nov)
    # reference zoo models for the matched comparison: never an anchor, any split (they are only compared)
    reference_ids = baselines.order_pool([], [m for m in have_epoch if m not in anchor_ids], ecfg.seed)
    reference_ids = reference_ids[:max(ecfg.max_train_models, 2)]
    reference = {m: load(m) for m in reference_ids}
    reference_acc = dict(zip(reference_ids, _test_accs(kwargs, list(reference.values()), dataset)))
    nov["matched"] = matched_novelty(kwargs, generated, accs["generated"], dict(zip(anchor_ids, anchors)), reference,
                                     reference_acc, x_nov, ecfg.seed)

    results = {
        "schema_version": 1, "target_zoo": res["target_zoo"], "dataset": res["dataset"],
        "architecture": res["architecture"], "backbone": res["backbone"],
        "in_distribution": bool(res["in_distribution"]), "epoch": epoch, "anchors": anchor_ids,
        "anchor_provenance": provenance, "headline": headline, "candidates": candidates,
        "exposure": _exposure(res["backbone"]),
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


def anchor_pool_of(results: dict[str, Any]) -> str:
    """The pool the evaluated anchors came from (``held_out`` where results predate the record)."""
    headline, provenance = results.get("headline") or {}, results.get("anchor_provenance") or {}
    return str(headline.get("anchor_pool") or provenance.get("pool") or "held_out")


def best_reconstruction(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``reconstruction_best``: the best anchor's noise-free decode(encode(anchor)), beside ``reconstruction``
    (their mean); the top-k of many noisy decodes is compared with the best, not the mean, of the ceiling."""
    accs = [float(a) for a in (results.get("per_model") or {}).get("reconstruction") or []]
    if not accs:
        return []
    return [{"method": "reconstruction_best", "test_acc_mean": max(accs), "test_acc_std": 0.0, "n": len(accs)}]


def rows_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["target_zoo", "in_distribution", "backbone", "method", "test_acc_mean", "test_acc_std", "n"])
    for r in results["rows"]:
        w.writerow([results["target_zoo"], results["in_distribution"], results["backbone"], r["method"],
                    f"{r['test_acc_mean']:.6f}", f"{r['test_acc_std']:.6f}", r["n"]])
    return buf.getvalue()


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
           color=[f"C{i}" for i in range(len(rows))], capsize=4)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"zero-shot, {title}")
    out["accuracy"] = storage.write_figure(storage.join(out_url, "accuracy.png"), fig, tight=True)
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
        out["finetune"] = storage.write_figure(storage.join(out_url, "finetune.png"), fig, tight=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for aligned in (False, True):
        pts = sorted((p["n"], p["test_acc"]) for p in results["soup_curve"] if p["aligned"] == aligned)
        if pts:
            ax.plot(*zip(*pts), marker="o", label="aligned soup" if aligned else "soup")
    ax.set_xlabel("models averaged")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"uniform soup, {title}")
    ax.legend()
    out["soup"] = storage.write_figure(storage.join(out_url, "soup.png"), fig, tight=True)
    return out


def format_table(results: dict) -> str:
    """One block: the headline (with its anchors' provenance), method rows, the candidates before and after
    selection, fine-tuning, novelty and its verdict."""
    kind = "ID" if results["in_distribution"] else "OOD"
    lines = [f"{results['target_zoo']} [{kind}] backbone {results['backbone']}"]
    h = results.get("headline")
    if h:
        p = results.get("anchor_provenance", {})
        where = ("held-out anchors (never in the backbone's training selection)" if h["anchors_held_out"] else
                 f"anchors NOT all held out ({len(p.get('seen', []))} seen by the backbone"
                 f"{'' if p.get('held_out_verified') else ', provenance unverified'})")
        lines.append(f"  headline: generated {h['test_acc_mean']:.4f} +- {h['test_acc_std']:.4f} (top {h['n']} by val) "
                     f"on {where}; unselected {h['unselected_test_acc_mean']:.4f}; "
                     f"noise-free reconstruction of the anchors (the ceiling): mean "
                     f"{h['reconstruction_test_acc_mean']:.4f}, best anchor's "
                     f"{h.get('reconstruction_best_test_acc', float('nan')):.4f}")
    lines.append(f"  {'method':<22}{'test acc':>10}{'std':>9}{'n':>5}")
    for r in results["rows"]:
        lines.append(f"  {r['method']:<22}{r['test_acc_mean']:>10.4f}{r['test_acc_std']:>9.4f}{r['n']:>5}")
    cand = results.get("candidates")
    if cand:
        v, k = cand["val_acc"], cand["kept_val_acc"]
        lines.append(f"  candidates (val acc, before selection): mean {v['mean']:.4f} median {v['median']:.4f} "
                     f"q10 {v['q10']:.4f} q90 {v['q90']:.4f} (n={v['n']}) | kept top {k['n']}: mean {k['mean']:.4f}")
    for m, c in results["finetune"]["curves"].items():
        lines.append(f"  finetune {m:<13}" + " ".join(f"{a:.3f}" for a in c["test_acc_mean"]))
    s = results["novelty"]["summary"]
    lines.append("  novelty: generated->anchor dist {:.3f} disagree {:.3f} | generated->train dist {:.3f} disagree "
                 "{:.3f} | zoo pairs dist {:.3f} disagree {:.3f}".format(
                     s["generated_to_anchor_distance"]["mean"], s["generated_to_anchor_disagreement"]["mean"],
                     s["generated_to_train_distance"]["mean"], s["generated_to_train_disagreement"]["mean"],
                     s["zoo_pair_distance"]["mean"], s["zoo_pair_disagreement"]["mean"]))
    mt = results["novelty"].get("matched")
    if mt and mt.get("generated"):
        lines.append("  novelty at matched accuracy (pool {}): generated->nearest anchor dist {:.3f} disagree {:.3f} | "
                     "zoo models dist {:.3f} disagree {:.3f} | median ratios {:.2f} / {:.2f}: {}".format(
                         mt["pool_size"], mt["generated_distance"]["mean"], mt["generated_disagreement"]["mean"],
                         mt["reference_distance"]["mean"], mt["reference_disagreement"]["mean"],
                         mt["median_distance_ratio"], mt["median_disagreement_ratio"], mt["verdict"]))
    return "\n".join(lines)


def evaluate_cli(args: Any) -> None:
    """``mzsane evaluate --samples OUT --zoo ZOO``: prints the table and where the files are."""
    results = evaluate(args.samples, args.zoo, args.cfg.evaluate)
    print(format_table(results))
    out = storage.join(args.samples, "evaluate")
    print(f"results: {storage.join(out, 'results.json')} (+ results.csv); plots: "
          + ", ".join(results.get("plots", {}).values()))
