"""Ray Train workers run in their own working directory: the driver hands them absolute local paths."""
from __future__ import annotations

import os

from mzsane import config as config_mod
from mzsane import storage
from mzsane.train import launch
from tests.unit.test_train_loop import make_shards


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
