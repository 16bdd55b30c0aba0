"""Read-time epoch selection (``data.epochs`` / ``data.num_tail_epochs``), the step budget by exposure
(``train.num_epochs``) and the per-zoo exposure a real training run writes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mzsane import presets, storage
from mzsane.errors import DataError
from mzsane.shards import writer
from mzsane.shards.manifest import Manifest, read_manifest, summary
from mzsane.shards.select import tail_epochs, training_selection
from mzsane.train import budget as budget_mod
from mzsane.train import launch
from mzsane.train.context import LocalContext
from mzsane.train.data import open_selection
from mzsane.train.loop import train_loop
from mzsane.zoo.synthetic import SyntheticZoo

EPOCHS = (0, 1, 2, 3)


def _zoo(root, zoo, arch="cnn_s", num_models=8):
    """A small real zoo: built networks perturbed per epoch, epochs 0 (init) to 3 saved."""
    url = storage.join(root, "zoos", zoo)
    SyntheticZoo(zoo, arch, num_models, EPOCHS, metrics=lambda i, e, _: {"test_acc": 0.2 * e, "val_acc": 0.2 * e}
                 ).write(url)
    return url


@pytest.fixture
def shards(tmp_path):
    cfg = presets.tiny()
    out = storage.join(str(tmp_path), "shards")
    zoos = [_zoo(str(tmp_path), "za"), _zoo(str(tmp_path), "zb", "resnet_mini", num_models=4)]
    writer.build_shards(zoos, out, cfg.tokens, cfg.shards, progress=False)
    return out


def _cfg(shards_url, **data):
    cfg = presets.tiny()
    cfg.data.shards_url = shards_url
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_tail_epochs_skip_the_init_unless_it_is_alone():
    assert tail_epochs([0, 1, 2, 3], 2) == [2, 3]
    assert tail_epochs([3, 0, 2, 1], 1) == [3]
    assert tail_epochs([0, 1], 5) == [1]  # never the random init while a trained epoch exists
    assert tail_epochs([0], 2) == [0]
    assert tail_epochs([0, 1, 2, 3], -1) == [0, 1, 2, 3]


def test_training_reads_the_trained_tail_by_default_and_the_listed_epochs_when_given(shards):
    _, _, train, val = open_selection(_cfg(shards), world_size=1)  # the defaults: the last 2 saved epochs
    assert {r.epoch for r in train.rows()} == {2, 3} and {r.epoch for r in val.rows()} == {2, 3}
    assert train.rows_per_zoo() == {"za": 2 * 6, "zb": 2 * 2}  # 6 + 2 train models (70% split), 2 epochs
    _, _, train, _ = open_selection(_cfg(shards, epochs=[1]), world_size=1)
    assert {r.epoch for r in train.rows()} == {1}
    _, _, train, _ = open_selection(_cfg(shards, num_tail_epochs=-1), world_size=1)
    assert {r.epoch for r in train.rows()} == set(EPOCHS)
    with pytest.raises(DataError, match="available epochs"):
        open_selection(_cfg(shards, epochs=[7]), world_size=1)
    # the recorded selection names what was read
    assert training_selection(read_manifest(shards), _cfg(shards).data).to_dict()["rows_per_zoo"] == {"za": 12, "zb": 4}


def test_shards_info_shows_rows_per_zoo_per_epoch(shards):
    info = summary(read_manifest(shards))
    assert info["zoos"]["za"]["rows_per_epoch"] == {str(e): {"train": 6, "val": 1, "test": 1} for e in EPOCHS}
    assert info["zoos"]["zb"]["rows_per_epoch"]["0"] == {"train": 2, "val": 1, "test": 1}


def test_steps_follow_the_data_batch_and_world_size():
    assert budget_mod.steps_for_epochs(3, 100, 4, 2) == math.ceil(300 / 8)
    assert budget_mod.steps_for_epochs(0.5, 10, 16, 1) == 1


def _windows(shards, zoo, cfg):
    """Windows the reader cuts from one row of ``zoo``: a ResNet row holds several windows, a small CNN's one."""
    from mzsane.train.data import windows_of

    return windows_of(read_manifest(shards).zoos[zoo]["num_tokens"], cfg.data.window_size, cfg.data.windows_per_row)


def _plan(cfg, world_size=1):
    _, manifest, train, _ = open_selection(cfg, world_size)
    return budget_mod.plan(cfg, manifest, train, world_size)


def test_budget_by_exposure_gives_equal_passes_whatever_the_zoo_count(shards):
    single = _cfg(shards, zoos=["za"])
    multi = _cfg(shards)
    for c in (single, multi):
        c.train.num_epochs = 4
    b1, b2 = _plan(single), _plan(multi)
    w_a, w_b = _windows(shards, "za", multi), _windows(shards, "zb", multi)
    assert w_b > w_a > 1  # tokensize 64, window 16: several windows per row, more for the ResNet
    assert b1.num_steps == math.ceil(4 * 12 * w_a / single.train.batch_size)
    assert b2.num_steps == math.ceil(4 * (12 * w_a + 4 * w_b) / multi.train.batch_size) > b1.num_steps
    assert b2.windows_per_row == {"za": w_a, "zb": w_b}
    assert b1.epochs_covered == pytest.approx(4, abs=single.train.batch_size / 12)
    multi.train.num_epochs = 0  # 0 = the plain step count
    assert _plan(multi).num_steps == multi.train.num_steps


def test_training_spends_the_budget_with_a_live_schedule_and_writes_exposure(shards, tmp_path):
    cfg = _cfg(shards)
    cfg.train.num_epochs = 2
    cfg.train.num_steps = 1000  # ignored: the budget decides
    cfg.train.eval_every_n_steps = -1
    cfg.train.checkpoint_every_n_steps = -1
    cfg.train.log_every_n_steps = 1
    cfg.metrics.enabled = False
    run = str(tmp_path / "run")
    windows_per_epoch = 12 * _windows(shards, "za", cfg) + 4 * _windows(shards, "zb", cfg)
    expected_steps = math.ceil(2 * windows_per_epoch / cfg.train.batch_size)
    lrs = []
    import mzsane.train.loop as loop_mod

    real = loop_mod.make_scheduler

    def spy(optimizer, tc):
        sched = real(optimizer, tc)
        lrs.append(sched)
        return sched

    loop_mod.make_scheduler = spy
    launch.finish(cfg, 1)  # on the driver: the budget becomes the finished config's step count
    assert cfg.train.num_steps == expected_steps
    try:
        last = train_loop(cfg, LocalContext(run, num_to_keep=1), run)
    finally:
        loop_mod.make_scheduler = real
    assert last["step"] == expected_steps
    assert lrs[0].total_steps == expected_steps  # the schedule spans exactly the budget
    assert last["train/lr"] > 0
    out = json.loads((tmp_path / "run" / budget_mod.EXPOSURE_FILE).read_text())
    assert out["budget"]["num_steps"] == expected_steps and out["budget"]["rows_per_zoo"] == {"za": 12, "zb": 4}
    zoos = out["zoos"]
    assert sum(z["samples"] for z in zoos.values()) == expected_steps * cfg.train.batch_size
    assert set(zoos) == {"za", "zb"}
    for z in zoos.values():
        assert 0 < z["tokens"] <= z["samples"] * cfg.data.window_size and z["entries"] > 0
    for z in zoos.values():  # equal exposure: every zoo's windows seen ~2 times (the last batch may spill over)
        assert z["passes"] == pytest.approx(2, abs=cfg.train.batch_size / 4)
    # a resnet_mini window holds more valid entries than a cnn_s window
    assert zoos["zb"]["entries"] / zoos["zb"]["samples"] > zoos["za"]["entries"] / zoos["za"]["samples"]
    assert sum(z["entry_share"] for z in zoos.values()) == pytest.approx(1.0)


def test_exposure_merges_ranks():
    e = budget_mod.Exposure()
    e.add(["a", "b"], torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, 4, dtype=torch.bool))
    merged = budget_mod.Exposure.merge([e.state(), e.state()])
    assert merged["a"] == {"samples": 2, "tokens": 6, "entries": 24, "entry_share": 0.5}


def test_manifest_type_is_what_select_reads():  # guards the fixture-free selection path used by sampling
    m = Manifest(url="memory://x", tokensize=8, include_bn=True, include_running_stats=False,
                 weight_threshold=math.inf, encoding="fixed_size_binary", compression="lz4",
                 zoos={"z": {}}, models=[{"zoo": "z", "model_id": "a", "split": "train", "file": "f", "row": 0,
                                          "epochs": [0, 1, 2]}])
    cfg = presets.tiny()
    sel = training_selection(m, cfg.data)
    assert [r.epoch for r in sel.rows()] == [1, 2] and [r.row for r in sel.rows()] == [1, 2]
