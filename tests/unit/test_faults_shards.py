"""Faults on shard datasets, reproduced for real: a truncated file, single-byte flips, an old manifest without
checksums, a SIGKILLed build, a full filesystem (a real 2 MiB tmpfs), an architecture mismatch, file modes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from mzsane import storage
from mzsane.errors import DataError, StorageError
from mzsane.shards import manifest as mf
from mzsane.shards.reader import ShardReader, verify_dataset
from mzsane.shards.select import select
from tests.fixtures.errors import assert_one_line
from tests.fixtures.zoos import build_shards, make_zoo, shards_cfg

PY = sys.executable


def _dataset(tmp_path, num_models=4):
    zoo = make_zoo(str(tmp_path / "zoos"), "za", num_models=num_models)
    out = str(tmp_path / "shards")
    return out, build_shards([zoo], out, shards_cfg(rows_per_file=64))


def _read_all(out):
    m = mf.read_manifest(out)
    return [(s.model_id, s.epoch, s.tokens_ND.clone()) for s in ShardReader(out, select(m)).iter_samples(shuffle=False)]


def test_truncated_shard_is_one_line_naming_the_file(tmp_path):
    out, m = _dataset(tmp_path)
    part = os.path.join(out, m.files[0]["path"])
    with open(part, "r+b") as fh:
        fh.truncate(os.path.getsize(part) // 2)
    with pytest.raises(DataError) as err:
        _read_all(out)
    assert_one_line(err, part, "the manifest says")
    # also through the CLI: one line on stderr, no traceback, non-zero exit
    proc = subprocess.run([PY, "-m", "mzsane.cli", "shards", "verify", out], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and m.files[0]["path"] in proc.stderr
    info = subprocess.run([PY, "-m", "mzsane.cli", "shards", "info", out], capture_output=True, text=True)
    assert info.returncode != 0 and "differ from the manifest" in info.stderr
    assert m.files[0]["path"] in json.loads(info.stdout)["size_mismatches"][0]


def test_truncated_footer_of_right_size_is_arrow_invalid_turned_into_one_line(tmp_path):
    """Same size, zeroed footer: pyarrow raises ArrowInvalid (not an OSError) while opening the file."""
    out, m = _dataset(tmp_path)
    part = os.path.join(out, m.files[0]["path"])
    size = os.path.getsize(part)
    with open(part, "r+b") as fh:
        fh.seek(size - 64)
        fh.write(b"\0" * 64)
    with pytest.raises(DataError) as err:
        _read_all(out)
    assert_one_line(err, part)


def test_every_single_byte_flip_is_detected(tmp_path):
    """Single-byte flips all over a part file: the reader either fails naming the file or returns exactly the
    original tokens (a flip in unused metadata); `shards verify` (sha256) catches every one."""
    out, m = _dataset(tmp_path)
    original = _read_all(out)
    part = os.path.join(out, m.files[0]["path"])
    clean = Path(part).read_bytes()
    rng = np.random.default_rng(0)
    silent, detected_by_reader = 0, 0
    positions = rng.choice(len(clean), size=60, replace=False)
    for pos in positions:
        damaged = bytearray(clean)
        damaged[pos] ^= 0xFF
        Path(part).write_bytes(bytes(damaged))
        try:
            got = _read_all(out)
        except DataError as err:
            assert part in str(err) and "\n" not in str(err)
            detected_by_reader += 1
        else:
            same = len(got) == len(original) and all(
                a[:2] == b[:2] and torch.equal(a[2], b[2]) for a, b in zip(got, original))
            silent += 0 if same else 1
        report = verify_dataset(out)
        assert report["damaged"] == [m.files[0]["path"]], pos
    Path(part).write_bytes(clean)
    assert verify_dataset(out)["damaged"] == []
    print(f"flips: {len(positions)}, reader detected {detected_by_reader}, silently changed tokens {silent}")
    assert silent == 0


def test_hash_on_first_open_catches_a_flip_in_unread_metadata(tmp_path):
    out, m = _dataset(tmp_path)
    part = os.path.join(out, m.files[0]["path"])
    data = bytearray(Path(part).read_bytes())
    data[4] ^= 0x01  # inside the first page header region, read by nobody for a selection
    Path(part).write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        list(ShardReader(out, select(mf.read_manifest(out)), verify_hash=True).iter_samples())


def test_manifest_without_checksums_still_reads(tmp_path):
    """Datasets built before sha256 was recorded: read as before (size checked, no hash)."""
    out, _ = _dataset(tmp_path)
    original = _read_all(out)
    raw = storage.read_json(os.path.join(out, "manifest.json"))
    for entry in raw["files"]:
        entry.pop("sha256")
    storage.write_json(os.path.join(out, "manifest.json"), raw)
    got = _read_all(out)
    assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in original]
    assert all(r == "size+pages" for r in verify_dataset(out)["results"].values())
    got_hashing = list(ShardReader(out, select(mf.read_manifest(out)), verify_hash=True).iter_samples())
    assert len(got_hashing) == len(original)


def test_manifest_records_size_and_sha256_matching_the_file(tmp_path):
    import hashlib

    out, m = _dataset(tmp_path)
    for entry in m.files:
        data = Path(os.path.join(out, entry["path"])).read_bytes()
        assert entry["num_bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_files_are_written_with_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "a.bin"), b"x")
        assert os.stat(tmp_path / "a.bin").st_mode & 0o777 == 0o644
        os.umask(0o002)
        storage.write_bytes(str(tmp_path / "b.bin"), b"x")
        assert os.stat(tmp_path / "b.bin").st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    from mzsane.shards import writer
    from tests.fixtures.zoos import build_shards, shards_cfg
    add = writer._PartFile.add
    def slow_add(self, row):
        add(self, row)
        print("writing", flush=True)
        time.sleep(0.2)
    writer._PartFile.add = slow_add
    build_shards([sys.argv[1]], sys.argv[2], shards_cfg(rows_per_file=64))
""")


def test_sigkilled_build_leaves_temps_that_the_rerun_removes(tmp_path):
    zoo = make_zoo(str(tmp_path / "zoos"), "za", num_models=4)
    out = str(tmp_path / "shards")
    proc = subprocess.Popen([PY, "-c", _SLOW_BUILD, zoo, out], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    temps = [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert temps, "the killed build left its partial part file"
    # a temp of a live writer (this test process) in the same folder is not touched
    live = os.path.join(out, f".tmp-{os.getpid()}-live")
    Path(live).write_bytes(b"busy")
    m = build_shards([zoo], out, shards_cfg(rows_per_file=64))
    left = sorted(n for n in os.listdir(out) if n.startswith(".tmp-"))
    assert left == [os.path.basename(live)]
    assert sorted(n for n in os.listdir(out) if n.endswith(".parquet")) == sorted(f["path"] for f in m.files)


def _mismatched_zoo(root):
    """A zoo whose second model holds a wider first conv layer than its architecture (same key names)."""
    url = make_zoo(root, "zm", num_models=4)
    path = os.path.join(url, "models", "m001", "epoch_0002.safetensors")
    from safetensors.torch import load as st_load

    sd = st_load(Path(path).read_bytes())  # not load_file: its mmap would fault once the file is rewritten
    key = next(k for k in sd if k.endswith("weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 3, *sd[key].shape[1:])
    Path(path).write_bytes(st_save(sd))
    return url, path


def test_architecture_mismatch_names_model_and_file_and_leaves_no_orphan(tmp_path):
    url, path = _mismatched_zoo(str(tmp_path / "zoos"))
    out = str(tmp_path / "shards")
    with pytest.raises(DataError) as err:
        build_shards([url], out, shards_cfg(rows_per_file=2, split_fractions=[1.0, 0.0, 0.0]))
    assert_one_line(err, "m001", path, "architecture")
    assert [n for n in os.listdir(out) if not n.startswith("_")] == [], "no orphan part or temp file"


@pytest.fixture
def tiny_fs(tmpfs):
    """A real 2 MiB filesystem."""
    return str(tmpfs("full", "size=2m"))


def test_disk_full_shards_build_is_one_line_and_leaves_no_partial_files(tmp_path, tiny_fs):
    zoo = make_zoo(str(tmp_path / "zoos"), "za", arch="resnet_mini", num_models=6)
    out = os.path.join(tiny_fs, "shards")
    with pytest.raises(StorageError) as err:
        build_shards([zoo], out, shards_cfg(rows_per_file=4))
    assert_one_line(err, "no space left", tiny_fs, "MiB free", "more are needed")
    leftovers = [n for n in os.listdir(out) if not os.path.isdir(os.path.join(out, n))]
    assert leftovers == [], leftovers
    # the CLI prints exactly that line
    proc = subprocess.run([PY, "-m", "mzsane.cli", "shards", "build", zoo, "--out", out, "--preset", "tiny"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "no space left" in proc.stderr


def test_disk_full_zoo_write_is_one_line_and_leaves_no_partial_model(tiny_fs):
    from mzsane.zoo.records import ModelRecord, ZooInfo
    from mzsane.zoo.store import ZooWriter

    url = os.path.join(tiny_fs, "zoo")
    w = ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s", num_models=1))
    big = {e: {"w": torch.zeros(200_000)} for e in range(5)}  # 0.8 MB per epoch: the third does not fit
    with pytest.raises(StorageError) as err:
        w.write_model(ModelRecord(zoo="z", model_id="m0", dataset="mnist", architecture="cnn_s"), big)
    assert_one_line(err, "no space left", url)
    assert os.listdir(os.path.join(url, "models", "m0")) == [], "epochs of the unfinished model are removed"


def test_rewriting_a_model_removes_a_killed_writers_temp(tmp_path):
    from mzsane.zoo.records import ModelRecord, ZooInfo
    from mzsane.zoo.store import ZooWriter

    url = str(tmp_path / "zoo")
    w = ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s", num_models=1))
    folder = tmp_path / "zoo" / "models" / "m0"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (folder / f".tmp-{dead.pid}-abc").write_bytes(b"partial epoch")
    w.write_model(ModelRecord(zoo="z", model_id="m0", dataset="mnist", architecture="cnn_s"), {0: {"w": torch.ones(2)}})
    assert sorted(os.listdir(folder)) == ["epoch_0000.safetensors", "model.json"]
