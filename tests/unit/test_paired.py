"""Paired-by-seed comparisons against hand computations, and as ``sweep report`` writes them."""
from __future__ import annotations

import csv
import io
import math

import pytest

from mzsane import storage, sweep
from mzsane.sweep import paired


def _t2_p(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom, closed form: 1 - t / sqrt(t^2 + 2)."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_three_pairs_with_a_spread_are_not_distinguishable():
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3, p = 1 - sqrt(12/14) = 0.0742
    c = paired.compare({0: 0.6, 1: 0.7, 2: 0.8}, {0: 0.5, 1: 0.5, 2: 0.5}, label_a="A", label_b="B")
    assert c.n_pairs == 3 and c.seeds == "0,1,2"
    assert c.mean_diff == pytest.approx(0.2) and c.t_stat == pytest.approx(2 * math.sqrt(3))
    assert c.p_t == pytest.approx(_t2_p(2 * math.sqrt(3)), rel=1e-9) == pytest.approx(0.07418, abs=1e-5)
    assert c.diff_ci95 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    # sign flips of |d| = .1, .2, .3: only +++ and --- reach |mean| 0.2: 2 of 8
    assert c.p_sign_flip == pytest.approx(0.25)
    assert c.verdict == "not distinguishable"


def test_three_consistent_pairs_are_called_by_the_t_test_but_never_by_three_sign_flips():
    # d = 0.10, 0.11, 0.12: t = 0.11 / (0.01 / sqrt 3) = 19.05, p = 1 - t / sqrt(t^2 + 2) = 0.00274
    a = {0: 0.60, 1: 0.70, 2: 0.65}
    b = {0: 0.50, 1: 0.59, 2: 0.53}
    c = paired.compare(a, b, label_a="A", label_b="B")
    t = 0.11 / (0.01 / math.sqrt(3))
    assert c.t_stat == pytest.approx(t, rel=1e-6) and c.p_t == pytest.approx(_t2_p(t), rel=1e-6)
    assert c.p_t < 0.05 and c.verdict == "A higher"
    assert c.p_sign_flip == pytest.approx(0.25)  # 2 / 2^3: the smallest three pairs allow
    assert paired.compare(b, a, label_a="B", label_b="A").verdict == "A higher"  # the sign is kept


def test_pairs_only_on_shared_seeds():
    c = paired.compare({0: 0.9, 1: 0.8, 2: 0.7, 5: 0.0}, {1: 0.5, 2: 0.6, 3: 0.9})
    assert c.seeds == "1,2" and c.n_pairs == 2 and c.mean_diff == pytest.approx(0.2)
    assert c.mean_a == pytest.approx(0.75) and c.mean_b == pytest.approx(0.55)
    one = paired.compare({0: 0.9}, {0: 0.5})
    assert one.n_pairs == 1 and math.isnan(one.p_t) and one.verdict == "not distinguishable"


def test_exact_sign_flip_p_by_hand():
    # |d| = 1, 2, 3, 0.5 (sum 6.5), observed mean 5.5 / 4: sums >= 5.5 in size are all +, and + with 0.5
    # flipped, and their negatives: 4 of 16
    assert paired.sign_flip_p([1, 2, 3, -0.5]) == pytest.approx(4 / 16)
    assert paired.sign_flip_p([0.3, -0.3]) == pytest.approx(1.0)  # mean 0: every pattern is as large
    assert paired.sign_flip_p([0.1] * 6) == pytest.approx(2 / 64)


def _two_setting_sweep(root: str, lr_a: dict, lr_b: dict) -> str:
    """Settings train.lr=0.001 and 0.01 at seeds 0-2, written as the chart's seed axis writes point.json."""
    url = storage.join(root, "sweeps", "pairs")
    for lr, accs in ((0.001, lr_a), (0.01, lr_b)):
        for seed, acc in accs.items():
            point = f"n8-mnist-{lr}-{seed}"
            storage.write_json(storage.join(url, point, "point.json"), {
                "composition": "mnist", "zoo_size": 8, "zoos": ["mnist-cnn_s"],
                "axes": {"train.lr": lr, **dict.fromkeys(sweep.schema.SEED_PATHS, seed)}})
            storage.write_json(storage.join(url, point, "evaluate", "results.json"), {
                "target_zoo": "mnist-cnn_s", "dataset": "mnist", "in_distribution": True, "backbone": "x",
                "rows": [{"method": "generated", "test_acc_mean": acc, "test_acc_std": 0.0, "n": 10},
                         {"method": "anchors", "test_acc_mean": 0.9, "test_acc_std": 0.0, "n": 5}]})
    return url


def test_report_pairs_settings_by_seed_against_the_baseline(tmp_path, capsys):
    url = _two_setting_sweep(str(tmp_path), {0: 0.60, 1: 0.70, 2: 0.65}, {0: 0.50, 1: 0.59, 2: 0.53})
    result = sweep.report(url, baseline="train.lr=0.01")
    (row,) = result["paired"]
    assert row["a"] == "mnist n=8 train.lr=0.001" and row["b"] == "mnist n=8 train.lr=0.01"
    assert row["mean_diff"] == pytest.approx(0.11) and row["verdict"] == "mnist n=8 train.lr=0.001 higher"
    # the unpaired 95% intervals overlap (0.650 +- 0.124 against 0.540 +- 0.113): pairing is what separates them
    gen = {r["axes"]: r for r in result["summary"] if r["method"] == "generated"}
    lo, hi = gen["train.lr=0.01"], gen["train.lr=0.001"]
    assert lo["test_acc_mean"] + lo["test_acc_ci95"] > hi["test_acc_mean"] - hi["test_acc_ci95"]
    written = list(csv.DictReader(io.StringIO(storage.read_text(result["paired_csv"]))))
    assert len(written) == 1 and float(written[0]["p_t"]) == pytest.approx(row["p_t"])
    # default baseline: the first setting by label; the comparison turns round
    (flipped,) = sweep.report(url)["paired"]
    assert flipped["b"] == "mnist n=8 train.lr=0.001" and flipped["mean_diff"] == pytest.approx(-0.11)
    import argparse

    sweep.report_cli(argparse.Namespace(url=url, out="", baseline="lr=0.01"))
    assert "paired by seed" in capsys.readouterr().out


def test_identical_nonzero_differences_have_no_spread():
    c = paired.compare({0: 0.7, 1: 0.8}, {0: 0.5, 1: 0.6}, label_a="A", label_b="B")
    assert c.t_stat == math.inf and c.p_t == 0.0 and c.verdict == "A higher"


def test_settings_are_compared_within_one_anchor_pool():
    """Seen anchors against the baseline's seen anchors, held-out against held-out: never across pools."""
    def rows(axes: str, pool: str, accs: dict[int, float]) -> list[dict]:
        return [{"method": "generated", "test_acc_mean": a, "seed": s, "point": f"{axes}-{s}", "target_zoo": "z",
                 "composition": "mnist", "zoo_size": 32, "axes": axes, "anchor_pool": pool} for s, a in accs.items()]

    table = (rows("", "held_out", {0: 0.70, 1: 0.75, 2: 0.72}) + rows("", "seen", {0: 0.92, 1: 0.93, 2: 0.91})
             + rows("model.latent_dim=128", "held_out", {0: 0.80, 1: 0.86, 2: 0.83})
             + rows("model.latent_dim=128", "seen", {0: 0.93, 1: 0.94, 2: 0.92}))
    got = {(c.a, c.b): c for c in paired.compare_settings(table, baseline="mnist n=32")}
    assert sorted(got) == [("mnist n=32 [seen anchors]", "mnist n=32"),  # the protocols, on the same backbones
                           ("mnist n=32 model.latent_dim=128", "mnist n=32"),
                           ("mnist n=32 model.latent_dim=128 [seen anchors]", "mnist n=32 [seen anchors]")]
    assert got[("mnist n=32 model.latent_dim=128 [seen anchors]", "mnist n=32 [seen anchors]")].mean_diff == \
        pytest.approx(0.01)
