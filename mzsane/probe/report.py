"""``mzsane probe``: how much of a model's test accuracy, training epoch and generalization gap a linear
probe reads off the backbone's embeddings, next to a probe on plain weight statistics.

Protocol: every checkpoint of the given zoos is featurized (``probe/features.py``); probes are fitted on the
checkpoints of the shards' TRAIN-split models and scored on the TEST-split models (falls back to val+test
when a zoo has fewer than ``MIN_HELDOUT`` test rows, recorded as ``heldout``), so no model is on both sides.
Each target gets a probe per zoo and one across all given zoos (weight statistics zero-padded to the
widest zoo). Reported: R^2 on the held-out checkpoints and, for test accuracy, Kendall's tau between
predicted and true accuracy (the ranking view the Model Zoos paper uses).

Output: ``{out}/probe.json`` (default ``{backbone}/probe``) plus ``probe.csv``; ``format_table`` prints it.
``probe_point`` is the entry a sweep point calls; ``summary`` flattens a result into scalar columns.
"""
from __future__ import annotations

import csv
import io
import time
from typing import Any

import numpy as np

from mzsane import storage
from mzsane.errors import DataError
from mzsane.probe import ridge
from mzsane.probe.features import TARGETS, ZooFeatures, pad_features, zoo_features

FEATURES = ("embedding", "weight_stats")
MIN_HELDOUT = 3
RESULTS_FILE = "probe.json"


def _fit_score(x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray, rank: bool) -> dict[str, Any]:
    keep_tr, keep_te = np.isfinite(y_train), np.isfinite(y_test)
    if keep_tr.sum() < 2 or keep_te.sum() < 2:
        return {"r2": float("nan"), "kendall_tau": float("nan"), "n_train": int(keep_tr.sum()),
                "n_test": int(keep_te.sum()), "alpha": float("nan")}
    probe = ridge.fit(x_train[keep_tr], y_train[keep_tr], groups=groups[keep_tr])
    pred = probe.predict(x_test[keep_te])
    out = {"r2": ridge.r2_score(y_test[keep_te], pred), "n_train": int(keep_tr.sum()), "n_test": int(keep_te.sum()),
           "alpha": probe.alpha}
    out["kendall_tau"] = ridge.kendall_tau(y_test[keep_te], pred) if rank else float("nan")
    return out


def _heldout(splits: np.ndarray) -> tuple[np.ndarray, str]:
    test = splits == "test"
    if test.sum() >= MIN_HELDOUT:
        return test, "test"
    return (splits == "val") | test, "val+test"


def run_probes(per_zoo: list[ZooFeatures]) -> list[dict[str, Any]]:
    """One row per (scope, target, features): scope is a zoo name or ``all``."""
    scopes: list[tuple[str, dict, dict, np.ndarray, np.ndarray]] = []
    models = [np.array([f"{zf.zoo}/{m}" for m in zf.model_ids]) for zf in per_zoo]  # probe CV leaves out models
    for zf, ids in zip(per_zoo, models):
        feats = {k: zf.features(k) for k in FEATURES}
        scopes.append((zf.zoo, feats, {t: zf.target(t) for t in TARGETS}, np.asarray(zf.splits), ids))
    if len(per_zoo) > 1:
        feats = {k: pad_features([zf.features(k) for zf in per_zoo]) for k in FEATURES}
        targets = {t: np.concatenate([zf.target(t) for zf in per_zoo]) for t in TARGETS}
        scopes.append(("all", feats, targets, np.concatenate([np.asarray(zf.splits) for zf in per_zoo]),
                       np.concatenate(models)))
    rows = []
    for scope, feats, targets, splits, ids in scopes:
        train = splits == "train"
        test, heldout = _heldout(splits)
        for target, y in targets.items():
            for kind, x in feats.items():
                score = _fit_score(x[train], y[train], ids[train], x[test], y[test], rank=target == "test_acc")
                rows.append({"scope": scope, "target": target, "features": kind, "heldout": heldout, **score})
    return rows


def probe(backbone_url: str, zoos: list[str], shards_url: str = "", out_url: str = "", *,
          backbone: tuple[Any, Any] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Featurize the zoos' checkpoints, fit and score the probes, write ``probe.json``/``probe.csv``."""
    import torch

    from mzsane.model.backbone import load_backbone
    from mzsane.shards.manifest import read_manifest

    if not zoos:
        raise DataError("mzsane probe needs at least one --zoo; pass zoo names from the shard manifest")
    model, cfg = backbone if backbone is not None else load_backbone(backbone_url)
    shards_url = shards_url or cfg.data.shards_url or storage.join(cfg.storage.root, "shards", "default")
    manifest = read_manifest(shards_url)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    t0 = time.perf_counter()
    per_zoo = [zoo_features(model, cfg, manifest, z, batch_size, device) for z in zoos]
    t_feat = time.perf_counter() - t0
    rows = run_probes(per_zoo)
    latent = per_zoo[0].features("embedding").shape[1]
    results = {"schema_version": 1, "backbone": backbone_url, "shards": shards_url, "zoos": list(zoos),
               "in_backbone_data": {z: (not cfg.data.zoos) or z in cfg.data.zoos for z in zoos},
               "checkpoints": {zf.zoo: {s: zf.splits.count(s) for s in ("train", "val", "test")} for zf in per_zoo},
               "targets": {"test_acc": "test accuracy", "epoch": "training epoch of the checkpoint",
                           "gap": "train accuracy - test accuracy"},
               "features": {"embedding": f"mean-pooled encoder output (latent width {latent})",
                            "weight_stats": "per layer mean, std, 5 quantiles of weights (and biases)"},
               "rows": rows, "timings": {"features_s": round(t_feat, 2),
                                         "probes_s": round(time.perf_counter() - t0 - t_feat, 2)}}
    out_url = out_url or storage.join(backbone_url, "probe")
    storage.write_json(storage.join(out_url, RESULTS_FILE), results)
    storage.write_text(storage.join(out_url, "probe.csv"), rows_csv(rows))
    results["out"] = out_url
    return results


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = ["scope", "target", "features", "heldout", "r2", "kendall_tau", "n_train", "n_test", "alpha"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in fields})
    return buf.getvalue()


def format_table(results: dict, label: str = "") -> str:
    """One line per scope/target: R^2 of the embedding probe and of the weight-statistics probe (+ tau)."""
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results["rows"]:
        by.setdefault((r["scope"], r["target"]), {})[r["features"]] = r
    head = (f"{'scope':<24}{'target':<10}{'R2 embed':>10}{'R2 wstats':>11}{'tau embed':>11}{'tau wstats':>12}"
            f"{'n train/test':>14}")
    lines = [f"property probes{' ' + label if label else ''} (backbone {results['backbone']})", head, "-" * len(head)]
    for (scope, target), cells in by.items():
        e, s = cells.get("embedding", {}), cells.get("weight_stats", {})
        tau = (f"{e.get('kendall_tau', float('nan')):>11.3f}{s.get('kendall_tau', float('nan')):>12.3f}"
               if target == "test_acc" else f"{'':>23}")
        lines.append(f"{scope:<24}{target:<10}{e.get('r2', float('nan')):>10.3f}{s.get('r2', float('nan')):>11.3f}"
                     f"{tau}{str(e.get('n_train', 0)) + '/' + str(e.get('n_test', 0)):>14}")
    return "\n".join(lines)


def summary(results: dict) -> dict[str, float]:
    """Flat scalar columns for a sweep report: ``probe_<scope>_<target>_<features>_r2`` (+ ``_tau``)."""
    out = {}
    for r in results["rows"]:
        key = f"probe_{r['scope']}_{r['target']}_{r['features']}"
        out[f"{key}_r2"] = r["r2"]
        if r["target"] == "test_acc":
            out[f"{key}_tau"] = r["kendall_tau"]
    return out


def probe_point(run_url: str, shards_url: str, zoos: list[str], out_url: str = "") -> dict[str, float]:
    """What a sweep point calls after training: probe its backbone on its zoos, return ``summary``.

    Writes ``{out_url or run_url/probe}/probe.json``; the sweep report reads the returned columns (or that
    file) as a second axis next to the generated models' accuracy.
    """
    return summary(probe(run_url, zoos, shards_url, out_url))


def point_summary(point_url: str) -> dict[str, float]:
    """``summary`` of ``{point_url}/probe/probe.json`` (what ``mzsane probe --out {point}/probe`` wrote), or
    ``{}`` when the point has no probe results: the sweep report's second axis, empty where not run."""
    url = storage.join(point_url, "probe", RESULTS_FILE)
    return summary(storage.read_json(url)) if storage.exists(url) else {}


def probe_cli(args: Any) -> dict:
    """``mzsane probe --backbone RUN --zoo ZOO [ZOO ...] [--shards URL] [--out URL] [--json]``."""
    zoos = [z for group in args.zoo for z in (group if isinstance(group, list) else [group])]
    results = probe(args.backbone, zoos, getattr(args, "shards", "") or "", getattr(args, "out", "") or "")
    if getattr(args, "json", False):
        import json

        print(json.dumps(results, indent=2, default=str))
    else:
        print(format_table(results))
        print(f"results: {storage.join(results['out'], RESULTS_FILE)} (+ probe.csv)")
    return results
