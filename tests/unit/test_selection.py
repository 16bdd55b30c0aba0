"""Generation and selection: streamed, sorted by validation accuracy, and never reading the test split."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from mzsane.config import Config, SampleConfig
from mzsane.sample.anchors import Anchors
from mzsane.sample.generate import generate, read_state_dict, sample
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import Split
from tests.fixtures.backbones import IdentityBackbone


class NoTestDataset:
    """Train and val like an ImageDataset; records every split read (``.reads``), and reading ``.test`` fails."""

    def __init__(self, seed: int = 0, channels: int = 1):
        g = torch.Generator().manual_seed(seed)
        self._train = Split(torch.randn(96, channels, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
        self._val = Split(torch.randn(64, channels, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
        self.reads: set[str] = set()

    @property
    def train(self):
        self.reads.add("train")
        return self._train

    @property
    def val(self):
        self.reads.add("val")
        return self._val

    @property
    def test(self):
        self.reads.add("test")
        raise AssertionError("selection read the test split")

    def split(self, name):
        return getattr(self, name)


def _toy_zoo(tmp_path, num_models: int = 6) -> str:
    """A stored cnn_s zoo of freshly initialized models (one checkpoint each at epoch 0)."""
    from mzsane.zoo.synthetic import SyntheticZoo

    zoo_url = str(tmp_path / "zoo")
    SyntheticZoo("toy", "cnn_s", num_models, (0,), metrics=lambda *_: {"val_acc": 0.1},
                 hparams=lambda i: {"seed": i, "init": "default"}, model_id="model_{:03d}").write(zoo_url)
    return zoo_url


def _tiny_backbone() -> tuple[nn.Module, Config]:
    cfg = Config()
    cfg.tokens.tokensize = 64
    return IdentityBackbone(), cfg


def _anchors(arch: str = "cnn_s", k: int = 3, tokensize: int = 64) -> Anchors:
    sds = []
    for i in range(k):
        torch.manual_seed(100 + i)
        sds.append(build_model(arch).state_dict())
    layout = layout_from_state_dict(sds[0], tokensize=tokensize)
    return Anchors(zoo="z", dataset="d", architecture=arch, arch_kwargs={}, hparams={}, epoch=0,
                   model_ids=[f"m{i}" for i in range(k)], state_dicts=sds,
                   tokens_KND=torch.stack([tokenize(sd, layout) for sd in sds]), layout=layout)


def _cfg(**kw) -> SampleConfig:
    base = dict(num_candidates=8, num_keep=3, candidate_batch_size=3, halo_window=7, halo_size=2,
                encode_batch_size=5, bandwidth=0.05, bn_iterations=2, bn_batch_size=16, precision="fp32")
    base.update(kw)
    return SampleConfig(**base)


def test_keeps_top_n_by_val_accuracy_and_never_reads_test():
    seen = []

    def score(kwargs, state_dicts, split):
        from mzsane.sample.generate import score_candidates

        seen.append((split, len(state_dicts)))
        return score_candidates(kwargs, state_dicts, split)

    ds = NoTestDataset()
    gen = generate(IdentityBackbone(), _anchors(), ds, _cfg(), score=score)
    assert all(split is ds._val for split, _ in seen)  # scored on val only
    assert "test" not in ds.reads
    assert [n for _, n in seen] == [3, 3, 2]  # streamed in candidate batches
    assert len(gen.candidates) == 8 and len(gen.kept) == 3
    ranked = sorted(gen.candidates, key=lambda c: (-c["val_acc"], c["index"]))[:3]
    assert [info["index"] for info, _ in gen.kept] == [c["index"] for c in ranked]
    accs = [info["val_acc"] for info, _ in gen.kept]
    assert accs == sorted(accs, reverse=True)


def test_same_result_whatever_the_candidate_batch_size():
    a = generate(IdentityBackbone(), _anchors(), NoTestDataset(), _cfg(candidate_batch_size=8))
    b = generate(IdentityBackbone(), _anchors(), NoTestDataset(), _cfg(candidate_batch_size=2))
    assert a.candidates == b.candidates


def test_zero_bandwidth_reproduces_the_anchors():
    anchors = _anchors()
    gen = generate(IdentityBackbone(), anchors, NoTestDataset(), _cfg(bandwidth=0.0))
    by_id = dict(zip(anchors.model_ids, anchors.state_dicts))
    for info, sd in gen.kept:
        ref = by_id[info["anchor"]]
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_batchnorm_statistics_are_reestimated_on_train_images():
    anchors = _anchors("resnet_mini", k=2)
    gen = generate(IdentityBackbone(), anchors, NoTestDataset(), _cfg(num_candidates=2, num_keep=2, halo_window=64,
                                                                       halo_size=4, encode_batch_size=64))
    for _, sd in gen.kept:
        means = [v for k, v in sd.items() if k.endswith("running_mean")]
        assert means and any(float(m.abs().sum()) > 0 for m in means)  # not the fresh 0 / 1
        model = build_model("resnet_mini")
        model.load_state_dict(sd)


def test_sample_stage_writes_loadable_checkpoints(tmp_path):
    zoo_url = _toy_zoo(tmp_path)
    out = str(tmp_path / "out")
    results = sample("backbone-url", zoo_url, out, _cfg(num_anchors=2), dataset=NoTestDataset(),
                     backbone=_tiny_backbone(), progress=False)
    with open(os.path.join(out, "sample_results.json")) as fh:
        on_disk = json.load(fh)
    assert on_disk["anchors"]["model_ids"] == results["anchors"]["model_ids"]
    assert len(set(results["anchors"]["model_ids"])) == 2
    assert len(on_disk["generated"]) == 3
    for g in on_disk["generated"]:
        sd = read_state_dict(os.path.join(out, g["file"]))
        model = build_model("cnn_s")
        model.load_state_dict(sd)
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_sampling_never_reads_the_test_split(tmp_path, monkeypatch):
    """The stage loads the target's dataset itself (no ``dataset=``): every split it reads is recorded."""
    import mzsane.zoo.datasets

    loaded = []

    def load_dataset(name):
        loaded.append(NoTestDataset())
        return loaded[-1]

    monkeypatch.setattr(mzsane.zoo.datasets, "load_dataset", load_dataset)
    sample("backbone-url", _toy_zoo(tmp_path), str(tmp_path / "out"), _cfg(num_anchors=2),
           backbone=_tiny_backbone(), progress=False)
    assert len(loaded) == 1
    assert loaded[0].reads == {"train", "val"}  # BN statistics from train, selection on val, never test


def test_anchors_come_from_train_and_val_models_only(tmp_path):
    """load_anchors on a real zoo: asking for every train/val model must return exactly those, for any seed."""
    from mzsane.config import ShardsConfig, TokensConfig
    from mzsane.sample.anchors import load_anchors
    from mzsane.shards.writer import split_models

    zoo_url = _toy_zoo(tmp_path, num_models=20)
    shards_cfg = ShardsConfig()
    ids = [f"model_{i:03d}" for i in range(20)]
    splits = split_models(ids, list(shards_cfg.split_fractions), shards_cfg.split_seed, "toy")  # the shards' split
    allowed = {m for m, s in splits.items() if s != "test"}
    assert 0 < len(allowed) < 20
    for seed in range(3):
        anchors = load_anchors(zoo_url, len(allowed), 0, seed, TokensConfig(tokensize=64), shards_cfg)
        assert set(anchors.model_ids) == allowed
    one = load_anchors(zoo_url, 3, 0, 1, TokensConfig(tokensize=64), shards_cfg).model_ids
    assert one == load_anchors(zoo_url, 3, 0, 1, TokensConfig(tokensize=64), shards_cfg).model_ids


@pytest.mark.parametrize("bad", [dict(num_keep=9), dict(num_keep=0)])
def test_bad_counts_raise(tmp_path, bad):
    """On a valid zoo, so that only the count check can raise (generation would otherwise just run)."""
    from mzsane.errors import DataError

    with pytest.raises(DataError, match=r"sample\.num_keep"):
        sample("b", _toy_zoo(tmp_path), str(tmp_path / "o"), _cfg(num_anchors=2, **bad), dataset=NoTestDataset(),
               backbone=_tiny_backbone(), progress=False)
