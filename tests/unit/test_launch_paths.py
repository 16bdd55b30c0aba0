"""Ray Train workers run in their own working directory: the driver hands them absolute local paths."""
from __future__ import annotations

import os

import pytest

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.errors import CheckpointError
from mzsane.train import checkpoint as ckpt
from mzsane.train import launch
from tests.fixtures.zoos import make_shards


def test_storage_absolute_keeps_urls_and_anchors_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("data/x") == os.path.join(str(tmp_path), "data", "x")
    assert storage.absolute("file://data") == os.path.join(str(tmp_path), "data")
    assert storage.absolute("s3://b/p") == "s3://b/p"
    assert storage.absolute("memory://p") == "memory://p"
    assert storage.absolute("") == ""


def test_prepare_resolves_a_relative_root_before_workers_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_shards("data")
    cfg = config_mod.load(presets.tiny())
    cfg.storage.root, cfg.run_name = "data", "rel"
    resolved, run_url = launch.prepare(cfg)
    assert resolved.storage.root == str(tmp_path / "data")
    assert run_url == str(tmp_path / "data" / "runs" / "rel")
    saved = config_mod.loads(storage.read_text(storage.join(run_url, "config.json")))
    assert saved.storage.root == str(tmp_path / "data")  # what the workers read
    monkeypatch.chdir("/")
    again, url = launch.prepare(config_mod.load(presets.tiny()), resume=run_url)
    assert url == run_url and again.storage.root == str(tmp_path / "data")


def _epochs_cfg(root: str, run: str, workers: int) -> config_mod.Config:
    cfg = config_mod.load(presets.tiny())
    cfg.storage.root, cfg.run_name, cfg.metrics.enabled = root, run, False
    cfg.train.num_epochs, cfg.train.num_steps, cfg.cluster.num_workers = 3, 7, workers
    return cfg


def test_the_driver_finishes_the_config_for_the_real_world_size_and_workers_only_read_it(tmp_path):
    """train.num_epochs becomes steps for the ranks that will run (Ray's workers, or 1 with --no-ray), written into
    config.json before any worker starts; a worker handed an unfinished config refuses it."""
    from mzsane.errors import ConfigError
    from mzsane.train import budget as budget_mod
    from mzsane.train.context import LocalContext
    from mzsane.train.data import open_selection
    from mzsane.train.loop import build_parts

    root = str(tmp_path)
    make_shards(root)
    raw = _epochs_cfg(root, "ray2", 2)
    _, manifest, train, _ = open_selection(raw, 2)
    windows = budget_mod.measure(raw, manifest, train, 2).windows_per_epoch
    ray2, url = launch.prepare(raw)
    assert ray2.train.num_steps == budget_mod.steps_for_epochs(3, windows, raw.train.batch_size, 2)
    local, _ = launch.prepare(_epochs_cfg(root, "local", 2), no_ray=True)
    assert local.train.num_steps == budget_mod.steps_for_epochs(3, windows, raw.train.batch_size, 1)
    assert local.train.num_steps > ray2.train.num_steps and local.cluster.num_workers == 1
    saved = config_mod.loads(storage.read_text(storage.join(url, "config.json")))
    assert saved == ray2 and saved.cluster.num_workers == 2 and saved.model.max_positions
    assert raw.train.num_steps == 7 and raw.cluster.num_workers == 2 and not raw.model.max_positions  # a copy
    with pytest.raises(ConfigError, match="not finished") as err:  # planned for 2 ranks, run by 1
        build_parts(ray2, LocalContext(url))
    assert "\n" not in str(err.value)


def test_resume_keeps_the_world_size_once_a_checkpoint_exists(tmp_path):
    """A checkpoint holds every rank's data position: another world size is refused in one line on the driver;
    before the first checkpoint a resume may change it and is planned for the new one."""
    root = str(tmp_path)
    make_shards(root)
    planned, run = launch.prepare(_epochs_cfg(root, "r", 2))  # no checkpoint yet (say, killed at start)
    again, _ = launch.prepare(_epochs_cfg(root, "other", 1), resume=run, no_ray=True)
    assert again.run_name == "r" and again.cluster.num_workers == 1 and again.train.num_steps > planned.train.num_steps
    cfg = config_mod.load(presets.tiny(), [], [f"storage.root={root}", "run_name=c", "metrics.enabled=false",
                                               "train.num_steps=2", "train.checkpoint_every_n_steps=2"])
    run = launch.train(cfg, no_ray=True)
    resumed, _ = launch.prepare(config_mod.load(presets.tiny(), [], ["train.lr=0.5"]), resume=run, no_ray=True)
    assert resumed.train.lr == cfg.train.lr  # what it trains comes from the run's config.json
    two = config_mod.load(presets.tiny(), [], ["cluster.num_workers=2"])
    with pytest.raises(CheckpointError, match=r"written by 1 workers, this run has 2; resume with "
                                              r"cluster.num_workers=1$") as err:
        launch.prepare(two, resume=run)
    assert "\n" not in str(err.value)
    ckpt_config = storage.join(ckpt.latest_checkpoint_url(run), ckpt.CONFIG_FILE)  # as if 2 Ray workers wrote it
    storage.write_text(ckpt_config, storage.read_text(ckpt_config).replace('"num_workers": 1', '"num_workers": 2'))
    with pytest.raises(CheckpointError, match="resume with cluster.num_workers=2 without --no-ray"):
        launch.prepare(config_mod.load(presets.tiny()), resume=run, no_ray=True)


def test_a_worker_runs_as_many_threads_as_the_cpus_ray_reserved_for_it():
    """Ray sets OMP_NUM_THREADS=1 in a worker; one with cluster.cpus_per_worker=k must run k intra-op threads."""
    import torch

    before = torch.get_num_threads()
    cfg = config_mod.load(presets.tiny())
    try:
        torch.set_num_threads(1)  # what a Ray worker starts with
        cfg.cluster.cpus_per_worker = 2
        assert launch.worker_threads(cfg) == 2 and torch.get_num_threads() == 2
        cfg.cluster.cpus_per_worker = 0  # a worker reserving no CPU still computes on one thread
        assert launch.worker_threads(cfg) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
