"""Zoo store: both layouts round-trip, untrusted pickles are refused, filters say why they skip."""
import io
import json
import math
import os
import pickle

import pytest
import torch

from mzsane import storage
from mzsane.errors import DataError
from mzsane.zoo.architectures import build_model
from mzsane.zoo.modelzoos import ModelzoosZooReader, write_modelzoos_model
from mzsane.zoo.records import FilteredCheckpoint, ModelRecord, ZooInfo, load_untrusted
from mzsane.zoo.store import MzsaneZooReader, ZooWriter, find_zoos, open_zoo, zoo_info_cli


def _record(zoo, model_id, arch="cnn_s", epochs=(0, 1), status="ok"):
    return ModelRecord(zoo=zoo, model_id=model_id, dataset="mnist", architecture=arch, arch_kwargs={},
                       hparams={"seed": 1, "lr": 1e-3, "optimizer": "adam"}, status=status,
                       epochs=[{"epoch": e, "train_acc": 0.1 * e, "val_acc": 0.2 + e / 10, "test_acc": 0.3 + e / 10}
                               for e in epochs])


def _checkpoints(arch, seed, epochs=(0, 1)):
    torch.manual_seed(seed)
    model = build_model(arch)
    return {e: {k: v + 0.001 * e if v.is_floating_point() else v for k, v in model.state_dict().items()}
            for e in epochs}


def test_mzsane_layout_round_trip_bit_exact(root):
    url = storage.join(root, "zoos", "demo")
    writer = ZooWriter(url, ZooInfo(zoo="demo", dataset="mnist", architecture="resnet_mini", num_models=2))
    originals = {}
    for i in range(2):
        originals[f"m{i}"] = _checkpoints("resnet_mini", i)
        writer.write_model(_record("demo", f"m{i}", "resnet_mini"), originals[f"m{i}"])
    assert writer.finished_models() == {"m0", "m1"}
    reader = open_zoo(url)
    assert isinstance(reader, MzsaneZooReader) and reader.info.architecture == "resnet_mini"
    records = reader.models()
    assert [r.model_id for r in records] == ["m0", "m1"]
    assert records[0].checkpoint_epochs == [0, 1] and records[0].metrics(1)["test_acc"] == pytest.approx(0.4)
    assert math.isnan(records[0].metrics(7)["test_acc"])
    for model_id, cks in originals.items():
        for epoch, sd in cks.items():
            loaded = reader.load_checkpoint(model_id, epoch)
            assert list(loaded) == list(sd)
            assert all(torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype for k in sd)


def test_model_without_marker_is_not_finished(root):
    url = storage.join(root, "z")
    writer = ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s"))
    writer.write_model(_record("z", "done"), _checkpoints("cnn_s", 0))
    # an interrupted model: checkpoint written, model.json never
    storage.write_bytes(storage.join(url, "models", "half", "epoch_0000.safetensors"), b"partial")
    assert writer.finished_models() == {"done"}
    assert [r.model_id for r in open_zoo(url).models()] == ["done"]


def test_writer_refuses_other_architecture_in_same_folder(root):
    url = storage.join(root, "z")
    ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s"))
    with pytest.raises(DataError, match="already holds cnn_s"):
        ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="resnet_mini"))


def test_modelzoos_layout_written_and_read(root):
    url = storage.join(root, "tune_zoo_mnist_uniform")
    storage.write_json(storage.join(url, "config.json"), {"experiment": "x"})  # zoo-level file is ignored
    originals = {}
    for i in range(2):
        rec = _record("tune_zoo_mnist_uniform", f"NN_tune_trainable_0000{i}_{i}_seed={i}", epochs=(0, 1, 2))
        originals[rec.model_id] = _checkpoints("cnn_s", i, epochs=(0, 2))
        write_modelzoos_model(url, rec, originals[rec.model_id])
    reader = open_zoo(url)
    assert isinstance(reader, ModelzoosZooReader)
    assert reader.info.architecture == "cnn_s" and reader.info.dataset == "mnist" and reader.info.num_models == 2
    rec = reader.models()[0]
    assert rec.checkpoint_epochs == [0, 2] and [row["epoch"] for row in rec.epochs] == [0, 1, 2]
    for model_id, cks in originals.items():
        loaded = reader.load_checkpoint(model_id, 2)
        assert all(torch.equal(loaded[k], cks[2][k]) for k in cks[2])


@pytest.mark.parametrize("digits", [2, 4, 6])
def test_modelzoos_reference_folder_with_any_padding(tmp_path, digits):
    """A folder as Ray Tune wrote it (no mzsane keys), checkpoint_<e> padded to 2, 4 or 6 digits."""
    model = tmp_path / "zoo" / "NN_tune_trainable_c0371_00000_0_seed=1"
    (model / f"checkpoint_{5:0{digits}d}").mkdir(parents=True)
    params = {"model::type": "CNN", "model::channels_in": 1, "model::o_dim": 10, "model::nlin": "tanh",
              "model::dropout": 0.0, "model::init_type": "uniform", "seed": 1,
              "dataset::dump": "/data/zoos/fashion_mnist/dataset.pt"}
    (model / "params.json").write_text(json.dumps(params))
    lines = [{"training_iteration": e, "test_acc": 0.5 + e / 100, "train_acc": 0.6, "config": params} for e in (1, 5)]
    (model / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    sd = build_model("cnn_s").state_dict()
    torch.save(sd, model / f"checkpoint_{5:0{digits}d}" / "checkpoints")
    reader = open_zoo(str(tmp_path / "zoo"))
    rec = reader.models()[0]
    assert (rec.architecture, rec.dataset, rec.checkpoint_epochs) == ("cnn_s", "fashion_mnist", [5])
    assert rec.metrics(5)["test_acc"] == pytest.approx(0.55) and rec.arch_kwargs["activation"] == "tanh"
    assert all(torch.equal(reader.load_checkpoint(rec.model_id, 5)[k], sd[k]) for k in sd)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the raw pickle is the point
def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    payload = {"module_list.0.weight": torch.zeros(2, 2), "evil": _Evil(marker)}
    if how == "torch_save":
        torch.save(payload, buf)
    else:
        pickle.dump(payload, buf)
    with pytest.raises(DataError) as err:
        load_untrusted(buf.getvalue(), "zoo/m/checkpoint_000001/checkpoints")
    message = str(err.value)
    assert "\n" not in message and "zoo/m/checkpoint_000001/checkpoints" in message
    assert "carries code" in message and "system" in message
    assert not marker.exists()
    # and through the zoo reader, on a real modelzoos folder
    rec = _record("z", "m0")
    write_modelzoos_model(str(tmp_path / "z"), rec, _checkpoints("cnn_s", 0, epochs=(0,)))
    (tmp_path / "z" / "m0" / "checkpoint_000000" / "checkpoints").write_bytes(buf.getvalue())
    with pytest.raises(DataError):
        open_zoo(str(tmp_path / "z")).load_checkpoint("m0", 0)
    assert not marker.exists()


def test_filters_and_bad_checkpoints_give_one_line(root):
    url = storage.join(root, "z")
    writer = ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s"))
    cks = _checkpoints("cnn_s", 0, epochs=(0, 1, 2))
    cks[1]["module_list.0.weight"][0, 0, 0, 0] = float("nan")
    cks[2]["module_list.0.weight"][0, 0, 0, 0] = 50.0
    writer.write_model(_record("z", "m0", epochs=(0, 1, 2)), cks)
    reader = open_zoo(url)
    assert reader.load_checkpoint("m0", 2, weight_threshold=100.0)["module_list.0.weight"].max() == 50.0
    with pytest.raises(FilteredCheckpoint, match="non-finite weights in 'module_list.0.weight'"):
        reader.load_checkpoint("m0", 1)
    with pytest.raises(FilteredCheckpoint, match="exceeds weight_threshold 5"):
        reader.load_checkpoint("m0", 2, weight_threshold=5.0)
    storage.write_bytes(storage.join(url, "models", "m0", "epoch_0000.safetensors"), b"\x10\x00\x00\x00\x00\x00"
                        b"\x00\x00{\"a\": trunc")
    with pytest.raises(DataError, match="is corrupt") as err:
        reader.load_checkpoint("m0", 0)
    assert "\n" not in str(err.value)
    storage.remove(storage.join(url, "models", "m0", "epoch_0001.safetensors"))
    with pytest.raises(DataError, match="is missing"):
        reader.load_checkpoint("m0", 1)
    with pytest.raises(DataError, match="nope.*missing"):
        reader.load_checkpoint("nope", 0)


def test_newer_model_schema_and_non_zoo_are_refused(root):
    url = storage.join(root, "z")
    writer = ZooWriter(url, ZooInfo(zoo="z", dataset="mnist", architecture="cnn_s"))
    writer.write_model(_record("z", "m0"), _checkpoints("cnn_s", 0))
    meta = storage.join(url, "models", "m0", "model.json")
    storage.write_json(meta, {**storage.read_json(meta), "schema_version": 99})
    with pytest.raises(DataError, match="schema_version 99, newer"):
        open_zoo(url).models()
    storage.write_text(storage.join(root, "empty", "readme.md"), "nothing")
    with pytest.raises(DataError, match="is not a zoo"):
        open_zoo(storage.join(root, "empty"))


def test_zoo_info_over_a_folder_of_zoos(tmp_path, capsys):
    for zoo, n in (("a", 3), ("b", 2)):
        writer = ZooWriter(str(tmp_path / zoo), ZooInfo(zoo=zoo, dataset="mnist", architecture="cnn_s", num_models=n))
        for i in range(n):
            writer.write_model(_record(zoo, f"m{i}", status="diverged" if i == 2 else "ok"), _checkpoints("cnn_s", i))
    assert find_zoos(str(tmp_path)) == [str(tmp_path / "a"), str(tmp_path / "b")]
    out = zoo_info_cli(type("Args", (), {"path": str(tmp_path)})())
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(out))
    a = out["zoos"][0]
    assert a["num_models"] == 3 and a["status"] == {"ok": 2, "diverged": 1} and a["checkpoints"] == 6
    stats = a["accuracy_per_epoch"]["1"]["test_acc"]
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.4) and stats["std"] == pytest.approx(0.0, abs=1e-9)
    assert stats["min"] == stats["max"] == pytest.approx(0.4)
