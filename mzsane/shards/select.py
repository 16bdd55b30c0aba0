"""Choosing a sub-population at read time: zoos, N models per zoo, one split, some epochs.

Why at read time: the paper sweeps 50-300 models over 1-3 zoos; re-sharding for every point would copy the
data each time. A selection is computed from the manifest alone and is deterministic in its seed. The
choice is nested: with the same seed, the N=50 models are a subset of the N=100 models, so a sweep over
N changes one factor only.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from mzsane.errors import DataError
from mzsane.shards.manifest import Manifest
from mzsane.shards.schema import SPLITS


@dataclass(frozen=True)
class RowRef:
    """One selected checkpoint: where it lives (file, row) and what it is."""

    file: str
    row: int
    zoo: str
    model_id: str
    epoch: int


@dataclass
class Selection:
    """The chosen models of one split, and which of their epochs to read."""

    split: str
    zoos: list[str]
    epochs: list[int]
    seed: int
    models: list[dict] = field(default_factory=list)  # manifest model entries

    def rows(self) -> list[RowRef]:
        wanted = set(self.epochs)
        out = []
        for m in self.models:
            for k, epoch in enumerate(m["epochs"]):
                if not wanted or epoch in wanted:
                    out.append(RowRef(m["file"], int(m["row"]) + k, m["zoo"], m["model_id"], int(epoch)))
        return out

    @property
    def num_rows(self) -> int:
        return len(self.rows())

    def model_keys(self) -> set[tuple[str, str]]:
        return {(m["zoo"], m["model_id"]) for m in self.models}

    def to_dict(self) -> dict:
        return {"split": self.split, "zoos": self.zoos, "epochs": self.epochs, "seed": self.seed,
                "models": {z: sorted(m["model_id"] for m in self.models if m["zoo"] == z) for z in self.zoos}}


def select(manifest: Manifest, zoos: list[str] | tuple = (), num_models_per_zoo: int = -1, split: str = "train",
           epochs: list[int] | tuple = (), seed: int = 0) -> Selection:
    """Models of ``split`` from ``zoos`` (empty = all), ``num_models_per_zoo`` each (-1 = all), seeded."""
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")
    names = list(zoos) or sorted(manifest.zoos)
    unknown = [z for z in names if z not in manifest.zoos]
    if unknown:
        raise DataError(f"zoo(s) {unknown} are not in the shard dataset '{manifest.url}'; available: "
                        f"{', '.join(sorted(manifest.zoos))}")
    chosen = []
    for zoo in names:
        candidates = sorted((m for m in manifest.models if m["zoo"] == zoo and m["split"] == split),
                            key=lambda m: m["model_id"])
        if num_models_per_zoo >= 0:
            if num_models_per_zoo > len(candidates):
                raise DataError(f"zoo {zoo} has only {len(candidates)} {split} models, {num_models_per_zoo} were "
                                f"asked for; set data.num_models_per_zoo <= {len(candidates)} or -1 for all")
            order = np.random.default_rng([int(seed), zlib.crc32(zoo.encode())]).permutation(len(candidates))
            candidates = sorted((candidates[i] for i in order[:num_models_per_zoo]), key=lambda m: m["model_id"])
        chosen.extend(candidates)
    selection = Selection(split=split, zoos=names, epochs=sorted(int(e) for e in epochs), seed=int(seed),
                          models=chosen)
    if chosen and selection.num_rows == 0:
        available = sorted({e for m in chosen for e in m["epochs"]})
        raise DataError(f"no checkpoints of epochs {selection.epochs} in the selected models; available epochs: "
                        f"{available}")
    return selection
