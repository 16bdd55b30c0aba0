"""``mzsane sweep run -f jobs/smoke.yaml -f jobs/local/smoke.yaml``: the chart's sweep on one machine.

The real command in a subprocess, as a user runs it: the chart rendered by Helm, the zoos and shards built
by the runner, every point's RayJob entrypoint on a local Ray instance on loopback. Resume is tested the
hard way: the training stage of one point is SIGKILLed mid-run (after it wrote a checkpoint), the
command is run again, and it must finish that point from its checkpoint without re-running the other
point or the finished stages; ``mzsane sweep report`` then reads both points' results.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LONG_STEPS = 1500  # the point that is killed trains long enough to be caught between checkpoints
LEAN_EVALUATE = {"hypernet_steps": 0, "finetune_epochs": 0}  # the runner is under test here, not the baselines


def _extra_values(tmp_path: Path) -> str:
    """A second point beside jobs/smoke.yaml's 'smoke': same zoos, a longer fit, killed in the test."""
    values = {"sweep": {"config": {"evaluate": LEAN_EVALUATE}, "runs": {  # merged with smoke.yaml's run
        "long": {"zooSize": 2, "zoos": ["mnist-cnn_s"],
                 "set": {"train.num_steps": LONG_STEPS, "train.checkpoint_every_n_steps": 100,
                         "train.eval_every_n_steps": 500}},
    }}}
    path = tmp_path / "two-points.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _command(tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "mzsane.cli", "sweep", "run", "-f", str(ROOT / "jobs" / "smoke.yaml"),
            "-f", str(ROOT / "jobs" / "local" / "smoke.yaml"), "-f", _extra_values(tmp_path),
            "--storage", str(tmp_path / "data")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}


def _state(tmp_path: Path, point: str) -> dict:
    path = tmp_path / "data" / "sweeps" / ".run" / "smoke" / point / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _steps(run: Path) -> list[int]:
    log = run / "log.jsonl"
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _kill_long_point_mid_training(proc: subprocess.Popen, tmp_path: Path, timeout: float = 600.0) -> int:
    """SIGKILL the 'long' point's train process once it has a checkpoint; returns the step it had reached."""
    run = tmp_path / "data" / "runs" / "smoke-long"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"sweep run ended early:\n{proc.stdout.read() if proc.stdout else ''}"
        state = _state(tmp_path, "long")
        checkpoints = sorted(run.glob("checkpoint_*")) if run.exists() else []
        if state.get("running") == "train" and checkpoints and max(_steps(run), default=0) >= 200:
            os.kill(state["pid"], signal.SIGKILL)
            return max(_steps(run))
        time.sleep(0.2)
    raise AssertionError("the long point never reached step 200 of its training")


@pytest.mark.timeout(2400)  # two sweep runs of two points each on 2 shared cores
def test_sweep_run_resumes_after_a_killed_point_and_reports(tmp_path):
    first = subprocess.Popen(_command(tmp_path), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        killed_at = _kill_long_point_mid_training(first, tmp_path)
        out1, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert killed_at < LONG_STEPS
    assert first.returncode == 2, out1  # a failed point fails the command, after the others finished
    assert "1 point(s) failed: long" in out1 and "long: FAILED in train" in out1, out1
    assert _state(tmp_path, "smoke")["status"] == "done"
    long_state = _state(tmp_path, "long")
    assert long_state["done_stages"] == ["record-point"] and long_state["status"] == "failed"
    smoke_results = tmp_path / "data" / "sweeps" / "smoke" / "smoke" / "evaluate" / "results.json"
    smoke_mtime = smoke_results.stat().st_mtime_ns
    record_log = tmp_path / "data" / "sweeps" / ".run" / "smoke" / "long" / "0-record-point.log"
    record_log_size = record_log.stat().st_size

    second = subprocess.run(_command(tmp_path), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=900)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2
    assert "2 points, 1 finished before, 1 to run" in out2, out2
    assert "long: train (2/7) starting on 1 CPU, resuming after record-point" in out2, out2
    # nothing finished is computed again: the other point's results and the finished stage are untouched
    assert smoke_results.stat().st_mtime_ns == smoke_mtime
    assert record_log.stat().st_size == record_log_size
    # the killed training continued from its last checkpoint instead of starting over
    run = tmp_path / "data" / "runs" / "smoke-long"
    rank0 = json.loads((run / "workers" / "rank_0.json").read_text())
    assert 0 < rank0["start_step"] <= killed_at
    assert max(_steps(run)) == LONG_STEPS
    assert _state(tmp_path, "long")["status"] == "done"

    report = subprocess.run([sys.executable, "-m", "mzsane.cli", "sweep", "report",
                             str(tmp_path / "data" / "sweeps" / "smoke"), "--out", str(tmp_path / "report")],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "sweep_results.csv").open(encoding="utf-8")))
    for pool in ("held_out", "seen"):  # ours, and the paper's protocol (anchors the backbone trained on)
        generated = [r["point"] for r in rows if r["method"] == "generated" and r["anchor_pool"] == pool]
        assert sorted(generated) == ["long", "smoke"], (pool, report.stdout)
    assert (tmp_path / "report" / "sweep_zero_shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pending" not in report.stdout
    # the probe stage ran on each point's backbone and the report reads it as its second axis
    for point in ("smoke", "long"):
        probe = json.loads((tmp_path / "data" / "sweeps" / "smoke" / point / "probe" / "probe.json").read_text())
        assert {r["scope"] for r in probe["rows"]} == {"mnist-cnn_s"} and probe["backbone"].endswith(f"smoke-{point}")
    assert "probe_r2_embedding" in rows[0] and (tmp_path / "report" / "sweep_summary.csv").exists()
