"""Choosing a sub-population at read time: zoos, N models per zoo, one split, some epochs.

Epochs: a zoo stores every saved epoch of every model, epoch 0 (the random initialization) included. The
reference trains on the *trained tail* (epochs 21-25 of 25); training on every epoch spends a quarter of a
3-epoch zoo's rows on random inits. So the epochs are chosen here too, at read time: an explicit list
(``data.epochs``), or the last ``num_tail_epochs`` saved epochs of each model (epoch 0 only when nothing
else was saved), or every epoch (``num_tail_epochs=-1``).

Splits: a model's train/val/test split is written into the shards (``shards.split_seed``). ``data.split_seed``
(>= 0) draws another split of the same models at read time, with the writer's own function, so a sweep can
vary which models are held out without re-sharding; -1 reads the split as written.

Why at read time: the paper sweeps 50-300 models over 1-3 zoos; re-sharding for every point would copy the
data each time. A selection is computed from the manifest alone and is deterministic in its seed. The
choice is nested: with the same seed, the N=50 models are a subset of the N=100 models, so a sweep over
N changes one factor only.

The manifest answers per zoo and split (``Manifest.model_ids``, ``model_entries``): with a Parquet model index
only the ids are read to draw the models, then only the chosen models' rows, so choosing 1,000 models of a
10^6-row dataset never materialises the other 999,000.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

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
    epochs: list[int]  # explicit epochs; empty = decided by num_tail_epochs
    seed: int
    models: list[dict] = field(default_factory=list)  # manifest model entries
    num_tail_epochs: int = -1  # with no explicit epochs: the last n saved epochs of each model; -1 = all

    def epochs_of(self, model: dict) -> list[int]:
        """The saved epochs of one manifest model entry that this selection reads."""
        saved = [int(e) for e in model["epochs"]]
        if self.epochs:
            wanted = set(self.epochs)
            return [e for e in saved if e in wanted]
        return tail_epochs(saved, self.num_tail_epochs)

    def rows(self) -> list[RowRef]:
        out = []
        for m in self.models:
            keep = set(self.epochs_of(m))
            for k, epoch in enumerate(m["epochs"]):
                if int(epoch) in keep:
                    out.append(RowRef(m["file"], int(m["row"]) + k, m["zoo"], m["model_id"], int(epoch)))
        return out

    def rows_per_zoo(self) -> dict[str, int]:
        """Selected rows (checkpoints) of every zoo: the unit an epoch of training passes over."""
        counts = dict.fromkeys(self.zoos, 0)
        for ref in self.rows():
            counts[ref.zoo] = counts.get(ref.zoo, 0) + 1
        return counts

    @property
    def num_rows(self) -> int:
        return len(self.rows())

    def model_keys(self) -> set[tuple[str, str]]:
        return {(m["zoo"], m["model_id"]) for m in self.models}

    def to_dict(self) -> dict:
        return {"split": self.split, "zoos": self.zoos, "epochs": self.epochs, "seed": self.seed,
                "num_tail_epochs": self.num_tail_epochs, "rows_per_zoo": self.rows_per_zoo(),
                "models": {z: sorted(m["model_id"] for m in self.models if m["zoo"] == z) for z in self.zoos}}


def tail_epochs(saved: list[int], num_tail_epochs: int) -> list[int]:
    """The last ``num_tail_epochs`` of ``saved`` (-1 = all); epoch 0, the untrained init, only if it is alone."""
    saved = sorted(int(e) for e in saved)
    if num_tail_epochs < 0:
        return saved
    trained = [e for e in saved if e > 0] or saved
    return trained[-num_tail_epochs:] if num_tail_epochs > 0 else []


def effective_split_seed(cfg: Any) -> int:
    """The split seed a backbone's data was read with: ``data.split_seed``, or (-1) the shards' own."""
    seed = int(getattr(cfg.data, "split_seed", -1))
    return seed if seed >= 0 else int(cfg.shards.split_seed)


def training_selection(manifest: Manifest, data_cfg: Any, split: str = "train",
                       split_fractions: list[float] | tuple = ()) -> Selection:
    """The selection ``mzsane train`` reads for ``split`` under a ``DataConfig`` (val: every model, same epochs);
    ``split_fractions`` (``shards.split_fractions``) are needed when ``data.split_seed`` re-splits.

    One definition, so the loop, the step budget and the held-out check of sampling agree on what a
    backbone was trained on.
    """
    return select(manifest, zoos=list(data_cfg.zoos), split=split, seed=data_cfg.seed,
                  num_models_per_zoo=data_cfg.num_models_per_zoo if split == "train" else -1,
                  epochs=list(data_cfg.epochs), num_tail_epochs=int(data_cfg.num_tail_epochs),
                  split_seed=int(getattr(data_cfg, "split_seed", -1)), split_fractions=split_fractions)


def _resplit(manifest: Manifest, zoo: str, split_seed: int, split_fractions: list[float] | tuple) -> dict[str, str]:
    """model id -> split under ``split_seed``, drawn over every model the shards hold of ``zoo`` (the set the
    writer split), so the seed the shards were written with gives back their own split."""
    from mzsane.shards.writer import split_models

    if len(split_fractions) != 3:
        raise DataError(f"data.split_seed={split_seed} re-splits at read time and needs the three split fractions "
                        "(shards.split_fractions); pass them with the config")
    every = [m for s in SPLITS for m in manifest.model_ids(zoo, s)]
    return split_models(every, [float(f) for f in split_fractions], split_seed, zoo)


def _split_entries(manifest: Manifest, zoo: str, split: str, ids: list[str] | None, assign: dict[str, str] | None
                   ) -> list[dict]:
    """Manifest entries of ``ids`` (None = all) of ``split``; under a read-time split (``assign``) the entries are
    found under the split the shards wrote them in, sorted by model id like ``model_entries``."""
    if assign is None:
        return manifest.model_entries(zoo, split, ids)
    wanted = set(ids) if ids is not None else {m for m, s in assign.items() if s == split}
    found = []
    for written in SPLITS:
        here = [m for m in manifest.model_ids(zoo, written) if m in wanted]
        if here:
            found += manifest.model_entries(zoo, written, here)
    return sorted(found, key=lambda m: m["model_id"])


def select(manifest: Manifest, zoos: list[str] | tuple = (), num_models_per_zoo: int = -1, split: str = "train",
           epochs: list[int] | tuple = (), seed: int = 0, num_tail_epochs: int = -1, split_seed: int = -1,
           split_fractions: list[float] | tuple = ()) -> Selection:
    """Models of ``split`` from ``zoos`` (empty = all), ``num_models_per_zoo`` each (-1 = all), seeded;
    of each model the ``epochs`` listed, or (none listed) its last ``num_tail_epochs`` saved epochs (-1 = all).
    ``split_seed`` >= 0 draws the split at read time (see the module docstring)."""
    if not epochs and num_tail_epochs == 0:
        raise DataError("data.num_tail_epochs=0 selects no checkpoints; list data.epochs, or set "
                        "data.num_tail_epochs to n >= 1 (the last n epochs) or -1 (every epoch)")
    if split not in SPLITS:
        raise DataError(f"split {split!r} does not exist; use one of {', '.join(SPLITS)}")
    names = list(zoos) or sorted(manifest.zoos)
    unknown = [z for z in names if z not in manifest.zoos]
    if unknown:
        raise DataError(f"zoo(s) {unknown} are not in the shard dataset '{manifest.url}'; available: "
                        f"{', '.join(sorted(manifest.zoos))}")
    chosen = []
    for zoo in names:
        assign = _resplit(manifest, zoo, split_seed, split_fractions) if split_seed >= 0 else None
        if num_models_per_zoo < 0:
            chosen.extend(_split_entries(manifest, zoo, split, None, assign))
            continue
        # sorted: the draw depends on the ids alone, not on the format
        ids = manifest.model_ids(zoo, split) if assign is None else sorted(m for m, s in assign.items() if s == split)
        if num_models_per_zoo > len(ids):
            raise DataError(f"zoo {zoo} has only {len(ids)} {split} models, {num_models_per_zoo} were "
                            f"asked for; set data.num_models_per_zoo <= {len(ids)} or -1 for all")
        order = np.random.default_rng([int(seed), zlib.crc32(zoo.encode())]).permutation(len(ids))
        chosen.extend(_split_entries(manifest, zoo, split, [ids[i] for i in order[:num_models_per_zoo]], assign))
    selection = Selection(split=split, zoos=names, epochs=sorted(int(e) for e in epochs), seed=int(seed),
                          models=chosen, num_tail_epochs=int(num_tail_epochs))
    if chosen and selection.num_rows == 0:
        available = sorted({e for m in chosen for e in m["epochs"]})
        raise DataError(f"no checkpoints of epochs {selection.epochs} in the selected models; available epochs: "
                        f"{available}")
    return selection
