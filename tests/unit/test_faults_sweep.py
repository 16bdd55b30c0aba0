"""Sweep sizes a zoo recipe cannot build are refused at once, and sizing a zoo is linear (issue 28, item 6).

``zooSize: 100000`` passed the schema and then spun for hours in ``models_for_train`` (a seeded split drawn for
every candidate zoo size: quadratic) before it would have built a 143k-model zoo from a recipe whose model seeds
repeat beyond 99,999 models. The two-process sweep lock is in tests/integration/test_sweep_lock.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

from mzsane import presets
from mzsane.errors import ConfigError
from mzsane.shards import writer
from mzsane.sweep import local, prerequisites
from mzsane.zoo import recipes

ROOT = Path(__file__).resolve().parents[2]


def _values(tmp_path: Path, zoo_size: int, recipe: str = "demo") -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump({"sweep": {"name": "huge", "preset": "default", "targetZoo": "mnist-cnn_s",
                                              "grid": None, "config": {"zoo": {"recipe": recipe}},
                                              "runs": {"huge": {"zooSize": zoo_size, "zoos": ["mnist-cnn_s"]}}},
                                    "metrics": {"enabled": False},
                                    "worker": {"replicas": 1, "resources": {"cpu": "1"}}}))
    return str(path)


@pytest.mark.parametrize("zoo_size, recipe, limit", [(100_000, "demo", "99,999"), (2_000, "hyp10", "2,560")])
def test_a_zoo_size_beyond_the_recipe_is_refused_before_anything_runs(tmp_path, zoo_size, recipe, limit):
    logged: list[str] = []
    with pytest.raises(ConfigError) as err:
        local.run([_values(tmp_path, zoo_size, recipe)], storage_root=str(tmp_path / "data"),
                  state_root=str(tmp_path / "state"), log=logged.append)
    message = str(err.value)
    assert "\n" not in message and f"{zoo_size:,}" in message and recipe in message and limit in message, message
    assert not (tmp_path / "data" / "zoos").exists()  # nothing was built
    assert not any("building" in line for line in logged), logged


def test_a_zoo_size_the_recipe_can_build_is_kept(tmp_path):
    cfg = presets.PRESETS["default"]()
    need = prerequisites.ZooNeed("mnist-cnn_s", train_models=40, sharded=True, points=["p"], cfg=cfg)
    assert prerequisites._zoo_config(need).num_models >= 40


def test_sizing_a_zoo_draws_no_split_and_takes_linear_steps(monkeypatch):
    """Structural, not timed: no seeded split is drawn, and the counts are asked for once per candidate size,
    about need x (1 / train fraction - 1) of them."""
    cfg = presets.PRESETS["default"]()
    fractions = list(cfg.shards.split_fractions)

    def no_split(*args, **kwargs):
        raise AssertionError("models_for_train drew a split (O(n) per candidate size)")

    calls = {"n": 0}
    real = writer.split_counts

    def counted(num_models, fracs):
        calls["n"] += 1
        return real(num_models, fracs)

    monkeypatch.setattr(writer, "split_models", no_split)
    monkeypatch.setattr(writer, "split_counts", counted)
    need = 100_000
    n = prerequisites.models_for_train(need, cfg, "mnist-cnn_s")
    assert real(n, fractions)[0] >= need > real(n - 1, fractions)[0]
    assert calls["n"] <= (n - need) + 2, calls  # one O(1) count per candidate between need and n


def test_split_counts_agree_with_the_split_itself():
    for n in (0, 1, 2, 3, 7, 20, 101):
        for fractions in ([0.7, 0.15, 0.15], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0]):
            drawn = writer.split_models([f"m{i:05d}" for i in range(n)], fractions, 3, "z")
            counts = tuple(sum(1 for s in drawn.values() if s == k) for k in ("train", "val", "test"))
            assert writer.split_counts(n, fractions) == counts


def test_building_more_models_than_a_recipe_holds_is_one_line():
    with pytest.raises(ConfigError) as err:
        recipes.resolve_sizes("tiny", "cnn_s", {"num_models": 5_000})
    assert "999" in str(err.value) and "\n" not in str(err.value)
    assert recipes.resolve_sizes("seed", "cnn_s", {"num_models": 5_000})["num_models"] == 5_000  # no limit
