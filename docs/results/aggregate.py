"""Markdown tables for docs/results.md from the stage markers of measure_single_vs_multi.py.

Usage: .venv/bin/python docs/results/aggregate.py ROOT [--epochs 150]
Mean over seeds with a 95% t-interval (half-width; "n/a" with one seed) and the per-seed values.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}
METHODS = ("generated", "generated_unselected", "reconstruction", "anchors", "anchors_selected", "soup_aligned",
           "random")


def ci(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return f"{mean:.3f} ± {T95.get(n - 1, 2.0) * sd / math.sqrt(n):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--epochs", default="150")
    a = ap.parse_args()
    marks = os.path.join(os.path.abspath(a.root), "issue13", "stages")
    cells: dict = {}
    info: dict = {}
    for path in sorted(glob.glob(os.path.join(marks, f"evaluate-*-e{a.epochs}-s*-*.json"))):
        name = os.path.basename(path)[len("evaluate-"):-len(".json")]
        backbone, rest = name.split("-e", 1)
        seed = int(rest.split("-s", 1)[1].split("-", 1)[0])
        target = rest.split("-s", 1)[1].split("-", 1)[1]
        with open(path) as fh:
            marker = json.load(fh)
        res = marker["result"]
        key = (target, backbone)
        for r in res["rows"]:
            cells.setdefault(key, {}).setdefault(r["method"], []).append(r["test_acc_mean"])
        info.setdefault(key, []).append({"seed": seed, "held_out": res["headline"]["anchors_held_out"],
                                         "cand": res["candidates"]["val_acc"], "verdict": res["matched"]["verdict"],
                                         "ratios": (res["matched"].get("median_distance_ratio"),
                                                    res["matched"].get("median_disagreement_ratio")),
                                         "eval_s": marker["wall_s"]})
    seeds = {k: sorted(i["seed"] for i in v) for k, v in info.items()}
    print("| target | backbone | seeds | anchors | " + " | ".join(METHODS) + " |")
    print("|---" * (4 + len(METHODS)) + "|")
    for (target, backbone), by in sorted(cells.items(), key=lambda kv: (kv[0][0] != "mnist-cnn_s", kv[0][1])):
        held = all(i["held_out"] for i in info[(target, backbone)])
        vals = " | ".join(ci(by[m]) if m in by else "-" for m in METHODS)
        print(f"| {target} | {backbone} | {seeds[(target, backbone)]} | {'held-out' if held else 'SEEN'} | {vals} |")
    print()
    print("| target | backbone | seed | candidate val acc mean / median / q10 / q90 | novelty verdict "
          "(distance / disagreement ratio vs matched zoo pairs) | per-seed generated (top-k) |")
    print("|---|---|---|---|---|---|")
    for (target, backbone), items in sorted(info.items()):
        for i, it in enumerate(sorted(items, key=lambda x: x["seed"])):
            c = it["cand"]
            r = it["ratios"]
            ratios = f"{r[0]:.2f} / {r[1]:.2f}" if r[0] is not None else "-"
            print(f"| {target} | {backbone} | {it['seed']} | {c['mean']:.3f} / {c['median']:.3f} / {c['q10']:.3f} / "
                  f"{c['q90']:.3f} | {it['verdict']} ({ratios}) | {cells[(target, backbone)]['generated'][i]:.3f} |")
    print()
    for path in sorted(glob.glob(os.path.join(marks, f"train-*-e{a.epochs}-s*.json"))):
        with open(path) as fh:
            run = json.load(fh)
        with open(os.path.join(run["result"], "exposure.json")) as fh:
            exp = json.load(fh)
        b = exp["budget"]
        zoos = ", ".join(f"{z}: {v['rows']} rows, {v['passes']:.0f} passes, {v['entry_share']:.0%} of entries"
                         for z, v in exp["zoos"].items())
        print(f"- {os.path.basename(path)[6:-5]}: {b['num_steps']} steps x {b['samples_per_step']} windows "
              f"({b['epochs_covered']:.0f} epochs over {b['rows']} rows), {run['wall_s']:.0f} s; {zoos}")


if __name__ == "__main__":
    main()
