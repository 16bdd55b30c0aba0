"""Probe features of every checkpoint in some zoos: backbone embeddings and plain weight statistics.

Why both: a property probe on SANE embeddings (SANE's discriminative downstream task; the reference
predicts test accuracy, training epoch and generalization gap from mean-pooled encoder embeddings) only
means something next to a probe on features that need no backbone. The baseline is the Model Zoos
paper's: per layer, mean, std and the five quantiles (min, 25%, median, 75%, max) of the weights and,
where the layer has them, of the biases.

Checkpoints are streamed from the shards one row group at a time (``ShardReader``), encoded in haloed
windows with the backbone's own sampling settings (``sample.halo``) and mean-pooled over tokens, so memory
holds one batch of checkpoints, never a zoo. Weight statistics are computed from the same token rows
(the layout says where each layer's rows and bias column sit), so both probes see exactly the same
checkpoints.

Legend: M checkpoints in a batch, N tokens per checkpoint, D token width, L latent width, F features.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mzsane import storage
from mzsane.errors import DataError
from mzsane.shards.manifest import Manifest

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
TARGETS = ("test_acc", "epoch", "gap")  # gap = train accuracy - test accuracy


@dataclass
class ZooFeatures:
    """Features and targets of every checkpoint of one zoo, row-aligned."""

    zoo: str
    model_ids: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    embedding: list[np.ndarray] = field(default_factory=list)
    weight_stats: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.model_ids)

    def features(self, kind: str) -> np.ndarray:
        return np.stack(getattr(self, kind)).astype(np.float64)

    def target(self, name: str) -> np.ndarray:
        if name == "test_acc":
            return np.asarray(self.test_acc, dtype=np.float64)
        if name == "epoch":
            return np.asarray(self.epochs, dtype=np.float64)
        if name == "gap":
            return np.asarray(self.train_acc, dtype=np.float64) - np.asarray(self.test_acc, dtype=np.float64)
        raise ValueError(f"unknown probe target {name!r}")


def weight_stats(tokens_MND: torch.Tensor, layout: Any) -> torch.Tensor:
    """``[M, F]``: per layer, 7 statistics of the weights, and 7 of the bias column where there is one."""
    out = []
    for e in layout.entries:
        rows_MRC = tokens_MND[:, e.first_token:e.first_token + e.num_tokens].reshape(
            tokens_MND.shape[0], e.rows, e.chunks * layout.tokensize)
        parts = [rows_MRC[:, :, :e.weight_len]]
        if e.bias_key:
            parts.append(rows_MRC[:, :, e.weight_len:e.weight_len + 1])
        for part in parts:
            flat_MK = part.reshape(part.shape[0], -1).float()
            q_QM = torch.quantile(flat_MK, torch.tensor(QUANTILES), dim=1)
            out += [flat_MK.mean(1, keepdim=True), flat_MK.std(1, keepdim=True, unbiased=False), q_QM.T]
    return torch.cat(out, dim=1)


def _train_accs(manifest: Manifest, files: set[str]) -> dict[tuple[str, int], float]:
    """(model_id, epoch) -> train accuracy, from the shard rows' metadata column (tokens are not read)."""
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(files):
        fh = storage.open_read(manifest.file_url(path))
        try:
            meta = pq.ParquetFile(fh).read(columns=["model_id", "epoch", "train_acc"]).to_pydict()
        finally:
            getattr(fh, "close", lambda: None)()
        for m, e, a in zip(meta["model_id"], meta["epoch"], meta["train_acc"]):
            out[(m, int(e))] = float(a)
    return out


def _batches(reader: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for sample in reader.iter_samples(shuffle=False):
        batch.append(sample)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def zoo_features(backbone: torch.nn.Module, backbone_cfg: Any, manifest: Manifest, zoo: str,
                 batch_size: int = 16, device: str = "cpu") -> ZooFeatures:
    """Embed and summarize every checkpoint (all splits, all epochs) of ``zoo`` in the shards."""
    from mzsane.model import halo
    from mzsane.shards.reader import ShardReader
    from mzsane.shards.select import select

    if zoo not in manifest.zoos:
        raise DataError(f"zoo {zoo!r} is not in the shard dataset '{manifest.url}'; use one of "
                        f"{', '.join(sorted(manifest.zoos))} or pass --shards with a dataset that holds it")
    layout = manifest.layout(manifest.zoos[zoo]["layout_id"])
    plan = halo.plan(layout.num_tokens, backbone_cfg.sample.halo_window, backbone_cfg.sample.halo_size)
    out = ZooFeatures(zoo)
    for split in ("train", "val", "test"):
        selection = select(manifest, [zoo], -1, split, split_seed=int(backbone_cfg.data.split_seed),
                           split_fractions=backbone_cfg.shards.split_fractions)  # the split the backbone read
        if not selection.models:
            continue
        accs = _train_accs(manifest, {m["file"] for m in selection.models})
        reader = ShardReader(manifest.url, selection, manifest)
        for batch in _batches(reader, batch_size):
            tokens_MND = torch.stack([s.tokens_ND for s in batch])
            z_MNL = halo.encode(backbone, tokens_MND, layout.positions_NP, plan, backbone_cfg.sample.encode_batch_size,
                                device)
            out.embedding += list(z_MNL.mean(1).numpy())
            out.weight_stats += list(weight_stats(tokens_MND, layout).numpy())
            for s in batch:
                out.model_ids.append(s.model_id)
                out.splits.append(split)  # the selection's: the shards' own unless data.split_seed re-split
                out.epochs.append(int(s.epoch))
                out.test_acc.append(float(s.test_acc))
                out.train_acc.append(accs.get((s.model_id, int(s.epoch)), float("nan")))
    return out


def pad_features(blocks: list[np.ndarray]) -> np.ndarray:
    """Stack feature blocks of different widths (zoos with other layer counts) by zero-padding on the right."""
    width = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]))) for b in blocks])
