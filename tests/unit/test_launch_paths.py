"""Ray Train workers run in their own working directory: the driver hands them absolute local paths."""
from __future__ import annotations

import os

from mzsane import config as config_mod
from mzsane import storage
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
    cfg = config_mod.load("tiny")
    cfg.storage.root, cfg.run_name = "data", "rel"
    resolved, run_url = launch.prepare(cfg)
    assert resolved.storage.root == str(tmp_path / "data")
    assert run_url == str(tmp_path / "data" / "runs" / "rel")
    saved = config_mod.loads(storage.read_text(storage.join(run_url, "config.json")))
    assert saved.storage.root == str(tmp_path / "data")  # what the workers read
    monkeypatch.chdir("/")
    again, url = launch.prepare(config_mod.load("tiny"), resume=run_url)
    assert url == run_url and again.storage.root == str(tmp_path / "data")


def test_the_drivers_progress_bar_shows_the_planned_steps_not_train_num_steps(tmp_path, capsys):
    """With train.num_epochs the step count is resolved on the workers; the bar follows it from log.jsonl."""
    import json
    import threading
    import time

    run = str(tmp_path / "run")
    storage.write_text(storage.join(run, "log.jsonl"),
                       json.dumps({"step": 150, "train/loss": 0.5, "train/target_steps": 413}) + "\n")
    stop = threading.Event()
    thread = threading.Thread(target=launch._follow_progress, args=(run, 200, stop))
    thread.start()
    time.sleep(2.5)  # one poll of the log (every 2 s)
    stop.set()
    thread.join(timeout=10)
    err = capsys.readouterr().err
    assert "150/413" in err and "/200" not in err.split("\r")[-1]  # the bar opens at 0/200, then follows


def test_a_worker_runs_as_many_threads_as_the_cpus_ray_reserved_for_it():
    """Ray sets OMP_NUM_THREADS=1 in a worker; one with cluster.cpus_per_worker=k must run k intra-op threads."""
    import torch

    before = torch.get_num_threads()
    cfg = config_mod.load("tiny")
    try:
        torch.set_num_threads(1)  # what a Ray worker starts with
        cfg.cluster.cpus_per_worker = 2
        assert launch.worker_threads(cfg) == 2 and torch.get_num_threads() == 2
        cfg.cluster.cpus_per_worker = 0  # a worker reserving no CPU still computes on one thread
        assert launch.worker_threads(cfg) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
