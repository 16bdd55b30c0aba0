"""Fine-tuning comparison: every start gets one identical budget; curves and the across-targets table."""
from __future__ import annotations

import math
import os

import pytest

from mzsane.config import EvaluateConfig, SampleConfig
from mzsane.evaluate import baselines
from mzsane.evaluate import finetune as ft
from mzsane.zoo.datasets import load_dataset

CNN = {"architecture": "cnn_s", "activation": "tanh", "channels_in": 1, "image_size": 28}


def test_every_start_is_finetuned_with_one_budget(monkeypatch):
    calls = []

    def fake_finetune(kwargs, state_dicts, dataset, **settings):
        calls.append((len(state_dicts), settings))
        return [[{"epoch": 0, "test_acc": 0.1}, {"epoch": 1, "test_acc": 0.5}] for _ in state_dicts]

    monkeypatch.setattr("mzsane.zoo.evaluation.finetune", fake_finetune)
    models = baselines.random_models(CNN, "default", 3, 0)
    per_method = {"generated": models, "random": models, "anchors": models, "soup": models[:1],
                  "soup_aligned": models[:1]}
    ecfg = EvaluateConfig(finetune_epochs=1, num_finetune_models=2, hypernet_steps=3, finetune_max_train_images=256,
                          finetune_optimizer="sgd", finetune_batch_size=16, finetune_weight_decay=1e-4)
    out = ft.compare(CNN, per_method, load_dataset("mnist"), ecfg, SampleConfig(bn_iterations=1))
    assert list(out["curves"]) == list(ft.METHODS)
    assert [n for n, _ in calls] == [2, 2, 2, 2, 1, 1]  # generated, hypernet, random, anchors, soups
    budgets = [s for _, s in calls]
    assert all(b == budgets[0] for b in budgets)
    assert budgets[0] == {"epochs": 1, "lr": 1e-3, "optimizer": "sgd", "batch_size": 16, "weight_decay": 1e-4,
                          "seed": 0, "max_train_images": 256}
    assert len(out["hypernet"]["runs"]) == 2 and out["hypernet"]["settings"]["steps"] == 3
    assert out["curves"]["hypernet"]["test_acc_mean"] == [0.1, 0.5]


def test_no_hypernet_start_when_its_budget_is_zero(monkeypatch):
    monkeypatch.setattr("mzsane.zoo.evaluation.finetune", lambda k, sds, d, **s: [[{"test_acc": 0.3}] for _ in sds])
    models = baselines.random_models(CNN, "default", 1, 0)
    ecfg = EvaluateConfig(finetune_epochs=1, num_finetune_models=1, hypernet_steps=0)
    out = ft.compare(CNN, {"generated": models}, load_dataset("mnist"), ecfg, SampleConfig())
    assert list(out["curves"]) == ["generated"] and out["hypernet"]["runs"] == []


def test_curve_stats_ignore_diverged_epochs():
    stats = ft.curve_stats([[{"test_acc": 0.1}, {"test_acc": 0.5}], [{"test_acc": 0.3}]])
    assert stats["test_acc_mean"] == pytest.approx([0.2, 0.5])
    assert stats["test_acc_std"] == pytest.approx([0.1, 0.0])
    assert stats["n"] == 2 and math.isnan(stats["per_model"][1][1])


def _result(target, backbone, final):
    curves = {m: {"epoch": [0, 1], "test_acc_mean": [0.1, final + i / 100], "test_acc_std": [0.0, 0.01], "n": 2}
              for i, m in enumerate(("generated", "hypernet", "random"))}
    return {"target_zoo": target, "dataset": target.split("-")[0], "backbone": backbone, "in_distribution": True,
            "finetune": {"curves": curves}}


def test_comparison_table_and_plot(tmp_path):
    results = [_result("mnist-cnn_s", "runs/single", 0.8), _result("digits-cnn_s", "runs/single", 0.6)]
    rows = ft.comparison_rows(results)
    assert len(rows) == 6
    assert {(r["target"], r["method"]): r["final_mean"] for r in rows}[("digits-cnn_s", "hypernet")] == 0.61
    table = ft.format_comparison(rows)
    assert "ID digits-cnn_s" in table and "0.100 -> 0.610+-0.010" in table
    url = ft.write_comparison_plot(rows, str(tmp_path / "finetune_all.png"))
    assert os.path.getsize(url) > 1000
