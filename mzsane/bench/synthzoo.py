"""Synthetic model zoos for benchmarks only: N checkpoints of one architecture written as a real zoo.

What the weights are: ``num_bases`` networks initialised by the architecture's own init (seeded), and
every model = one base (model i uses base i mod num_bases) plus a per-model perturbation of each float
tensor, ``sigma`` times that tensor's standard deviation times unit Gaussian noise (BatchNorm running
statistics and counters are copied from the base). Why: scale figures (bytes, seconds and memory per
model, reads per worker) depend on the tensor shapes and on value statistics that compress like real
weights (initialised layers have the right per-layer scales, unlike iid noise), not on what a network
learned; training 1,000 ResNet-18s for a benchmark would take days on this machine. The models are
distinct (no two rows are equal) and clustered around a few modes, as population zoos are.

Each model gets ``epochs`` checkpoints (default one, the issue's "one checkpoint per model"), with
made-up accuracies; the layout is ``mzsane.zoo.store``'s, so ``shards build`` reads it like any zoo.
``dtype`` stores the float tensors in half precision, as many published checkpoints are (tokens are float32
whatever the checkpoint's precision), so a 1,000-model ResNet-18 zoo and its shards fit one disk together.
"""
from __future__ import annotations

import time

import torch

from mzsane import storage
from mzsane.zoo.architectures import build_model
from mzsane.zoo.records import ModelRecord, ZooInfo
from mzsane.zoo.store import ZooWriter

DATASET_OF = {"resnet18": "cifar10", "resnet_mini": "mnist", "cnn_s": "mnist", "cnn_l": "cifar10"}


def _bases(arch: str, num_bases: int, seed: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for b in range(num_bases):
        torch.manual_seed(seed * 7919 + b)  # build_model draws its init from the global generator
        out.append({k: v.detach().clone() for k, v in build_model(arch).state_dict().items()})
    return out


def perturbed(base: dict[str, torch.Tensor], sigma: float, generator: torch.Generator,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``base`` with every weight/bias tensor moved by ``sigma`` of its own spread (BN statistics kept), its
    float tensors stored as ``dtype``."""
    out = {}
    for key, value in base.items():
        if value.is_floating_point() and not key.endswith(("running_mean", "running_var")) and value.numel() > 1:
            scale = float(value.std()) or 1.0
            value = value + sigma * scale * torch.randn(value.shape, generator=generator)
        out[key] = value.to(dtype) if value.is_floating_point() else value.clone()
    return out


def write_synthetic_zoo(url: str, num_models: int, arch: str = "resnet18", num_bases: int = 4, sigma: float = 0.05,
                        epochs: tuple[int, ...] = (1,), seed: int = 0, zoo: str = "",
                        dtype: str = "float32") -> dict:
    """Write (or complete: finished models are kept) a synthetic zoo at ``url``; returns timing and size."""
    zoo = zoo or f"synth_{arch}"
    writer = ZooWriter(url, ZooInfo(zoo=zoo, dataset=DATASET_OF.get(arch, "mnist"), architecture=arch,
                                    num_models=num_models, recipe="synthetic"))
    done = writer.finished_models()
    bases = _bases(arch, num_bases, seed)
    t0 = time.perf_counter()
    for i in range(num_models):
        model_id = f"m{i:05d}"
        if model_id in done:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        base = bases[i % num_bases]
        cks = {e: perturbed(base, sigma * (1 + 0.1 * k), g, getattr(torch, dtype)) for k, e in enumerate(epochs)}
        acc = 0.5 + 0.4 * float(torch.rand((), generator=g))
        rec = ModelRecord(zoo=zoo, model_id=model_id, dataset=DATASET_OF.get(arch, "mnist"), architecture=arch,
                          epochs=[{"epoch": e, "test_acc": acc, "val_acc": acc} for e in epochs])
        writer.write_model(rec, cks)
    seconds = time.perf_counter() - t0
    return {"zoo": zoo, "url": url, "num_models": num_models, "architecture": arch, "num_bases": num_bases,
            "sigma": sigma, "checkpoints_per_model": len(epochs), "dtype": dtype, "write_s": round(seconds, 2),
            "bytes": storage.du(url)}

