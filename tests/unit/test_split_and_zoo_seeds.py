"""What a seed varies (issue 25.5): ``data.split_seed`` draws another train/val/test split of the same shards at
read time (training, the held-out anchor pool and the probe follow it); ``zoo.seed`` is recorded in zoo.json, a
zoo is never grown under another seed, recipe or training budget, and a sweep cannot ask one zoo name for two
seeds."""
from __future__ import annotations

import pytest

from mzsane import storage
from mzsane.config import Config, ZooConfig
from mzsane.errors import ConfigError, DataError
from mzsane.sample.anchors import anchor_pool, model_splits, seen_models
from mzsane.shards.manifest import read_manifest
from mzsane.shards.select import effective_split_seed, select, training_selection
from mzsane.sweep import prerequisites
from mzsane.sweep.results import _rows
from mzsane.zoo.build import build_zoos
from mzsane.zoo.store import open_zoo
from tests.fixtures.zoos import build_shards, make_zoo, shards_cfg

FRACTIONS = [0.5, 0.25, 0.25]


@pytest.fixture
def shards(tmp_path):
    """A 12-model zoo sharded 50/25/25 under the tiny preset's split seed."""
    zoo = make_zoo(str(tmp_path / "zoos"), "mnist-cnn_s", num_models=12, epochs=(0, 1))
    cfg = shards_cfg(split_fractions=FRACTIONS)
    out = str(tmp_path / "shards")
    build_shards([zoo], out, cfg)
    return cfg, read_manifest(out), zoo


def _ids(selection) -> list[str]:
    return sorted(m["model_id"] for m in selection.models)


def test_the_shards_own_seed_reads_back_their_split_and_another_seed_draws_a_new_one(shards):
    cfg, manifest, _ = shards
    written = {s: manifest.model_ids("mnist-cnn_s", s) for s in ("train", "val", "test")}
    same = {s: _ids(select(manifest, split=s, split_seed=cfg.shards.split_seed, split_fractions=FRACTIONS))
            for s in written}
    assert same == written
    other = {s: _ids(select(manifest, split=s, split_seed=cfg.shards.split_seed + 1, split_fractions=FRACTIONS))
             for s in written}
    assert other != written and {s: len(v) for s, v in other.items()} == {s: len(v) for s, v in written.items()}
    assert sorted(other["train"] + other["val"] + other["test"]) == sorted(m for ids in written.values() for m in ids)
    rows = select(manifest, split="train", split_seed=cfg.shards.split_seed + 1, split_fractions=FRACTIONS).rows()
    assert {r.model_id for r in rows} == set(other["train"]) and len(rows) == 2 * len(other["train"])  # 2 epochs
    with pytest.raises(DataError, match="split fractions"):
        select(manifest, split="train", split_seed=3)


def test_training_and_the_held_out_anchor_pool_follow_the_read_time_split(shards):
    cfg, manifest, zoo = shards
    cfg.data.shards_url, cfg.data.zoos, cfg.data.num_models_per_zoo = manifest.url, ["mnist-cnn_s"], 4
    cfg.data.split_seed = cfg.shards.split_seed + 1
    assert effective_split_seed(cfg) == cfg.shards.split_seed + 1
    resplit = model_splits([r.model_id for r in open_zoo(zoo).models()], FRACTIONS, cfg.data.split_seed, "mnist-cnn_s")
    trained = set(_ids(training_selection(manifest, cfg.data, "train", cfg.shards.split_fractions)))
    assert len(trained) == 4 and all(resplit[m] == "train" for m in trained)
    assert not trained <= set(manifest.model_ids("mnist-cnn_s", "train"))  # not the shards' own train models
    assert seen_models(cfg, "mnist-cnn_s") == trained
    held_out = anchor_pool(sorted(resplit), resplit, seen_models(cfg, "mnist-cnn_s"), "held_out")
    assert not set(held_out) & trained and len(held_out) == 8
    cfg.data.split_seed = -1
    assert effective_split_seed(cfg) == cfg.shards.split_seed


def test_a_split_seed_axis_is_a_replicate_in_the_report_not_a_setting(tmp_path):
    point = str(tmp_path / "p")
    axes = {"data.seed": 1, "train.seed": 1, "sample.seed": 1, "evaluate.seed": 1, "data.split_seed": 7,
            "train.lr": 0.001}
    meta = {"point": "p", "composition": "mnist", "zoos": ["mnist-cnn_s"], "zoo_size": 4, "axes": axes}
    storage.write_json(storage.join(point, "point.json"), meta)
    (row,) = _rows(point, "p", {"target_zoo": "mnist-cnn_s", "rows": [{"method": "generated", "test_acc_mean": 0.5}]},
                   True)
    assert row["axes"] == "train.lr=0.001" and row["seed"] == "1,7"


def _zoo_cfg(**kw) -> ZooConfig:
    base = dict(recipe="tiny", datasets=["mnist"], extra_zoos=[], num_models=2, num_epochs=1, batch_size=32,
                max_train_images=96, max_eval_images=64, population_batch=8, num_threads=1)
    return ZooConfig(**{**base, **kw})


def test_a_zoo_records_its_seed_and_is_never_grown_under_another_seed_or_recipe(tmp_path):
    out = str(tmp_path / "zoos")
    build_zoos(_zoo_cfg(seed=3), out, show_progress=False)
    assert open_zoo(storage.join(out, "mnist-cnn_s")).info.seed == 3
    with pytest.raises(DataError, match=r"built with zoo.seed=3, this build asks for zoo.seed=4; set zoo.seed=3"):
        build_zoos(_zoo_cfg(seed=4, num_models=3), out, show_progress=False)
    with pytest.raises(DataError, match=r"zoo.recipe=tiny, this build asks for zoo.recipe=demo"):
        build_zoos(_zoo_cfg(seed=3, recipe="demo", num_models=3), out, show_progress=False)
    assert len(open_zoo(storage.join(out, "mnist-cnn_s")).models()) == 2  # nothing was added or lost
    for key, value in (("num_epochs", 2), ("max_train_images", 64)):  # nor under another budget
        with pytest.raises(DataError, match=rf"trained with {key}=.*set zoo.{key}="):
            build_zoos(_zoo_cfg(seed=3, num_models=3, **{key: value}), out, show_progress=False)
    with pytest.raises(DataError, match=r"saved at epochs \[0, 1\].*saves \[1\]"):
        build_zoos(_zoo_cfg(seed=3, num_models=3, save_epochs=[1]), out, show_progress=False)
    assert len(open_zoo(storage.join(out, "mnist-cnn_s")).models()) == 2
    build_zoos(_zoo_cfg(seed=3, num_models=3), out, show_progress=False)  # the same seed and budget grow it
    assert len(open_zoo(storage.join(out, "mnist-cnn_s")).models()) == 3


def test_a_sweep_asking_one_zoo_for_two_seeds_is_refused_before_anything_is_built(tmp_path):
    configs = {}
    for seed in (0, 1):
        cfg = Config()
        cfg.storage.root, cfg.data.zoos, cfg.sample.target_zoo = str(tmp_path), ["mnist-cnn_s"], "mnist-cnn_s"
        cfg.zoo.seed = seed
        configs[f"p{seed}"] = cfg
    with pytest.raises(ConfigError, match=r"zoo mnist-cnn_s with zoo.seed 0 and 1.*one sweep per zoo.seed"):
        prerequisites.needs(configs)
    configs["p1"].zoo.seed = 0
    assert set(prerequisites.needs(configs)[2]) == {"mnist-cnn_s"}


def test_the_probe_labels_each_checkpoint_with_the_split_the_backbone_read(shards):
    from mzsane.model.sane import SANE
    from mzsane.probe.features import zoo_features

    cfg, manifest, zoo = shards
    model = SANE(cfg.model, int(manifest.tokensize), manifest.max_positions).eval()
    cfg.data.split_seed = cfg.shards.split_seed + 1
    resplit = model_splits([r.model_id for r in open_zoo(zoo).models()], FRACTIONS, cfg.data.split_seed, "mnist-cnn_s")
    features = zoo_features(model, cfg, manifest, "mnist-cnn_s")
    assert len(features.model_ids) == 24  # 12 models x 2 epochs
    assert [resplit[m] for m in features.model_ids] == features.splits


def test_a_split_seed_axis_renders_one_point_per_split_crossed_with_the_seeds():
    from pathlib import Path

    from mzsane.sweep import chart
    from mzsane.sweep.point import rendered_points

    root = Path(__file__).resolve().parents[2]
    size = [str(root / "jobs" / "zoo-size.yaml"), str(root / "jobs" / "local" / "zoo-size.yaml")]
    points = rendered_points(chart.render(size, sets=["sweep.grid.zooSizes={4}", "sweep.grid.axes.seed.values={0,1}",
                                                      r"sweep.grid.axes.data\.split_seed.values={42,43}"]))
    assert sorted((p.overrides["data"]["seed"], p.overrides["data"]["split_seed"]) for p in points) == [
        (0, 42), (0, 43), (1, 42), (1, 43)]
