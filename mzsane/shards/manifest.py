"""The shard dataset's table of contents: ``{shards_url}/manifest.json``, written last.

Why a manifest rather than listing Parquet files: the reader selects a sub-population (zoos, N models per
zoo, a split, epochs) and plans which row groups each DDP rank reads from the manifest alone, without opening
a single part file; and a dataset is valid exactly when its manifest exists, so an interrupted build
never exposes half-written data. Each zoo is committed on its own first (``_zoos/{zoo}.json``, a part
manifest) so a re-run skips finished zoos; the dataset manifest is the union of the committed parts.

Layout (schema_version 2)::

    {"schema_version": 2, "tokensize", "include_bn", "include_running_stats", "weight_threshold",
     "encoding", "compression",
     "layouts": {layout_id: TokenLayout.to_dict()},
     "zoos": {zoo: {"dataset", "architecture", "arch_kwargs", "layout_id", "num_tokens", "source",
                    "num_models", "num_rows", "splits": {"train": n, "val": n, "test": n}}},
     "index": {"path": "_index/models-<sha256[:16]>.parquet", "num_rows", "num_bytes", "sha256"},
     "files": [{"path", "zoo", "split", "num_rows", "num_bytes", "sha256", "rows_per_row_group"}],
     "skipped": [{"zoo", "model_id", "epoch", "reason"}]}

The per-model rows live in the Parquet model index (index.py), not here: at 10^6 checkpoints the JSON list
took ~47 s to parse, the index is read and a sub-zoo selected from it in a fraction of a second, and the
manifest stays dataset-sized. ``read_manifest`` loads the index's bytes and checks size and sha256 (the
manifest is the commit point, so an index that does not match it is damage, reported in one line naming it).
Manifests of schema_version 1 carry ``"models": [{"zoo", "model_id", "split", "status", "file", "row",
"epochs", "test_acc", "val_acc"}]`` inline instead; they read as before. ``Manifest.models`` gives those
entries for either kind; selection asks for one zoo and split at a time (``model_ids``, ``model_entries``).

``sha256`` (hex, of the whole file) is absent in manifests written before checksums were recorded; those
still read, with sizes checked but no hash (see reader.py).

A model's rows are contiguous in one file, starting at ``row``, one per entry of ``epochs``; row group g
of a file holds rows [g*R, (g+1)*R) with R its ``rows_per_row_group``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from mzsane import storage
from mzsane.errors import DataError, StorageError
from mzsane.shards import index as idx
from mzsane.shards.schema import SCHEMA_VERSION, SPLITS
from mzsane.tokens.layout import TokenLayout

MANIFEST = "manifest.json"
PARTS_DIR = "_zoos"
SETTINGS = ("tokensize", "include_bn", "include_running_stats", "weight_threshold", "encoding", "compression")
_FIELDS = ("tokensize", "include_bn", "include_running_stats", "encoding", "compression", "layouts", "zoos",
           "files", "skipped")
# sane limits, checked before anything is sized from a manifest (a crafted one claimed 2^31 rows or 10^12 tokens
# per layout, which the position embeddings would have allocated as 137 GB / 8 TB): a ResNet-18 layout is 43,924
# tokens of 288 values with 21 layers; counts of rows and bytes stay far inside int64
MAX_LAYOUT_TOKENS, MAX_LAYOUT_LAYERS, MAX_LAYOUT_ROWS, MAX_TOKENSIZE = 2**20, 2**12, 2**20, 2**16
MAX_COUNT = 2**48


class Manifest:
    """A loaded manifest.json (see module docstring); ``url`` is the dataset root it was read from.

    ``models`` inline (built in memory, or a schema 1 manifest) or ``index`` (the model index's manifest
    entry, its bytes loaded by ``load_index``); with both, the inline list answers and ``index`` is written.
    """

    def __init__(self, url: str, tokensize: int, include_bn: bool, include_running_stats: bool,
                 weight_threshold: float, encoding: str, compression: str, layouts: dict | None = None,
                 zoos: dict | None = None, models: list | None = None, files: list | None = None,
                 skipped: list | None = None, schema_version: int = SCHEMA_VERSION, index: dict | None = None):
        self.url, self.tokensize, self.include_bn = url, tokensize, include_bn
        self.include_running_stats, self.weight_threshold = include_running_stats, weight_threshold
        self.encoding, self.compression, self.schema_version = encoding, compression, schema_version
        self.layouts = layouts if layouts is not None else {}
        self.zoos = zoos if zoos is not None else {}
        self.files = files if files is not None else []
        self.skipped = skipped if skipped is not None else []
        self.index = index
        self._models = models if models is not None or index is not None else []
        self._index_data: bytes | None = None

    # ------------------------------------------------------------------------------------ models
    @property
    def models(self) -> list[dict]:
        """Every model entry (from the index, read in full once: selection reads less, see ``model_entries``)."""
        if self._models is None:
            self._models = idx.table_to_models(idx.read_table(self.load_index(), self.index_url))
        return self._models

    @models.setter
    def models(self, value: list[dict]) -> None:
        self._models = value

    @property
    def index_url(self) -> str:
        return self.file_url(self.index["path"]) if self.index else ""

    def load_index(self) -> bytes:
        """The model index's bytes, checked against the manifest once (DataError naming it when damaged)."""
        if self._index_data is None:
            assert self.index is not None, "load_index on a manifest without a model index"
            self._index_data = idx.load_index(self.url, self.index)
        return self._index_data

    def model_ids(self, zoo: str, split: str) -> list[str]:
        """Sorted ids of the models of one zoo and split."""
        if self._models is not None:
            return sorted(m["model_id"] for m in self._models if m["zoo"] == zoo and m["split"] == split)
        return idx.model_ids(self.load_index(), self.index_url, zoo, split)

    def model_entries(self, zoo: str, split: str, model_ids: Sequence[str] | None = None) -> list[dict]:
        """Entries of one zoo and split (only ``model_ids`` when given), sorted by model id."""
        if self._models is not None:
            wanted = set(model_ids) if model_ids is not None else None
            found = [m for m in self._models if m["zoo"] == zoo and m["split"] == split
                     and (wanted is None or m["model_id"] in wanted)]
        else:
            found = idx.table_to_models(idx.read_table(self.load_index(), self.index_url, zoos=[zoo], split=split,
                                                       model_ids=model_ids))
        return sorted(found, key=lambda m: m["model_id"])

    # ------------------------------------------------------------------------------------ layouts
    def layout(self, layout_id: str) -> TokenLayout:
        if layout_id not in self.layouts:
            raise DataError(f"layout {layout_id!r} is not in the shard manifest at '{self.url}'; known: "
                            f"{', '.join(sorted(self.layouts))}")
        return TokenLayout.from_dict(self.layouts[layout_id])

    @property
    def max_positions(self) -> list[int]:
        """Embedding-table sizes [tokens, layers, rows] covering every layout (each = max index + 1)."""
        return self.max_positions_for(())

    def max_positions_for(self, zoos: Sequence[str] = ()) -> list[int]:
        """Table sizes covering the layouts of ``zoos`` only (every layout when empty).

        Why: a backbone's shape, and with it its seeded initialization, must follow from what it trains on,
        not from which other zoos were built into the same shard dataset: sized over the whole dataset, an
        mnist-cnn_s backbone got 490-token tables (48 needed) once a ResNet zoo joined the shards, and the
        same sweep point no longer reproduced. A backbone meant to encode architectures it never trains on
        sets ``model.max_positions`` explicitly."""
        names = list(zoos) or sorted(self.zoos)
        layout_ids = sorted({self.zoos[z]["layout_id"] for z in names if z in self.zoos})
        sizes = [self.layout(i).max_positions for i in layout_ids]
        return [max(s[i] for s in sizes) for i in range(3)] if sizes else [0, 0, 0]

    def check_max_positions(self, max_positions: list[int]) -> None:
        """DataError when any layout's positions exceed a model's position tables (empty = sized from here)."""
        if max_positions:
            for layout_id in sorted(self.layouts):
                self.layout(layout_id).check_max_positions(max_positions)

    def file_url(self, path: str) -> str:
        return storage.join(self.url, path)

    def to_dict(self) -> dict:
        """manifest.json's content: the index entry when there is one, else the schema 1 inline models."""
        d = {k: getattr(self, k) for k in _FIELDS}
        d["weight_threshold"] = _json_float(self.weight_threshold)
        if self.index is not None:
            d.update(schema_version=SCHEMA_VERSION, index=self.index)
        else:
            d.update(schema_version=1, models=self.models)
        return d

    @classmethod
    def from_dict(cls, d: dict, url: str) -> Manifest:
        version = int(d.get("schema_version", 0)) if isinstance(d, dict) else 0
        if version > SCHEMA_VERSION:
            raise DataError(f"shard manifest '{storage.join(url, MANIFEST)}' has schema_version {version}, newer than "
                            f"this mzsane understands ({SCHEMA_VERSION}); upgrade mzsane or rebuild the shards")
        try:
            kwargs = {k: d[k] for k in _FIELDS}
            index = d.get("index")
            models = d["models"] if index is None else None
            if index is not None and not all(k in index for k in ("path", "num_rows", "num_bytes", "sha256")):
                raise KeyError("index")
        except (KeyError, TypeError):
            raise DataError(f"shard manifest '{storage.join(url, MANIFEST)}' is incomplete; rebuild the shards "
                            f"with `mzsane shards build`") from None
        check_counts(d, storage.join(url, MANIFEST))
        return cls(url=url, weight_threshold=float(d.get("weight_threshold", math.inf)),
                   schema_version=version, models=models, index=index, **kwargs)


def _count(value: Any, what: str, where: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer count within [low, high], else a one-line DataError naming it (no bools, floats or strings)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DataError(f"shard manifest '{where}': {what} is {str(value)[:40]!r}, not an integer in "
                        f"[{low:,}, {high:,}]; the manifest is damaged or crafted, rebuild the shards")
    return value


def check_counts(d: dict, where: str) -> None:
    """Every count a reader sizes anything by, checked against sane limits and against the other counts that
    describe the same files, before any of it is used (a DataError naming the field)."""
    if not all(isinstance(d.get(k), t) for k, t in (("layouts", dict), ("zoos", dict), ("files", list))):
        raise DataError(f"shard manifest '{where}' has malformed layouts, zoos or files; rebuild the shards")
    _count(d.get("tokensize"), "tokensize", where, 1, MAX_TOKENSIZE)
    for lid, layout in d["layouts"].items():
        if not isinstance(layout, dict):
            raise DataError(f"shard manifest '{where}': layout {str(lid)[:20]!r} is malformed; rebuild the shards")
        _count(layout.get("num_tokens"), f"layout {lid} num_tokens", where, 1, MAX_LAYOUT_TOKENS)
        _count(layout.get("num_layers"), f"layout {lid} num_layers", where, 1, MAX_LAYOUT_LAYERS)
        _count(layout.get("max_rows"), f"layout {lid} max_rows", where, 1, MAX_LAYOUT_ROWS)
        _count(layout.get("tokensize"), f"layout {lid} tokensize", where, 1, MAX_TOKENSIZE)
    rows_of: dict[str, int] = {}
    for i, f in enumerate(d["files"]):
        if not isinstance(f, dict):
            raise DataError(f"shard manifest '{where}': files[{i}] is malformed; rebuild the shards")
        name = f"file {str(f.get('path', i))[:80]}"
        rows = _count(f.get("num_rows"), f"{name} num_rows", where)
        _count(f.get("num_bytes"), f"{name} num_bytes", where)
        _count(f.get("rows_per_row_group"), f"{name} rows_per_row_group", where, 1)
        rows_of[str(f.get("zoo"))] = rows_of.get(str(f.get("zoo")), 0) + rows
    for zoo, info in d["zoos"].items():
        if not isinstance(info, dict) or not isinstance(info.get("splits", {}), dict):
            raise DataError(f"shard manifest '{where}': zoo {str(zoo)[:40]!r} is malformed; rebuild the shards")
        layout = d["layouts"].get(info.get("layout_id"))
        tokens = _count(info.get("num_tokens"), f"zoo {zoo} num_tokens", where, 1, MAX_LAYOUT_TOKENS)
        if layout is None or tokens != layout["num_tokens"]:
            found = "is missing" if layout is None else f"has {layout['num_tokens']:,}"
            raise DataError(f"shard manifest '{where}': zoo {zoo} has {tokens:,} tokens but its layout "
                            f"{str(info.get('layout_id'))[:20]!r} {found}; the manifest is damaged or crafted, "
                            f"rebuild the shards")
        models = _count(info.get("num_models"), f"zoo {zoo} num_models", where)
        rows = _count(info.get("num_rows"), f"zoo {zoo} num_rows", where)
        split_models = sum(_count(n, f"zoo {zoo} splits.{s}", where) for s, n in info.get("splits", {}).items())
        if rows != rows_of.get(zoo, 0) or split_models > models:
            raise DataError(f"shard manifest '{where}': zoo {zoo} claims {rows:,} checkpoints and {models:,} models "
                            f"({split_models:,} in splits) but its files hold {rows_of.get(zoo, 0):,} rows; the "
                            f"manifest is damaged or crafted, rebuild the shards")
    index = d.get("index")
    if index is not None:
        rows = _count(index.get("num_rows"), "index num_rows", where)
        _count(index.get("num_bytes"), "index num_bytes", where, 1)
        if rows != sum(rows_of.values()):
            raise DataError(f"shard manifest '{where}': the model index claims {rows:,} rows but the part files hold "
                            f"{sum(rows_of.values()):,} checkpoints; the manifest is damaged or crafted, rebuild "
                            f"the shards")


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def settings_of(tokens_cfg: Any, encoding: str, compression: str) -> dict:
    """The build settings every zoo of one dataset must share."""
    return {"tokensize": int(tokens_cfg.tokensize), "include_bn": bool(tokens_cfg.include_bn),
            "include_running_stats": bool(tokens_cfg.include_running_stats),
            "weight_threshold": _json_float(float(tokens_cfg.weight_threshold)), "encoding": encoding,
            "compression": compression}


def read_manifest(url: str, check_index: bool = True) -> Manifest:
    """Load ``{url}/manifest.json`` and its model index; DataError when either is absent, damaged, incomplete
    or from a newer schema. ``check_index=False`` leaves the index unread until used (``shards verify``)."""
    murl = storage.join(url, MANIFEST)
    try:
        data = storage.read_json(murl)
    except StorageError:
        if not storage.exists(murl):
            raise DataError(f"no shard dataset at '{url}' (manifest.json missing); build it with "
                            f"`mzsane shards build ZOOS... --out {url}`") from None
        raise
    manifest = Manifest.from_dict(data, url)
    if check_index and manifest.index is not None:
        manifest.load_index()
    return manifest


def read_parts(url: str) -> dict[str, dict]:
    """Committed per-zoo part manifests: {zoo: part}. Parts from a newer schema are refused."""
    parts = {}
    for name in storage.listdir(storage.join(url, PARTS_DIR)):
        if not name.endswith(".json"):
            continue
        purl = storage.join(url, PARTS_DIR, name)
        part = storage.read_json(purl)
        if int(part.get("schema_version", 0)) > SCHEMA_VERSION:
            raise DataError(f"shard part '{purl}' has schema_version {part['schema_version']}, newer than this "
                            f"mzsane ({SCHEMA_VERSION}); upgrade mzsane or write to a new --out")
        parts[part["zoo"]] = part
    return parts


def merge_parts(url: str, parts: dict[str, dict]) -> Manifest:
    """The dataset manifest as the union of committed zoo parts (all must share the settings)."""
    assert parts, "merge_parts needs at least one committed zoo"
    first = next(iter(parts.values()))["settings"]
    manifest = Manifest(url=url, **{k: first[k] for k in SETTINGS})
    manifest.weight_threshold = float(manifest.weight_threshold)
    for zoo in sorted(parts):
        part = parts[zoo]
        manifest.layouts.update(part["layouts"])
        manifest.zoos[zoo] = part["info"]
        manifest.models.extend(part["models"])
        manifest.files.extend(part["files"])
        manifest.skipped.extend(part["skipped"])
    return manifest


def write_manifest(manifest: Manifest) -> None:
    """Commit a dataset: its model index first (a new file, named by its hash), then manifest.json, then the
    index files no longer referenced (the previous manifest's, or a dead build's)."""
    if manifest.index is None or manifest._models is not None:
        manifest.index = idx.write_index(manifest.url, manifest.models)
    storage.write_json(storage.join(manifest.url, MANIFEST), manifest.to_dict())
    folder = storage.join(manifest.url, idx.INDEX_DIR)
    for name in storage.listdir(folder):
        if f"{idx.INDEX_DIR}/{name}" != manifest.index["path"] and name.startswith("models-"):
            storage.remove(storage.join(folder, name))


def summary(manifest: Manifest) -> dict:
    """What `mzsane shards info` prints: zoos, models, tokens, bytes and splits (counted column-wise from a
    model index: a 10^6-row dataset is summarised without building 10^6 model entries)."""
    splits = dict.fromkeys(SPLITS, 0)
    zoos = {}
    per_epoch = _rows_per_epoch(manifest)
    for zoo, info in sorted(manifest.zoos.items()):
        zoo_bytes = sum(f["num_bytes"] for f in manifest.files if f["zoo"] == zoo)
        zoos[zoo] = {"dataset": info["dataset"], "architecture": info["architecture"],
                     "models": info["num_models"], "checkpoints": info["num_rows"], "splits": info["splits"],
                     "tokens_per_checkpoint": info["num_tokens"], "bytes": zoo_bytes,
                     "bytes_per_model": zoo_bytes // max(info["num_models"], 1),
                     "rows_per_epoch": per_epoch.get(zoo, {})}
        for s, n in info["splits"].items():
            splits[s] = splits.get(s, 0) + n
    rows_per_zoo = {z: sum(sum(c.values()) for c in e.values()) for z, e in per_epoch.items()}
    return {"url": manifest.url, "schema_version": manifest.schema_version, "tokensize": manifest.tokensize,
            "encoding": f"{manifest.encoding}+{manifest.compression}", "zoos": zoos,
            "models": sum(int(info["num_models"]) for info in manifest.zoos.values()) if manifest.index
            else len(manifest.models), "checkpoints": sum(f["num_rows"] for f in manifest.files),
            "tokens": sum(manifest.zoos[z]["num_tokens"] * n for z, n in rows_per_zoo.items()),
            "bytes": sum(f["num_bytes"] for f in manifest.files), "files": len(manifest.files),
            "splits_models": splits, "skipped_checkpoints": len(manifest.skipped),
            "max_positions": manifest.max_positions}


def _rows_per_epoch(manifest: Manifest) -> dict[str, dict[str, dict[str, int]]]:
    """Checkpoints per zoo, saved epoch and split, so ``data.epochs`` can be chosen knowingly."""
    out: dict[str, dict[str, dict[str, int]]] = {}

    def add(zoo: str, epoch: int, split: str, n: int) -> None:
        counts = out.setdefault(zoo, {}).setdefault(str(int(epoch)), dict.fromkeys(SPLITS, 0))
        counts[split] = counts.get(split, 0) + n

    if manifest.index is not None and manifest._models is None:
        import pyarrow as pa  # counted batch by batch: memory stays bounded whatever the index's length

        for batch in idx.iter_batches(manifest.load_index(), manifest.index_url, ["zoo", "epoch", "split"]):
            table = pa.Table.from_batches([batch])
            for g in table.group_by(["zoo", "epoch", "split"]).aggregate([([], "count_all")]).to_pylist():
                add(g["zoo"], g["epoch"], g["split"], g["count_all"])
    else:
        for m in manifest.models:
            for e in m["epochs"]:
                add(m["zoo"], e, m["split"], 1)
    return {z: dict(sorted(e.items(), key=lambda kv: int(kv[0]))) for z, e in out.items()}


def size_mismatches(manifest: Manifest) -> list[str]:
    """Part files whose size on storage differs from the manifest (missing ones included): one stat each."""
    bad = []
    for entry in manifest.files:
        url = manifest.file_url(entry["path"])
        try:
            actual = storage.size(url)
        except StorageError:
            actual = -1
        if actual != int(entry["num_bytes"]):
            bad.append(f"{entry['path']}: {'missing' if actual < 0 else f'{actual} bytes'}, manifest "
                       f"{entry['num_bytes']}")
    return bad


def shards_info_cli(args: Any) -> dict:
    """``mzsane shards info URL``: print the summary as JSON; sizes are compared with the manifest."""
    manifest = read_manifest(args.url)
    out = summary(manifest)
    out["size_mismatches"] = size_mismatches(manifest)
    out["checksums"] = "sha256" if all(f.get("sha256") for f in manifest.files) else "none (built before checksums)"
    print(json.dumps(out, indent=2, sort_keys=True))
    if out["size_mismatches"]:
        raise DataError(f"{len(out['size_mismatches'])} part file(s) of '{args.url}' differ from the manifest "
                        f"({out['size_mismatches'][0]}); the dataset is damaged, rebuild it")
    return out
