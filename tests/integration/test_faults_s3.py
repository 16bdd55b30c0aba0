"""S3 faults against a real SeaweedFS: a bucket that does not exist, and the secret never in messages."""
import pytest

from mzsane import storage
from mzsane.errors import StorageError

pytestmark = pytest.mark.integration


def test_no_such_bucket_is_one_line_naming_the_bucket(s3_server):
    """Reading from a bucket that was never created (SeaweedFS creates buckets on the first PUT, so a write
    cannot be used to reproduce NoSuchBucket here)."""
    url = "s3://never-created-h3/shards/manifest.json"
    for action in (lambda: storage.read_bytes(url), lambda: storage.size(url)):
        with pytest.raises(StorageError) as err:
            action()
        message = str(err.value)
        assert "\n" not in message and "bucket" in message and "never-created-h3" in message, message
        assert s3_server.secret_key not in message


def test_wrong_secret_is_not_echoed(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key)
    with pytest.raises(StorageError) as err:
        storage.write_bytes(s3_server.url("faults/x.bin"), b"1")
    assert "access denied" in str(err.value) and s3_server.secret_key not in str(err.value)
