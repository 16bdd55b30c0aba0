"""``mzsane curve``: zero-shot generation and its ceiling at every kept checkpoint of a run, resumable, with the
run's validation reconstruction loss beside it (issue 26.3's learning curve)."""
from __future__ import annotations

import json

import pytest

from mzsane import cli, presets, storage
from mzsane.errors import DataError
from mzsane.evaluate import curve
from mzsane.shards.writer import build_shards
from mzsane.train.launch import train
from mzsane.zoo.synthetic import SyntheticZoo


@pytest.fixture
def run(tmp_path):
    """A tiny backbone trained 4 steps without Ray, keeping its checkpoints at steps 2 and 4."""
    cfg = presets.tiny()
    cfg.storage.root = str(tmp_path)
    zoo = storage.join(str(tmp_path), "zoos", "mnist-cnn_s")
    SyntheticZoo("mnist-cnn_s", "cnn_s", 12, (0, 1)).write(zoo)
    build_shards([zoo], storage.join(str(tmp_path), "shards", "default"), cfg.tokens, cfg.shards, progress=False)
    cfg.train.num_epochs, cfg.train.num_steps = 0.0, 4
    cfg.train.checkpoint_every_n_steps = cfg.train.eval_every_n_steps = 2
    cfg.train.num_checkpoints_to_keep = 5
    cfg.run_name = "curve-run"
    return train(cfg, no_ray=True), zoo


def _cfg():
    cfg = presets.tiny()
    s, e = cfg.sample, cfg.evaluate
    s.num_anchors, s.num_candidates, s.num_keep, s.bn_iterations, s.max_val_images = 2, 3, 1, 0, 100
    e.num_random, e.max_train_models, e.num_novelty_images, e.soup_sizes = 1, 2, 50, [1]
    e.finetune_epochs, e.hypernet_steps = 2, 5  # the curve turns both off
    return cfg


def test_every_kept_checkpoint_is_a_point_and_a_rerun_reads_what_it_evaluated(run, tmp_path):
    run_url, zoo = run
    cfg, out, lines = _cfg(), str(tmp_path / "curve"), []
    summary = curve.learning_curve(run_url, zoo, out, cfg.sample, cfg.evaluate, log=lines.append)
    assert [r["step"] for r in summary["rows"]] == [2, 4]
    for row in summary["rows"]:
        assert 0.0 <= row["generated"] <= 1.0 and 0.0 <= row["reconstruction"] <= row["reconstruction_best"] <= 1.0
        assert row["val_loss_recon"] > 0 and row["anchor_pool"] == "held_out"
        results = storage.read_json(storage.join(out, f"step_{row['step']:08d}", "evaluate", "results.json"))
        assert results["backbone"].endswith(f"checkpoint_{row['step']:08d}")  # that checkpoint, not the last
        assert not results["finetune"]["curves"]  # zero-shot only
    logged = {json.loads(x)["step"]: json.loads(x)["val/loss_recon"]
              for x in storage.read_text(storage.join(run_url, "log.jsonl")).splitlines() if "val/loss_recon" in x}
    assert [r["val_loss_recon"] for r in summary["rows"]] == [logged[2], logged[4]]
    assert storage.read_text(storage.join(out, "curve.csv")).splitlines()[0].split(",") == list(curve.COLUMNS)
    assert storage.exists(storage.join(out, "curve.png"))
    assert all("sampling" in x for x in lines)
    lines.clear()
    again = curve.learning_curve(run_url, zoo, out, cfg.sample, cfg.evaluate, log=lines.append)
    assert again["rows"] == summary["rows"] and all("evaluated before" in x for x in lines)


def test_a_run_without_checkpoints_gets_one_line_naming_the_fix(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="num_checkpoints_to_keep"):
        curve.checkpoints(str(tmp_path / "empty"))
    code = cli.main(["curve", "--backbone", str(tmp_path / "empty"), "--zoo", str(tmp_path), "--out",
                     str(tmp_path / "o")])
    assert code != 0 and "Traceback" not in capsys.readouterr().err
