"""Streaming a Selection out of the Parquet shards, one row group at a time, split across DDP ranks.

Why row groups: they are Parquet's unit of independent reading (nanochat's loader uses them the same way),
so memory is one row group plus the shuffle buffer, whatever the zoo size. The plan (which row groups,
which rows, which rank) comes from the manifest alone; each rank opens only the files it reads.

Rank split: the selected row groups are shuffled with (seed, epoch), their rows concatenated, and rank r
takes the r-th of ``world_size`` equal contiguous slices (the remainder, < world_size rows, is dropped:
DistributedSampler's drop_last). So ranks are disjoint, yield exactly the same number of samples (DDP
collectives stay in lockstep) and read disjoint row groups except at most one shared group per boundary.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from mzsane import storage
from mzsane.errors import DataError
from mzsane.shards.manifest import Manifest, read_manifest
from mzsane.shards.schema import table_tokens
from mzsane.shards.select import RowRef, Selection

Unit = tuple[str, int]  # (file path, row group index)


@dataclass
class Sample:
    """One checkpoint's tokens and identity, as training and sampling consume it."""

    tokens_ND: torch.Tensor
    layout_id: str
    zoo: str
    model_id: str
    epoch: int
    split: str
    test_acc: float
    val_acc: float


class ShardReader:
    """Iterates the rows of ``selection`` from the shard dataset at ``url``."""

    def __init__(self, url: str, selection: Selection, manifest: Manifest | None = None, max_open_files: int = 2):
        self.url = url
        self.manifest = manifest if manifest is not None else read_manifest(url)
        self.selection = selection
        self._files = {f["path"]: f for f in self.manifest.files}
        self._units: dict[Unit, list[RowRef]] = {}
        for ref in selection.rows():
            per_group = int(self._files[ref.file]["rows_per_row_group"])
            self._units.setdefault((ref.file, ref.row // per_group), []).append(ref)
        self._open: OrderedDict[str, tuple[pq.ParquetFile, object]] = OrderedDict()
        self._max_open = max_open_files

    def __len__(self) -> int:
        return sum(len(refs) for refs in self._units.values())

    # ------------------------------------------------------------------------------------ planning
    def plan(self, world_rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
             shuffle: bool = True) -> list[tuple[Unit, list[RowRef]]]:
        """This rank's row groups in read order, each with the rows to keep from it."""
        if not 0 <= world_rank < world_size:
            raise DataError(f"world_rank {world_rank} is outside world_size {world_size}")
        units = sorted(self._units)
        if shuffle:
            order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(units))
            units = [units[i] for i in order]
        flat = [(u, ref) for u in units for ref in self._units[u]]
        quota = len(flat) // world_size if world_size > 1 else len(flat)
        mine: dict[Unit, list[RowRef]] = {}
        for u, ref in flat[world_rank * quota:(world_rank + 1) * quota]:
            mine.setdefault(u, []).append(ref)
        return [(u, mine[u]) for u in units if u in mine]

    def num_samples(self, world_rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0) -> int:
        return sum(len(refs) for _, refs in self.plan(world_rank, world_size, seed, epoch))

    # ------------------------------------------------------------------------------------- reading
    def _file(self, path: str) -> pq.ParquetFile:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path][0]
        while len(self._open) >= self._max_open:
            _close(*self._open.popitem(last=False)[1])
        fh = storage.open_read(self.manifest.file_url(path))
        self._open[path] = (pq.ParquetFile(fh), fh)
        return self._open[path][0]

    def read_unit(self, unit: Unit, refs: list[RowRef]) -> Iterator[Sample]:
        """The samples of ``refs`` from one row group (tokens copied out, so the group can be freed)."""
        path, group = unit
        try:
            table = self._file(path).read_row_group(group)
        except OSError as err:
            raise DataError(f"shard file '{self.manifest.file_url(path)}' cannot be read ({str(err).splitlines()[0]}"
                            f"); the dataset is corrupt, rebuild it") from None
        zoo = self.manifest.zoos[refs[0].zoo]
        tokens = table_tokens(table.column("tokens"), zoo["num_tokens"], self.manifest.tokensize)
        base = group * int(self._files[path]["rows_per_row_group"])
        meta = table.select(["model_id", "epoch", "split", "layout_id", "test_acc", "val_acc"]).to_pydict()
        for ref in refs:
            i = ref.row - base
            if meta["model_id"][i] != ref.model_id or meta["epoch"][i] != ref.epoch:
                raise DataError(f"shard file '{self.manifest.file_url(path)}' does not match its manifest at row "
                                f"{ref.row}; the dataset is corrupt, rebuild it")
            yield Sample(torch.from_numpy(tokens[i].copy()), meta["layout_id"][i], ref.zoo, ref.model_id, ref.epoch,
                         meta["split"][i], float(meta["test_acc"][i]), float(meta["val_acc"][i]))

    def iter_samples(self, world_rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                     shuffle_buffer: int = 64, shuffle: bool = True) -> Iterator[Sample]:
        """One pass over this rank's share; row groups shuffled, then samples through a shuffle buffer."""
        rng = np.random.default_rng([int(seed), int(epoch), int(world_rank), 1])
        buffer: list[Sample] = []
        try:
            for unit, refs in self.plan(world_rank, world_size, seed, epoch, shuffle):
                for sample in self.read_unit(unit, refs):
                    if not shuffle or shuffle_buffer <= 1:
                        yield sample
                        continue
                    buffer.append(sample)
                    if len(buffer) >= shuffle_buffer:
                        j = int(rng.integers(len(buffer)))
                        buffer[j], buffer[-1] = buffer[-1], buffer[j]
                        yield buffer.pop()
            while buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        finally:
            self.close()

    def close(self) -> None:
        while self._open:
            _close(*self._open.popitem()[1])


def _close(parquet_file: pq.ParquetFile, fh: object) -> None:
    parquet_file.close()
    getattr(fh, "close", lambda: None)()
