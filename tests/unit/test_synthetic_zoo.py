"""Synthetic zoos (``mzsane.zoo.synthetic``): the benchmarks' zoo (distinct models around a few bases) stored at
the precision asked for, whose shards hold exactly the stored values as float32 (what ``bench scale
--zoo-dtype float16`` relies on); a write completes a zoo without changing the models it already holds."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from mzsane import storage
from mzsane.config import Config
from mzsane.shards.manifest import read_manifest
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.shards.writer import build_shards
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.store import open_zoo
from mzsane.zoo.synthetic import Directions, Independent, PerturbedBases, SyntheticZoo, dataset_for, perturbed_zoo
from tests.fixtures.zoos import make_zoo

# sha256 of every file of a small cnn_s zoo per recipe, as the writers before issue 27 wrote them
# (tests/unit/test_shards.make_zoo, test_science_sweeps' zoo of epochs 21-25, tests/unit/test_train_loop.make_shards,
# bench/synthzoo.write_synthetic_zoo): the one builder that replaced them must write the same bytes
BEFORE_ISSUE_27 = {
    "independent": "4a8c677363edbefe13a7e037830f80d3ffec98e6607f71e99c9b0980a553ca9b",
    "independent_from_epoch_21": "78703884dabb5bf296fcd69b21686d0a5612f83a13e46bd65a2b44d34d514445",
    "directions": "f28f3eb4187e776cd657f8878123a0519f65a654d48120ba143c14f7eab87ceb",
    "perturbed_bases_float16": "4ce16f8e349d0a15c07e8a7658562be874aafa77e1f332c65faee2a23e83a99b",
}


def _digest(folder: str) -> str:
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _write(recipe: str, folder: str) -> str:
    if recipe == "independent":
        return make_zoo(folder, "za", num_models=3, epochs=(0, 1), seed=1)
    if recipe == "independent_from_epoch_21":  # the first checkpoint is the init itself
        url = os.path.join(folder, "mnist-cnn_s")
        SyntheticZoo("mnist-cnn_s", "cnn_s", 3, (21, 22)).write(url)
        return url
    if recipe == "directions":
        url = os.path.join(folder, "mnist_cnn_s")
        SyntheticZoo("mnist_cnn_s", "cnn_s", 3, (0, 1), Directions()).write(url)
        return url
    url = os.path.join(folder, "synth")
    perturbed_zoo("synth", "cnn_s", 3, seed=1, epochs=(1, 2), dtype="float16").write(url)
    return url


@pytest.mark.parametrize("recipe", sorted(BEFORE_ISSUE_27))
def test_every_recipe_writes_the_bytes_its_former_writer_wrote(tmp_path, recipe):
    assert _digest(_write(recipe, str(tmp_path))) == BEFORE_ISSUE_27[recipe]


@pytest.mark.parametrize("weights", [Independent(seed=2), Directions(), PerturbedBases(num_bases=2, seed=3)],
                         ids=["independent", "directions", "perturbed_bases"])
def test_a_zoo_grown_in_place_equals_one_written_at_once(tmp_path, weights):
    """``bench scale`` grows its zoos 10 -> 100 -> 1,000: the finished models are kept, the new ones are the
    models a fresh write would hold (Directions draws its per-model coefficients in model order)."""
    grown, once = str(tmp_path / "grown"), str(tmp_path / "once")
    assert SyntheticZoo("z", "cnn_s", 2, (0, 1), weights).write(grown)["written"] == 2
    assert SyntheticZoo("z", "cnn_s", 5, (0, 1), weights).write(grown)["written"] == 3
    SyntheticZoo("z", "cnn_s", 5, (0, 1), weights).write(once)
    assert _digest(grown) == _digest(once)


def test_the_dataset_follows_the_architectures_input_shape():
    """As the benchmarks' former table said: 3x32x32 networks are CIFAR-10 zoos, 1x28x28 ones MNIST zoos."""
    assert {arch: dataset_for(arch) for arch in ("resnet18", "cnn_l", "cnn_s", "resnet_mini", "mlp")} == {
        "resnet18": "cifar10", "cnn_l": "cifar10", "cnn_s": "mnist", "resnet_mini": "mnist", "mlp": "mnist"}


def test_half_precision_zoo_shards_to_the_stored_values(tmp_path):
    url = str(tmp_path / "zoo")
    perturbed_zoo("synth", "resnet_mini", 3, dtype="float16").write(url)
    reader = open_zoo(url)
    models = sorted(reader.models(), key=lambda r: r.model_id)
    cks = [reader.load_checkpoint(m.model_id, 1) for m in models]
    floats = [v for v in cks[0].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert any(not v.is_floating_point() for v in cks[0].values())  # BN counters stay integers
    assert not torch.equal(cks[0]["fc.weight"], cks[1]["fc.weight"])  # distinct models
    perturbed_zoo("synth32", "resnet_mini", 1).write(str(tmp_path / "zoo32"))
    assert storage.du(url) < 0.6 * storage.du(str(tmp_path / "zoo32")) * 3  # half the bytes (plus small json files)
    cfg = Config()
    out = str(tmp_path / "shards")
    build_shards([url], out, cfg.tokens, cfg.shards, progress=False)
    manifest = read_manifest(out)
    layout = layout_from_state_dict(cks[0], cfg.tokens.tokensize)
    stored = {m.model_id: tokenize({k: v.float() for k, v in ck.items()}, layout) for m, ck in zip(models, cks)}
    seen = set()
    for split in ("train", "val", "test"):
        for sample in ShardReader(out, select(manifest, split=split), manifest).iter_samples():
            assert torch.equal(sample.tokens_ND, stored[sample.model_id])
            seen.add(sample.model_id)
    assert seen == set(stored)
