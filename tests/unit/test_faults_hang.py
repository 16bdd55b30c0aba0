"""A hung reader or store never leaves training silent (issue 28, item 4), the parts that need no server: the
loop's wait for a batch reports and then fails with one line naming the source; the S3 deadline setting is
checked with one line. The real hung store (SIGSTOPped SeaweedFS, a port that never answers) is in
tests/integration/test_faults_s3_hang.py."""
from __future__ import annotations

import threading
import time

import pytest

from mzsane import storage
from mzsane.errors import DataError, StorageError, StoreUnavailableError
from mzsane.train import data as data_mod
from mzsane.train.data import RankStream


def _stuck_epoch(release: threading.Event):
    def open_epoch(epoch: int):
        release.wait()  # a reader stuck in a call that never returns
        yield from range(4)
    return open_epoch


@pytest.mark.parametrize("remote, kind", [(False, DataError), (True, StoreUnavailableError)])
def test_a_stuck_reader_is_reported_then_fails_in_one_line(monkeypatch, capsys, remote, kind):
    monkeypatch.setenv(data_mod.DATA_TIMEOUT_ENV, "1.5")
    monkeypatch.setattr(data_mod, "REPORT_EVERY_S", 0.5)
    release = threading.Event()
    source = "'s3://bucket/shards' at S3 endpoint http://127.0.0.1:9"
    stream = RankStream(_stuck_epoch(release), batch_size=2, name="rank 0", source=source, remote=remote)
    outcome: dict = {}

    def take() -> None:
        try:
            next(stream)
        except Exception as err:  # what the loop would see
            outcome["err"] = err

    t0 = time.monotonic()
    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    worker.join(timeout=20)
    took = time.monotonic() - t0
    release.set()
    stream.close()
    assert not worker.is_alive(), "the loop still waits for a batch 20 s later (an unbounded queue.get)"
    err = outcome.get("err")
    assert isinstance(err, kind), err
    message = str(err)
    assert "\n" not in message and source in message and "MZSANE_DATA_TIMEOUT_S" in message, message
    assert 1.5 <= took < 10, took
    reports = [line for line in capsys.readouterr().err.splitlines() if "waiting" in line]
    assert reports and all(source in line for line in reports), reports


def test_a_slow_but_working_reader_is_not_failed(monkeypatch):
    monkeypatch.setenv(data_mod.DATA_TIMEOUT_ENV, "5")
    monkeypatch.setattr(data_mod, "REPORT_EVERY_S", 0.1)

    def open_epoch(epoch: int):
        for i in range(4):
            time.sleep(0.3)  # slower than a report interval, well inside the timeout
            yield i

    stream = RankStream(open_epoch, batch_size=2)
    try:
        assert next(stream) == [0, 1] and next(stream) == [2, 3]
    finally:
        stream.close()


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_bad_timeout_settings_are_one_line(monkeypatch, value):
    monkeypatch.setenv(storage.TIMEOUT_ENV, value)
    with pytest.raises(StorageError) as err:
        storage.timeout_s()
    assert storage.TIMEOUT_ENV in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv(data_mod.DATA_TIMEOUT_ENV, value)
    with pytest.raises(DataError) as err:
        data_mod.data_timeout_s()
    assert data_mod.DATA_TIMEOUT_ENV in str(err.value)


def test_per_attempt_timeouts_fit_in_the_deadline(monkeypatch):
    """s3fs x botocore attempts, each at most one read timeout: together no longer than the deadline."""
    monkeypatch.setenv(storage.TIMEOUT_ENV, "40")
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    kwargs = storage.s3_options()["config_kwargs"]
    attempts = kwargs["retries"]["total_max_attempts"] * storage._ATTEMPTS  # botocore's inside s3fs's
    assert attempts * kwargs["read_timeout"] <= 40 and kwargs["connect_timeout"] <= kwargs["read_timeout"]
    fs, _ = storage._fs("s3://bucket/x")
    assert fs.retries == storage._ATTEMPTS
