"""The tiny preset end to end, without Ray: zoo -> shards -> train -> sample -> evaluate."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


def test_tiny_pipeline_generates_models_that_beat_random_init(tmp_path):
    from mzsane import presets
    from mzsane.evaluate.report import evaluate, format_table
    from mzsane.sample.generate import read_state_dict, sample
    from mzsane.shards.writer import build_shards
    from mzsane.train.launch import train
    from mzsane.zoo.architectures import build_model
    from mzsane.zoo.build import build_zoos

    cfg = presets.tiny()
    cfg.storage.root = str(tmp_path)
    cfg.zoo.datasets, cfg.zoo.extra_zoos = ["mnist"], []
    cfg.zoo.num_models, cfg.zoo.num_epochs = 6, 2
    # the tiny preset's 20 steps only prove the loop runs; decodable weights need a real (still small) fit
    cfg.model.d_model, cfg.model.latent_dim = 64, 16
    cfg.train.num_steps, cfg.train.checkpoint_every_n_steps, cfg.train.eval_every_n_steps = 1500, 1500, 1500
    cfg.train.batch_size = 8
    cfg.sample.num_candidates, cfg.sample.num_keep = 8, 2
    zoos = str(tmp_path / "zoos")
    build_zoos(cfg.zoo, zoos, show_progress=False)
    zoo_url = os.path.join(zoos, "mnist-cnn_s")
    shards = str(tmp_path / "shards")
    build_shards([zoo_url], shards, cfg.tokens, cfg.shards, progress=False)
    cfg.data.shards_url = shards
    run_url = train(cfg, no_ray=True)

    out = str(tmp_path / "samples")
    results = sample(run_url, zoo_url, out, cfg.sample, progress=False)
    assert results["in_distribution"] is True
    assert results["selection"]["test_used"] is False
    for g in results["generated"]:  # generated checkpoints load into their architecture and run
        model = build_model("cnn_s", **{k: v for k, v in results["arch_kwargs"].items()})
        model.load_state_dict(read_state_dict(os.path.join(out, g["file"])))
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)

    report = evaluate(out, zoo_url, cfg.evaluate)
    print(format_table(report))
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"generated", "anchors", "soup", "soup_aligned", "random"}
    assert rows["generated"]["test_acc_mean"] > rows["random"]["test_acc_mean"] + 0.1
    on_disk = json.loads(open(os.path.join(out, "evaluate", "results.json")).read())
    assert on_disk["rows"] == report["rows"]
    for name in ("results.csv", "accuracy.png", "soup.png", "finetune.png"):
        assert os.path.getsize(os.path.join(out, "evaluate", name)) > 0
