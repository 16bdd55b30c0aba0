"""Honest sampling and evaluation: held-out anchors checked against the backbone's training selection, the
reconstruction ceiling, unselected candidates, selection on equal footing, matched novelty, and a
``test_used`` record derived from what sampling actually read.

The backbone is the identity (latent = tokens), so decode(encode(m)) is m itself and a zero bandwidth
reproduces the anchors: every expectation below is checkable by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mzsane import presets, storage
from mzsane.config import EvaluateConfig, SampleConfig
from mzsane.evaluate import report
from mzsane.evaluate.novelty import matched_novelty
from mzsane.sample import generate as generate_mod
from mzsane.sample.generate import read_state_dict, sample, score_candidates, selection_split
from mzsane.shards import writer
from mzsane.shards.manifest import read_manifest
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import Split
from mzsane.zoo.synthetic import SyntheticZoo
from tests.fixtures.backbones import IdentityBackbone

NUM_MODELS = 20


class Images:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)

        def split(n):
            return Split(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

        self.train, self.val, self.test = split(96), split(64), split(80)


def _zoo(root: str) -> str:
    url = storage.join(root, "zoos", "toy-cnn_s")
    SyntheticZoo("toy-cnn_s", "cnn_s", NUM_MODELS, (0, 1), metrics=lambda *_: {"val_acc": 0.1, "test_acc": 0.1},
                 hparams=lambda i: {"seed": i, "init": "default"}).write(url)
    return url


@pytest.fixture
def setup(tmp_path):
    root = str(tmp_path)
    zoo = _zoo(root)
    cfg = presets.tiny()
    cfg.storage.root = root
    cfg.data.shards_url = storage.join(root, "shards")
    writer.build_shards([zoo], cfg.data.shards_url, cfg.tokens, cfg.shards, progress=False)
    return root, zoo, cfg


def _scfg(**kw) -> SampleConfig:
    base = dict(num_anchors=3, num_candidates=6, num_keep=2, candidate_batch_size=3, halo_window=7, halo_size=2,
                encode_batch_size=5, bandwidth=0.0, bn_iterations=0, precision="fp32")
    base.update(kw)
    return SampleConfig(**base)


def _train_models(cfg) -> set[str]:
    return {m["model_id"] for m in read_manifest(cfg.data.shards_url).models if m["split"] == "train"}


def test_held_out_anchors_are_never_in_the_backbones_training_selection(setup, tmp_path):
    _, zoo, cfg = setup
    trained = _train_models(cfg)
    assert len(trained) == 14
    res = sample("run", zoo, str(tmp_path / "ho"), _scfg(), dataset=Images(), backbone=(IdentityBackbone(), cfg),
                 progress=False)
    a = res["anchors"]
    assert a["pool"] == "held_out" and a["held_out_verified"] is True and a["num_seen_in_zoo"] == 14
    assert not set(a["model_ids"]) & trained and a["held_out"] == a["model_ids"] and a["seen"] == []
    assert set(a["pool_ids"]) == {f"m{i:03d}" for i in range(NUM_MODELS)} - trained  # val and test models
    res = sample("run", zoo, str(tmp_path / "seen"), _scfg(anchor_pool="seen"), dataset=Images(),
                 backbone=(IdentityBackbone(), cfg), progress=False)
    assert set(res["anchors"]["model_ids"]) <= trained and res["anchors"]["held_out"] == []
    # a backbone trained on a subset: its unselected train models count as held out
    small = presets.tiny()
    small.data.shards_url, small.data.num_models_per_zoo = cfg.data.shards_url, 4
    res = sample("run", zoo, str(tmp_path / "sub"), _scfg(num_anchors=10), dataset=Images(),
                 backbone=(IdentityBackbone(), small), progress=False)
    assert res["anchors"]["num_seen_in_zoo"] == 4 and len(res["anchors"]["pool_ids"]) == NUM_MODELS - 4
    # unknown provenance is reported as such, not as held out
    lost = presets.tiny()
    lost.data.shards_url = str(tmp_path / "nowhere")
    res = sample("run", zoo, str(tmp_path / "lost"), _scfg(), dataset=Images(), backbone=(IdentityBackbone(), lost),
                 progress=False)
    assert res["anchors"]["held_out_verified"] is False


def test_reconstruction_and_unselected_are_written(setup, tmp_path):
    _, zoo, cfg = setup
    out = str(tmp_path / "s")
    res = sample("run", zoo, out, _scfg(bandwidth=0.5), dataset=Images(), backbone=(IdentityBackbone(), cfg),
                 progress=False)
    assert [r["anchor"] for r in res["reconstructed"]] == res["anchors"]["model_ids"]
    from mzsane.zoo.store import open_zoo

    reader = open_zoo(zoo)
    for r in res["reconstructed"]:  # identity backbone: decode(encode(m)) == m
        sd, ref = read_state_dict(storage.join(out, r["file"])), reader.load_checkpoint(r["anchor"], 1)
        assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert [u["index"] for u in res["unselected"]] == [0, 1]  # the first draws, whatever their val accuracy


def test_test_used_records_what_sampling_read(setup, tmp_path, monkeypatch):
    _, zoo, cfg = setup
    res = sample("run", zoo, str(tmp_path / "a"), _scfg(), dataset=Images(), backbone=(IdentityBackbone(), cfg),
                 progress=False)
    assert res["selection"]["test_used"] is False and res["selection"]["splits_read"] == ["train", "val"]
    leaky = generate_mod.selection_split
    monkeypatch.setattr(generate_mod, "selection_split", lambda ds, num=-1, seed=0: leaky(ds, num, seed) and ds.test)
    res = sample("run", zoo, str(tmp_path / "b"), _scfg(), dataset=Images(), backbone=(IdentityBackbone(), cfg),
                 progress=False)
    assert res["selection"]["test_used"] is True and "test" in res["selection"]["splits_read"]


def test_evaluate_reports_held_out_headline_unselected_ceiling_and_equal_footing(setup, tmp_path):
    _, zoo, cfg = setup
    out = str(tmp_path / "s")
    images = Images()
    scfg = _scfg(bandwidth=0.0)
    res = sample("run", zoo, out, scfg, dataset=images, backbone=(IdentityBackbone(), cfg), progress=False)
    ecfg = EvaluateConfig(finetune_epochs=0, soup_sizes=[1, 2], num_random=2, num_novelty_images=80,
                          max_train_models=6)
    rep = report.evaluate(out, zoo, ecfg, dataset=images, plots=False)
    rows = {r["method"]: r for r in rep["rows"]}
    assert {"generated", "generated_unselected", "reconstruction", "anchors", "anchors_selected"} <= set(rows)
    h = rep["headline"]
    assert h["anchors_held_out"] is True and h["test_acc_mean"] == rows["generated"]["test_acc_mean"]
    # zero bandwidth + identity: every candidate is an anchor, so the ceiling equals the anchors
    assert rows["reconstruction"]["test_acc_mean"] == pytest.approx(rows["anchors"]["test_acc_mean"])
    # candidates before selection: the numpy figures of all candidates' val accuracies
    vals = np.array([c["val_acc"] for c in res["candidates"]])
    d = rep["candidates"]["val_acc"]
    assert d["n"] == 6 and d["median"] == pytest.approx(np.median(vals)) and d["q10"] == pytest.approx(
        np.quantile(vals, 0.1)) and d["mean"] == pytest.approx(vals.mean())
    # the selected baseline: best 2 of the whole held-out pool on the same val images
    from mzsane.zoo.store import open_zoo

    reader = open_zoo(zoo)
    pool = res["anchors"]["pool_ids"]
    val = [a for _, a in score_candidates(report.baselines.zoo_kwargs(res),
                                          [reader.load_checkpoint(m, 1) for m in pool],
                                          selection_split(images, scfg.max_val_images, scfg.seed))]
    assert rep["candidates"]["anchors_selected"] == report.select_best(pool, val, 2)
    assert rows["anchors_selected"]["n"] == 2
    assert rep["novelty"]["matched"]["verdict"] == "near-copies of their anchors"  # they are the anchors
    assert "held-out anchors" in report.format_table(rep)

    seen = sample("run", zoo, str(tmp_path / "seen"), _scfg(anchor_pool="seen"), dataset=images,
                  backbone=(IdentityBackbone(), cfg), progress=False)
    assert seen["anchors"]["seen"]
    rep = report.evaluate(str(tmp_path / "seen"), zoo, ecfg, dataset=images, plots=False)
    assert rep["headline"]["anchors_held_out"] is False and "NOT all held out" in report.format_table(rep)


def test_select_best_and_distribution():
    assert report.select_best(["a", "b", "c", "d"], [0.5, 0.9, 0.9, 0.1], 3) == ["b", "c", "a"]
    d = report.distribution([0.1, 0.2, 0.3, float("nan")])
    assert d["n"] == 3 and d["median"] == pytest.approx(0.2)


def test_matched_novelty_compares_like_with_like():
    kwargs = {"architecture": "cnn_s"}
    models = []
    for i in range(9):
        torch.manual_seed(50 + i)
        models.append(build_model("cnn_s").state_dict())
    x = torch.randn(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    anchors = {f"a{i}": models[i] for i in range(3)}
    reference = {f"r{i}": models[3 + i] for i in range(5)}
    ref_acc = {m: 0.1 * (i + 1) for i, m in enumerate(reference)}
    copies = matched_novelty(kwargs, [anchors["a1"]], [0.31], anchors, reference, ref_acc, x)
    assert copies["verdict"] == "near-copies of their anchors" and copies["generated"][0]["distance"] == 0
    assert copies["generated"][0]["matched_model"] == "r2"  # accuracy 0.3 is the nearest to 0.31
    assert all(r["pool_size"] == 3 for r in copies["reference"])  # equal pool sizes: K = 3 anchors
    fresh = matched_novelty(kwargs, [models[8]], [0.5], anchors, reference, ref_acc, x)
    assert fresh["verdict"] == "new models" and fresh["median_distance_ratio"] > 0.5
    far = matched_novelty(kwargs, [models[8]], [0.95], anchors, reference, ref_acc, x)  # zoo tops out at 0.5
    assert far["verdict"].startswith("not comparable")


def test_reconstruction_view_per_layer_and_figure(tmp_path):
    """decode(encode(m)) through the identity is m (zero error); a collapsed layer shows its full error."""
    from mzsane.evaluate import reconstruction as rec

    cfg = presets.tiny()
    models = []
    for i in range(3):
        torch.manual_seed(i)
        models.append({k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v  # BN weights not all 1
                       for k, v in build_model("resnet_mini").state_dict().items()})
    same = rec.reconstruct(IdentityBackbone(), models, cfg.tokens, halo_window=7, halo_size=2)
    errors = rec.layer_errors(models, same)
    assert set(errors["kinds"]) >= {"conv", "bn_weight", "bn_bias", "linear"}
    assert all(v == 0 for v in errors["kinds"].values())
    bn_weight = next(k for k, v in errors["layers"].items() if v["kind"] == "bn_weight")
    collapsed = [{k: (torch.zeros_like(v) if k == bn_weight else v) for k, v in sd.items()} for sd in models]
    errors = rec.layer_errors(models, collapsed)
    expected = sum(float(sd[bn_weight].square().sum()) for sd in models) / float(
        torch.cat([sd[bn_weight].reshape(-1) for sd in models]).sub(
            torch.cat([sd[bn_weight].reshape(-1) for sd in models]).mean()).square().sum())
    assert errors["layers"][bn_weight]["rel_error"] == pytest.approx(expected, rel=1e-5)
    assert errors["kinds"]["conv"] == 0 and errors["layers"][bn_weight]["rec_std"] == 0
    url = rec.figure(models, {"identity": same, "collapsed": collapsed}, str(tmp_path / "figure2.png"))
    with open(url, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fine_tuning_budget_and_random_init_are_fixed_per_target_not_read_from_an_anchor(setup, tmp_path,
                                                                                          monkeypatch):
    """An anchor trained with SGD, batch 16, weight decay 0.1 and U(0,1) init changes neither the fine-tuning
    optimizer of any start nor the random baseline's init: both come from ``evaluate`` (issue 25.4; they used to
    follow the first anchor drawn, so they changed with the seed)."""
    from mzsane.sample.generate import RESULTS_FILE

    _, zoo, cfg = setup
    out = str(tmp_path / "s")
    images = Images()
    sample("run", zoo, out, _scfg(), dataset=images, backbone=(IdentityBackbone(), cfg), progress=False)
    res = storage.read_json(storage.join(out, RESULTS_FILE))
    res["hparams"] = {**res.get("hparams", {}), "optimizer": "sgd", "batch_size": 16, "weight_decay": 0.1,
                      "init": "uniform"}
    storage.write_json(storage.join(out, RESULTS_FILE), res)
    budgets, inits = [], []
    monkeypatch.setattr("mzsane.zoo.evaluation.finetune", lambda kwargs, sds, dataset, **settings: (
        budgets.append(settings) or [[{"epoch": 0, "test_acc": 0.1}] for _ in sds]))
    real_random = report.baselines.random_models
    monkeypatch.setattr(report.baselines, "random_models",
                        lambda kwargs, init, num, seed: inits.append(init) or real_random(kwargs, init, num, seed))
    ecfg = EvaluateConfig(finetune_epochs=1, soup_sizes=[1], num_random=1, num_novelty_images=80, max_train_models=2,
                          num_finetune_models=1, hypernet_steps=0)
    rep = report.evaluate(out, zoo, ecfg, dataset=images, plots=False)
    assert budgets and all(b["optimizer"] == "adam" and b["batch_size"] == 64 and b["weight_decay"] == 0.0
                           for b in budgets)
    assert inits == ["default"] and rep["finetune"]["optimizer"] == "adam"
    chosen = report.finetune_mod.finetune_settings(EvaluateConfig(finetune_optimizer="sgd", finetune_batch_size=8))
    assert chosen["optimizer"] == "sgd" and chosen["batch_size"] == 8


def test_best_soup_is_selected_by_validation_accuracy_and_the_ceiling_names_its_best_anchor(setup, tmp_path):
    _, zoo, cfg = setup
    out = str(tmp_path / "s")
    images = Images()
    sample("run", zoo, out, _scfg(), dataset=images, backbone=(IdentityBackbone(), cfg), progress=False)
    ecfg = EvaluateConfig(finetune_epochs=0, soup_sizes=[1, 2], num_random=1, num_novelty_images=80,
                          max_train_models=2)
    rep = report.evaluate(out, zoo, ecfg, dataset=images, plots=False)
    curve = rep["soup_curve"]
    assert len(curve) == 6 and all("val_acc" in p for p in curve)  # sizes 1, 2, 3 (= K), plain and aligned
    best = max(curve, key=lambda p: p["val_acc"])
    assert rep["candidates"]["soup_best"]["val_acc"] == best["val_acc"]
    chosen = [p for p in curve if (p["n"], p["aligned"]) == (rep["candidates"]["soup_best"]["n"],
                                                            rep["candidates"]["soup_best"]["aligned"])]
    rows = {r["method"]: r for r in rep["rows"]}
    assert rows["soup_best"]["n"] == 1 and rows["soup_best"]["test_acc_mean"] == pytest.approx(chosen[0]["test_acc"])
    assert rep["headline"]["reconstruction_best_test_acc"] == pytest.approx(max(rep["per_model"]["reconstruction"]))
    assert "best anchor's" in report.format_table(rep)
