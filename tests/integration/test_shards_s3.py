"""Zoos and shards on a real S3 server (SeaweedFS on 127.0.0.1, started by the ``s3_server`` fixture):
write, list, read back, resume an interrupted build, sub-zoo selection, and one-line errors for wrong
credentials and an unreachable endpoint that strike mid-build and leave earlier data intact."""
import json
import uuid

import pytest
import torch

from mzsane import storage
from mzsane.cli import main as cli_main
from mzsane.errors import DataError, StorageError
from mzsane.loopback.seaweedfs import free_port
from mzsane.shards import writer
from mzsane.shards.manifest import read_manifest
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.store import open_zoo
from tests.fixtures.zoos import build_shards, interrupt_tokenize, make_zoo, shards_cfg

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(s3_server):
    return s3_server.url(f"t-{uuid.uuid4().hex[:8]}")


def test_zoo_and_shards_round_trip_on_s3(s3_server, prefix, capsys):
    zoos = [make_zoo(storage.join(prefix, "zoos"), "za", num_models=3, epochs=(0, 1)),
            make_zoo(storage.join(prefix, "zoos"), "zb", "resnet_mini", num_models=3, seed=1, epochs=(0, 1))]
    assert storage.listdir(storage.join(prefix, "zoos")) == ["za", "zb"]
    out = storage.join(prefix, "shards")
    assert cli_main(["shards", "build", storage.join(prefix, "zoos"), "--out", out, "--preset", "tiny"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["models"] == 6 and built["checkpoints"] == 12
    listed = storage.listdir(out)
    assert "manifest.json" in listed and "_zoos" in listed and sum(n.endswith(".parquet") for n in listed) == 6
    assert cli_main(["shards", "info", out]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == sum(storage.size(storage.join(out, n)) for n in listed if n.endswith(".parquet"))
    m = read_manifest(out)
    sel = select(m, zoos=["zb"], num_models_per_zoo=1, seed=2)
    samples = list(ShardReader(out, sel).iter_samples(shuffle_buffer=2))
    (model_id,) = {e["model_id"] for e in sel.models}
    assert sorted((s.zoo, s.model_id, s.epoch) for s in samples) == [("zb", model_id, e) for e in (0, 1)]
    reader = open_zoo(zoos[1])
    layout = m.layout(m.zoos["zb"]["layout_id"])
    for s in samples:
        assert s.split == "train"
        assert torch.equal(s.tokens_ND, tokenize(reader.load_checkpoint(s.model_id, s.epoch), layout))
    ranks = [{(s.zoo, s.model_id, s.epoch) for s in ShardReader(out, select(m)).iter_samples(r, 2)} for r in (0, 1)]
    assert ranks[0].isdisjoint(ranks[1]) and len(ranks[0]) == len(ranks[1])


def test_resume_interrupted_build_on_s3(s3_server, prefix, monkeypatch, tmp_path):
    zoos = [make_zoo(str(tmp_path / "zoos"), z, num_models=3, seed=i, epochs=(0, 1))
            for i, z in enumerate(("za", "zb"))]
    out = storage.join(prefix, "shards")
    calls = interrupt_tokenize(monkeypatch, at_call=9)
    with pytest.raises(KeyboardInterrupt):
        build_shards(zoos, out, shards_cfg(rows_per_file=2))
    assert not storage.exists(storage.join(out, "manifest.json"))
    calls.clear()
    m = build_shards(zoos, out, shards_cfg(rows_per_file=2))
    assert len(calls) == 6
    assert sorted(n for n in storage.listdir(out) if n.endswith(".parquet")) == sorted(f["path"] for f in m.files)
    total = sum(len(list(ShardReader(out, select(m, split=s)).iter_samples())) for s in ("train", "val", "test"))
    assert total == 12


def _num_samples(out, manifest) -> int:
    return sum(len(list(ShardReader(out, select(manifest, split=s)).iter_samples())) for s in ("train", "val", "test"))


def _fail_mid_build(monkeypatch, after_calls: int, env: dict[str, str]) -> None:
    """Let the build tokenize ``after_calls`` checkpoints (and write their part files), then break S3."""
    real, calls = writer.tokenize, []

    def breaking(state_dict, layout):
        calls.append(1)
        if len(calls) == after_calls + 1:
            for key, value in env.items():
                monkeypatch.setenv(key, value)
        return real(state_dict, layout)

    monkeypatch.setattr(writer, "tokenize", breaking)


@pytest.mark.parametrize("fault", ["wrong_credentials", "dead_endpoint"])
def test_s3_failure_mid_build_is_one_line_and_leaves_earlier_data_intact(s3_server, prefix, monkeypatch, tmp_path,
                                                                          fault):
    """The failure hits after the new build has written objects under the output: the manifest readers
    see must still be the earlier one, and a re-run must complete."""
    out = storage.join(prefix, "shards")
    build_shards([make_zoo(str(tmp_path / "zoos"), "za", num_models=3, epochs=(0,))], out)
    before = storage.read_bytes(storage.join(out, "manifest.json"))
    before_objects = set(storage.listdir(out))
    extra = make_zoo(str(tmp_path / "zoos"), "zb", num_models=4, epochs=(0,))
    if fault == "wrong_credentials":
        env, match = {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "access denied.*AWS_ACCESS_KEY_ID"
    else:
        env, match = {"MZSANE_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, "unreachable.*MZSANE_S3_ENDPOINT"

    _fail_mid_build(monkeypatch, after_calls=2, env=env)
    with pytest.raises(StorageError, match=match) as err:
        build_shards([extra], out, shards_cfg(rows_per_file=1))
    assert "\n" not in str(err.value)
    if fault == "wrong_credentials":
        with pytest.raises(StorageError, match="access denied"):
            read_manifest(out)
        assert cli_main(["shards", "info", out]) == 2

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", s3_server.endpoint)
    monkeypatch.setattr(writer, "tokenize", tokenize)
    touched = set(storage.listdir(out))
    assert touched != before_objects, "the fault must hit after the build wrote something under the output"
    assert storage.read_bytes(storage.join(out, "manifest.json")) == before
    m = read_manifest(out)
    assert set(m.zoos) == {"za"} and _num_samples(out, m) == 3
    m = build_shards([extra], out, shards_cfg(rows_per_file=1))  # the re-run completes and adds the zoo
    assert set(m.zoos) == {"za", "zb"} and _num_samples(out, m) == 7
    with pytest.raises(DataError, match="no shard dataset"):
        read_manifest(storage.join(prefix, "nothing"))
