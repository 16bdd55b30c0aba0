"""``shards.align_to_reference``: every model of a zoo weight-matched to one reference before tokenizing
(SANE's preprocessing). The aligned models compute the same functions, sit closer to the reference, and
sampling aligns the anchors of such a zoo to the same reference."""
from __future__ import annotations

import pytest
import torch

from mzsane import presets, storage
from mzsane.sample.anchors import alignment_reference, load_anchors
from mzsane.shards import writer
from mzsane.shards.manifest import read_manifest
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.tokens.alignment import ReferenceAligner
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.architectures import build_model
from mzsane.zoo.records import ModelRecord, ZooInfo
from mzsane.zoo.store import ZooWriter, open_zoo

EPOCHS = (1, 2)


def _zoo(root: str, zoo: str, arch: str, num_models: int) -> str:
    """Independently initialised models (distinct bases), drifting per epoch, BN running stats random."""
    url = storage.join(root, "zoos", zoo)
    w = ZooWriter(url, ZooInfo(zoo=zoo, dataset="mnist", architecture=arch, num_models=num_models))
    for i in range(num_models):
        g = torch.Generator().manual_seed(100 + i)
        torch.manual_seed(100 + i)
        base = build_model(arch).state_dict()
        for k, v in base.items():
            if k.endswith("running_mean"):
                base[k] = torch.randn(v.shape, generator=g) * 0.1
            elif k.endswith("running_var"):
                base[k] = torch.rand(v.shape, generator=g) + 0.5
            elif k.endswith(".weight") and v.dim() == 1:  # BN affine weight: not all ones
                base[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        cks = {e: {k: v + 0.01 * e * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in base.items()} for e in EPOCHS}
        w.write_model(ModelRecord(zoo=zoo, model_id=f"m{i:03d}", dataset="mnist", architecture=arch,
                                  epochs=[{"epoch": e, "test_acc": 0.5, "val_acc": 0.5} for e in EPOCHS]), cks)
    return url


def _outputs(arch: str, state_dict: dict, x: torch.Tensor) -> torch.Tensor:
    model = build_model(arch)
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model.eval()(x)


def _dist(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()
               and not k.endswith(("running_mean", "running_var")))


@pytest.mark.parametrize("arch", ["cnn_s", "resnet_mini"])
def test_aligned_models_compute_the_same_function_and_move_towards_the_reference(arch):
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    reference = build_model(arch).state_dict()
    aligner = ReferenceAligner(reference, arch)
    for seed in (2, 3):
        torch.manual_seed(seed)
        model = build_model(arch)
        for m in model.modules():  # BN statistics that matter, so their permutation is checked too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5), m.weight.data.normal_(1, 0.1)
        sd = model.state_dict()
        aligned = aligner.apply(sd, aligner.fit(sd))
        assert torch.allclose(_outputs(arch, aligned, x), _outputs(arch, sd, x), atol=1e-5)
        assert _dist(aligned, reference) < _dist(sd, reference)
        assert not all(torch.equal(aligned[k], sd[k]) for k in sd)  # it did permute something


def test_shards_build_aligns_every_model_to_the_first_train_model(tmp_path):
    root = str(tmp_path)
    zoos = [_zoo(root, "za", "cnn_s", 6), _zoo(root, "zr", "resnet_mini", 4)]
    cfg = presets.tiny()
    cfg.shards.align_to_reference = True
    out = storage.join(root, "shards")
    manifest = writer.build_shards(zoos, out, cfg.tokens, cfg.shards, progress=False)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for zoo_url, zoo, arch in ((zoos[0], "za", "cnn_s"), (zoos[1], "zr", "resnet_mini")):
        reader = open_zoo(zoo_url)
        record = storage.read_json(storage.join(out, "_zoos", f"{zoo}.json"))["alignment"]
        train = sorted(m["model_id"] for m in manifest.models if m["zoo"] == zoo and m["split"] == "train")
        assert record == {"reference": train[0], "epoch": EPOCHS[-1]}
        reference = reader.load_checkpoint(record["reference"], record["epoch"])
        aligner = ReferenceAligner(reference, arch)
        layout = manifest.layout(manifest.zoos[zoo]["layout_id"])
        sel = select(manifest, zoos=[zoo], split="train", seed=0)
        samples = list(ShardReader(out, sel).iter_samples(shuffle_buffer=1, seed=0))
        assert samples
        for s in samples:
            original = reader.load_checkpoint(s.model_id, s.epoch)
            # one permutation per model, found on its last epoch, applied to every epoch
            aligned = aligner.apply(original, aligner.fit(reader.load_checkpoint(s.model_id, EPOCHS[-1])))
            assert torch.equal(s.tokens_ND, tokenize(aligned, layout))
            assert torch.allclose(_outputs(arch, aligned, x), _outputs(arch, original, x), atol=1e-5)
            if s.model_id != record["reference"]:
                assert _dist(aligned, reference) < _dist(original, reference)
            else:
                assert torch.equal(s.tokens_ND, tokenize(original, layout))  # the reference is itself
    # an unaligned build of the same zoos writes the original tokens and no alignment record
    plain = storage.join(root, "plain")
    writer.build_shards(zoos[:1], plain, presets.tiny().tokens, presets.tiny().shards, progress=False)
    assert "alignment" not in storage.read_json(storage.join(plain, "_zoos", "za.json"))


def test_anchors_of_an_aligned_zoo_are_aligned_to_the_same_reference(tmp_path):
    root = str(tmp_path)
    zoo = _zoo(root, "za", "cnn_s", 6)
    cfg = presets.tiny()
    cfg.storage.root = root
    cfg.data.shards_url = storage.join(root, "shards")
    cfg.shards.align_to_reference = True
    writer.build_shards([zoo], cfg.data.shards_url, cfg.tokens, cfg.shards, progress=False)
    record = alignment_reference(cfg, "za")
    assert record and record["reference"] in read_manifest(cfg.data.shards_url).model_ids("za", "train")
    plain = load_anchors(zoo, 2, EPOCHS[-1], 0, cfg.tokens, cfg.shards, pool="any")
    aligned = load_anchors(zoo, 2, EPOCHS[-1], 0, cfg.tokens, cfg.shards, pool="any", alignment=record)
    assert plain.model_ids == aligned.model_ids
    reference = open_zoo(zoo).load_checkpoint(record["reference"], record["epoch"])
    aligner = ReferenceAligner(reference, "cnn_s")
    for sd, got in zip(plain.state_dicts, aligned.state_dicts):
        assert all(torch.equal(got[k], v) for k, v in aligner.apply(sd, aligner.fit(sd)).items())
    assert not torch.equal(plain.tokens_KND, aligned.tokens_KND)
    assert alignment_reference(presets.tiny(), "za") == {}  # a backbone whose shards are elsewhere: none


def test_a_read_time_split_of_aligned_shards_is_refused_with_the_fix(tmp_path):
    """Aligned shards hold a basis chosen from the written split's train models; another split may hold that
    reference out, so ``data.split_seed`` on them is refused before training starts."""
    from mzsane.errors import DataError
    from mzsane.train.data import open_selection

    root = str(tmp_path)
    zoo = _zoo(root, "za", "cnn_s", 6)
    cfg = presets.tiny()
    cfg.shards.align_to_reference = True
    cfg.data.shards_url = storage.join(root, "shards")
    writer.build_shards([zoo], cfg.data.shards_url, cfg.tokens, cfg.shards, progress=False)
    assert open_selection(cfg, 1)[2].models  # the written split reads
    cfg.data.split_seed = 7
    with pytest.raises(DataError, match=r"za were aligned.*re-shard with shards.split_seed=7"):
        open_selection(cfg, 1)
