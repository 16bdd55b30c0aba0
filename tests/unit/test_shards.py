"""Parquet shards on memory:// and local disk: build, manifest, splits by model, read-time selection,
DDP rank sharding, resume, and bad inputs that must leave earlier data intact."""
import io
import json
import os
import types

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mzsane import storage
from mzsane.cli import main as cli_main
from mzsane.errors import DataError
from mzsane.shards import schema, writer
from mzsane.shards.manifest import read_manifest, summary
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.architectures import build_model
from mzsane.zoo.modelzoos import write_modelzoos_model
from mzsane.zoo.records import ModelRecord
from mzsane.zoo.store import ZooWriter, open_zoo
from tests.fixtures.zoos import build_shards, interrupt_tokenize, make_zoo, shards_cfg


@pytest.fixture
def two_zoos(root):
    return root, [make_zoo(root, "za", num_models=8), make_zoo(root, "zb", "resnet_mini", num_models=4, seed=1)]


def test_max_positions_for_covers_only_the_named_zoos(two_zoos):
    """A backbone's position tables follow the zoos it trains on, not every zoo of the shard dataset."""
    root, zoos = two_zoos
    m = build_shards(zoos, storage.join(root, "shards"))
    cnn = layout_from_state_dict(build_model("cnn_s").state_dict(), 64).max_positions
    resnet = layout_from_state_dict(build_model("resnet_mini").state_dict(), 64).max_positions
    assert m.max_positions_for(["za"]) == list(cnn)
    assert m.max_positions_for(["zb"]) == list(resnet)
    assert m.max_positions_for([]) == m.max_positions_for(["za", "zb"]) == m.max_positions
    assert cnn[0] < resnet[0]


def test_build_manifest_splits_by_model_and_info(two_zoos, capsys):
    root, zoos = two_zoos
    out = storage.join(root, "shards")
    build_shards(zoos, out)
    m = read_manifest(out)
    assert set(m.zoos) == {"za", "zb"} and m.tokensize == 64 and len(m.layouts) == 2
    assert m.zoos["za"]["splits"] == {"train": 6, "val": 1, "test": 1}
    assert m.zoos["zb"]["splits"] == {"train": 2, "val": 1, "test": 1}
    seen = {}
    for entry in m.models:  # each model in exactly one split, all its epochs in one place
        assert (entry["zoo"], entry["model_id"]) not in seen
        seen[(entry["zoo"], entry["model_id"])] = entry["split"]
        assert entry["epochs"] == [0, 1, 2]
    for f in m.files:  # files never mix zoos or splits
        table = pq.read_table(m.file_url(f["path"]), columns=["zoo", "split"]) if not out.startswith("memory") else \
            pq.read_table(io.BytesIO(storage.read_bytes(m.file_url(f["path"]))), columns=["zoo", "split"])
        assert set(table.column("zoo").to_pylist()) == {f["zoo"]} and set(table.column("split").to_pylist()) == {
            f["split"]}
    mp = [max(layout_from_state_dict(build_model(a).state_dict(), 64).max_positions[i] for a in ("cnn_s",
                                                                                                "resnet_mini"))
          for i in range(3)]
    assert m.max_positions == mp
    assert cli_main(["shards", "info", out]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["models"] == 12 and info["checkpoints"] == 36 and info["splits_models"] == {"train": 8, "val": 2,
                                                                                           "test": 2}
    assert info["bytes"] == sum(f["num_bytes"] for f in m.files) > 0
    assert info["tokens"] == 3 * (8 * m.zoos["za"]["num_tokens"] + 4 * m.zoos["zb"]["num_tokens"])


def test_split_is_seeded_and_default_70_15_15():
    ids = [f"m{i:03d}" for i in range(100)]
    a = writer.split_models(ids, [0.7, 0.15, 0.15], 42, "z")
    assert a == writer.split_models(list(reversed(ids)), [0.7, 0.15, 0.15], 42, "z")
    assert a != writer.split_models(ids, [0.7, 0.15, 0.15], 43, "z")
    assert sorted(a.values()).count("train") == 70 and list(a.values()).count("val") == 15


def test_reader_returns_exact_tokens_of_selected_models(two_zoos):
    root, zoos = two_zoos
    out = storage.join(root, "shards")
    build_shards(zoos, out)
    m = read_manifest(out)
    sel = select(m, zoos=["zb"], num_models_per_zoo=2, split="train", epochs=[0, 2], seed=3)
    chosen = sorted(e["model_id"] for e in sel.models)
    assert len(chosen) == 2 and all(e["split"] == "train" for e in sel.models)
    samples = list(ShardReader(out, sel).iter_samples(shuffle_buffer=4, seed=1))
    assert sorted((s.model_id, s.epoch) for s in samples) == [(mid, e) for mid in chosen for e in (0, 2)]
    reader = open_zoo(zoos[1])
    layout = m.layout(m.zoos["zb"]["layout_id"])
    for s in samples:
        assert s.zoo == "zb" and s.split == "train" and s.layout_id == layout.layout_id
        expected = tokenize(reader.load_checkpoint(s.model_id, s.epoch), layout)
        assert torch.equal(s.tokens_ND, expected) and s.tokens_ND.dtype == torch.float32
        assert s.test_acc == pytest.approx(0.1 * s.epoch + 0.01 * int(s.model_id[1:]))


def test_selection_nested_exact_and_errors(two_zoos):
    root, zoos = two_zoos
    out = storage.join(root, "shards")
    m = build_shards(zoos, out)
    small = select(m, zoos=["za"], num_models_per_zoo=3, seed=5)
    large = select(m, zoos=["za"], num_models_per_zoo=5, seed=5)
    assert len(small.models) == 3 and small.model_keys() <= large.model_keys()
    both = select(m, num_models_per_zoo=2, seed=5)
    assert {z for z, _ in both.model_keys()} == {"za", "zb"} and len(both.models) == 4
    assert select(m, split="test").model_keys().isdisjoint(select(m, split="train").model_keys())
    with pytest.raises(DataError, match="only 6 train models"):
        select(m, zoos=["za"], num_models_per_zoo=7)
    with pytest.raises(DataError, match=r"not in the shard dataset .* available: za, zb"):
        select(m, zoos=["nope"])
    with pytest.raises(DataError, match="split 'dev'"):
        select(m, split="dev")
    with pytest.raises(DataError, match="available epochs"):
        select(m, epochs=[9])


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_disjoint_balanced_and_reproducible(two_zoos, world_size):
    root, zoos = two_zoos
    out = storage.join(root, "shards")
    m = build_shards(zoos, out)
    sel = select(m)
    reader = ShardReader(out, sel, manifest=m)
    per_rank = [[(s.zoo, s.model_id, s.epoch) for s in reader.iter_samples(r, world_size, seed=7, epoch=1,
                                                                             shuffle_buffer=5)]
                for r in range(world_size)]
    flat = [x for rank in per_rank for x in rank]
    assert len(flat) == len(set(flat)), "ranks overlap"
    assert len({len(r) for r in per_rank}) == 1 and len(flat) == sel.num_rows - sel.num_rows % world_size
    again = [(s.zoo, s.model_id, s.epoch) for s in reader.iter_samples(0, world_size, seed=7, epoch=1,
                                                                       shuffle_buffer=5)]
    assert again == per_rank[0]
    other_epoch = [(s.zoo, s.model_id, s.epoch) for s in reader.iter_samples(0, 1, seed=7, epoch=2)]
    assert sorted(other_epoch) == sorted((r.zoo, r.model_id, r.epoch) for r in sel.rows())


def test_all_encodings_decode_identically():
    rng = np.random.default_rng(0)
    rows = [schema.Row("z", f"m{i}", i, "train", "x", 0.1, 0.2, 0.3,
                       rng.standard_normal((5, 7)).astype(np.float32)) for i in range(4)]
    for enc in schema.ENCODINGS:
        buf = io.BytesIO()
        pq.write_table(schema.rows_to_table(rows, 5, 7, enc), buf, row_group_size=3)
        f = pq.ParquetFile(io.BytesIO(buf.getvalue()))
        got = np.concatenate([schema.table_tokens(f.read_row_group(g).column("tokens"), 5, 7)
                              for g in range(f.num_row_groups)])
        assert np.array_equal(got, np.stack([r.tokens_ND for r in rows])), enc


def test_resume_after_interrupted_build_skips_done_zoos(two_zoos, monkeypatch):
    root, zoos = two_zoos
    out = storage.join(root, "shards")
    calls = interrupt_tokenize(monkeypatch, at_call=30)  # in the middle of the second zoo
    with pytest.raises(KeyboardInterrupt):
        build_shards(zoos, out, shards_cfg(rows_per_file=4))
    assert not storage.exists(storage.join(out, "manifest.json"))
    assert storage.listdir(storage.join(out, "_zoos")) == ["za.json"]
    calls.clear()
    m = build_shards(zoos, out, shards_cfg(rows_per_file=4))
    assert len(calls) == 12, "only the interrupted zoo is redone"
    names = sorted(n for n in storage.listdir(out) if n.endswith(".parquet"))
    assert names == sorted(f["path"] for f in m.files), "orphans of the interrupted build are gone"
    assert len(list(ShardReader(out, select(m, split="val")).iter_samples())) == 6
    calls.clear()
    build_shards(zoos, out, shards_cfg(rows_per_file=4))
    assert calls == []


def test_nan_checkpoints_are_skipped_and_recorded(root):
    url = make_zoo(root, "zn", num_models=3)
    sd_url = storage.join(url, "models", "m001", "epoch_0001.safetensors")
    reader = open_zoo(url)
    bad = reader.load_checkpoint("m001", 1)
    bad["module_list.0.weight"][0, 0, 0, 0] = float("inf")
    from safetensors.torch import save
    storage.write_bytes(sd_url, save(bad))
    m = build_shards([url], storage.join(root, "shards"))
    assert [(s["model_id"], s["epoch"]) for s in m.skipped] == [("m001", 1)]
    assert "non-finite" in m.skipped[0]["reason"]
    entry = next(e for e in m.models if e["model_id"] == "m001")
    assert entry["epochs"] == [0, 2]
    assert summary(m)["skipped_checkpoints"] == 1


def _bad_zoo(root, kind):
    """A zoo that must be refused with one line (or a settings mismatch)."""
    if kind == "unknown_arch":
        url = make_zoo(root, "zx", num_models=2)
        storage.write_json(storage.join(url, "zoo.json"), {**storage.read_json(storage.join(url, "zoo.json")),
                                                           "architecture": "transformer9000"})
        return url, "unknown architecture 'transformer9000'"
    if kind == "corrupt":
        url = make_zoo(root, "zx", num_models=2)
        storage.write_bytes(storage.join(url, "models", "m001", "epoch_0002.safetensors"), b"garbage" * 3)
        return url, "is corrupt"
    if kind == "missing":
        url = make_zoo(root, "zx", num_models=2)
        storage.remove(storage.join(url, "models", "m000", "epoch_0001.safetensors"))
        return url, "is missing"
    if kind == "pickle_with_code":
        url = storage.join(root, "zx")
        rec = ModelRecord(zoo="zx", model_id="m0", dataset="mnist", architecture="cnn_s",
                          epochs=[{"epoch": 0, "test_acc": 0.5}])
        write_modelzoos_model(url, rec, {0: build_model("cnn_s").state_dict()})
        buf = io.BytesIO()
        torch.save({"module_list.0.weight": types.SimpleNamespace(x=os.system)}, buf)
        storage.write_bytes(storage.join(url, "m0", "checkpoint_000000", "checkpoints"), buf.getvalue())
        return url, "carries code"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unknown_arch", "corrupt", "missing", "pickle_with_code"])
def test_bad_zoo_gives_one_line_and_leaves_dataset_intact(root, kind):
    good = make_zoo(root, "za", num_models=4)
    out = storage.join(root, "shards")
    build_shards([good], out)
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    files_before = sorted(storage.listdir(out))
    bad, match = _bad_zoo(root, kind)
    with pytest.raises(DataError, match=match) as err:
        build_shards([bad], out)
    assert "\n" not in str(err.value)
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before
    assert sorted(storage.listdir(out)) == files_before, "no orphan part file of the failed zoo is left"
    m = read_manifest(out)
    assert len(list(ShardReader(out, select(m)).iter_samples())) == m.zoos["za"]["splits"]["train"] * 3


def test_settings_schema_and_positions_errors_leave_dataset_intact(root):
    good = make_zoo(root, "za", num_models=4)
    other = make_zoo(root, "zb", num_models=3)
    out = storage.join(root, "shards")
    build_shards([good], out)
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    c = shards_cfg()
    c.tokens.tokensize = 32
    with pytest.raises(DataError, match="holds tokensize 64.*tokens.tokensize=64"):
        build_shards([other], out, c)
    with pytest.raises(DataError, match=r"needs token positions < \d+ but max_positions allows 50.*larger tokensize"):
        build_shards([make_zoo(root, "zr", "resnet_mini", num_models=3)], out, shards_cfg(), max_positions=[50, 64, 64])
    with pytest.raises(DataError, match="given twice"):
        build_shards([good, good], out)
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before
    manifest = json.loads(before)
    storage.write_json(storage.join(out, "manifest.json"), {**manifest, "schema_version": 99})
    with pytest.raises(DataError, match="schema_version 99, newer") as err:
        read_manifest(out)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="schema_version 99, newer"):
        build_shards([other], out)
    assert storage.listdir(storage.join(out, "_zoos")) == ["za.json"]
    with pytest.raises(DataError, match="no shard dataset"):
        read_manifest(storage.join(root, "nothing"))


def test_cli_build_is_idempotent_and_expands_folders(tmp_path, capsys):
    make_zoo(str(tmp_path / "zoos"), "za", num_models=3)
    make_zoo(str(tmp_path / "zoos"), "zb", num_models=3)
    out = str(tmp_path / "shards")
    argv = ["shards", "build", str(tmp_path / "zoos"), "--out", out, "--preset", "tiny", "--set", "shards.epochs=[0,2]"]
    assert cli_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["models"] == 6 and first["checkpoints"] == 12
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "already in" in captured.err and json.loads(captured.out)["checkpoints"] == 12
    assert cli_main(["shards", "info", str(tmp_path / "missing")]) == 2
    assert "no shard dataset" in capsys.readouterr().err


def test_checkpoints_with_shifted_keys_tokenize_and_foreign_ones_are_refused(tmp_path):
    """Model Zoos CNNs with dropout shift their module_list indices; same tensors, same tokens."""
    url = make_zoo(str(tmp_path), "zd", num_models=3, epochs=(0,))
    w = ZooWriter(url, open_zoo(url).info)
    torch.manual_seed(5)
    shifted = build_model("cnn_s", dropout=0.1).state_dict()
    w.write_model(ModelRecord(zoo="zd", model_id="m_drop", dataset="mnist", architecture="cnn_s",
                              arch_kwargs={"dropout": 0.1}, epochs=[{"epoch": 0, "test_acc": 0.5}]), {0: shifted})
    m = build_shards([url], str(tmp_path / "shards"), shards_cfg(split_fractions=[1.0, 0.0, 0.0]))
    got = next(s for s in ShardReader(m.url, select(m)).iter_samples() if s.model_id == "m_drop")
    plain = dict(zip(build_model("cnn_s").state_dict().keys(), shifted.values()))
    assert torch.equal(got.tokens_ND, tokenize(plain, m.layout(got.layout_id)))
    w.write_model(ModelRecord(zoo="zd", model_id="m_foreign", dataset="mnist", architecture="cnn_s",
                              epochs=[{"epoch": 0}]), {0: build_model("mlp").state_dict()})
    with pytest.raises(DataError, match="does not match the zoo's architecture"):
        build_shards([url], str(tmp_path / "shards2"))


def test_reader_streams_row_groups_lazily(tmp_path, monkeypatch):
    """Memory is one row group plus the shuffle buffer: the first sample needs only the first group(s)."""
    url = make_zoo(str(tmp_path), "zl", num_models=10, epochs=(0, 1, 2, 3))
    m = build_shards([url], str(tmp_path / "shards"), shards_cfg(rows_per_row_group=2, split_fractions=[1.0, 0.0, 0.0]))
    reader = ShardReader(m.url, select(m), m)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k))
    stream = reader.iter_samples(shuffle_buffer=3)
    next(stream)
    assert len(reads) == 2 and len(reader.plan()) == 20
    assert sum(1 for _ in stream) == 39 and len(reads) == 20
