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


def test_pruned_ray_checkpoint_leaves_no_empty_folder(s3_server, tmp_path):
    """A checkpoint uploaded the way Ray Train uploads one (pyarrow: a folder marker, then the files) and then
    pruned by ``storage.remove`` must vanish from the run's listing. s3fs alone deleted the files but left
    SeaweedFS's folder, so a killed-and-resumed Ray run kept an empty ``checkpoint_*`` beyond the keep count
    (the flake of ``test_ddp_on_two_nodes_survives_a_killed_worker``)."""
    import pyarrow.fs as pafs

    from mzsane.train import checkpoint as ckpt

    run = s3_server.url(f"prune-{tmp_path.name}/runs/r")
    storage.write_text(storage.join(run, "log.jsonl"), "{}")
    local = tmp_path / "ck"
    (local / "nested").mkdir(parents=True)
    for name in ("model.safetensors", "state.pt", "config.json", "nested/extra"):
        (local / name).write_text("x")
    fs, root = storage.pyarrow_fs(run)
    for step in (100, 120):
        fs.create_dir(f"{root}/{ckpt.checkpoint_name(step)}")
        pafs.copy_files(str(local), f"{root}/{ckpt.checkpoint_name(step)}", destination_filesystem=fs)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [100, 120]
    storage.remove(storage.join(run, ckpt.checkpoint_name(100)), recursive=True)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [120]
    assert storage.listdir(run) == [ckpt.checkpoint_name(120), "log.jsonl"]
