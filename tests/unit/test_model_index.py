"""The Parquet model index next to the shards: round-trips, selection identical to an inline (schema 1) manifest,
one-line errors for a missing or damaged index, ``shards verify`` checking it, and a commit order that keeps
the previous dataset readable when a build dies between the index and the manifest."""
import json
import os

import pytest

from mzsane import storage
from mzsane.errors import DataError
from mzsane.shards import index as idx
from mzsane.shards import manifest as mf
from mzsane.shards.reader import ShardReader, verify_cli, verify_dataset
from mzsane.shards.select import select
from tests.fixtures.errors import assert_one_line
from tests.fixtures.zoos import build_shards, make_zoo

MODELS = [
    {"zoo": "za", "model_id": "m000", "split": "train", "status": "ok", "file": "part-00000.parquet", "row": 0,
     "epochs": [0, 1, 2], "test_acc": [0.1, None, 0.3], "val_acc": [0.0, 0.05, 0.1]},
    {"zoo": "za", "model_id": "m001", "split": "train", "status": "partial", "file": "part-00000.parquet", "row": 3,
     "epochs": [2], "test_acc": [0.25], "val_acc": [None]},
    {"zoo": "zb", "model_id": "m000", "split": "val", "status": "ok", "file": "part-00001.parquet", "row": 0,
     "epochs": [1, 2], "test_acc": [0.5, 0.6], "val_acc": [0.4, 0.45]},
]


def test_models_round_trip_through_table_and_storage(root):
    assert idx.table_to_models(idx.models_to_table(MODELS)) == MODELS
    entry = idx.write_index(storage.join(root, "ds"), MODELS)
    assert entry["path"].startswith(f"{idx.INDEX_DIR}/models-") and entry["num_rows"] == 6
    data = idx.load_index(storage.join(root, "ds"), entry)
    assert len(data) == entry["num_bytes"]
    url = storage.join(root, "ds", entry["path"])
    assert idx.table_to_models(idx.read_table(data, url)) == MODELS
    assert idx.model_ids(data, url, "za", "train") == ["m000", "m001"]
    assert idx.table_to_models(idx.read_table(data, url, zoos=["za"], split="train", model_ids=["m001"])) == MODELS[1:2]
    assert idx.read_table(data, url, model_ids=[]).num_rows == 0


@pytest.fixture
def dataset(root):
    zoos = [make_zoo(root, "za", num_models=8), make_zoo(root, "zb", "resnet_mini", num_models=5, seed=1)]
    out = storage.join(root, "shards")
    return out, build_shards(zoos, out)


def test_manifest_json_holds_no_models_and_the_index_holds_them_all(dataset):
    out, built = dataset
    raw = storage.read_json(storage.join(out, mf.MANIFEST))
    assert "models" not in raw and raw["schema_version"] == 2
    assert set(raw["index"]) == {"path", "num_rows", "num_bytes", "sha256"}
    parts = mf.read_parts(out)
    inline = [m for zoo in sorted(parts) for m in parts[zoo]["models"]]
    m = mf.read_manifest(out)
    assert m.models == inline == built.models
    assert raw["index"]["num_rows"] == sum(len(x["epochs"]) for x in inline) == sum(f["num_rows"] for f in m.files)
    assert storage.listdir(storage.join(out, idx.INDEX_DIR)) == [raw["index"]["path"].split("/")[-1]]


def _as_inline(out: str) -> str:
    """The same dataset behind a schema 1 manifest (models inline, no index), as built before the index."""
    m = mf.read_manifest(out)
    doc = {k: v for k, v in storage.read_json(storage.join(out, mf.MANIFEST)).items() if k != "index"}
    doc.update(schema_version=1, models=m.models)
    storage.write_json(storage.join(out, mf.MANIFEST), doc)
    return out


@pytest.mark.parametrize("kwargs", [
    {}, {"split": "val"}, {"split": "test"}, {"zoos": ["zb"]}, {"zoos": ["zb", "za"], "num_models_per_zoo": 2},
    {"num_models_per_zoo": 3, "seed": 7}, {"num_models_per_zoo": 0}, {"epochs": [1, 2]},
    {"num_tail_epochs": 1, "num_models_per_zoo": 1, "seed": 3},
])
def test_selection_is_identical_from_the_index_and_from_an_inline_manifest(dataset, kwargs):
    out, _ = dataset
    indexed = mf.read_manifest(out)
    assert indexed._models is None, "selection must not need every model materialised"
    a = select(indexed, **kwargs)
    assert indexed._models is None
    b = select(mf.read_manifest(_as_inline(out)), **kwargs)
    assert a.models == b.models and a.rows() == b.rows() and a.to_dict() == b.to_dict()


def test_summary_is_identical_from_the_index_and_from_an_inline_manifest(dataset):
    out, _ = dataset
    indexed = mf.summary(mf.read_manifest(out))
    inline = mf.summary(mf.read_manifest(_as_inline(out)))
    assert indexed == {**inline, "schema_version": 2} and inline["schema_version"] == 1
    assert indexed["zoos"]["za"]["rows_per_epoch"]["2"]["train"] > 0


def test_old_inline_manifest_reads_and_streams(dataset):
    out, _ = dataset
    before = [(s.zoo, s.model_id, s.epoch) for s in ShardReader(out, select(mf.read_manifest(out))).iter_samples(0, 1)]
    _as_inline(out)
    old = mf.read_manifest(out)
    assert old.index is None and old.schema_version == 1
    after = [(s.zoo, s.model_id, s.epoch) for s in ShardReader(out, select(old)).iter_samples(0, 1)]
    assert after == before and len(after) > 0
    assert verify_dataset(out)["damaged"] == [] and "index" not in verify_dataset(out)


def _index_file(out: str) -> str:
    return storage.join(out, storage.read_json(storage.join(out, mf.MANIFEST))["index"]["path"])


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated"])
def test_damaged_index_is_one_line_naming_the_file(dataset, damage):
    out, _ = dataset
    url = _index_file(out)
    data = storage.read_bytes(url)
    if damage == "missing":
        storage.remove(url)
    elif damage == "flipped":
        storage.write_bytes(url, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        storage.write_bytes(url, data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        mf.read_manifest(out)
    assert_one_line(err, url, {"missing": "missing", "flipped": "sha256", "truncated": "bytes"}[damage])
    report = verify_dataset(out)
    path = url.split(out.rstrip("/") + "/")[-1]
    assert report["damaged"] == [path] and report["index"][path].startswith("DAMAGED") and report["files"] > 0
    with pytest.raises(DataError) as err:
        verify_cli(type("Args", (), {"url": out}))
    assert_one_line(err, path, "damaged")
    build_shards([], out)  # what the message says to do: the committed zoos are re-indexed, nothing is re-tokenized
    assert verify_dataset(out)["damaged"] == [] and len(mf.read_manifest(out).models) == 13


def test_verify_checks_the_index_checksum(dataset, capsys):
    out, _ = dataset
    report = verify_cli(type("Args", (), {"url": out}))
    path = storage.read_json(storage.join(out, mf.MANIFEST))["index"]["path"]
    assert report["index"] == {path: "size+sha256+pages"} and report["damaged"] == []
    assert json.loads(capsys.readouterr().out)["index"] == {path: "size+sha256+pages"}
    # a manifest whose recorded sha256 disagrees with an intact file: the checksum, not just the size, is compared
    raw = storage.read_json(storage.join(out, mf.MANIFEST))
    raw["index"]["sha256"] = "0" * 64
    storage.write_json(storage.join(out, mf.MANIFEST), raw)
    assert verify_dataset(out)["damaged"] == [path]


def test_build_dying_before_the_manifest_keeps_the_old_index_and_the_rerun_cleans_up(root, monkeypatch):
    out = storage.join(root, "shards")
    build_shards([make_zoo(root, "za", num_models=4)], out)
    old_manifest = storage.read_bytes(storage.join(out, mf.MANIFEST))
    old_index = _index_file(out)
    real = storage.write_json

    def dies_on_manifest(url, obj):
        if url.endswith(mf.MANIFEST):
            raise KeyboardInterrupt("killed between the index and the manifest")
        real(url, obj)

    zb = make_zoo(root, "zb", num_models=3)
    monkeypatch.setattr(mf.storage, "write_json", dies_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_shards([zb], out)
    monkeypatch.setattr(mf.storage, "write_json", real)
    assert storage.read_bytes(storage.join(out, mf.MANIFEST)) == old_manifest
    assert len(storage.listdir(storage.join(out, idx.INDEX_DIR))) == 2, "the new index was written first"
    assert sorted(mf.read_manifest(out).zoos) == ["za"]  # the committed dataset still reads, old index intact
    build_shards([zb], out)
    assert sorted(mf.read_manifest(out).zoos) == ["za", "zb"]
    assert storage.listdir(storage.join(out, idx.INDEX_DIR)) == [_index_file(out).split("/")[-1]]
    assert not storage.exists(old_index)


def test_big_synthetic_manifest_figure_agrees_between_formats(tmp_path):
    from mzsane.bench.bigmanifest import big_manifest

    r = big_manifest(10_000, str(tmp_path))
    assert r["manifest_rows"] == 10_000 and r["selected_rows"] == 700 and r["whole_zoo_rows"] == 700
    assert r["json_format"]["same_selection"] and r["json_format"]["selected_rows"] == 700
    assert r["manifest_kb"] < r["json_format"]["manifest_mb"] * 1024
    assert os.listdir(tmp_path) == []
