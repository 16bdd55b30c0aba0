"""``mzsane sweep report``: results files shaped as ``mzsane evaluate`` writes them -> table, CSV, Figure-3 PNG."""
from __future__ import annotations

import csv
import io
import json

import pytest

from mzsane import storage, sweep
from mzsane.errors import DataError

ACC = {("mnist", 50): 0.61, ("mnist", 100): 0.70, ("mnist-fashion", 50): 0.66, ("mnist-fashion", 100): 0.78}


def _results(backbone: str, generated: float) -> dict:
    return {
        "target_zoo": "mnist-cnn_s", "dataset": "mnist", "architecture": "cnn_s", "backbone": backbone,
        "in_distribution": True,
        "rows": [
            {"method": "generated", "test_acc_mean": generated, "test_acc_std": 0.02, "n": 10},
            {"method": "anchors", "test_acc_mean": 0.80, "test_acc_std": 0.01, "n": 5},
            {"method": "soup", "test_acc_mean": 0.11, "test_acc_std": 0.0, "n": 1},
            {"method": "random", "test_acc_mean": 0.10, "test_acc_std": 0.01, "n": 5},
        ],
        "soup_curve": [], "finetune": {}, "novelty": {},
    }


def _write_sweep(root: str) -> str:
    """Four points written as the chart's RayJobs would, one pending, one run without point.json."""
    url = storage.join(root, "sweeps", "grid")
    for (comp, size), acc in ACC.items():
        point = f"n{size}-{comp}"
        zoos = ["mnist-cnn_s"] + (["fashion_mnist-cnn_s"] if comp == "mnist-fashion" else [])
        storage.write_json(storage.join(url, point, "point.json"), {
            "schema_version": 1, "sweep": "grid", "point": point, "composition": comp, "zoo_size": size,
            "zoos": zoos, "axes": {}, "target_zoo": "mnist-cnn_s"})
        storage.write_json(storage.join(url, point, "evaluate", "results.json"),
                           _results(storage.join(root, "runs", f"grid-{point}"), acc))
    # a point still running: point.json but no results yet
    storage.write_json(storage.join(url, "n150-mnist", "point.json"), {"zoo_size": 150, "zoos": ["mnist-cnn_s"]})
    # a point run by hand: its coordinates come from the backbone run's config.json
    run = storage.join(root, "runs", "manual")
    storage.write_json(storage.join(run, "config.json"),
                       {"data": {"zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s"], "num_models_per_zoo": 150}})
    storage.write_json(storage.join(url, "manual", "evaluate", "results.json"), _results(run, 0.81))
    return url


def test_report_writes_table_csv_and_png(tmp_path):
    url = _write_sweep(str(tmp_path))
    result = sweep.report(url)
    assert result["pending"] == ["n150-mnist"]
    zero_shot = [r for r in result["rows"] if r["method"] == "generated"]
    assert len(result["rows"]) == 5 * 4 and len(zero_shot) == 5
    got = {(r["composition"], r["zoo_size"]): r["test_acc_mean"] for r in zero_shot}
    assert got == {**ACC, ("mnist-cnn_s+fashion_mnist-cnn_s", 150): 0.81}
    by_point = {r["point"]: r for r in zero_shot}
    assert by_point["n100-mnist-fashion"]["num_zoos"] == 2
    assert by_point["n100-mnist-fashion"]["zoos"] == "mnist-cnn_s+fashion_mnist-cnn_s"

    rows = list(csv.DictReader(io.StringIO(storage.read_text(result["csv"]))))
    assert rows[0].keys() == set(sweep.REPORT_COLUMNS)
    assert len(rows) == 20
    assert {(r["point"], r["method"]) for r in rows} >= {("n50-mnist", "generated"), ("manual", "random")}
    assert float(next(r for r in rows if r["point"] == "n50-mnist" and r["method"] == "generated")
                 ["test_acc_mean"]) == pytest.approx(0.61)

    png = storage.read_bytes(result["png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.size[0] > 300 and image.size[1] > 200
    assert len(set(image.convert("RGB").getdata())) > 10  # lines drawn, not a blank canvas


def test_report_to_separate_output_and_cli_table(tmp_path, capsys):
    url = _write_sweep(str(tmp_path / "data"))
    out = str(tmp_path / "report")
    sweep.report_cli(type("Args", (), {"url": url, "out": out})())
    text = capsys.readouterr().out
    assert "n100-mnist-fashion" in text and "0.7800" in text and "pending (no results yet): n150-mnist" in text
    assert storage.exists(storage.join(out, "sweep_results.csv"))
    assert storage.exists(storage.join(out, "sweep_zero_shot.png"))


def test_report_errors_name_the_url(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sweep.report(str(tmp_path / "nope"))
    storage.write_json(str(tmp_path / "s" / "p1" / "point.json"), {"zoo_size": 5})
    with pytest.raises(DataError, match=r"no evaluate/results\.json"):
        sweep.report(str(tmp_path / "s"))


def test_record_point_copies_point_json_beside_the_results(tmp_path):
    src = tmp_path / "point.json"
    src.write_text(json.dumps({"point": "n50-mnist", "zoo_size": 50}))
    assert sweep.main(["record-point", str(src), str(tmp_path / "out")]) == 0
    assert storage.read_json(str(tmp_path / "out" / "point.json"))["zoo_size"] == 50


def _seeded_sweep(root: str, accs: list[float], probe_r2: float | None = None) -> str:
    """One setting (n8, mnist, lr 1e-3) run with seeds 0..k-1, as the chart's `seed` axis writes point.json."""
    url = storage.join(root, "sweeps", "seeds")
    for seed, acc in enumerate(accs):
        point = f"n8-mnist-{seed}"
        axes = {"train.lr": 0.001, **dict.fromkeys(sweep.schema.SEED_PATHS, seed)}
        storage.write_json(storage.join(url, point, "point.json"), {
            "composition": "mnist", "zoo_size": 8, "zoos": ["mnist-cnn_s"], "axes": axes})
        storage.write_json(storage.join(url, point, "evaluate", "results.json"),
                           _results(storage.join(root, "runs", point), acc))
        if probe_r2 is not None:  # as `mzsane probe --out {point}/probe` writes it
            r2 = {"embedding": probe_r2 + seed * 0.1, "weight_stats": probe_r2 + seed * 0.1 + 0.2}
            storage.write_json(storage.join(url, point, "probe", "probe.json"), {"rows": [
                {"scope": "mnist-cnn_s", "target": "test_acc", "features": f, "r2": r2[f], "kendall_tau": 0.5}
                for f in r2]})
    return url


def test_seeds_of_one_setting_aggregate_to_mean_and_student_t_interval(tmp_path):
    accs = [0.60, 0.70, 0.65]
    result = sweep.report(_seeded_sweep(str(tmp_path), accs))
    gen = [r for r in result["summary"] if r["method"] == "generated"]
    assert len(gen) == 1 and gen[0]["n_seeds"] == 3 and gen[0]["axes"] == "train.lr=0.001"  # seeds: no setting
    assert gen[0]["test_acc_mean"] == pytest.approx(0.65)
    # t(0.975, 2) = 4.303; sample std of the three = 0.05; half-width = 4.303 * 0.05 / sqrt(3)
    assert gen[0]["test_acc_ci95"] == pytest.approx(4.3027 * 0.05 / 3 ** 0.5, rel=1e-3)
    assert sorted(r["seed"] for r in result["rows"] if r["method"] == "generated") == ["0", "1", "2"]
    rows = list(csv.DictReader(io.StringIO(storage.read_text(result["summary_csv"]))))
    assert len(rows) == 4 and {r["n_seeds"] for r in rows} == {"3"}
    table = sweep.results.summary_table(result["summary"])
    assert "0.650 ± 0.124" in table and "probe" in table.splitlines()[0]
    # a single seed has no interval rather than a zero-width one
    one = sweep.report(_seeded_sweep(str(tmp_path / "one"), [0.6]))
    assert all(r["n_seeds"] == 1 and r["test_acc_ci95"] != r["test_acc_ci95"] for r in one["summary"])


def test_probe_results_of_a_point_become_the_reports_second_axis(tmp_path):
    url = _seeded_sweep(str(tmp_path), [0.6, 0.7], probe_r2=0.4)
    result = sweep.report(url)
    by_seed = {r["seed"]: r for r in result["rows"] if r["method"] == "generated"}
    assert by_seed["0"]["probe_r2_embedding"] == pytest.approx(0.4)
    assert by_seed["1"]["probe_r2_weight_stats"] == pytest.approx(0.7)
    gen = next(r for r in result["summary"] if r["method"] == "generated")
    assert gen["probe_r2_embedding"] == pytest.approx(0.45) and gen["probe_tau_embedding"] == pytest.approx(0.5)
    assert storage.read_bytes(result["probe_png"])[:4] == b"\x89PNG"
    # without probe results the columns are NaN and no probe plot is drawn
    bare = sweep.report(_seeded_sweep(str(tmp_path / "bare"), [0.6, 0.7]))
    assert "probe_png" not in bare and all(r["probe_r2_embedding"] != r["probe_r2_embedding"] for r in bare["rows"])


def test_fine_tuned_starts_are_rows_at_their_last_epoch(tmp_path):
    url = _seeded_sweep(str(tmp_path), [0.6, 0.7])
    for seed, last in enumerate([0.90, 0.94]):  # as evaluate/finetune.py writes the curves
        point = storage.join(url, f"n8-mnist-{seed}", "evaluate", "results.json")
        results = storage.read_json(point)
        results["finetune"] = {"epochs": 2, "curves": {
            "generated": {"epoch": [0, 1, 2], "test_acc_mean": [0.6, 0.8, last], "test_acc_std": [0, 0, 0.01], "n": 3},
            "random": {"epoch": [0, 1, 2], "test_acc_mean": [0.1, 0.5, 0.7], "test_acc_std": [0, 0, 0.02], "n": 3}}}
        storage.write_json(point, results)
    result = sweep.report(url)
    tuned = {r["method"]: r for r in result["summary"] if r["method"].startswith("finetuned_")}
    assert set(tuned) == {"finetuned_generated", "finetuned_random"}
    assert tuned["finetuned_generated"]["test_acc_mean"] == pytest.approx(0.92)
    assert tuned["finetuned_random"]["test_acc_mean"] == pytest.approx(0.7)
    assert tuned["finetuned_random"]["n_seeds"] == 2
    assert "finetuned_generated" in sweep.results.summary_table(result["summary"]).splitlines()[0]


def test_extra_targets_are_rows_of_their_own_with_no_borrowed_probe(tmp_path):
    """{point}/targets/{zoo}/evaluate/results.json (sweep.extraTargetZoos) adds the point's rows for that target:
    ID and OOD settings stay apart in the summary and the plot, and the probe (run on the first target only)
    is not attributed to the extra one."""
    url = _seeded_sweep(str(tmp_path), [0.6, 0.7], probe_r2=0.4)
    for seed, acc in enumerate([0.40, 0.44]):
        ood = dict(_results("b", acc), target_zoo="digits-cnn_s", dataset="digits", in_distribution=False)
        storage.write_json(storage.join(url, f"n8-mnist-{seed}", "targets", "digits-cnn_s", "evaluate",
                                        "results.json"), ood)
    result = sweep.report(url)
    gen = {(r["point"], r["target_zoo"]): r for r in result["rows"] if r["method"] == "generated"}
    assert gen[("n8-mnist-1", "digits-cnn_s")]["test_acc_mean"] == pytest.approx(0.44)
    assert gen[("n8-mnist-1", "mnist-cnn_s")]["test_acc_mean"] == pytest.approx(0.7)
    assert not gen[("n8-mnist-1", "digits-cnn_s")]["in_distribution"]
    assert gen[("n8-mnist-1", "mnist-cnn_s")]["probe_r2_embedding"] == pytest.approx(0.5)
    assert gen[("n8-mnist-1", "digits-cnn_s")]["probe_r2_embedding"] != gen[("n8-mnist-1", "digits-cnn_s")][
        "probe_r2_embedding"]  # NaN: not the first target's probe
    summary = {r["target_zoo"]: r for r in result["summary"] if r["method"] == "generated"}
    assert summary["digits-cnn_s"]["test_acc_mean"] == pytest.approx(0.42) and summary["digits-cnn_s"]["n_seeds"] == 2
    table = sweep.results.summary_table(result["summary"])
    assert "digits-cnn_s (OOD)" in table and "mnist-cnn_s (ID)" in table
    assert table.index("mnist-cnn_s (ID)") < table.index("digits-cnn_s (OOD)")
    from PIL import Image

    image = Image.open(io.BytesIO(storage.read_bytes(result["png"])))
    assert image.size[0] > 1.8 * image.size[1]  # one panel per target, side by side


def test_a_sweep_of_one_zoo_size_plots_its_settings_side_by_side(tmp_path, monkeypatch):
    """Composition and ablation sweeps have one zoo size: a line per setting would stack every point at one x."""
    drawn = []
    original = sweep.results._plot_settings
    monkeypatch.setattr(sweep.results, "_plot_settings",
                        lambda ax, lines, *a: drawn.append(sorted(lines)) or original(ax, lines, *a))
    url = _seeded_sweep(str(tmp_path), [0.6, 0.7])
    other = storage.join(url, "n8-mnist-fashion-0")
    storage.write_json(storage.join(other, "point.json"), {"composition": "mnist-fashion", "zoo_size": 8,
                                                           "zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s"], "axes": {}})
    storage.write_json(storage.join(other, "evaluate", "results.json"), _results("b", 0.8))
    sweep.report(url)
    assert drawn == [["mnist (train.lr=0.001)", "mnist-fashion"]]
    drawn.clear()
    sweep.report(_write_sweep(str(tmp_path / "grid")))  # several sizes: lines over zoo size, no settings panel
    assert drawn == []
