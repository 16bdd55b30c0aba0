"""The sweep report: every point's ``evaluate/results.json`` as one table, a CSV and the Figure-3 plot.

Why no cluster here: ``report`` reads ``{sweep}/{point}/evaluate/results.json`` through
``mzsane.storage``, so the same report follows a KubeRay sweep (S3) and a ``sweep run`` (local folder).
The plot is the paper's Figure-3 view (zero-shot accuracy vs zoo size, one line per composition).
"""
from __future__ import annotations

import argparse
import csv
import io
from typing import Any

from mzsane import storage
from mzsane.errors import DataError

ZERO_SHOT_METHOD = "generated"


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


def collect(url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (point, method) from ``{url}/{point}/evaluate/results.json``; plus points without results."""
    if not storage.isdir(url):
        raise DataError(f"sweep results folder '{url}' does not exist; pass {{storage.root}}/sweeps/{{sweep}}")
    rows, pending = [], []
    for name in storage.listdir(url):
        point_url = storage.join(url, name)
        results_url = storage.join(point_url, "evaluate", "results.json")
        if not storage.isdir(point_url):
            continue
        if not storage.exists(results_url):
            pending.append(name)
            continue
        results = storage.read_json(results_url)
        meta = _point_meta(point_url, name, results)
        for method in results.get("rows", []):
            rows.append({
                "point": name, "composition": meta["composition"], "num_zoos": len(meta["zoos"]),
                "zoos": "+".join(meta["zoos"]), "zoo_size": meta["zoo_size"],
                "axes": ",".join(f"{k}={v}" for k, v in sorted(meta["axes"].items())),
                "target_zoo": results.get("target_zoo", ""), "dataset": results.get("dataset", ""),
                "in_distribution": bool(results.get("in_distribution", False)),
                "method": method.get("method", ""), "test_acc_mean": float(method.get("test_acc_mean", float("nan"))),
                "test_acc_std": float(method.get("test_acc_std", 0.0) or 0.0), "n": int(method.get("n", 0) or 0),
            })
    return rows, pending


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """Figure-3 view: zero-shot test accuracy of generated models vs zoo size, one line per composition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] == ZERO_SHOT_METHOD and row["zoo_size"] > 0:
            label = row["composition"] + (f" ({row['axes']})" if row["axes"] else "")
            lines.setdefault(label, []).append(row)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, points in sorted(lines.items(), key=lambda kv: (kv[1][0]["num_zoos"], kv[0])):
        points.sort(key=lambda r: r["zoo_size"])
        ax.errorbar([p["zoo_size"] for p in points], [p["test_acc_mean"] for p in points],
                    yerr=[p["test_acc_std"] for p in points], marker="o", capsize=3, label=label)
    ax.set_xlabel("zoo size (models per zoo)")
    ax.set_ylabel("zero-shot test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(title="composition", fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


REPORT_COLUMNS = ["point", "composition", "num_zoos", "zoos", "zoo_size", "axes", "target_zoo", "dataset",
                  "in_distribution", "method", "test_acc_mean", "test_acc_std", "n"]


def report(url: str, out: str = "") -> dict[str, Any]:
    """Collect every point's results into rows, ``sweep_results.csv`` and ``sweep_zero_shot.png`` under ``out``."""
    url = url.rstrip("/")
    rows, pending = collect(url)
    if not rows:
        raise DataError(f"no evaluate/results.json under '{url}/*/' yet ({len(pending)} points pending); "
                        "wait for `mzsane sweep status` to show SUCCEEDED")
    rows.sort(key=lambda r: (r["num_zoos"], r["composition"], r["axes"], r["zoo_size"], r["method"]))
    out = (out or url).rstrip("/")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_url, png_url = storage.join(out, "sweep_results.csv"), storage.join(out, "sweep_zero_shot.png")
    storage.write_text(csv_url, text.getvalue())
    storage.write_bytes(png_url, _plot(rows, f"sweep {url.rsplit('/', 1)[-1]}: zero-shot accuracy vs zoo size"))
    return {"rows": rows, "pending": pending, "csv": csv_url, "png": png_url}


def report_cli(args: argparse.Namespace) -> None:
    result = report(args.url, args.out)
    zero_shot = [r for r in result["rows"] if r["method"] == ZERO_SHOT_METHOD] or result["rows"]
    print(format_table(zero_shot, ["composition", "zoo_size", "axes", "point", "method", "test_acc_mean",
                                    "test_acc_std", "n"]))
    if result["pending"]:
        print(f"pending (no results yet): {', '.join(result['pending'])}")
    print(f"wrote {result['csv']} and {result['png']}")
