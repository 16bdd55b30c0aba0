"""Synthetic model zoos: real zoos on storage (``store.ZooWriter``'s layout, so ``shards build``, sampling and
``zoo info`` read them like any zoo) whose weights are drawn, not trained.

Why: benchmarks and tests need zoos of a given architecture, size and number of checkpoints in seconds;
what they measure or check (bytes, seconds, memory, reads per worker, splits, selection, resume) depends
on tensor shapes and on weights with realistic per-layer scales, not on what a network learned. Training
1,000 ResNet-18s for a benchmark would take days on a 2-core machine.

How the weights are drawn is one of three recipes (each a frozen dataclass with ``prepare``):

* ``Independent``: every model its own architecture init (seeded per model), moved by ``drift`` per epoch
  after the first: models as unrelated as separately seeded runs (the tests' default zoos).
* ``Directions``: one shared init plus a point in a plane of directions per model, drifting along the
  first direction per epoch: a zoo with low-dimensional structure an autoencoder can learn.
* ``PerturbedBases``: a few initialised bases, every model one base plus noise of ``sigma`` times each
  tensor's own spread (BatchNorm running statistics kept): distinct models clustered around a few modes,
  as population zoos are, which compress like real weights (the benchmarks' zoos).

Accuracies are made up (``metrics``); ``dtype`` stores the float tensors in e.g. half precision, as many
published checkpoints are (tokens are float32 whatever the checkpoint's precision). Writing is resumable:
finished models are kept, so a zoo grows in place (``bench scale`` writes 10, then 100, then 1,000).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from mzsane.zoo.architectures import build_model, get_architecture
from mzsane.zoo.records import ModelRecord, ZooInfo
from mzsane.zoo.store import ZooWriter

StateDict = dict[str, torch.Tensor]


class DrawnModel(NamedTuple):
    checkpoints: dict[int, StateDict]  # epoch -> float32 state_dict
    accuracy: float  # what the recipe makes up for the model (``SyntheticZoo.metrics`` turns it into rows)


Draw = Callable[[int], DrawnModel]  # model index -> the model; any index, in any order


@dataclass(frozen=True)
class Independent:
    """Model i = the architecture's init under ``torch.manual_seed(seed * 1000 + i)``; its checkpoint at
    epoch e adds ``drift * (e - first epoch)`` to every float tensor."""

    seed: int = 0
    drift: float = 0.01

    def prepare(self, architecture: str, epochs: tuple[int, ...]) -> Draw:
        first = min(epochs)

        def draw(index: int) -> DrawnModel:
            torch.manual_seed(self.seed * 1000 + index)  # build_model draws its init from the global generator
            base = build_model(architecture).state_dict()
            return DrawnModel({e: {k: v + self.drift * (e - first) if v.is_floating_point() else v
                                   for k, v in base.items()} for e in epochs}, 0.5)

        return draw


@dataclass(frozen=True)
class Directions:
    """Inits ``base, d_1 .. d_n`` under ``torch.manual_seed(seed)``; model i = base + ``spread`` * sum_j
    c_ij d_j with c_i ~ N(0, 1) drawn in model order from ``coefficient_seed``; epoch e adds
    ``drift * e * d_1``."""

    num_directions: int = 2
    seed: int = 1000
    coefficient_seed: int = 7
    spread: float = 0.3
    drift: float = 0.05

    def prepare(self, architecture: str, epochs: tuple[int, ...]) -> Draw:
        torch.manual_seed(self.seed)
        base, *directions = (build_model(architecture).state_dict() for _ in range(1 + self.num_directions))
        generator = torch.Generator().manual_seed(self.coefficient_seed)
        coefficients: list[list[float]] = []  # drawn in model order, so model i is the same whatever is skipped

        def point(key: str, value: torch.Tensor, coefs: list[float], epoch: int) -> torch.Tensor:
            for c, direction in zip(coefs, directions):
                value = value + self.spread * c * direction[key]
            return value + self.drift * epoch * directions[0][key]

        def draw(index: int) -> DrawnModel:
            while len(coefficients) <= index:
                coefficients.append(torch.randn(self.num_directions, generator=generator).tolist())
            coefs = coefficients[index]
            return DrawnModel({e: {k: point(k, v, coefs, e) if v.is_floating_point() else v for k, v in base.items()}
                               for e in epochs}, 0.5)

        return draw


@dataclass(frozen=True)
class PerturbedBases:
    """Bases b = the init under ``torch.manual_seed(seed * 7919 + b)``; model i = base ``i % num_bases`` with
    each weight/bias tensor moved by ``sigma * (1 + 0.1 k)`` (k-th checkpoint) of its own spread, noise and
    a made-up accuracy in [0.5, 0.9] from the model's own generator (seed ``seed * 1_000_003 + i``)."""

    num_bases: int = 4
    sigma: float = 0.05
    seed: int = 0

    def prepare(self, architecture: str, epochs: tuple[int, ...]) -> Draw:
        bases = []
        for b in range(self.num_bases):
            torch.manual_seed(self.seed * 7919 + b)
            bases.append({k: v.detach().clone() for k, v in build_model(architecture).state_dict().items()})

        def draw(index: int) -> DrawnModel:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            base = bases[index % self.num_bases]
            checkpoints = {e: _perturbed(base, self.sigma * (1 + 0.1 * k), g) for k, e in enumerate(epochs)}
            return DrawnModel(checkpoints, 0.5 + 0.4 * float(torch.rand((), generator=g)))

        return draw


def _perturbed(base: StateDict, sigma: float, generator: torch.Generator) -> StateDict:
    out = {}
    for key, value in base.items():
        if value.is_floating_point() and not key.endswith(("running_mean", "running_var")) and value.numel() > 1:
            scale = float(value.std()) or 1.0
            value = value + sigma * scale * torch.randn(value.shape, generator=generator)
        out[key] = value
    return out


def same_accuracy(index: int, epoch: int, accuracy: float) -> dict:
    """Test and validation accuracy both the recipe's made-up ``accuracy``, at every epoch."""
    return {"test_acc": accuracy, "val_acc": accuracy}


def no_hparams(index: int) -> dict:
    return {}


def dataset_for(architecture: str) -> str:
    """The image dataset an architecture's default input shape fits: 3 channels CIFAR-10, else MNIST."""
    return "cifar10" if get_architecture(architecture).defaults["channels_in"] == 3 else "mnist"


@dataclass(frozen=True)
class SyntheticZoo:
    """One synthetic zoo: ``write(url)`` puts it on storage (or completes it there)."""

    zoo: str
    architecture: str = "cnn_s"
    num_models: int = 6
    epochs: tuple[int, ...] = (0,)
    weights: Independent | Directions | PerturbedBases = Independent()
    metrics: Callable[[int, int, float], dict] = same_accuracy  # (index, epoch, accuracy) -> metrics row
    hparams: Callable[[int], dict] = no_hparams  # index -> the record's hparams (e.g. build kwargs)
    model_id: str = "m{:03d}"  # formatted with the model index
    recipe: str = ""  # zoo.json's recipe
    dtype: str = "float32"  # storage precision of float tensors

    def write(self, url: str) -> dict:
        """Write the models ``url`` does not hold yet; returns the url, models written and seconds."""
        dataset = dataset_for(self.architecture)
        writer = ZooWriter(url, ZooInfo(zoo=self.zoo, dataset=dataset, architecture=self.architecture,
                                        num_models=self.num_models, recipe=self.recipe))
        done = writer.finished_models()
        draw = self.weights.prepare(self.architecture, self.epochs)
        dtype = getattr(torch, self.dtype)
        written, start = 0, time.perf_counter()
        for i in range(self.num_models):
            model_id = self.model_id.format(i)
            if model_id in done:
                continue
            drawn = draw(i)
            checkpoints = {e: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                           for e, sd in drawn.checkpoints.items()}
            record = ModelRecord(zoo=self.zoo, model_id=model_id, dataset=dataset, architecture=self.architecture,
                                 hparams=self.hparams(i),
                                 epochs=[{"epoch": e, **self.metrics(i, e, drawn.accuracy)} for e in self.epochs])
            writer.write_model(record, checkpoints)
            written += 1
        return {"zoo": self.zoo, "url": url, "num_models": self.num_models, "written": written,
                "write_s": round(time.perf_counter() - start, 2)}


def perturbed_zoo(zoo: str, architecture: str, num_models: int, *, seed: int = 0, epochs: tuple[int, ...] = (1,),
                  dtype: str = "float32") -> SyntheticZoo:
    """The benchmarks' zoo: ``PerturbedBases`` around four bases, one checkpoint per model by default (as the
    reference's epoch-60 ResNet zoo), five-digit model ids (up to 100,000 models), recipe ``synthetic``."""
    return SyntheticZoo(zoo, architecture, num_models, tuple(epochs), PerturbedBases(seed=seed),
                        model_id="m{:05d}", recipe="synthetic", dtype=dtype)
