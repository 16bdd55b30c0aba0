"""storage.py on local disk and memory://; S3 behaviour is covered by the integration tests."""
import os

import pytest

from mzsane import storage
from mzsane.errors import StorageError


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    url = f"memory://test-{os.getpid()}-{id(request)}"
    yield url
    storage.remove(url, recursive=True)


def test_write_read_list_remove(root):
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_bytes(storage.join(root, "a", "y.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "b.txt"), "hello")
    assert storage.read_json(storage.join(root, "a/x.json")) == {"k": 1}
    assert storage.read_bytes(storage.join(root, "a/y.bin")) == b"\x00\x01"
    assert storage.listdir(root) == ["a", "b.txt"]
    assert storage.listdir(storage.join(root, "a")) == ["x.json", "y.bin"]
    assert storage.size(storage.join(root, "b.txt")) == 5
    assert storage.listdir(storage.join(root, "missing")) == []
    storage.remove(storage.join(root, "a"), recursive=True)
    assert not storage.exists(storage.join(root, "a/x.json"))


def test_failed_write_leaves_previous_object_intact(root):
    url = storage.join(root, "manifest.json")
    storage.write_json(url, {"version": 1})
    with pytest.raises(RuntimeError), storage.open_write(url) as fh:
        fh.write(b'{"version": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert storage.read_json(url) == {"version": 1}
    assert storage.listdir(root) == ["manifest.json"]  # no temporary left behind


def test_missing_object_is_one_line_error(root):
    with pytest.raises(StorageError) as info:
        storage.read_bytes(storage.join(root, "nope.bin"))
    assert "does not exist" in str(info.value) and "\n" not in str(info.value)


def test_corrupt_json_is_one_line_error(root):
    url = storage.join(root, "bad.json")
    storage.write_text(url, "{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        storage.read_json(url)


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported storage URL"):
        storage.exists("ftp://host/x")


def test_join():
    assert storage.join("s3://b/p/", "zoos", "z1") == "s3://b/p/zoos/z1"
    assert storage.join("/tmp/x", "a/", "/b") == "/tmp/x/a/b"
    assert storage.join("memory://m", "k") == "memory://m/k"


def test_local_dir_roundtrip(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("x")
    url = "memory://dir-roundtrip"
    storage.upload_dir(str(src), url)
    out = storage.download_dir(url, str(tmp_path / "dst"))
    with open(os.path.join(out, "d", "f.txt")) as fh:
        assert fh.read() == "x"
    storage.remove(url, recursive=True)


def test_credentials_come_only_from_environment(monkeypatch):
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    opts = storage.s3_options()
    assert opts["endpoint_url"] == "http://127.0.0.1:1" and opts["key"] == "k"


def test_unreachable_endpoint_is_one_line_error(monkeypatch):
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://bucket/x")
    assert "unreachable" in str(info.value) and "\n" not in str(info.value)
