"""The sweep report: every point's ``evaluate/results.json`` as one table, a CSV and the Figure-3 plot.

Why no cluster here: ``report`` reads ``{sweep}/{point}/evaluate/results.json`` through
``mzsane.storage``, so the same report follows a KubeRay sweep (S3) and a ``sweep run`` (local folder).
The plot is the paper's Figure-3 view (zero-shot accuracy vs zoo size, one line per composition).

Seeds: points that differ only in their seeds (a ``seed`` axis sets all of them, or a ``train.seed`` axis)
are one setting; ``aggregate`` gives each setting's mean
over seeds with a 95% Student-t half-width (one seed: no interval, said as ``n_seeds`` 1), so a reader
compares settings, not lucky seeds. Second axis: the probe stage's R^2 (how well a linear probe on the
backbone's embeddings reads the target zoo's test accuracy, next to a probe on weight statistics), read
from ``{point}/probe/probe.json`` where the point ran it.
"""
from __future__ import annotations

import argparse
import csv
import io
from typing import Any

import numpy as np

from mzsane import storage
from mzsane.errors import DataError
from mzsane.sample.protocol import SEEN_ANCHORS_FOLDER
from mzsane.sweep import paired
from mzsane.sweep.schema import REPLICATE_PATHS

ZERO_SHOT_METHOD = "generated"
PROBE_COLUMNS = ("probe_r2_embedding", "probe_r2_weight_stats", "probe_tau_embedding")
# the columns of the printed summary: the headline, what it is selected from, its ceiling and the baselines
FINETUNED_PREFIX = "finetuned_"
SUMMARY_METHODS = ("generated", "generated_unselected", "reconstruction", "reconstruction_best", "anchors_selected",
                   "soup_aligned", "soup_best", "random", "finetuned_generated", "finetuned_anchors",
                   "finetuned_hypernet", "finetuned_random")
# A point's second evaluation with another anchor pool sits in this sibling folder of its samples: the
# seen-anchor run (sample.anchor_pool=seen, the paper's protocol) beside the held-out headline
POOL_FOLDERS = {"seen": SEEN_ANCHORS_FOLDER}
# the protocol table: per anchor pool, the generated top-k and its ceiling (the mean and the best anchor's
# noise-free reconstruction)
POOL_COLUMNS = ("generated", "reconstruction", "reconstruction_best")


def _probe_columns(point_url: str, target_zoo: str, exact: bool = False) -> dict[str, float]:
    """The point's probe R^2 / tau for test accuracy on its target zoo (NaN where the probe did not run; with
    ``exact``, also where it ran on another zoo: the probe stage covers the first target only)."""
    from mzsane.probe.report import point_summary  # torch comes with it: only when a report is made

    found = point_summary(point_url)
    name = target_zoo.rstrip("/").rsplit("/", 1)[-1]
    scopes = {k.split("_test_acc_")[0][len("probe_"):] for k in found if "_test_acc_" in k}
    scope = name if name in scopes or exact else next(iter(sorted(scopes - {"all"})), "")
    get = lambda key: float(found.get(f"probe_{scope}_test_acc_{key}", float("nan")))  # noqa: E731
    return {"probe_r2_embedding": get("embedding_r2"), "probe_r2_weight_stats": get("weight_stats_r2"),
            "probe_tau_embedding": get("embedding_tau")}


def _point_meta(point_url: str, name: str, results: dict[str, Any]) -> dict[str, Any]:
    """The point's sweep coordinates: point.json (written by the chart's RayJob), else the backbone's config."""
    meta_url = storage.join(point_url, "point.json")
    if storage.exists(meta_url):
        meta = storage.read_json(meta_url)
        return {"composition": meta.get("composition") or "+".join(meta.get("zoos", [])),
                "zoos": list(meta.get("zoos", [])), "zoo_size": int(meta.get("zoo_size", -1)),
                "axes": dict(meta.get("axes", {}))}
    backbone = str(results.get("backbone", ""))
    data: dict[str, Any] = {}
    config_url = storage.join(backbone, "config.json") if backbone else ""
    if config_url and storage.exists(config_url):  # a run dir and every checkpoint hold config.json
        data = storage.read_json(config_url).get("data", {})
    if not data and not backbone:
        raise DataError(f"point '{name}' has neither point.json nor a 'backbone' in evaluate/results.json; "
                        "re-run the point with the chart or `mzsane evaluate`")
    zoos = list(data.get("zoos", []))
    return {"composition": "+".join(zoos) or "all", "zoos": zoos,
            "zoo_size": int(data.get("num_models_per_zoo", -1)), "axes": {}}


def target_results(point_url: str) -> list[tuple[str, bool]]:
    """(results.json URL, is the first target) of every target a point evaluated: ``evaluate/`` for the first,
    ``targets/{zoo}/evaluate/`` for each of the chart's ``sweep.extraTargetZoos``, and for each of them the
    evaluation with another anchor pool where the point ran one (``anchors-seen/evaluate/`` beside it)."""
    bases = [(point_url, True)]
    extra_root = storage.join(point_url, "targets")
    bases += [(storage.join(extra_root, zoo), False)
              for zoo in (storage.listdir(extra_root) if storage.isdir(extra_root) else [])]
    out = []
    for base, first in bases:
        for folder in ("", *POOL_FOLDERS.values()):
            url = storage.join(base, *([folder] if folder else []), "evaluate", "results.json")
            if storage.exists(url):
                out.append((url, first))
    return out


def collect(url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (point, target, method) from ``{url}/{point}/evaluate/results.json`` and each extra target's
    ``{url}/{point}/targets/{zoo}/evaluate/results.json``; plus points without results."""
    if not storage.isdir(url):
        raise DataError(f"sweep results folder '{url}' does not exist; pass {{storage.root}}/sweeps/{{sweep}}")
    rows, pending = [], []
    for name in storage.listdir(url):
        point_url = storage.join(url, name)
        if not storage.isdir(point_url):
            continue
        if not storage.exists(storage.join(point_url, "evaluate", "results.json")):
            pending.append(name)
            continue
        for results_url, first in target_results(point_url):
            rows += _rows(point_url, name, storage.read_json(results_url), first)
    return rows, pending


def _rows(point_url: str, name: str, results: dict[str, Any], first_target: bool) -> list[dict[str, Any]]:
    """The rows of one point's evaluation of one target."""
    rows = []
    meta = _point_meta(point_url, name, results)
    probe = _probe_columns(point_url, str(results.get("target_zoo", "")), exact=not first_target)
    setting = {k: v for k, v in meta["axes"].items() if k not in REPLICATE_PATHS}
    seeds = [meta["axes"][k] for k in REPLICATE_PATHS if k in meta["axes"]]
    pool = anchor_pool(results)
    from mzsane.evaluate.report import best_reconstruction  # torch comes with it: only when a report is made

    for method in [*results.get("rows", []), *best_reconstruction(results), *_finetuned(results)]:
        rows.append({
            "point": name, "composition": meta["composition"], "num_zoos": len(meta["zoos"]),
            "zoos": "+".join(meta["zoos"]), "zoo_size": meta["zoo_size"],
            "axes": ",".join(f"{k}={v}" for k, v in sorted(setting.items())),
            "seed": ",".join(str(x) for x in dict.fromkeys(seeds)), **probe,
            "target_zoo": results.get("target_zoo", ""), "dataset": results.get("dataset", ""),
            "in_distribution": bool(results.get("in_distribution", False)), "anchor_pool": pool,
            "method": method.get("method", ""), "budget": method.get("budget", ""),
            "test_acc_mean": float(method.get("test_acc_mean", float("nan"))),
            "test_acc_std": float(method.get("test_acc_std", 0.0) or 0.0), "n": int(method.get("n", 0) or 0),
        })
    return rows


def anchor_pool(results: dict[str, Any]) -> str:
    """The pool the evaluated anchors came from (``evaluate.report.anchor_pool_of``)."""
    from mzsane.evaluate.report import anchor_pool_of  # torch comes with it: only when a report is made

    return anchor_pool_of(results)


def _finetuned(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each fine-tuning start's accuracy after the last fine-tuning epoch, as ``finetuned_<start>`` rows."""
    curves = (results.get("finetune") or {}).get("curves") or {}
    return [{"method": f"{FINETUNED_PREFIX}{start}", "test_acc_mean": c["test_acc_mean"][-1],
             "test_acc_std": c["test_acc_std"][-1], "n": c.get("n", 0),
             "budget": hypernet_budget(results) if start == "hypernet" else ""}
            for start, c in curves.items() if c.get("test_acc_mean")]


def hypernet_budget(results: dict[str, Any]) -> str:
    """The HyperNetwork start's training budget, stated beside its row: steps x images per step (its data)."""
    settings = ((results.get("finetune") or {}).get("hypernet") or {}).get("settings") or {}
    if not settings.get("steps"):
        return ""
    images = int(settings.get("max_train_images", -1))
    return (f"{int(settings['steps'])} steps x {int(settings.get('batch_size', 64))} images"
            + (f" of {images:,}" if images > 0 else " of the train split"))


def _ci95(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t interval of the mean; NaN for fewer than two values."""
    if values.size < 2:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, values.size - 1) * values.std(ddof=1) / np.sqrt(values.size))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, method): mean over the setting's seeds, the 95% half-width, the seed count."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["num_zoos"], row["composition"], row["zoos"], row["zoo_size"], row["axes"], row["target_zoo"],
               row["dataset"], row["in_distribution"], row["method"], row.get("anchor_pool", "held_out"))
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: (*kv[0][:5], kv[0][9] != "held_out", kv[0][8])):
        acc = np.array([m["test_acc_mean"] for m in members], dtype=float)
        entry = dict(zip(("num_zoos", "composition", "zoos", "zoo_size", "axes", "target_zoo", "dataset",
                          "in_distribution", "method", "anchor_pool"), key))
        entry.update({"test_acc_mean": float(np.nanmean(acc)), "test_acc_ci95": _ci95(acc[np.isfinite(acc)]),
                      "test_acc_seed_std": float(np.nanstd(acc, ddof=1)) if acc.size > 1 else float("nan"),
                      "n_seeds": len(members), "seeds": ",".join(str(m["seed"]) for m in members),
                      "budget": " / ".join(dict.fromkeys(m.get("budget", "") for m in members if m.get("budget")))})
        for col in PROBE_COLUMNS:
            vals = np.array([m[col] for m in members], dtype=float)
            entry[col] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        out.append(entry)
    return out


def summary_table(summary: list[dict[str, Any]]) -> str:
    """One line per setting: generated (mean +- 95% over seeds) beside its selection pool, its ceiling and
    the selected baselines, the fine-tuned starts (after ``evaluate.finetune_epochs``), plus the probe axis."""
    by: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in sorted(summary, key=lambda r: (not r["in_distribution"], r["target_zoo"])):  # ID targets first
        target = f"{row['target_zoo']} ({'ID' if row['in_distribution'] else 'OOD'})"
        if row.get("anchor_pool", "held_out") != "held_out":  # the held-out headline; pools: pool_table
            continue
        by.setdefault((target, row["composition"], row["zoo_size"], row["axes"]), {})[row["method"]] = row
    head = ["target", "composition", "zoo_size", "axes", "seeds", *SUMMARY_METHODS, "probe R2 emb",
            "probe R2 wstats"]
    cells = []
    for (target, composition, size, axes), methods in by.items():
        gen = methods.get(ZERO_SHOT_METHOD) or next(iter(methods.values()))
        line = [target, composition, str(size), axes or "-", str(gen["n_seeds"])]
        for m in SUMMARY_METHODS:
            r = methods.get(m)
            if r is None:
                line.append("-")
            else:
                line.append(_mean_ci(r) + (f" ({r['budget']})" if r.get("budget") else ""))
        line += [_cell(gen["probe_r2_embedding"]), _cell(gen["probe_r2_weight_stats"])]
        cells.append(line)
    return format_table_cells(head, cells)


def _mean_ci(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    if np.isfinite(row["test_acc_ci95"]):
        return f"{row['test_acc_mean']:.3f} ± {row['test_acc_ci95']:.3f}"
    return f"{row['test_acc_mean']:.3f}"


def pool_table(summary: list[dict[str, Any]]) -> str:
    """One line per setting and target: for each anchor pool (held-out, then seen: the paper's protocol) the
    generated top-k beside its ceiling, the mean and the best anchor's noise-free reconstruction; empty when
    every point ran held-out anchors only."""
    pools = sorted({r.get("anchor_pool", "held_out") for r in summary}, key=lambda p: (p != "held_out", p))
    if pools == ["held_out"]:
        return ""
    by: dict[tuple, dict[tuple[str, str], dict[str, Any]]] = {}
    for row in sorted(summary, key=lambda r: (not r["in_distribution"], r["target_zoo"])):
        target = f"{row['target_zoo']} ({'ID' if row['in_distribution'] else 'OOD'})"
        key = (target, row["composition"], row["zoo_size"], row["axes"])
        by.setdefault(key, {})[(row.get("anchor_pool", "held_out"), row["method"])] = row
    head = ["target", "composition", "zoo_size", "axes"] + [f"{pool}: {m}" for pool in pools for m in POOL_COLUMNS]
    cells = [[*(str(k) if k != "" else "-" for k in key)] + [_mean_ci(methods.get((pool, m))) for pool in pools
                                                             for m in POOL_COLUMNS]
             for key, methods in by.items()]
    return format_table_cells(head, cells)


def format_table_cells(head: list[str], cells: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths)) for c in cells]
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return format_table_cells(columns, [[_cell(row.get(c)) for c in columns] for row in rows])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.4f}"
    return "-" if value is None else str(value)


def _plot(summary: list[dict[str, Any]], title: str, column: str = "test_acc_mean",
          ylabel: str = "zero-shot test accuracy (mean over seeds, 95% CI)") -> Any:
    """Figure-3 view: a setting's value vs zoo size, one line per composition (and non-seed axes), one panel
    per target zoo (in-distribution targets first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for row in summary:
        if row["method"] == ZERO_SHOT_METHOD and row["zoo_size"] > 0 and np.isfinite(row[column]) \
                and row.get("anchor_pool", "held_out") == "held_out":  # the plot is the held-out headline
            label = row["composition"] + (f" ({row['axes']})" if row["axes"] else "")
            target = (not row["in_distribution"], row["target_zoo"])
            panels.setdefault(target, {}).setdefault(label, []).append(row)
    keys = sorted(panels) or [(False, "")]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.2), dpi=120, squeeze=False)
    for ax, key in zip(axes[0], keys):
        lines = panels.get(key, {})
        sizes = sorted({p["zoo_size"] for points in lines.values() for p in points})
        if len(sizes) == 1 and len(lines) > 1:  # one zoo size: the settings side by side instead of a line each
            _plot_settings(ax, lines, column, ylabel, f"{title}\ntarget {key[1]} ({'OOD' if key[0] else 'ID'})",
                           sizes[0])
            continue
        for label, points in sorted(lines.items(), key=lambda kv: (kv[1][0]["num_zoos"], kv[0])):
            points.sort(key=lambda r: r["zoo_size"])
            yerr = [p["test_acc_ci95"] if column == "test_acc_mean" and np.isfinite(p["test_acc_ci95"]) else 0.0
                    for p in points]
            ax.errorbar([p["zoo_size"] for p in points], [p[column] for p in points], yerr=yerr, marker="o",
                        capsize=3, label=label)
        if sizes and sizes[-1] >= 4 * sizes[0]:  # doubling sizes (4, 8, 16, 32) read evenly on a log axis
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(x) for x in sizes])
        ax.set_xlabel("zoo size (models per zoo)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\ntarget {key[1]} ({'OOD' if key[0] else 'ID'})" if key[1] else title)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(title="composition", fontsize=8)
    fig.tight_layout()
    return fig


def _plot_settings(ax: Any, lines: dict[str, list[dict[str, Any]]], column: str, ylabel: str, title: str,
                   size: int) -> None:
    """A panel of one zoo size: each setting (composition, axes) at its own x position, with its 95% interval."""
    ordered = sorted(lines.items(), key=lambda kv: (kv[1][0]["num_zoos"], kv[0]))
    xs = list(range(len(ordered)))
    ys = [points[0][column] for _, points in ordered]
    yerr = [p[0]["test_acc_ci95"] if column == "test_acc_mean" and np.isfinite(p[0]["test_acc_ci95"]) else 0.0
            for _, p in ordered]
    ax.errorbar(xs, ys, yerr=yerr, fmt="o", capsize=4)
    compositions = {points[0]["composition"] for _, points in ordered}
    names = [points[0]["axes"] or label for label, points in ordered] if len(compositions) == 1 else \
        [label for label, _ in ordered]  # one composition: the axes tell the settings apart
    names = [n.split("=", 1)[1] if n.count("=") == 1 else n for n in names]  # one axis: its values alone
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    first = ordered[0][1][0]
    common = f"{first['composition']}, " if len(compositions) == 1 else ""
    ax.set_xlabel(f"setting ({common}zoo size {size})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


REPORT_COLUMNS = ["point", "composition", "num_zoos", "zoos", "zoo_size", "axes", "seed", "target_zoo", "dataset",
                  "in_distribution", "anchor_pool", "method", "budget", "test_acc_mean", "test_acc_std", "n",
                  *PROBE_COLUMNS]
SUMMARY_COLUMNS = ["composition", "num_zoos", "zoos", "zoo_size", "axes", "target_zoo", "dataset", "in_distribution",
                   "anchor_pool", "method", "budget", "test_acc_mean", "test_acc_ci95", "test_acc_seed_std", "n_seeds",
                   "seeds", *PROBE_COLUMNS]


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def report(url: str, out: str = "", baseline: str = "") -> dict[str, Any]:
    """Collect every point's results into rows, ``sweep_results.csv`` and ``sweep_zero_shot.png`` under ``out``,
    and every setting against ``baseline`` (a substring of a setting's label, empty = the first) paired by seed
    in ``sweep_paired.csv`` (``mzsane.sweep.paired``)."""
    url = url.rstrip("/")
    rows, pending = collect(url)
    if not rows:
        raise DataError(f"no evaluate/results.json under '{url}/*/' yet ({len(pending)} points pending); "
                        "wait for `mzsane sweep status` to show SUCCEEDED")
    rows.sort(key=lambda r: (r["num_zoos"], r["composition"], r["axes"], r["zoo_size"], str(r["seed"]), r["method"]))
    summary = aggregate(rows)
    out, name = (out or url).rstrip("/"), url.rsplit("/", 1)[-1]
    csv_url, png_url = storage.join(out, "sweep_results.csv"), storage.join(out, "sweep_zero_shot.png")
    summary_url = storage.join(out, "sweep_summary.csv")
    storage.write_text(csv_url, _csv(rows, REPORT_COLUMNS))
    storage.write_text(summary_url, _csv(summary, SUMMARY_COLUMNS))
    storage.write_figure(png_url, _plot(summary, f"sweep {name}: zero-shot accuracy"), dpi="figure")
    paired_rows = [c.as_dict() for c in paired.compare_settings(rows, ZERO_SHOT_METHOD, baseline)]
    paired_url = storage.join(out, "sweep_paired.csv")
    storage.write_text(paired_url, _csv(paired_rows, paired.COLUMNS))
    result = {"rows": rows, "summary": summary, "pending": pending, "csv": csv_url, "summary_csv": summary_url,
              "png": png_url, "paired": paired_rows, "paired_csv": paired_url}
    if any(np.isfinite(r["probe_r2_embedding"]) for r in summary):
        result["probe_png"] = storage.join(out, "sweep_probe.png")
        probe = _plot(summary, f"sweep {name}: probe of test accuracy", "probe_r2_embedding",
                      "probe R^2 (embeddings), held-out models")
        storage.write_figure(result["probe_png"], probe, dpi="figure")
    return result


def report_cli(args: argparse.Namespace) -> None:
    result = report(args.url, args.out, getattr(args, "baseline", ""))
    zero_shot = [r for r in result["rows"] if r["method"] == ZERO_SHOT_METHOD] or result["rows"]
    print(format_table(zero_shot, ["target_zoo", "composition", "zoo_size", "axes", "seed", "point", "anchor_pool",
                                    "method", "test_acc_mean", "test_acc_std", "n", "probe_r2_embedding"]))
    print("\nper setting (test accuracy, mean ± 95% half-width over seeds; generated = top-k by validation; "
          "finetuned_* = after evaluate.finetune_epochs of fine-tuning from that start):")
    print(summary_table(result["summary"]))
    pools = pool_table(result["summary"])
    if pools:
        print("\nby anchor pool (held_out: anchors the backbone never trained on, the headline; seen: anchors it "
              "trained on, the paper's protocol; reconstruction = the anchors' mean noise-free decode(encode(anchor)), "
              "reconstruction_best = the best anchor's):")
        print(pools)
    if result["paired"]:
        print(f"\npaired by seed ({ZERO_SHOT_METHOD}, a - b; p_t: paired t-test, two-sided; p_sign_flip: exact "
              f"sign-flip test, whose smallest p at n pairs is 2/2^n; '{paired.NOT_DISTINGUISHABLE}' when p_t >= "
              f"{paired.ALPHA}):")
        print(paired.format_comparisons([paired.Comparison(**c) for c in result["paired"]]))
    if result["pending"]:
        print(f"pending (no results yet): {', '.join(result['pending'])}")
    wrote = [result["csv"], result["summary_csv"], result["paired_csv"], result["png"], result.get("probe_png", "")]
    print(f"wrote {', '.join(w for w in wrote if w)}")
