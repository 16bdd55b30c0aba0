"""Streaming a Selection out of the Parquet shards, one row group at a time, split across DDP ranks.

Why row groups: they are Parquet's unit of independent reading (nanochat's loader uses them the same way),
so memory is one row group plus the shuffle buffer, whatever the zoo size. The plan (which row groups,
which rows, which rank) comes from the manifest alone; each rank opens only the files it reads.

Rank split: the selected row groups are shuffled with (seed, epoch), their rows concatenated, and rank r
takes the r-th of ``world_size`` equal contiguous slices (the remainder, < world_size rows, is dropped:
DistributedSampler's drop_last). So ranks are disjoint, yield exactly the same number of samples (DDP
collectives stay in lockstep) and read disjoint row groups except at most one shared group per boundary.

Integrity: every file's size is compared with the manifest when it is opened (one seek), and Parquet page
checksums (written since manifests carry ``sha256``) are verified on every page read; a truncated or
bit-flipped file is a one-line ``DataError`` naming it. ``verify_hash=True`` also hashes each file in full the
first time this reader opens it; ``mzsane shards verify`` does that for a whole dataset and its model index.
Manifests written before checksums existed (no ``sha256`` entry) are read as before: size checked, no hash.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mzsane import storage
from mzsane.errors import DataError, MzsaneError, StoreUnavailableError
from mzsane.shards.index import check_index
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

    def __init__(self, url: str, selection: Selection, manifest: Manifest | None = None, max_open_files: int = 2,
                 verify_hash: bool = False):
        self.url = url
        self.verify_hash = verify_hash
        self._hashed: set[str] = set()
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
        entry = self._files[path]
        if self.verify_hash and path not in self._hashed and entry.get("sha256"):
            check_file(self.manifest, entry, full=True)
            self._hashed.add(path)
        fh = storage.open_read(self.manifest.file_url(path))
        try:
            _check_size(self.manifest, entry, _size_of(fh))
            self._open[path] = (pq.ParquetFile(fh, page_checksum_verification=True), fh)
        except BaseException:
            getattr(fh, "close", lambda: None)()
            raise
        return self._open[path][0]

    def read_unit(self, unit: Unit, refs: list[RowRef]) -> Iterator[Sample]:
        """The samples of ``refs`` from one row group (tokens copied out, so the group can be freed)."""
        path, group = unit
        try:
            table = self._file(path).read_row_group(group)
        except StoreUnavailableError:
            raise  # an outage or revoked credentials, not a damaged file: no "rebuild it" advice
        except (OSError, pa.ArrowException, MzsaneError) as err:  # ArrowInvalid is not an OSError
            raise corrupt(self.manifest.file_url(path), err) from None
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
        samples = (sample for unit, refs in self.plan(world_rank, world_size, seed, epoch, shuffle)
                   for sample in self.read_unit(unit, refs))
        try:
            yield from shuffle_buffered(samples, rng, shuffle_buffer if shuffle else 1)
        finally:
            self.close()

    def close(self) -> None:
        while self._open:
            _close(*self._open.popitem()[1])


def corrupt(url: str, err: BaseException) -> DataError:
    """One line naming the damaged file (already one line when it is our own size/hash error)."""
    if isinstance(err, DataError) and url in str(err):
        return DataError(str(err).splitlines()[0])
    text = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    return DataError(f"shard file '{url}' cannot be read ({text}); the dataset is corrupt or truncated, rebuild "
                     f"it (mzsane shards verify lists every damaged file)")


def _size_of(fh: object) -> int:
    fh.seek(0, 2)  # type: ignore[attr-defined]  (S3: from the object's metadata, no data read)
    size = int(fh.tell())  # type: ignore[attr-defined]
    fh.seek(0)  # type: ignore[attr-defined]
    return size


def _check_size(manifest: Manifest, entry: dict, size: int) -> None:
    expected = int(entry.get("num_bytes", -1))
    if expected >= 0 and size != expected:
        raise DataError(f"shard file '{manifest.file_url(entry['path'])}' has {size} bytes, the manifest says "
                        f"{expected}; it is truncated or was replaced, rebuild the dataset")


def check_file(manifest: Manifest, entry: dict, full: bool = True) -> str:
    """Check one part file against its manifest entry: size, then (``full``) its sha256 and every page checksum
    of every row group. Returns what was checked; raises a one-line DataError naming the file."""
    url = manifest.file_url(entry["path"])
    try:
        with storage.open_read(url) as fh:
            _check_size(manifest, entry, _size_of(fh))
            if not full:
                return "size"
            checked = "size"
            if entry.get("sha256"):
                digest = hashlib.sha256()
                for block in iter(lambda: fh.read(8 * 2**20), b""):
                    digest.update(block)
                if digest.hexdigest() != entry["sha256"]:
                    raise DataError(f"shard file '{url}' does not match its manifest checksum (sha256); it is "
                                    f"corrupt, rebuild the dataset")
                checked += "+sha256"
            fh.seek(0)
            parquet = pq.ParquetFile(fh, page_checksum_verification=True)
            rows, per_group = parquet.metadata.num_rows, int(entry["rows_per_row_group"])
            groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            if rows != int(entry["num_rows"]) or any(n != per_group for n in groups[:-1]):
                raise DataError(f"shard file '{url}' holds {rows:,} rows in row groups of {groups[:1] or [0]} but the "
                                f"manifest says {int(entry['num_rows']):,} in groups of {per_group}; the manifest "
                                f"is damaged or crafted, rebuild the dataset")
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group)
            return checked + "+pages"
    except (OSError, pa.ArrowException, MzsaneError) as err:
        raise corrupt(url, err) from None


def _close(parquet_file: pq.ParquetFile, fh: object) -> None:
    parquet_file.close()
    getattr(fh, "close", lambda: None)()


def verify_dataset(url: str) -> dict:
    """Check every part file of a shard dataset and its model index (size, sha256, page checksums); the files
    that fail, by name. The index is checked here, not by ``read_manifest``, so it is listed like a part file."""
    manifest = read_manifest(url, check_index=False)
    results, damaged = {}, []
    for entry in manifest.files:
        try:
            results[entry["path"]] = check_file(manifest, entry, full=True)
        except DataError as err:
            results[entry["path"]] = f"DAMAGED: {err}"
            damaged.append(entry["path"])
    out = {"url": url, "files": len(manifest.files), "damaged": damaged, "results": results}
    if manifest.index is not None:
        try:
            out["index"] = {manifest.index["path"]: check_index(url, manifest.index)}
        except DataError as err:
            out["index"] = {manifest.index["path"]: f"DAMAGED: {err}"}
            damaged.append(manifest.index["path"])
    return out


def verify_cli(args: object) -> dict:
    """``mzsane shards verify URL``: prints JSON, fails (one line) when any file is damaged."""
    import json

    out = verify_dataset(args.url)  # type: ignore[attr-defined]
    print(json.dumps(out, indent=2, sort_keys=True))
    if out["damaged"]:
        total = out["files"] + len(out.get("index", {}))
        raise DataError(f"{len(out['damaged'])} of {total} files of '{out['url']}' are damaged "
                        f"({', '.join(out['damaged'][:3])}); rebuild the dataset")
    return out


_END = object()


def shuffle_buffered(items: Iterable[Any], rng: np.random.Generator, size: int, initial: int = 0) -> Iterator[Any]:
    """``items`` through a shuffle buffer of ``size`` (``size <= 1``: in order). One copy of the draw for the
    row reader and the training window stream, so both orders follow from (seed, epoch, rank) alone.

    ``initial`` (0: ``size``) items are held before the first draw; until the buffer is full every draw then
    takes two items in, so it grows to ``size`` over the first ``size - initial`` draws. Why: a full buffer of
    512 ResNet-18 windows is 32 checkpoint rows (1.4 GB) read before the first step, on every start and
    resume; a growing one starts after ``initial`` windows and mixes as widely once full."""
    if size <= 1:
        yield from items
        return
    start = size if initial <= 0 else min(initial, size)
    buffer: list[Any] = []
    iterator = iter(items)
    for item in iterator:
        buffer.append(item)
        if len(buffer) < start:
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()
        if len(buffer) < size - 1:  # growing: one extra item per draw until the buffer is full
            extra = next(iterator, _END)
            if extra is not _END:
                buffer.append(extra)
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()
