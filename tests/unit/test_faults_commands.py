"""A full disk through whole commands, as a user meets it: ``mzsane zoo build``, ``mzsane shards build`` and
``mzsane train --no-ray`` run as subprocesses with their output on a real tmpfs that an earlier, complete output
of the same command already uses and a filler file then nearly fills (about half of what the next run needs is
left, so it fails midway). Each must exit non-zero with one ``error:`` line naming the path and saying space is
needed, no traceback, no temp or unfinished files of that run, and the earlier output byte-identical."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mzsane.shards.reader import verify_dataset
from mzsane.train import checkpoint as ckpt
from mzsane.zoo.store import open_zoo
from tests.fixtures.zoos import make_shards, make_zoo

pytestmark = pytest.mark.slow

PY = sys.executable
ZOO_SETS = ["--set", "zoo.datasets=[digits]", "--set", "zoo.num_models=4", "--set", "zoo.num_epochs=1",
            "--set", "zoo.max_train_images=128", "--set", "zoo.max_eval_images=64"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "mzsane", *args], capture_output=True, text=True, timeout=900)


def _lines(text: str) -> list[str]:
    """Non-empty lines, tqdm's carriage-return redraws split apart."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def _disk_full_line(proc: subprocess.CompletedProcess, path: Path) -> str:
    """The command failed with one line naming ``path`` and asking for space; progress bars aside, nothing else."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = _lines(proc.stderr)
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], lines[-5:]
    last = lines[-1]
    assert last.startswith("error: no space left") and str(path) in last and "free space" in last, last
    return last


def _fill(mnt: Path, leave: int) -> None:
    """Allocate a filler file so that about ``leave`` bytes stay free on the filesystem."""
    free = shutil.disk_usage(mnt).free
    with open(mnt / "filler", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(free - leave, 1))


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _temps(mnt: Path) -> list[str]:
    return [str(p) for p in mnt.rglob(".tmp-*")]


def test_zoo_build_on_a_full_disk(tmpfs):
    mnt = tmpfs("zoos", "size=1m")
    done = _cli("zoo", "build", "--preset", "tiny", "--out", str(mnt / "a"), *ZOO_SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    before = _digests(mnt / "a")
    _fill(mnt, _du(mnt / "a") // 2)
    proc = _cli("zoo", "build", "--preset", "tiny", "--out", str(mnt / "b"), *ZOO_SETS)
    print(_disk_full_line(proc, mnt / "b"))
    assert _temps(mnt) == []
    models = mnt / "b" / "digits-cnn_s" / "models"
    unfinished = [m.name for m in models.iterdir() if not (m / "model.json").exists()]
    assert unfinished, "the disk filled before the last model"
    assert all(list((models / m).iterdir()) == [] for m in unfinished), "epochs of unfinished models are removed"
    assert _digests(mnt / "a") == before
    zoo = open_zoo(str(mnt / "a" / "digits-cnn_s"))
    assert [r.status for r in zoo.models()] == ["ok"] * 4
    assert all(zoo.load_checkpoint(r.model_id, 1) for r in zoo.models())


def test_shards_build_on_a_full_disk(tmp_path, tmpfs):
    zoo = make_zoo(str(tmp_path / "zoos"), "za", arch="resnet_mini", num_models=6)  # the source: normal disk
    mnt = tmpfs("shards", "size=4m")
    done = _cli("shards", "build", zoo, "--out", str(mnt / "a"), "--preset", "tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    before = _digests(mnt / "a")
    _fill(mnt, _du(mnt / "a") // 2)
    proc = _cli("shards", "build", zoo, "--out", str(mnt / "b"), "--preset", "tiny")
    print(_disk_full_line(proc, mnt / "b"))
    assert _temps(mnt) == []
    left = [p.name for p in (mnt / "b").iterdir() if p.is_file()]
    assert left == [], f"part files without a manifest: {left}"
    assert _digests(mnt / "a") == before
    assert verify_dataset(str(mnt / "a"))["damaged"] == []


def test_train_on_a_full_disk(tmp_path, tmpfs):
    shards = make_shards(str(tmp_path))  # the shards: normal disk; runs and checkpoints: the tmpfs
    mnt = tmpfs("root", "size=4m")
    common = ["--no-ray", "--preset", "tiny", "--set", f"storage.root={mnt}", "--set", f"data.shards_url={shards}",
              "--set", "metrics.enabled=false", "--set", "train.eval_every_n_steps=-1",
              "--set", "train.checkpoint_every_n_steps=5"]
    done = _cli("train", *common, "--set", "run_name=a", "--set", "train.num_steps=5")
    assert done.returncode == 0, done.stderr[-3000:]
    run_a = mnt / "runs" / "a"
    before = _digests(run_a)
    _fill(mnt, _du(run_a / ckpt.checkpoint_name(5)) // 2)
    proc = _cli("train", *common, "--set", "run_name=b", "--set", "train.num_steps=10")
    print(_disk_full_line(proc, mnt / "runs" / "b"))
    assert _temps(mnt) == []
    assert ckpt.list_checkpoints(str(mnt / "runs" / "b")) == [], "no incomplete checkpoint folder"
    assert _digests(run_a) == before
    _, state, _ = ckpt.load(str(run_a / ckpt.checkpoint_name(5)))
    assert state["step"] == 5
