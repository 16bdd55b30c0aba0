"""Property probes: closed-form ridge, R^2, Kendall's tau, per-layer weight statistics, probe rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mzsane.probe import ridge
from mzsane.probe.features import ZooFeatures, pad_features, weight_stats
from mzsane.probe.report import format_table, run_probes, summary


def test_ridge_recovers_a_linear_relation_on_held_out_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12))
    w = rng.normal(size=12)
    y = x @ w + 3.0 + 0.05 * rng.normal(size=200)
    probe = ridge.fit(x[:120], y[:120])
    assert ridge.r2_score(y[120:], probe.predict(x[120:])) > 0.99
    assert probe.alpha < 1.0  # leave-one-out picks weak regularization for a clean linear target
    noise = rng.normal(size=200)  # unrelated target: leave-one-out shrinks, held-out R^2 stays near 0 or below
    assert ridge.r2_score(noise[120:], ridge.fit(x[:120], noise[:120]).predict(x[120:])) < 0.1


def test_ridge_leaves_out_whole_models_when_choosing_the_strength():
    """Checkpoints of one model share features and target: leave-one-row-out rewards memorizing the model,
    leave-one-model-out sees that a new model's target is not predictable and shrinks to the mean."""
    rng = np.random.default_rng(1)
    models = np.repeat(np.arange(12), 3)
    x = rng.normal(size=(12, 20))[models] + 0.01 * rng.normal(size=(36, 20))
    y = rng.normal(size=12)[models]
    assert ridge.fit(x, y).alpha < 1.0
    assert ridge.fit(x, y, groups=models).alpha == ridge.ALPHAS[-1]


def test_r2_and_kendall_tau_against_hand_computed_values():
    assert ridge.r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert ridge.r2_score([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0
    assert ridge.r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == -1.0  # squared errors 4 over total 2
    assert ridge.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert ridge.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # pairs of (1,2,3) vs (1,3,2): concordant 2, discordant 1 -> 1/3
    assert ridge.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # tau-b with a tie in b: (1,1,2): pairs (12: 0, 13: +, 23: +) -> 2 / sqrt(3 * 2)
    assert ridge.kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / np.sqrt(6))


def test_weight_stats_are_per_layer_statistics_of_the_state_dict():
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.tokenize import tokenize
    from mzsane.zoo.architectures import build_model

    sd = build_model("cnn_s", activation="tanh").state_dict()
    layout = layout_from_state_dict(sd, tokensize=64)
    feats = weight_stats(tokenize(sd, layout)[None], layout)[0]
    w, b = sd["module_list.0.weight"].flatten(), sd["module_list.0.bias"]
    q = torch.tensor([0, .25, .5, .75, 1.])
    expect = torch.cat([w.mean()[None], w.std(unbiased=False)[None], torch.quantile(w, q),
                        b.mean()[None], b.std(unbiased=False)[None], torch.quantile(b, q)])
    assert torch.allclose(feats[:14], expect, atol=1e-6)
    assert feats.shape == (len(layout.entries) * 14,)  # every cnn_s layer has a bias


def _zoo(name: str, n_models: int, seed: int) -> ZooFeatures:
    """Embeddings that are a fixed linear mix of (test acc, epoch, gap, 3 noise dims); stats are pure noise."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(42).normal(size=(6, 6))  # the same map in every zoo: "all" is linear too
    zf = ZooFeatures(name)
    splits = ["train"] * (n_models - 6) + ["val"] * 2 + ["test"] * 4
    for m in range(n_models):
        for epoch in range(3):
            acc, train_acc = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
            zf.model_ids.append(f"m{m}")
            zf.splits.append(splits[m])
            zf.epochs.append(epoch)
            zf.test_acc.append(acc)
            zf.train_acc.append(train_acc)
            zf.embedding.append(np.array([acc, epoch, train_acc - acc, *rng.normal(size=3)]) @ mix)
            zf.weight_stats.append(rng.normal(size=4 + seed))
    return zf


def test_probe_rows_per_zoo_and_across_zoos():
    zoos = [_zoo("a", 30, 0), _zoo("b", 30, 1)]
    rows = run_probes(zoos)
    by = {(r["scope"], r["target"], r["features"]): r for r in rows}
    assert {s for s, _, _ in by} == {"a", "b", "all"}
    for scope in ("a", "b", "all"):
        for target in ("test_acc", "epoch", "gap"):
            assert by[(scope, target, "embedding")]["r2"] > 0.95  # the embedding holds the targets linearly
            assert by[(scope, target, "weight_stats")]["r2"] < 0.3  # noise features explain nothing
        assert by[(scope, "test_acc", "embedding")]["kendall_tau"] > 0.9
    assert by[("a", "epoch", "embedding")]["n_train"] == 24 * 3 and by[("a", "epoch", "embedding")]["n_test"] == 12
    cols = summary({"rows": rows})
    assert cols["probe_all_test_acc_embedding_r2"] == by[("all", "test_acc", "embedding")]["r2"]
    assert "probe_all_epoch_embedding_tau" not in cols
    assert "R2 embed" in format_table({"rows": rows, "backbone": "run"})


def test_pad_features_zero_pads_narrow_blocks():
    out = pad_features([np.ones((2, 3)), np.ones((1, 5))])
    assert out.shape == (3, 5) and out[:2, 3:].sum() == 0 and out[2].sum() == 5


def test_point_summary_reads_a_points_probe_file(root):
    from mzsane import storage
    from mzsane.probe.report import point_summary

    assert point_summary(storage.join(root, "p0")) == {}
    rows = [{"scope": "all", "target": "test_acc", "features": "embedding", "r2": 0.5, "kendall_tau": 0.4}]
    storage.write_json(storage.join(root, "p0", "probe", "probe.json"), {"rows": rows})
    assert point_summary(storage.join(root, "p0")) == {"probe_all_test_acc_embedding_r2": 0.5,
                                                       "probe_all_test_acc_embedding_tau": 0.4}
