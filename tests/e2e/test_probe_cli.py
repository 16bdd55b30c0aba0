"""``mzsane probe`` on the tiny preset: zoo -> shards -> backbone (no Ray) -> probe through the CLI."""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def test_probe_cli_writes_rows_for_every_zoo_target_and_feature(tmp_path, capsys):
    from mzsane import cli, presets
    from mzsane.shards.writer import build_shards
    from mzsane.train.launch import train
    from mzsane.zoo.build import build_zoos

    cfg = presets.tiny()
    cfg.storage.root = str(tmp_path)
    cfg.zoo.datasets, cfg.zoo.extra_zoos, cfg.zoo.num_models = ["mnist", "fashion_mnist"], [], 5
    zoos = str(tmp_path / "zoos")
    build_zoos(cfg.zoo, zoos, show_progress=False)
    shards = str(tmp_path / "shards")
    build_shards([os.path.join(zoos, z) for z in ("mnist-cnn_s", "fashion_mnist-cnn_s")], shards, cfg.tokens,
                 cfg.shards, progress=False)
    cfg.data.shards_url = shards
    cfg.train.num_steps = cfg.train.checkpoint_every_n_steps = 10
    run_url = train(cfg, no_ray=True)

    out = str(tmp_path / "probe")
    assert cli.main(["probe", "--backbone", run_url, "--zoo", "mnist-cnn_s", "fashion_mnist-cnn_s", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "property probes" in printed and "fashion_mnist-cnn_s" in printed
    with open(os.path.join(out, "probe.json")) as fh:
        results = json.load(fh)
    keys = {(r["scope"], r["target"], r["features"]) for r in results["rows"]}
    assert keys == {(s, t, f) for s in ("mnist-cnn_s", "fashion_mnist-cnn_s", "all")
                    for t in ("test_acc", "epoch", "gap") for f in ("embedding", "weight_stats")}
    # every checkpoint of both zoos (5 models x epochs 0..2) was featurized, split by model
    assert {z: sum(c.values()) for z, c in results["checkpoints"].items()} == {"mnist-cnn_s": 15,
                                                                               "fashion_mnist-cnn_s": 15}
    row = next(r for r in results["rows"] if r["scope"] == "all" and r["target"] == "test_acc")
    assert row["n_train"] == 2 * 3 * 3 and row["n_test"] >= 3 and -1e9 < row["r2"] <= 1.0
    assert os.path.getsize(os.path.join(out, "probe.csv")) > 0

    assert cli.main(["probe", "--backbone", run_url, "--zoo", "cifar10-cnn_s", "--shards", shards]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: zoo 'cifar10-cnn_s' is not in the shard dataset") and "\n" not in err
