"""A real ``mzsane shards build`` / ``mzsane zoo build`` process SIGKILLed mid-write: no cleanup code runs
(unlike an exception raised inside the process), yet nothing torn may be visible to a reader, and running
the same command again must complete.

"Visible" is what the readers look at: for shards every ``part-*.parquet`` under its final name and the
manifest; for zoos every model whose ``model.json`` exists (written last) and its checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from mzsane import storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MZSANE = os.path.join(os.path.dirname(sys.executable), "mzsane")


def _files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


def _kill_when(cmd: list[str], ready, timeout: float = 300.0) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; returns the poll count (> 0: killed mid-run)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, polls = time.time() + timeout, 0
    try:
        while not ready():
            assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-2000:]!r}"
            assert time.time() < deadline, "the build never reached the point to kill it at"
            time.sleep(0.02)
            polls += 1
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the build must die by SIGKILL, mid-write"
    return polls


def _run(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_sigkilled_shards_build_leaves_nothing_torn_and_a_rerun_completes(tmp_path):
    from mzsane.shards.manifest import read_manifest
    from mzsane.shards.reader import ShardReader
    from mzsane.shards.select import select
    from tests.fixtures.zoos import make_zoo

    zoos = [make_zoo(str(tmp_path / "zoos"), z, "resnet_mini", num_models=6, seed=i, epochs=(0, 1, 2))
            for i, z in enumerate(("za", "zb"))]
    out = str(tmp_path / "shards")
    cmd = [MZSANE, "shards", "build", *zoos, "--out", out, "--preset", "tiny", "--set", "shards.rows_per_file=2"]

    def some_part_written() -> bool:
        return any(os.path.basename(f).startswith("part-") for f in _files(out)) if os.path.isdir(out) else False

    _kill_when(cmd, some_part_written)
    assert not os.path.exists(os.path.join(out, "manifest.json")), "a manifest before every part was written"
    visible = [f for f in os.listdir(out) if f.startswith("part-") and f.endswith(".parquet")]
    for name in visible:  # every part under its final name is a whole Parquet file (footer included)
        pq.read_metadata(os.path.join(out, name))
    done = subprocess.run([MZSANE, "shards", "info", out], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr  # one-line error

    summary = _run(cmd)
    assert summary["models"] == 12 and summary["checkpoints"] == 36
    m = read_manifest(out)
    rows = sum(len(list(ShardReader(out, select(m, split=s)).iter_samples())) for s in ("train", "val", "test"))
    assert rows == 36
    referenced = {f["path"] for f in m.files}
    assert {f for f in os.listdir(out) if f.startswith("part-")} == referenced  # no orphan left behind


def test_sigkilled_zoo_build_leaves_nothing_torn_and_a_rerun_completes(tmp_path):
    from mzsane.zoo.store import open_zoo

    out = str(tmp_path / "zoos")
    cmd = [MZSANE, "zoo", "build", "--preset", "tiny", "--out", out, "--set", "zoo.datasets=[mnist]",
           "--set", "zoo.extra_zoos=[]", "--set", "zoo.num_models=6", "--set", "zoo.num_epochs=2",
           "--set", "zoo.population_batch=2", "--set", "zoo.max_train_images=500", "--set", "zoo.max_eval_images=200"]

    def a_model_finished() -> bool:
        return any(f.endswith("model.json") for f in _files(out)) if os.path.isdir(out) else False

    _kill_when(cmd, a_model_finished)
    (zoo,) = os.listdir(out)
    reader = open_zoo(storage.join(out, zoo))
    finished = reader.models()
    assert 1 <= len(finished) < 6, "killed after the first population and before the last"
    for record in finished:  # every visible model is whole: each of its checkpoints loads
        for epoch in record.checkpoint_epochs or [e["epoch"] for e in record.epochs]:
            assert reader.load_checkpoint(record.model_id, epoch)

    summary = _run(cmd)
    (built,) = summary["zoos"]
    assert built["num_models"] == 6 and built["skipped_finished"] == len(finished)
    assert len(open_zoo(storage.join(out, zoo)).models()) == 6
