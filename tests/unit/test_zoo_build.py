"""`mzsane zoo build`: a tiny zoo in seconds, deterministic, resumable, both layouts, one-line errors."""
from __future__ import annotations

import os

import pytest
import torch

from mzsane import cli
from mzsane.config import ZooConfig
from mzsane.errors import ConfigError, DataError, MzsaneError, StorageError
from mzsane.zoo import build, datasets, recipes
from mzsane.zoo.build import build_zoos, plan_zoos
from mzsane.zoo.store import open_zoo

torch.set_num_threads(1)


def _cfg(**kw) -> ZooConfig:
    base = dict(recipe="tiny", datasets=["mnist"], extra_zoos=[], num_models=3, num_epochs=1, batch_size=32,
                max_train_images=192, max_eval_images=96, population_batch=8)
    return ZooConfig(**{**base, **kw})


def _weights(zoo_url: str) -> dict[str, dict]:
    zoo = open_zoo(zoo_url)
    return {r.model_id: zoo.load_checkpoint(r.model_id, max(r.checkpoint_epochs)) for r in zoo.models()}


def test_tiny_zoo_layout_metrics_and_determinism(tmp_path):
    summary = build_zoos(_cfg(), str(tmp_path / "a"), show_progress=False)
    (zoo_summary,) = summary["zoos"]
    assert zoo_summary["zoo"] == "mnist-cnn_s" and zoo_summary["trained"] == 3 and zoo_summary["num_ok"] == 3
    zoo = open_zoo(str(tmp_path / "a" / "mnist-cnn_s"))
    assert zoo.layout == "mzsane" and zoo.info.architecture == "cnn_s" and zoo.info.num_models == 3
    records = zoo.models()
    assert [r.model_id for r in records] == ["m00000", "m00001", "m00002"]
    for r in records:
        assert r.status == "ok" and r.checkpoint_epochs == [0, 1]
        assert [row["epoch"] for row in r.epochs] == [0, 1]
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"} <= set(r.epochs[1])
        assert r.arch_kwargs["activation"] == "tanh" and r.hparams["seed"] >= 1
    first = _weights(str(tmp_path / "a" / "mnist-cnn_s"))
    key = "module_list.0.weight"
    assert not torch.equal(first["m00000"][key], first["m00001"][key])  # models of one zoo differ
    torch.set_num_threads(2)
    try:  # zoo.num_threads is the build's own: the caller's thread count comes back afterwards
        build_zoos(_cfg(num_threads=1), str(tmp_path / "b"), show_progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    again = _weights(str(tmp_path / "b" / "mnist-cnn_s"))
    assert all(torch.equal(first[m][k], again[m][k]) for m in first for k in first[m])  # same seed, same zoo


def test_resume_retrains_only_unfinished_models(tmp_path):
    out = str(tmp_path / "zoos")
    build_zoos(_cfg(), out, show_progress=False)
    models = tmp_path / "zoos" / "mnist-cnn_s" / "models"
    before = _weights(str(tmp_path / "zoos" / "mnist-cnn_s"))
    kept_mtime = os.path.getmtime(models / "m00000" / "model.json")
    os.remove(models / "m00001" / "model.json")  # interrupted before this model completed
    summary = build_zoos(_cfg(), out, show_progress=False)
    (zoo_summary,) = summary["zoos"]
    assert zoo_summary["trained"] == 1 and zoo_summary["skipped_finished"] == 2 and zoo_summary["num_models"] == 3
    assert os.path.getmtime(models / "m00000" / "model.json") == kept_mtime
    after = _weights(str(tmp_path / "zoos" / "mnist-cnn_s"))
    # retrained alone instead of in a population of 3: same weights up to kernel summation order
    assert all(torch.allclose(before["m00001"][k], after["m00001"][k], atol=1e-5) for k in before["m00001"])


def test_modelzoos_layout_and_memory_destination(tmp_path):
    build_zoos(_cfg(layout="modelzoos", num_models=2, save_epochs=[1]), str(tmp_path), show_progress=False)
    zoo = open_zoo(str(tmp_path / "mnist-cnn_s"))
    assert zoo.layout == "modelzoos" and len(zoo.models()) == 2
    assert (tmp_path / "mnist-cnn_s" / "m00000" / "checkpoint_000001" / "checkpoints").exists()
    assert zoo.load_checkpoint("m00000", 1)["module_list.0.weight"].shape == (8, 1, 5, 5)
    summary = build_zoos(_cfg(num_models=2), "memory://zoo-build-test", show_progress=False)
    assert summary["zoos"][0]["num_ok"] == 2


def test_one_line_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises((StorageError, DataError)) as err:
        build_zoos(_cfg(), str(blocker / "zoos"), show_progress=False)
    assert "\n" not in str(err.value) and "a-file" in str(err.value)
    monkeypatch.setattr(datasets, "FASHION_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(build, "load_dataset", datasets.load_dataset.__wrapped__)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_zoos(_cfg(datasets=["fashion_mnist"]), str(tmp_path / "ok"), show_progress=False)
    with pytest.raises(ConfigError, match="extra_zoos"):
        plan_zoos(_cfg(extra_zoos=["mnist"]))
    with pytest.raises(ConfigError, match="zoo.recipe"):
        plan_zoos(_cfg(recipe="nope"))


def test_cli_build_and_error_exit(tmp_path, capsys):
    sets = ["--set", "zoo.datasets=[digits]", "--set", "zoo.num_models=2", "--set", "zoo.num_epochs=1",
            "--set", "zoo.max_train_images=128", "--set", "zoo.max_eval_images=64"]
    assert cli.main(["zoo", "build", "--preset", "tiny", "--out", str(tmp_path / "z"), *sets]) == 0
    assert len(open_zoo(str(tmp_path / "z" / "digits-cnn_s")).models()) == 2
    capsys.readouterr()
    (tmp_path / "f").write_text("x")
    assert cli.main(["zoo", "build", "--preset", "tiny", "--out", str(tmp_path / "f" / "z"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_recipes_reproduce_model_zoos_grids():
    seed = recipes.get_recipe("seed")
    assert seed.sizes("cnn_s") == {"num_models": 1000, "num_epochs": 50, "batch_size": 10, "max_train_images": -1,
                                   "max_eval_images": -1}
    members = seed.members(1000, 0, "cnn_s", 10)
    assert [m["seed"] for m in members] == list(range(1, 1001))
    assert {(m["activation"], m["init"], m["optimizer"], m["lr"], m["weight_decay"], m["dropout"]) for m in members} \
        == {("tanh", "uniform", "adam", 3e-4, 0.0, 0.0)}
    grid = recipes.hyp10_grid()
    assert len(grid) == 2560 and len({tuple(sorted(h.items())) for h in grid}) == 2560
    assert {h["seed"] for h in grid} == set(range(1, 11)) and {h["lr"] for h in grid} == {1e-3, 1e-4}
    demo = plan_zoos(ZooConfig())
    assert [p.name for p in demo] == ["mnist-cnn_s", "fashion_mnist-cnn_s", "animal_mnist-cnn_s", "mnist-resnet_mini"]
    hps = [hp for _, hp in demo[0].members]
    assert len({h["seed"] for h in hps}) == len(hps) and len({h["lr"] for h in hps}) == len(hps)
    with pytest.raises(MzsaneError):
        plan_zoos(ZooConfig(recipe="hyp10", num_models=3000))
