"""Anchor models: the few trained models of the target zoo that prompt generation (spec section 8.3).

Why a seeded choice from train/val models only: the reference took "the first K" models of a file,
which were neither random nor guaranteed to be disjoint from the models used for testing. Here the
anchors are drawn with a seeded generator from the models the shards put in the train or val split
(the same seeded split by model, ``ShardsConfig.split_fractions``/``split_seed``), so a held-out test
model of a zoo is never an anchor, whether or not the backbone saw that zoo.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mzsane.errors import DataError

SPLITS = ("train", "val", "test")


def model_splits(model_ids: list[str], fractions: list[float], seed: int, zoo: str) -> dict[str, str]:
    """The shards' seeded split of one zoo's models into train/val/test (by model, never by checkpoint).

    Delegates to ``mzsane.shards.writer.split_models`` so there is one definition of the split: a model
    that is a test model in the shards is a test model here, for ID and OOD zoos alike.
    """
    from mzsane.shards.writer import split_models

    return split_models(model_ids, fractions, seed, zoo)


@dataclass
class Anchors:
    """Anchor checkpoints of a target zoo at one epoch, tokenized with the backbone's token settings."""

    zoo: str
    dataset: str
    architecture: str
    arch_kwargs: dict[str, Any]
    hparams: dict[str, Any]
    epoch: int
    model_ids: list[str]
    state_dicts: list[dict[str, torch.Tensor]]
    tokens_KND: torch.Tensor
    layout: Any  # mzsane.tokens.TokenLayout
    splits: dict[str, str] = field(default_factory=dict)  # model_id -> split, every ok model of the zoo

    def models_in(self, *splits: str) -> list[str]:
        return sorted(m for m, s in self.splits.items() if s in splits)


def _saved_epochs(record: Any) -> list[int]:
    saved = getattr(record, "checkpoint_epochs", None) or [e["epoch"] for e in record.epochs]
    return sorted(int(e) for e in saved)


def resolve_epoch(records: list[Any], epoch: int) -> int:
    """``epoch`` itself, or (-1) the latest epoch for which every usable model stored a checkpoint."""
    last = min(_saved_epochs(r)[-1] for r in records)
    if epoch == -1:
        common = set.intersection(*(set(_saved_epochs(r)) for r in records))
        return max(e for e in common if e <= last) if common else last
    if not any(epoch in _saved_epochs(r) for r in records):
        raise DataError(f"sample.target_epoch={epoch} has no stored checkpoints in this zoo (up to epoch {last}); "
                        "pick a saved epoch or -1 for the last one")
    return epoch


def usable_records(reader: Any) -> list[Any]:
    """Models that finished (status ok) and stored at least one checkpoint, sorted by id."""
    records = sorted((r for r in reader.models() if r.status == "ok" and _saved_epochs(r)), key=lambda r: r.model_id)
    if not records:
        raise DataError(f"zoo {reader.info.zoo!r} has no finished models; build or ingest the zoo first")
    return records


def choose(model_ids: list[str], num: int, seed: int) -> list[str]:
    """Seeded choice of ``num`` ids (order of the draw kept: anchor 0 is the first drawn)."""
    if num < 1:
        raise DataError(f"sample.num_anchors={num}; use at least 1")
    if num > len(model_ids):
        raise DataError(f"sample.num_anchors={num} but only {len(model_ids)} train/val models are available; "
                        "lower sample.num_anchors or grow the zoo")
    order = np.random.default_rng(seed).permutation(len(model_ids))[:num]
    return [model_ids[i] for i in order]


def load_anchors(zoo_url: str, num_anchors: int, epoch: int, seed: int, tokens_cfg: Any, shards_cfg: Any,
                 reader: Any = None) -> Anchors:
    """Pick, load and tokenize the anchors; ``tokens_cfg`` must be the backbone's token settings."""
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.tokenize import tokenize
    from mzsane.zoo.store import open_zoo

    reader = reader if reader is not None else open_zoo(zoo_url)
    records = usable_records(reader)
    splittable = [r.model_id for r in reader.models() if r.status != "failed"]  # exactly what the shards split
    splits = model_splits(splittable, list(shards_cfg.split_fractions), shards_cfg.split_seed, reader.info.zoo)
    epoch = resolve_epoch([r for r in records if splits[r.model_id] != "test"] or records, epoch)
    pool = sorted(r.model_id for r in records if splits[r.model_id] in ("train", "val") and epoch in _saved_epochs(r))
    ids = choose(pool, num_anchors, seed)
    state_dicts = [reader.load_checkpoint(m, epoch) for m in ids]
    layout = layout_from_state_dict(state_dicts[0], tokensize=tokens_cfg.tokensize, include_bn=tokens_cfg.include_bn,
                                    include_running_stats=tokens_cfg.include_running_stats)
    tokens_KND = torch.stack([tokenize(sd, layout) for sd in state_dicts])
    by_id = {r.model_id: r for r in records}
    first = by_id[ids[0]]
    info = reader.info
    return Anchors(zoo=info.zoo, dataset=info.dataset, architecture=info.architecture,
                   arch_kwargs=dict(getattr(first, "arch_kwargs", None) or info.arch_kwargs),
                   hparams=dict(first.hparams), epoch=epoch, model_ids=ids, state_dicts=state_dicts,
                   tokens_KND=tokens_KND, layout=layout, splits=splits)
