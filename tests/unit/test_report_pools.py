"""The sweep report carries seen- and held-out-anchor figures side by side, each with its ceiling (the mean and
the best anchor's noise-free reconstruction), read from a point's ``anchors-seen/`` sibling evaluation."""
from __future__ import annotations

import csv
import io

import pytest

from mzsane import storage, sweep
from mzsane.sweep import results as report_mod
from tests.fixtures.results_scripts import load_results_script


def _results(pool: str | None, generated: float, recon: list[float]) -> dict:
    out = {"target_zoo": "mnist-cnn_s", "dataset": "mnist", "in_distribution": True, "backbone": "x",
           "rows": [{"method": "generated", "test_acc_mean": generated, "test_acc_std": 0.0, "n": 10},
                    {"method": "reconstruction", "test_acc_mean": sum(recon) / len(recon), "test_acc_std": 0.0,
                     "n": len(recon)}],
           "per_model": {"reconstruction": recon}}
    if pool is not None:  # results written before the pool was recorded have none: held out
        out["headline"] = {"method": "generated", "anchor_pool": pool}
    return out


def _sweep(root: str) -> str:
    url = storage.join(root, "sweeps", "pools")
    for seed in (0, 1):
        point = storage.join(url, f"n8-mnist-{seed}")
        storage.write_json(storage.join(point, "point.json"), {
            "composition": "mnist", "zoo_size": 8, "zoos": ["mnist-cnn_s"],
            "axes": dict.fromkeys(sweep.schema.SEED_PATHS, seed)})
        storage.write_json(storage.join(point, "evaluate", "results.json"),
                           _results(None if seed else "held_out", 0.70 + 0.02 * seed, [0.50, 0.62 + seed * 0.1]))
        storage.write_json(storage.join(point, "anchors-seen", "evaluate", "results.json"),
                           _results("seen", 0.88 + 0.02 * seed, [0.86, 0.90 + seed * 0.01]))
    return url


def test_seen_and_held_out_anchors_are_separate_settings_each_with_both_ceilings(tmp_path, capsys):
    result = sweep.report(_sweep(str(tmp_path)))
    summary = {(r["anchor_pool"], r["method"]): r for r in result["summary"]}
    assert summary[("held_out", "generated")]["test_acc_mean"] == pytest.approx(0.71)
    assert summary[("seen", "generated")]["test_acc_mean"] == pytest.approx(0.89)
    assert summary[("seen", "generated")]["n_seeds"] == 2
    # mean ceiling (per seed the anchors' mean) beside the best anchor's (per seed the max), averaged over seeds
    assert summary[("held_out", "reconstruction")]["test_acc_mean"] == pytest.approx((0.56 + 0.61) / 2)
    assert summary[("held_out", "reconstruction_best")]["test_acc_mean"] == pytest.approx((0.62 + 0.72) / 2)
    assert summary[("seen", "reconstruction_best")]["test_acc_mean"] == pytest.approx((0.90 + 0.91) / 2)
    table = report_mod.pool_table(result["summary"])
    head, line = table.splitlines()
    assert head.split("  ")[4:] and "held_out: generated" in head and "seen: reconstruction_best" in head
    assert head.index("held_out: generated") < head.index("seen: generated")
    assert "0.710" in line and "0.890" in line and "0.905" in line
    # the headline table and the plot stay held out; the CSVs say which pool every row came from
    assert "0.890" not in report_mod.summary_table(result["summary"])
    rows = list(csv.DictReader(io.StringIO(storage.read_text(result["csv"]))))
    assert {r["anchor_pool"] for r in rows} == {"held_out", "seen"}
    # paired by seed, seen against held out: a labelled comparison of its own
    labels = {c["a"] for c in result["paired"]} | {c["b"] for c in result["paired"]}
    assert labels == {"mnist n=8", "mnist n=8 [seen anchors]"}
    sweep.report_cli(__import__("argparse").Namespace(url=result["csv"].rsplit("/", 1)[0], out="", baseline=""))
    assert "by anchor pool" in capsys.readouterr().out


def test_held_out_only_sweeps_print_no_pool_table(tmp_path):
    url = storage.join(str(tmp_path), "sweeps", "one")
    storage.write_json(storage.join(url, "p", "point.json"), {"composition": "mnist", "zoo_size": 8,
                                                              "zoos": ["mnist-cnn_s"], "axes": {}})
    storage.write_json(storage.join(url, "p", "evaluate", "results.json"), _results("held_out", 0.7, [0.6]))
    assert report_mod.pool_table(sweep.report(url)["summary"]) == ""


def test_the_hypernetwork_row_states_its_budget(tmp_path):
    url = storage.join(str(tmp_path), "sweeps", "ft")
    res = _results("held_out", 0.7, [0.6])
    res["finetune"] = {"curves": {m: {"test_acc_mean": [0.1, f], "test_acc_std": [0.0, 0.0], "n": 3}
                                  for m, f in (("generated", 0.9), ("hypernet", 0.88), ("anchors", 0.93))},
                       "hypernet": {"settings": {"steps": 300, "batch_size": 64, "max_train_images": 5000}}}
    storage.write_json(storage.join(url, "p", "point.json"), {"composition": "mnist", "zoo_size": 8,
                                                              "zoos": ["mnist-cnn_s"], "axes": {}})
    storage.write_json(storage.join(url, "p", "evaluate", "results.json"), res)
    result = sweep.report(url)
    budget = {r["method"]: r["budget"] for r in result["summary"]}
    assert budget["finetuned_hypernet"] == "300 steps x 64 images of 5,000" and budget["finetuned_generated"] == ""
    table = report_mod.summary_table(result["summary"])
    assert "0.880 (300 steps x 64 images of 5,000)" in table
    # the anchors' own start sits beside the generated one (it can beat it)
    head, line = table.splitlines()
    assert head.index("finetuned_generated") < head.index("finetuned_anchors") and "0.930" in line


def test_the_cause_table_pairs_each_cause_and_each_further_sweep_with_the_baseline_by_seed(tmp_path):
    tables = load_results_script("sweep_tables")

    def point(sweep_name: str, name: str, seed: int, axes: dict, held: float, seen: float) -> None:
        url = storage.join(str(tmp_path), "sweeps", sweep_name, name)
        storage.write_json(storage.join(url, "point.json"), {
            "composition": "mnist", "zoo_size": 32, "zoos": ["mnist-cnn_s"],
            "axes": {**dict.fromkeys(sweep.schema.SEED_PATHS, seed), **axes}})
        storage.write_json(storage.join(url, "evaluate", "results.json"), _results("held_out", held, [held - 0.1]))
        storage.write_json(storage.join(url, "anchors-seen", "evaluate", "results.json"),
                           _results("seen", seen, [seen]))

    for seed in (0, 1, 2):
        point("causes", f"n32-{seed}", seed, {}, 0.70 + 0.05 * seed, 0.90)
        point("causes", f"latent-{seed}", seed, {"model.latent_dim": 128}, 0.80 + 0.05 * seed, 0.92)
        point("causes-aligned", f"n32-{seed}", seed, {}, 0.69 + 0.05 * seed, 0.90)
    table = tables.cause_table([storage.join(str(tmp_path), "sweeps", s) for s in ("causes", "causes-aligned")])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(lines) == ["baseline", "causes-aligned", "model.latent_dim=128"]
    assert "0.750 ± 0.124" in lines["baseline"] and "(" not in lines["baseline"]
    # held-out against held-out (+0.10 on every seed), seen against seen (+0.02, not the +0.2 across pools)
    assert "0.850 ± 0.124 (+0.100, p " in lines["model.latent_dim=128"]
    assert "0.920 ± 0.000 (+0.020, p " in lines["model.latent_dim=128"]
    assert "(-0.010, p " in lines["causes-aligned"]


def test_fine_tuning_starts_are_paired_with_the_generated_start_by_seed(tmp_path):
    tables = load_results_script("sweep_tables")
    rows = []
    for seed in (0, 1, 2):
        for method, value in (("finetuned_generated", 0.90 + 0.01 * seed), ("finetuned_anchors", 0.88 + 0.01 * seed),
                              ("finetuned_hypernet", 0.91), ("finetuned_random", 0.70 + 0.02 * seed)):
            rows.append({"in_distribution": True, "target_zoo": "mnist-cnn_s", "num_zoos": 1, "composition": "mnist",
                         "zoo_size": 8, "axes": "", "seed": str(seed), "method": method, "test_acc_mean": value})
    (line,) = tables.finetune_starts(rows).splitlines()[2:]
    cells = line.strip("| ").split(" | ")
    assert cells[4].startswith("0.910 ± ")  # generated
    assert "(+0.020, p " in cells[5]  # anchors: +0.02 on every seed
    assert "(+0.000, p " in cells[6] and "(+0.190, p " in cells[7]  # hypernet: 0 on average; random: +0.19
