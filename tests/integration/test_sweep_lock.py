"""One ``sweep run`` per sweep and storage root (issue 28, item 6), with real processes: a holder process takes the
sweep's lock as ``sweep run`` does; ``mzsane sweep run`` of the same sweep and storage, started as a user would,
is refused with one line naming the holder's host, pid and start time, before anything of the sweep is built or
written; after the holder is SIGKILLed its lock is taken over by the next process. Local storage (flock) and
SeaweedFS S3 (a lock object)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mzsane import storage
from mzsane.sweep.lock import LOCK_FILE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = [str(ROOT / "jobs" / "smoke.yaml"), str(ROOT / "jobs" / "local" / "smoke.yaml")]
HOLD = ("import sys, time; from mzsane.sweep.lock import SweepLock; lock = SweepLock(sys.argv[1], 'smoke').acquire(); "
        "print('held', flush=True); time.sleep(600)")
TAKE = ("import sys; from mzsane.sweep.lock import SweepLock; lock = SweepLock(sys.argv[1], 'smoke').acquire(); "
        "print(open(sys.argv[2]).read() if sys.argv[2] != '-' else 'taken', flush=True); lock.release()")


def _holder(sweep_url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, sweep_url], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _sweep_run(storage_root: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mzsane", "sweep", "run", *[a for f in SMOKE for a in ("-f", f)],
                           "--storage", storage_root], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})


def _check_refused(done: subprocess.CompletedProcess, holder: subprocess.Popen, lock_url: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep 'smoke' is already running"), last
    assert f"pid {holder.pid} " in last and socket.gethostname() in last and lock_url in last, last
    return last


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc: Linux")
def test_a_second_sweep_run_on_local_storage_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    root = str(tmp_path / "data")
    sweep_url = os.path.join(root, "sweeps", "smoke")
    lock_url = os.path.join(sweep_url, LOCK_FILE)
    holder = _holder(sweep_url)
    try:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        last = _check_refused(_sweep_run(root, tmp_path), holder, lock_url)
        started = json.loads(Path(lock_url).read_text())["started"]
        assert started in last
        after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
        assert after == before, "the refused run wrote into the sweep"
    finally:
        _kill(holder)
    taken = subprocess.run([sys.executable, "-c", TAKE, sweep_url, lock_url], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ))
    assert taken.returncode == 0, taken.stderr[-2000:]
    info = json.loads(taken.stdout)  # the lock file as the new holder wrote it
    assert info["pid"] != holder.pid and info["host"] == socket.gethostname()


def test_a_second_sweep_run_on_s3_is_refused_and_a_dead_holder_is_taken_over(s3_server, tmp_path):
    root = s3_server.url("lock-test")
    sweep_url = storage.join(root, "sweeps", "smoke")
    lock_url = storage.join(sweep_url, LOCK_FILE)
    holder = _holder(sweep_url)
    try:
        last = _check_refused(_sweep_run(root, tmp_path), holder, lock_url)
        assert storage.read_json(lock_url)["started"] in last
        assert storage.listdir(sweep_url) == [LOCK_FILE], "the refused run wrote into the sweep"
    finally:
        _kill(holder)
    taken = subprocess.run([sys.executable, "-c", TAKE, sweep_url, "-"], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ))
    assert taken.returncode == 0 and taken.stdout.strip() == "taken", taken.stderr[-2000:]
    assert not storage.exists(lock_url)  # released by the process that took it over
