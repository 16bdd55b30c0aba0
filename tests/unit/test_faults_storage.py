"""Storage faults without a server: missing credentials beside a local endpoint, a read-only filesystem and a
file where a folder is expected (this VM runs tests as root, so plain chmod would not deny anything), and
that error messages never carry the S3 secret."""
import os
import time

import pytest

from mzsane import storage
from mzsane.errors import StorageError

SECRET = "s3cr3t-DO-NOT-PRINT-42"


def test_endpoint_without_credentials_is_one_line_and_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.exists("s3://bucket/x")
    assert time.monotonic() - start < 1.0, "no instance-metadata lookup"
    message = str(err.value)
    assert "\n" not in message and "127.0.0.1:1" in message and "AWS_ACCESS_KEY_ID" in message
    with pytest.raises(StorageError, match="no credentials"):
        storage.pyarrow_fs("s3://bucket/x")


def test_unreachable_endpoint_message_never_holds_the_secret(monkeypatch):
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for action in (lambda: storage.write_bytes("s3://bucket/x", b"1"), lambda: storage.read_bytes("s3://bucket/x")):
        with pytest.raises(StorageError) as err:
            action()
        assert SECRET not in str(err.value) and "unreachable" in str(err.value)


def test_file_where_a_folder_is_expected(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(StorageError) as err:
        storage.write_bytes(str(tmp_path / "runs" / "r1" / "config.json"), b"{}")
    assert "\n" not in str(err.value) and "runs" in str(err.value) and "writable location" in str(err.value)
    with pytest.raises(StorageError, match="writable location"):
        storage.check_writable(str(tmp_path / "runs" / "r1"))


def test_read_only_filesystem(tmpfs):
    mnt = tmpfs("ro", "ro,size=1m")
    with pytest.raises(StorageError) as err:
        storage.write_bytes(str(mnt / "x.bin"), b"1")
    assert "\n" not in str(err.value) and "read-only" in str(err.value) and str(mnt) in str(err.value)
    assert os.listdir(mnt) == []
