"""Training-side faults without Ray: --resume targets, incomplete/corrupt/malicious checkpoints, a full disk
while saving (a real 2 MiB tmpfs), and the choice between Ray's snapshot and a newer complete checkpoint."""
import io
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch

from mzsane import config, presets
from mzsane.errors import CheckpointError, ConfigError, StorageError
from mzsane.train import checkpoint as ckpt
from mzsane.train import launch


def _fake_run(tmp_path, steps=(10, 20), incomplete=()):
    """A run folder with real checkpoint files (a tiny linear model), some left incomplete (no state.pt)."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = presets.tiny()
    (run / ckpt.CONFIG_FILE).write_text(config.dumps(cfg))
    for step in steps:
        ckpt.save(str(run / ckpt.checkpoint_name(step)), torch.nn.Linear(2, 2), {"step": step}, cfg)
        if step in incomplete:
            os.remove(run / ckpt.checkpoint_name(step) / ckpt.STATE_FILE)
    return str(run), cfg


def test_resume_accepts_run_or_newest_checkpoint_and_never_targets_a_checkpoint(tmp_path):
    run, _ = _fake_run(tmp_path)
    assert launch.resume_run_url(run) == run
    assert launch.resume_run_url(run + "/") == run
    newest = os.path.join(run, ckpt.checkpoint_name(20))
    assert launch.resume_run_url(newest) == run  # the run, not the checkpoint folder, is written to
    older = os.path.join(run, ckpt.checkpoint_name(10))
    with pytest.raises(ConfigError, match="not the newest complete checkpoint") as err:
        launch.resume_run_url(older)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a run folder"):
        launch.resume_run_url(str(tmp_path))


def test_incomplete_checkpoints_are_skipped_on_resume(tmp_path):
    run, _ = _fake_run(tmp_path, steps=(10, 20, 30), incomplete=(30,))
    assert ckpt.latest_checkpoint_url(run) == os.path.join(run, ckpt.checkpoint_name(20))
    with pytest.raises(ConfigError, match="newest complete checkpoint"):
        launch.resume_run_url(os.path.join(run, ckpt.checkpoint_name(30)))


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "malicious"])
def test_corrupt_or_malicious_state_pt_is_refused_in_one_line(tmp_path, kind):
    run, _ = _fake_run(tmp_path, steps=(10,))
    directory = os.path.join(run, ckpt.checkpoint_name(10))
    state = os.path.join(directory, ckpt.STATE_FILE)
    marker = tmp_path / "pwned"
    if kind == "garbage":
        Path(state).write_bytes(os.urandom(512))
    elif kind == "truncated":
        data = Path(state).read_bytes()
        Path(state).write_bytes(data[: len(data) // 2])
    else:
        buf = io.BytesIO()
        torch.save({"step": 10, "evil": _System(marker)}, buf)
        Path(state).write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as err:
        ckpt.load(directory)
    assert "\n" not in str(err.value) and directory in str(err.value)
    assert not marker.exists()


@pytest.fixture
def tiny_fs(tmpfs):
    """A real 2 MiB filesystem."""
    return tmpfs("full", "size=2m")


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_removes_it(tiny_fs):
    directory = str(tiny_fs / ckpt.checkpoint_name(5))
    with pytest.raises(StorageError) as err:
        ckpt.save(directory, torch.nn.Linear(1000, 1000), {"step": 5}, presets.tiny())  # 4 MB > 2 MiB
    assert "\n" not in str(err.value) and "no space left" in str(err.value) and directory in str(err.value)
    assert "more are needed" in str(err.value)
    assert not os.path.exists(directory)


def test_disk_full_while_uploading_a_checkpoint_removes_the_partial_copy(tmp_path, tiny_fs):
    local = str(tmp_path / ckpt.checkpoint_name(5))
    ckpt.save(local, torch.nn.Linear(800, 800), {"step": 5}, presets.tiny())  # 2.5 MB
    target = str(tiny_fs / "runs" / "r" / ckpt.checkpoint_name(5))
    with pytest.raises(StorageError, match="no space left"):
        ckpt.upload(local, target)
    assert not os.path.exists(target)
    assert ckpt.latest_checkpoint_url(str(tiny_fs / "runs" / "r")) is None


def test_ray_resume_prefers_a_newer_complete_checkpoint_over_rays_snapshot(tmp_path, monkeypatch):
    ray_train = pytest.importorskip("ray.train")
    from mzsane.train.context import RayContext

    run, _ = _fake_run(tmp_path, steps=(150, 160))
    snapshot = types.SimpleNamespace(path=os.path.join(run, ckpt.checkpoint_name(150)),
                                     to_directory=lambda d: os.path.join(run, ckpt.checkpoint_name(150)))
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: snapshot)
    ctx = RayContext.__new__(RayContext)  # identity from Ray is not needed for this choice
    ctx.run_url, ctx._scratch = run, []
    assert ctx.latest_checkpoint() == os.path.join(run, ckpt.checkpoint_name(160))
    monkeypatch.setattr(ray_train, "get_checkpoint",
                        lambda: types.SimpleNamespace(path=os.path.join(run, ckpt.checkpoint_name(160)),
                                                      to_directory=lambda d: "ray-snapshot"))
    assert ctx.latest_checkpoint() == "ray-snapshot"  # Ray's own, when it is the newest


_WORKER = """
import socket, sys, time
from mzsane.train import launch
launch._watch_driver({"pid": int(sys.argv[1]), "host": socket.gethostname()})
while True:  # a worker that would keep writing into the run folder
    with open(sys.argv[2], "a") as fh:
        fh.write(f"{time.time()}\\n")
    time.sleep(0.05)
"""


def test_a_worker_exits_soon_after_its_driver_is_sigkilled(tmp_path):
    import signal
    import sys
    import time

    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    out = tmp_path / "writes.txt"
    worker = subprocess.Popen([sys.executable, "-c", _WORKER, str(driver.pid), str(out)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 3):
            time.sleep(0.1)
        assert worker.poll() is None, "the worker runs while its driver lives"
        os.kill(driver.pid, signal.SIGKILL)
        killed = time.time()
        driver.wait()
        worker.wait(timeout=10)
        last = float(out.read_text().split()[-1])
        print(f"worker exited {time.time() - killed:.2f} s after the driver's SIGKILL; last write "
              f"+{max(0.0, last - killed):.2f} s")
        assert last - killed < 1.0 and worker.returncode == 75
    finally:
        for proc in (driver, worker):
            if proc.poll() is None:
                proc.kill()
