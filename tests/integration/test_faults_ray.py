"""Training faults under a real local Ray instance (Ray Train, 127.0.0.2): a diverging run fails once with one
line instead of being retried ``max_failures`` times; ``--resume`` with a checkpoint URL continues the run
without writing into the checkpoint; resuming with another worker count is one line; run files never hold
the S3 secret that the local Ray instance inherits."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from mzsane import config as config_mod
from mzsane import presets
from mzsane.errors import CheckpointError, DivergedError
from mzsane.train import checkpoint as ckpt
from mzsane.train import launch
from tests.fixtures.zoos import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

SECRET = "h3-secret-marker-5f1c"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ray-faults"))
    make_shards(path)
    return path


def _cfg(root: str, run: str, *overrides: str) -> config_mod.Config:
    return config_mod.load(presets.tiny(), [], [f"storage.root={root}", f"run_name={run}", "metrics.enabled=false",
                                        "cluster.max_failures=2", *overrides])


def test_non_finite_loss_under_ray_fails_once_with_one_line(root):
    cfg = _cfg(root, "diverge", "train.lr=1e30", "train.grad_clip=0")
    start = time.time()
    with pytest.raises(DivergedError) as err:
        launch.train(cfg)
    wall = time.time() - start
    assert "non-finite loss at step" in str(err.value) and "\n" not in str(err.value)
    run = os.path.join(root, "runs", "diverge")
    # the workers stopped cleanly and said why: no Ray retry (a retry would have raised from a worker failure)
    assert os.path.exists(os.path.join(run, launch.FAILED_FILE))
    print(f"diverging run failed after {wall:.1f} s")


def test_resume_under_ray_from_a_checkpoint_url_and_with_another_worker_count(root, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "h3-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # the local Ray instance inherits it
    cfg = _cfg(root, "resumable", "train.num_steps=20", "train.checkpoint_every_n_steps=10")
    run = launch.train(cfg)
    newest = ckpt.latest_checkpoint_url(run)
    assert newest.endswith(ckpt.checkpoint_name(20))
    saved = Path(os.path.join(newest, ckpt.CONFIG_FILE)).read_bytes()
    # a checkpoint URL is accepted explicitly and resolves to its run; nothing is written into the checkpoint
    again = launch.train(_cfg(root, "ignored"), resume=newest)
    assert again == run
    assert Path(os.path.join(newest, ckpt.CONFIG_FILE)).read_bytes() == saved
    assert not any(n.startswith("checkpoint_") or n == "runs" for n in os.listdir(newest))
    # another worker count: one line naming the count to use
    with pytest.raises(CheckpointError) as err:
        launch.train(_cfg(root, "ignored", "cluster.num_workers=2"), resume=run)
    assert "cluster.num_workers=1" in str(err.value) and "\n" not in str(err.value)
    # no run file holds the secret
    for folder, _, files in os.walk(run):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                assert SECRET.encode() not in fh.read(), os.path.join(folder, name)


def _newest_write(folder: str) -> float:
    newest = 0.0
    for sub, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temp file renamed meanwhile
                newest = max(newest, os.stat(os.path.join(sub, name)).st_mtime)
    return newest


def test_workers_stop_writing_soon_after_the_driver_is_sigkilled(root):
    import json
    import signal
    import subprocess
    import sys

    run = os.path.join(root, "runs", "orphaned")
    cmd = [sys.executable, "-m", "mzsane.cli", "train", "--preset", "tiny", "--set", f"storage.root={root}",
           "--set", "run_name=orphaned", "--set", "metrics.enabled=false", "--set", "train.num_steps=2000",
           "--set", "train.log_every_n_steps=1", "--set", "train.checkpoint_every_n_steps=5"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(run, "log.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(log) and len(Path(log).read_text().splitlines()) >= 8):
        time.sleep(0.5)
    assert os.path.exists(log), "training never started"
    worker_pid = json.loads(Path(run, "workers", "rank_0.json").read_text())["pid"]
    ray_pids = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(driver.pid)], capture_output=True,
                                               text=True).stdout.split()]  # the local Ray instance it started
    os.kill(driver.pid, signal.SIGKILL)
    killed = time.time()
    driver.wait()
    time.sleep(10)
    last = _newest_write(run)
    lag = max(0.0, last - killed)
    try:
        os.kill(worker_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    print(f"after the driver's SIGKILL: last write into the run folder +{lag:.2f} s, worker alive: {alive}")
    if alive:
        os.kill(worker_pid, signal.SIGKILL)
    leftover = []
    for pid in ray_pids:  # Ray's own processes die with their driver (fate sharing); stop any that did not
        try:
            os.kill(pid, signal.SIGKILL)
            leftover.append(pid)
        except ProcessLookupError:
            pass
    print(f"Ray processes of the killed driver still running 10 s later: {len(leftover)} of {len(ray_pids)}")
    assert not alive and lag < 2.0


def test_truncated_shard_under_ray_is_one_line_naming_the_file(root, tmp_path):
    import shutil

    from mzsane.errors import DataError
    from mzsane.shards.manifest import read_manifest

    shards = str(tmp_path / "shards")
    shutil.copytree(os.path.join(root, "shards", "default"), shards)
    part = os.path.join(shards, read_manifest(shards).files[0]["path"])
    with open(part, "r+b") as fh:
        fh.truncate(os.path.getsize(part) // 2)
    cfg = _cfg(root, "truncated", f"data.shards_url={shards}")
    start = time.time()
    with pytest.raises(DataError) as err:
        launch.train(cfg)
    assert part in str(err.value) and "\n" not in str(err.value)
    print(f"truncated shard under Ray: one line after {time.time() - start:.1f} s")
