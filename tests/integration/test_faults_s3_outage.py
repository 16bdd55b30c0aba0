"""An S3 outage, for real, on a SeaweedFS of each test's own (not the session's ``s3_server``), SIGKILLed:

- during training: ``mzsane train --no-ray`` loses its server once the first checkpoint is visible and must exit
  soon with one line naming the endpoint (no traceback, no secret); the server restarts on the same data dir and
  ports, and ``--resume`` continues from the last complete checkpoint to the end while the checkpoints written
  before the outage stay byte-identical;
- between opening a shard file and reading a row group of it (pyarrow reads lazily), and inside a write that
  uploads a multipart part (objects over 64 MiB): one line, not a raw botocore error and a traceback."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mzsane import storage
from mzsane.errors import StorageError
from mzsane.loopback.seaweedfs import SeaweedFS
from mzsane.train import checkpoint as ckpt
from tests.fixtures.cli import finish, train_process
from tests.fixtures.s3 import running
from tests.fixtures.zoos import make_shards

pytestmark = pytest.mark.integration

SECRET = "h14-outage-secret-9d3f"
NUM_STEPS = 40
EVERY = 5
EXIT_WITHIN_S = 120  # connection refused: botocore 2 attempts x s3fs backoff ~2 s per call; generous on 2 busy cores


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A SeaweedFS for this test alone, with its own secret: killing it leaves the session's server alone."""
    with running(SeaweedFS(str(tmp_path / "weed"), bucket="outage", secret_key=SECRET), monkeypatch) as srv:
        yield srv


def _lines(text: str) -> list[str]:
    """Non-empty lines, tqdm's carriage-return redraws split apart."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip()]


def _wait_readable(url: str, timeout_s: float = 60.0) -> None:
    """A restarted SeaweedFS answers 500 ("internal error, please try again") until its volume server has
    registered again: wait for a stored object to read back, as an operator would after an outage."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            storage.read_bytes(url)
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _digests(url: str) -> dict[str, str]:
    return {name: hashlib.sha256(storage.read_bytes(storage.join(url, name))).hexdigest()
            for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.CONFIG_FILE)}


def _check_loads(url: str, scratch: str) -> int:
    """The checkpoint reads back (weights, state, config) and its state is the step in its name."""
    _, state, _ = ckpt.load(ckpt.fetch(url, scratch))
    assert int(state["step"]) == ckpt.step_of(url), url
    return int(state["step"])


@pytest.mark.slow
def test_outage_mid_training_fails_in_one_line_and_resume_finishes(server, tmp_path):
    root = server.url("outage")
    make_shards(root, num_models=4)
    run = storage.join(root, "runs", "outage")
    first = train_process(root, tmp_path, "first", "--set", "run_name=outage", "--set", f"train.num_steps={NUM_STEPS}",
                   "--set", f"train.checkpoint_every_n_steps={EVERY}", "--set", "train.eval_every_n_steps=-1",
                   "--set", "train.num_checkpoints_to_keep=100")
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None and ckpt.latest_checkpoint_url(run) is None:
            time.sleep(0.1)
        assert first.poll() is None, f"training ended before the outage: {(tmp_path / 'first.err').read_text()[-2000:]}"
        assert ckpt.latest_checkpoint_url(run) is not None, "no checkpoint within 10 minutes"
        # ---------------------------------------------------------------------- the outage: SIGKILL
        os.kill(server.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        server.process.wait()
        try:
            first.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"train still running {EXIT_WITHIN_S} s after the S3 server died (it hangs)")
        took = time.monotonic() - killed
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stderr, stdout = (tmp_path / "first.err").read_text(), (tmp_path / "first.out").read_text()
    last = _lines(stderr)[-1]
    print(f"exit {first.returncode} {took:.1f} s after the S3 server was killed: {last}")
    assert first.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith("error: ") and server.endpoint in last and "unreachable" in last, last
    assert SECRET not in stderr and SECRET not in stdout
    # ------------------------------------------------- the same server back: what survived the outage
    endpoint = server.endpoint
    server.restart()
    assert server.endpoint == endpoint
    _wait_readable(storage.join(run, ckpt.checkpoint_name(EVERY), ckpt.MODEL_FILE))  # the first one written
    listed = ckpt.list_checkpoints(run)
    complete = [url for _, url in listed if ckpt.latest_checkpoint_url(url) is not None]
    partial = sorted({url for _, url in listed} - set(complete))
    assert complete, listed
    resume_from = ckpt.step_of(complete[-1])
    assert [ckpt.step_of(u) for u in complete] == list(range(EVERY, resume_from + 1, EVERY)), "no gap, no loss"
    assert all(ckpt.step_of(u) > resume_from for u in partial), (partial, resume_from)  # only the one being written
    before = {url: _digests(url) for url in complete}
    for i, url in enumerate(complete):
        _check_loads(url, str(tmp_path / f"before-{i}"))
    print(f"after restart: complete checkpoints up to step {resume_from}, partial {partial}")
    # ---------------------------------------------------------------------------------- --resume
    again = train_process(root, tmp_path, "resume", "--resume", run)
    finish(again)
    stderr = (tmp_path / "resume.err").read_text()
    assert again.returncode == 0, stderr[-3000:]
    worker = storage.read_json(storage.join(run, "workers", "rank_0.json"))
    assert worker["start_step"] == resume_from, worker  # continued from the last complete checkpoint
    final = ckpt.latest_checkpoint_url(run)
    assert ckpt.step_of(final) == NUM_STEPS
    assert _check_loads(final, str(tmp_path / "final")) == NUM_STEPS
    for _, url in ckpt.list_checkpoints(run):  # the partial one was rewritten when the resumed run got there
        assert ckpt.latest_checkpoint_url(url) is not None, f"incomplete checkpoint left: {url}"
    assert {url: _digests(url) for url in complete} == before, "checkpoints before the outage changed"
    weights, _, _ = ckpt.load(ckpt.fetch(final, str(tmp_path / "final2")))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # ------------------------------------------------------------------- the secret is nowhere
    local = storage.download_dir(run, str(tmp_path / "run-copy"))
    for folder, _, files in os.walk(local):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                assert SECRET.encode() not in fh.read(), os.path.join(folder, name)
    assert SECRET not in stderr and SECRET not in (tmp_path / "resume.out").read_text()


def test_outage_between_open_and_read_of_a_shard_file_is_one_line(server, tmp_path):
    table = pa.table({"x": np.random.default_rng(0).standard_normal(2**18)})  # 2 MiB in 4 row groups
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2**16, compression="none")
    url = server.url("reads/part.parquet")
    storage.write_bytes(url, (tmp_path / "part.parquet").read_bytes())
    fh = storage.open_read(url)
    parquet = pq.ParquetFile(fh)  # the footer is read now, the row groups when asked for
    assert parquet.num_row_groups == 4
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        parquet.read_row_group(0)
    fh.close()
    message = str(err.value)
    assert "\n" not in message and url in message and server.endpoint in message and "unreachable" in message
    assert SECRET not in message
    assert time.monotonic() - start < 30


def test_outage_while_streaming_shards_is_not_called_corruption(server):
    """The shard reader calls a file it cannot decode corrupt ("rebuild it"); an unreachable store is not that,
    and under Ray a DataError would also skip the retries that may outlast the outage."""
    from mzsane import presets
    from mzsane.errors import DataError, StoreUnavailableError
    from mzsane.shards.manifest import read_manifest
    from mzsane.shards.reader import ShardReader
    from mzsane.shards.select import training_selection

    url = make_shards(server.url("stream"))
    manifest = read_manifest(url)
    reader = ShardReader(url, training_selection(manifest, presets.tiny().data), manifest)
    units = reader.plan(shuffle=False)
    path, _ = units[0][0]
    reader._file(path)  # opened (footer read) before the outage, as a stream that is under way has
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    with pytest.raises(StoreUnavailableError) as err:
        list(reader.read_unit(*units[0]))
    message = str(err.value)
    assert not isinstance(err.value, DataError) and "unreachable" in message
    assert "corrupt" not in message and "rebuild" not in message and SECRET not in message


def test_outage_during_a_multipart_upload_is_one_line(server):
    """Writes past open_write's 64 MiB block upload a part from inside ``write()`` (a large checkpoint)."""
    storage.write_bytes(server.url("writes/small.bin"), b"1")  # the endpoint works
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    url = server.url("writes/big.bin")
    with pytest.raises(StorageError) as err:
        storage.write_bytes(url, bytes(65 * 2**20))
    message = str(err.value)
    assert "\n" not in message and url in message and server.endpoint in message and "unreachable" in message
    assert SECRET not in message
