"""Markdown tables for docs/results.md from finished sweeps (``mzsane sweep run`` or a cluster's results).

Usage: .venv/bin/python docs/results/sweep_tables.py mzsane-data/sweeps/zoo-size [more sweep folders]
       .venv/bin/python docs/results/sweep_tables.py mzsane-data/sweeps/zoo-size-equal-steps \
           --baseline 'mnist n=32' --baseline-from mzsane-data/sweeps/zoo-size
       .venv/bin/python docs/results/sweep_tables.py --causes mzsane-data/sweeps/causes \
           mzsane-data/sweeps/causes-aligned

Per sweep: the per-setting table of ``mzsane sweep report`` (mean ± 95% t half-width over seeds) for each
target (held-out anchors; seen anchors, the paper's protocol, in a table of their own), every setting against
a baseline paired by seed (``--baseline``), the candidate distribution before selection, weight averaging
against generation as the soup grows, fine-tuned starts, the novelty verdicts and the exposure (passes per
zoo) the budget gave.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from mzsane import storage, sweep
from mzsane.sweep import paired

COLUMNS = ("generated", "generated_unselected", "reconstruction", "reconstruction_best", "anchors", "anchors_selected",
           "soup_aligned", "soup_best", "random")
SEEN_COLUMNS = ("generated", "reconstruction", "reconstruction_best", "anchors")  # the paper's protocol
FINETUNED = ("finetuned_generated", "finetuned_anchors", "finetuned_hypernet", "finetuned_random")


def _ci(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.3f}"
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return f"{mean:.3f} ± {half:.3f}"


def _setting(row: dict) -> tuple:
    return (not row["in_distribution"], row["target_zoo"], row["num_zoos"], row["composition"], row["zoo_size"],
            row["axes"])


def _pool(rows: list[dict], pool: str) -> list[dict]:
    return [r for r in rows if r.get("anchor_pool", "held_out") == pool]


def _label(key: tuple) -> list[str]:
    ood, target, _, composition, size, axes = key
    return [f"{target} ({'OOD' if ood else 'ID'})", composition, str(size), axes or "-"]


def per_setting(rows: list[dict], methods: tuple[str, ...]) -> str:
    by: dict[tuple, dict[str, list[float]]] = {}
    seeds: dict[tuple, set] = {}
    for r in rows:
        by.setdefault(_setting(r), {}).setdefault(r["method"], []).append(r["test_acc_mean"])
        seeds.setdefault(_setting(r), set()).add(r["seed"])
    head = ["target", "composition", "zoo size", "axes", "seeds", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(by):
        cells = [_ci(by[key].get(m, [])) for m in methods]
        lines.append("| " + " | ".join([*_label(key), str(len(seeds[key])), *cells]) + " |")
    return "\n".join(lines)


def _results(url: str) -> list[tuple[str, dict]]:
    out = []
    for point in storage.listdir(url):
        for results_url, _ in sweep.results.target_results(storage.join(url, point)):
            if storage.exists(results_url):
                out.append((point, storage.read_json(results_url)))
    return out


def details(url: str, rows: list[dict]) -> str:
    """Candidates before selection, soups vs generation, novelty and exposure, per setting (means over seeds)."""
    meta = {(r["point"], r["target_zoo"]): _setting(r) for r in rows}
    acc: dict[tuple, dict[str, list[float]]] = {}
    verdicts: dict[tuple, list[str]] = {}
    for point, res in _results(url):
        if sweep.results.anchor_pool(res) != "held_out":  # the seen-anchor evaluation: its own table
            continue
        key = meta.get((point, res.get("target_zoo", "")))
        if key is None:
            continue
        slot = acc.setdefault(key, {})
        cand = (res.get("candidates") or {}).get("val_acc") or {}
        for q in ("mean", "median", "q10", "q90"):
            if q in cand:
                slot.setdefault(f"cand_{q}", []).append(float(cand[q]))
        for s in res.get("soup_curve") or []:
            slot.setdefault(f"soup{'_aligned' if s['aligned'] else ''}_{s['n']}", []).append(float(s["test_acc"]))
        nov = ((res.get("novelty") or {}).get("matched") or {})
        if "median_distance_ratio" in nov:
            slot.setdefault("distance_ratio", []).append(float(nov["median_distance_ratio"]))
        if nov.get("verdict"):
            verdicts.setdefault(key, []).append(str(nov["verdict"]).split(":")[0])
        for zoo, e in ((res.get("exposure") or {}).get("zoos") or {}).items():
            slot.setdefault(f"passes {zoo}", []).append(float(e.get("passes", float("nan"))))
        steps = ((res.get("exposure") or {}).get("budget") or {}).get("num_steps")
        if steps:
            slot.setdefault("steps", []).append(float(steps))
    sizes = sorted({int(k.split("_")[-1]) for v in acc.values() for k in v if k.startswith("soup_aligned_")})
    head = ["target", "composition", "zoo size", "axes", "steps", "candidates val: mean / median / q10 / q90",
            *(f"aligned soup of {n}" for n in sizes), "distance ratio (gen→anchor / zoo pairs)", "novelty verdicts"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(acc):
        slot = acc[key]

        def mean(k: str, slot: dict = slot) -> float:
            return float(np.mean(slot[k])) if slot.get(k) else float("nan")
        cand = " / ".join(f"{mean('cand_' + q):.3f}" for q in ("mean", "median", "q10", "q90"))
        soups = [_ci(slot.get(f"soup_aligned_{n}", [])) for n in sizes]
        counts: dict[str, int] = {}
        for v in verdicts.get(key, []):
            counts[v] = counts.get(v, 0) + 1
        lines.append("| " + " | ".join([*_label(key), f"{mean('steps'):.0f}", cand, *soups,
                                        _ci(slot.get("distance_ratio", [])),
                                        ", ".join(f"{v} x{n}" for v, n in sorted(counts.items())) or "-"]) + " |")
    return "\n".join(lines)


def _by_seed(rows: list[dict], ood: bool, pool: str, method: str) -> dict[str, dict]:
    """{setting label: {seed: accuracy}} of one target kind, anchor pool and method."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["method"] == method and r.get("anchor_pool", "held_out") == pool and (not r["in_distribution"]) == ood:
            out.setdefault(r["axes"] or "-", {})[r["seed"]] = r["test_acc_mean"]
    return out


def cause_table(urls: list[str]) -> str:
    """One row per cause (a setting of the first sweep's axes, or a whole other sweep, e.g. the aligned one),
    each against the baseline (the first sweep's setting without axes) paired by seed: held-out generation in and
    out of distribution, its ceiling, the seen-anchor protocol, each difference with its paired t-test p."""
    rows = []
    for i, url in enumerate(urls):
        found, _ = sweep.collect(url)
        name = os.path.basename(url.rstrip("/"))
        rows += [{**r, "axes": r["axes"] or (name if i else "")} for r in found]
    cols = [("ID held-out generated", False, "held_out", "generated"),
            ("ID held-out ceiling", False, "held_out", "reconstruction"),
            ("ID seen generated (paper's protocol)", False, "seen", "generated"),
            ("OOD held-out generated", True, "held_out", "generated")]
    data = [_by_seed(rows, ood, pool, method) for _, ood, pool, method in cols]
    head = ["cause (changed alone)", "seeds", *(c[0] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in sorted(data[0], key=lambda k: (k != "-", k)):
        cells = []
        for col in data:
            accs, base = col.get(label, {}), col.get("-", {})
            cell = _ci(list(accs.values()))
            if label != "-" and accs and base:
                c = paired.compare(accs, base)
                p = "-" if math.isnan(c.p_t) else f"{c.p_t:.2f}" if c.p_t >= 0.01 else f"{c.p_t:.1g}"
                cell += f" ({c.mean_diff:+.3f}, p {p})"
            cells.append(cell)
        lines.append("| " + " | ".join([label if label != "-" else "baseline", str(len(data[0][label])), *cells])
                     + " |")
    return "\n".join(lines)


def finetune_starts(rows: list[dict]) -> str:
    """Every fine-tuning start against the generated one, per setting, paired by seed: generated minus the start."""
    starts = [m for m in FINETUNED if m != "finetuned_generated"]
    head = "| target | composition | zoo size | axes | generated | " + " | ".join(m[len("finetuned_"):] for m in starts)
    lines = [head + " |", "|" + "---|" * (5 + len(starts))]
    for key in sorted({_setting(r) for r in rows if r["method"] == "finetuned_generated"}):
        by_method = {m: {r["seed"]: r["test_acc_mean"] for r in rows if _setting(r) == key and r["method"] == m}
                     for m in FINETUNED}
        cells = [_ci(list(by_method["finetuned_generated"].values()))]
        for m in starts:
            c = paired.compare(by_method["finetuned_generated"], by_method[m])
            p = "-" if math.isnan(c.p_t) else f"{c.p_t:.2f}" if c.p_t >= 0.01 else f"{c.p_t:.1g}"
            cells.append(f"{_ci(list(by_method[m].values()))} ({c.mean_diff:+.3f}, p {p})" if c.n_pairs else "-")
        lines.append("| " + " | ".join([*_label(key), *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", help="sweep result folders, {storage.root}/sweeps/{sweep}")
    ap.add_argument("--baseline", default="", help="setting the others are compared with, paired by seed (a "
                    "substring of its label, e.g. 'mnist n=8'; default: the first)")
    ap.add_argument("--method", default="generated", help="the row the paired comparison compares")
    ap.add_argument("--baseline-from", default="", metavar="SWEEP", help="take the --baseline setting's points from "
                    "this sweep folder too (a control sweep paired with its base sweep's point, e.g. zoo-size's "
                    "size 32 for zoo-size-equal-steps)")
    ap.add_argument("--causes", action="store_true", help="one cause table over the sweeps (issue 26): each setting "
                    "of the first, and each further sweep, against the first's setting without axes, paired by seed")
    args = ap.parse_args()
    if args.causes:
        print(cause_table(args.sweeps))
        return
    for url in args.sweeps:
        rows, pending = sweep.collect(url)
        seen, rows = _pool(rows, "seen"), _pool(rows, "held_out")
        print(f"### {os.path.basename(url.rstrip('/'))}" + (f" (pending: {', '.join(pending)})" if pending else ""))
        print("\nZero-shot test accuracy, held-out anchors:\n")
        print(per_setting(rows, COLUMNS))
        if seen:
            print("\nZero-shot test accuracy, seen anchors (the paper's protocol):\n")
            print(per_setting(seen, SEEN_COLUMNS))
        pairable = rows + seen
        if args.baseline_from:  # the baseline's own points, from the sweep they ran in
            extra, _ = sweep.collect(args.baseline_from)
            pairable += [r for r in extra if args.baseline in paired.setting_label(r)]
        comparisons = paired.compare_settings(pairable, args.method, args.baseline)
        if comparisons:
            print(f"\nPaired by seed against the baseline ({args.method}; p_t: paired t-test, p_sign_flip: exact "
                  "sign-flip test):\n")
            print(paired.format_comparisons(comparisons))
        if any(r["method"] in FINETUNED for r in rows):
            print("\nAfter fine-tuning (test accuracy at the last fine-tuning epoch):\n")
            print(per_setting([r for r in rows if r["method"] in FINETUNED], FINETUNED))
            print("\nFine-tuning starts against the generated one (generated minus the start, paired by seed):\n")
            print(finetune_starts(rows))
        print("\nBefore selection, weight averaging, novelty:\n")
        print(details(url, rows))
        print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
