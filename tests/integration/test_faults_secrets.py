"""The S3 secret stays out of everything a run leaves behind (issue 28, item 3).

``mzsane train`` on the local Ray instance it starts itself, with shards and checkpoints in a SeaweedFS of this
test's own (its own secret, so a hit can only come from this run). Ray's whole temp dir (session logs such as
``runtime_env_agent.log``, which used to hold the job's runtime-env variables), the storage root (run folder,
``log.jsonl``, ``metrics_targets.json``), the CLI's stdout/stderr and a Prometheus scrape of a training rank are
searched for the secret afterwards: none may hold it. Ray's temp dir is a short folder of the test's own
(``RAY_TMPDIR``), so nothing of other sessions on the machine is read."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from mzsane import storage
from mzsane.loopback.seaweedfs import SeaweedFS
from tests.fixtures.s3 import running
from tests.fixtures.zoos import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

SECRET = "i28-ray-log-secret-7c41e0"


@pytest.fixture
def server(tmp_path, monkeypatch):
    with running(SeaweedFS(str(tmp_path / "weed"), bucket="secrets", secret_key=SECRET), monkeypatch) as srv:
        yield srv


@pytest.fixture
def ray_tmp():
    """Ray's temp dir: short (Unix socket paths are limited to 107 bytes) and this test's alone."""
    path = tempfile.mkdtemp(prefix="r28-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _files_with(folder: str, needle: bytes) -> list[str]:
    """Every regular file below ``folder`` whose bytes contain ``needle`` (sockets and vanished files skipped)."""
    hits = []
    for sub, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(sub, name)
            try:
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                with open(path, "rb") as fh:
                    if needle in fh.read():
                        hits.append(path)
            except OSError:
                continue
    return hits


def _scrape_while_running(proc: subprocess.Popen, run_url: str, timeout_s: float = 600) -> bytes:
    """One Prometheus scrape of a training rank, taken while the run is under way (its exporter stops at the end)."""
    targets_url = storage.join(run_url, "metrics_targets.json")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            targets = storage.read_json(targets_url) if storage.exists(targets_url) else []
            for group in targets:
                for target in group.get("targets", []):
                    return urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read()
        except Exception:  # the file appears and the exporter starts while we poll
            pass
        time.sleep(0.5)
    return b""


def test_s3_secret_is_nowhere_after_a_ray_training_run(server, ray_tmp, tmp_path):
    root = server.url("run-root")
    make_shards(root, num_models=4)
    run_url = storage.join(root, "runs", "secretless")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET
    cmd = [sys.executable, "-m", "mzsane", "train", "--preset", "tiny", "--set", f"storage.root={root}",
           "--set", "run_name=secretless", "--set", "train.num_steps=300",
           "--set", "train.checkpoint_every_n_steps=100",
           "--set", "train.eval_every_n_steps=-1", "--set", "train.log_every_n_steps=5",
           "--set", "metrics.enabled=true", "--set", "metrics.host=127.0.0.1", "--set", "metrics.port=0"]
    with open(tmp_path / "train.out", "wb") as out, open(tmp_path / "train.err", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            scrape = _scrape_while_running(proc, run_url)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "train.err").read_text(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    assert b"mzsane_train" in scrape, "no scrape of a training rank was taken while the run was under way"
    assert SECRET.encode() not in scrape
    sessions = [n for n in os.listdir(os.path.join(ray_tmp, "ray")) if n.startswith("session_")] \
        if os.path.isdir(os.path.join(ray_tmp, "ray")) else os.listdir(ray_tmp)
    assert sessions, f"Ray wrote no session under RAY_TMPDIR {ray_tmp}"
    copy = storage.download_dir(root, str(tmp_path / "root-copy"))
    assert os.path.exists(os.path.join(copy, "runs", "secretless", "log.jsonl"))
    hits = _files_with(ray_tmp, SECRET.encode()) + _files_with(copy, SECRET.encode()) + \
        _files_with(str(tmp_path), SECRET.encode())
    hits = [h for h in hits if not h.startswith(str(tmp_path / "weed"))]  # the server's own data dir
    assert not hits, f"the S3 secret was written to {hits[:5]}"
