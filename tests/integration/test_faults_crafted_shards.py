"""Crafted shard datasets are answered with one line, under a memory cap (issue 28, item 5).

Each case starts from a real tiny dataset and changes its manifest (and, for the index case, writes a crafted
model index) so that every size and sha256 the manifest records still matches: checksum verification alone
cannot catch it. ``mzsane shards info``, ``mzsane shards verify`` and ``mzsane train --no-ray`` run on it as
a user would, in a child process with its address space capped (``RLIMIT_AS``); each must exit 2 with one
``error:`` line and no traceback. The children's peak RSS is printed (``-s``) for the fault table."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mzsane.shards import index as idx
from tests.fixtures.zoos import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CAP_BYTES = 6 * 2**30  # far below what the crafted counts would allocate (2.7 GB ... 8 TB), above torch's import
INDEX_ROWS = 5_000_000


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_BYTES, CAP_BYTES))


# runs the CLI in-process and records the process's own peak RSS (VmHWM) at exit into the file argv[1]: a
# parent's rusage would include the forked test process's RSS, which exec carries into the child's maximum
LAUNCH = ("import atexit, runpy, sys\n"
          "path = sys.argv[1]\n"
          "def peak():\n"
          "    with open('/proc/self/status') as fh, open(path, 'w') as out:\n"
          "        out.write([l.split()[1] for l in fh if l.startswith('VmHWM:')][0])\n"
          "atexit.register(peak)\n"
          "sys.argv = ['mzsane', *sys.argv[2:]]\n"
          "runpy.run_module('mzsane', run_name='__main__')\n")


def _peak_run(args: list[str], peak_file: str) -> tuple[int, str, float]:
    """(exit code, stderr, peak RSS in MiB) of the mzsane CLI with ARGS, its address space capped."""
    done = subprocess.run([sys.executable, "-c", LAUNCH, peak_file, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, preexec_fn=_cap, env=dict(os.environ), timeout=300)
    with open(peak_file, encoding="ascii") as fh:
        return done.returncode, done.stderr, int(fh.read()) / 1024


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    make_shards(str(root / "base"), num_models=4)
    return root


def _copy(clean, name: str) -> tuple[str, dict]:
    url = str(clean / name)
    shutil.copytree(clean / "base", url)
    with open(os.path.join(url, "shards", "default", "manifest.json"), encoding="utf-8") as fh:
        return url, json.load(fh)


def _save(url: str, manifest) -> str:
    path = os.path.join(url, "shards", "default", "manifest.json")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return os.path.join(url, "shards", "default")


def _huge_index(url: str, m: dict) -> None:
    """A model index of INDEX_ROWS rows a few MB big (repeated values compress), checksums and size matching."""
    table = pa.table({"zoo": pa.repeat(pa.scalar("mnist_cnn_s"), INDEX_ROWS),
                      "model_id": pa.repeat(pa.scalar("m000"), INDEX_ROWS),
                      "split": pa.repeat(pa.scalar("train"), INDEX_ROWS),
                      "status": pa.repeat(pa.scalar("ok"), INDEX_ROWS),
                      "file": pa.repeat(pa.scalar(m["files"][0]["path"]), INDEX_ROWS),
                      "epoch": pa.repeat(pa.scalar(0, pa.int32()), INDEX_ROWS),
                      "row": pa.repeat(pa.scalar(0, pa.int64()), INDEX_ROWS),
                      "test_acc": pa.repeat(pa.scalar(0.5), INDEX_ROWS),
                      "val_acc": pa.repeat(pa.scalar(0.5), INDEX_ROWS)}, schema=idx.SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=idx.ROWS_PER_GROUP, compression="zstd")
    data = sink.getvalue().to_pybytes()
    path = f"{idx.INDEX_DIR}/models-crafted.parquet"
    with open(os.path.join(url, "shards", "default", path), "wb") as fh:
        fh.write(data)
    m["index"] = {"path": path, "num_rows": INDEX_ROWS, "num_bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest()}


def _layout(m: dict, key: str, value: int) -> None:
    for layout in m["layouts"].values():
        layout[key] = value
    if key == "num_tokens":
        for info in m["zoos"].values():
            info["num_tokens"] = value


def _files(m: dict, key: str, value) -> None:
    m["files"][0][key] = value


CASES = {
    "index of 5e6 rows": _huge_index,
    "layout of 2^31 rows": lambda url, m: _layout(m, "max_rows", 2**31),
    "layout of 1e12 tokens": lambda url, m: _layout(m, "num_tokens", 10**12),
    "rows_per_row_group 0": lambda url, m: _files(m, "rows_per_row_group", 0),
    "negative num_rows": lambda url, m: _files(m, "num_rows", -5),
    "overflowing num_bytes": lambda url, m: _files(m, "num_bytes", 10**30),
    "float count": lambda url, m: _files(m, "num_rows", 1e300),
    "deeply nested manifest": None,
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_crafted_dataset_is_one_line_for_info_verify_and_train(clean, case):
    url, manifest = _copy(clean, case.replace(" ", "_").replace("^", ""))
    if CASES[case] is None:
        shards = _save(url, "[" * 200_000 + "]" * 200_000)
    else:
        CASES[case](url, manifest)
        shards = _save(url, manifest)
    peaks = {}
    for name, args in (("info", ["shards", "info", shards]), ("verify", ["shards", "verify", shards]),
                       ("train", ["train", "--no-ray", "--preset", "tiny", "--set", f"storage.root={url}",
                                  "--set", f"data.shards_url={shards}", "--set", "metrics.enabled=false",
                                  "--set", "train.num_steps=2"])):
        code, stderr, peak = _peak_run(args, os.path.join(url, f"peak-{name}"))
        peaks[name] = peak
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2, f"{name}: exit {code}\n{stderr[-3000:]}"
        assert "Traceback" not in stderr and "MemoryError" not in stderr, f"{name}:\n{stderr[-3000:]}"
        assert lines and lines[-1].startswith("error: ") and ("shard" in lines[-1] or "manifest" in lines[-1]), \
            f"{name}: {lines[-3:]}"
    print(f"\n{case}: peak RSS " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()) + f" | {lines[-1][:160]}")


def test_verify_compares_every_part_file_footer_with_the_manifest(clean):
    """Counts that agree with each other but not with the file they describe (a row-group size of 3 where the file
    has 4 would read the wrong rows): ``shards verify`` opens every footer and says so in one line."""
    url, manifest = _copy(clean, "row_groups_off")
    manifest["files"][0]["rows_per_row_group"] -= 1
    shards = _save(url, manifest)
    code, stderr, peak = _peak_run(["shards", "verify", shards], os.path.join(url, "peak-verify"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("error: ") and "damaged" in lines[-1], lines[-3:]
    print(f"\nrow groups off by one: shards verify peak RSS {peak:.0f} MiB | {lines[-1][:160]}")
