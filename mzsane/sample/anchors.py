"""Anchor models: the few trained models of the target zoo that prompt generation (spec section 8.3).

Why a seeded choice from a declared pool: the reference took "the first K" models of a file, and an
in-distribution anchor the backbone trained on decodes almost unchanged (memorization), which made
"generation" look better than it is (the demo's top-10 all came from two trained-on anchors; the one
held-out anchor decoded to 0.54 against its own 0.94). So every anchor is classified against the
backbone's recorded training selection (``seen_models``: its config's ``data`` section applied to its
shard manifest, the same ``training_selection`` the loop read) and drawn, seeded, from one pool
(``sample.anchor_pool``):

* ``held_out`` (default, the headline): models the backbone never trained on, whatever their split (for
  an OOD zoo every model);
* ``seen``: only trained-on models (the memorization control);
* ``any``: the shards' train and val split models (the earlier behaviour).

When the backbone's shards cannot be read, nothing is known to be seen: the anchors are marked
``held_out_verified: false`` rather than claimed held out.
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
    pool: str = "any"  # sample.anchor_pool the anchors were drawn from
    pool_ids: list[str] = field(default_factory=list)  # every model of that pool (the "available anchors")
    seen: list[str] = field(default_factory=list)  # models of this zoo the backbone trained on
    held_out_verified: bool = False  # False when the backbone's training selection could not be read

    def models_in(self, *splits: str) -> list[str]:
        return sorted(m for m, s in self.splits.items() if s in splits)

    def provenance(self) -> dict[str, Any]:
        """Which anchors are held out (never in the backbone's training selection) and which were seen."""
        seen = set(self.seen)
        return {"pool": self.pool, "pool_ids": list(self.pool_ids),
                "held_out": [m for m in self.model_ids if m not in seen],
                "seen": [m for m in self.model_ids if m in seen],
                "held_out_verified": self.held_out_verified, "num_seen_in_zoo": len(seen)}


POOLS = ("held_out", "seen", "any")


def seen_models(backbone_cfg: Any, zoo: str) -> set[str] | None:
    """Model ids of ``zoo`` in the backbone's training selection (empty for an OOD zoo); None = unknown
    (the backbone's shard manifest cannot be read)."""
    from mzsane import storage
    from mzsane.errors import MzsaneError
    from mzsane.shards.manifest import read_manifest
    from mzsane.shards.select import training_selection

    data = backbone_cfg.data
    if data.zoos and zoo not in data.zoos:
        return set()
    url = data.shards_url or storage.join(backbone_cfg.storage.root, "shards", "default")
    try:
        manifest = read_manifest(url)
    except (MzsaneError, OSError):
        return None
    if zoo not in manifest.zoos:
        return set()
    selection = training_selection(manifest, data, "train", backbone_cfg.shards.split_fractions)
    return {m["model_id"] for m in selection.models if m["zoo"] == zoo}


def alignment_reference(backbone_cfg: Any, zoo: str) -> dict[str, Any]:
    """``{"reference": model_id, "epoch": e}`` when the backbone's shards aligned ``zoo`` to one reference
    (``shards.align_to_reference``), else ``{}``: anchors of that zoo are then aligned the same way, so the
    backbone sees them in the basis it trained on."""
    from mzsane import storage
    from mzsane.shards.manifest import PARTS_DIR

    data = backbone_cfg.data
    url = data.shards_url or storage.join(backbone_cfg.storage.root, "shards", "default")
    part = storage.join(url, PARTS_DIR, f"{zoo}.json")
    try:
        return dict(storage.read_json(part).get("alignment") or {}) if storage.exists(part) else {}
    except (OSError, ValueError):
        return {}


def anchor_pool(candidates: list[str], splits: dict[str, str], seen: set[str] | None, pool: str) -> list[str]:
    """The models anchors may be drawn from, sorted (see the module docstring for the three pools)."""
    if pool not in POOLS:
        raise DataError(f"sample.anchor_pool={pool!r} is unknown; use one of {', '.join(POOLS)}")
    known = seen or set()
    if pool == "held_out":
        return sorted(m for m in candidates if m not in known)
    if pool == "seen":
        return sorted(m for m in candidates if m in known)
    return sorted(m for m in candidates if splits.get(m) in ("train", "val"))


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


def choose(model_ids: list[str], num: int, seed: int, pool: str = "any") -> list[str]:
    """Seeded choice of ``num`` ids (order of the draw kept: anchor 0 is the first drawn)."""
    if num < 1:
        raise DataError(f"sample.num_anchors={num}; use at least 1")
    if num > len(model_ids):
        raise DataError(f"sample.num_anchors={num} but only {len(model_ids)} models are in the anchor pool "
                        f"'{pool}'; lower sample.num_anchors, grow the zoo or set sample.anchor_pool")
    order = np.random.default_rng(seed).permutation(len(model_ids))[:num]
    return [model_ids[i] for i in order]


def load_anchors(zoo_url: str, num_anchors: int, epoch: int, seed: int, tokens_cfg: Any, shards_cfg: Any,
                 reader: Any = None, pool: str = "any", seen: set[str] | None = None,
                 alignment: dict[str, Any] | None = None, split_seed: int | None = None) -> Anchors:
    """Pick, load and tokenize the anchors from ``pool`` (``seen``: the zoo's models the backbone trained on,
    None = unknown); ``tokens_cfg`` must be the backbone's token settings. With ``alignment`` (see
    ``alignment_reference``) every anchor is weight-matched to that reference checkpoint first. ``split_seed``: the
    split the backbone read (``effective_split_seed``; None = ``shards_cfg.split_seed``)."""
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.tokenize import tokenize
    from mzsane.zoo.store import open_zoo

    reader = reader if reader is not None else open_zoo(zoo_url)
    records = usable_records(reader)
    splittable = [r.model_id for r in reader.models() if r.status != "failed"]  # exactly what the shards split
    seed_of_split = shards_cfg.split_seed if split_seed is None else split_seed
    splits = model_splits(splittable, list(shards_cfg.split_fractions), seed_of_split, reader.info.zoo)
    epoch = resolve_epoch([r for r in records if splits[r.model_id] != "test"] or records, epoch)
    have_epoch = [r.model_id for r in records if epoch in _saved_epochs(r)]
    pool_ids = anchor_pool(have_epoch, splits, seen, pool)
    ids = choose(pool_ids, num_anchors, seed, pool)
    state_dicts = [reader.load_checkpoint(m, epoch) for m in ids]
    if alignment:
        from mzsane.tokens.alignment import ReferenceAligner

        aligner = ReferenceAligner(reader.load_checkpoint(alignment["reference"], int(alignment["epoch"])),
                                   reader.info.architecture)
        state_dicts = [aligner.apply(sd, aligner.fit(sd)) for sd in state_dicts]
    layout = layout_from_state_dict(state_dicts[0], tokensize=tokens_cfg.tokensize, include_bn=tokens_cfg.include_bn,
                                    include_running_stats=tokens_cfg.include_running_stats)
    tokens_KND = torch.stack([tokenize(sd, layout) for sd in state_dicts])
    by_id = {r.model_id: r for r in records}
    first = by_id[ids[0]]
    info = reader.info
    return Anchors(zoo=info.zoo, dataset=info.dataset, architecture=info.architecture,
                   arch_kwargs=dict(getattr(first, "arch_kwargs", None) or info.arch_kwargs),
                   hparams=dict(first.hparams), epoch=epoch, model_ids=ids, state_dicts=state_dicts,
                   tokens_KND=tokens_KND, layout=layout, splits=splits, pool=pool, pool_ids=pool_ids,
                   seen=sorted(seen or ()), held_out_verified=seen is not None)
