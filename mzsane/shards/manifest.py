"""The shard dataset's table of contents: ``{shards_url}/manifest.json``, written last.

Why a manifest rather than listing Parquet files: the reader selects a sub-population (zoos, N models per
zoo, a split, epochs) and plans which row groups each DDP rank reads from this file alone, without opening
a single Parquet file; and a dataset is valid exactly when its manifest exists, so an interrupted build
never exposes half-written data. Each zoo is committed on its own first (``_zoos/{zoo}.json``, a part
manifest) so a re-run skips finished zoos; the dataset manifest is the union of the committed parts.

Layout::

    {"schema_version": 1, "tokensize", "include_bn", "include_running_stats", "weight_threshold",
     "encoding", "compression",
     "layouts": {layout_id: TokenLayout.to_dict()},
     "zoos": {zoo: {"dataset", "architecture", "arch_kwargs", "layout_id", "num_tokens", "source",
                    "num_models", "num_rows", "splits": {"train": n, "val": n, "test": n}}},
     "models": [{"zoo", "model_id", "split", "status", "file", "row", "epochs", "test_acc", "val_acc"}],
     "files": [{"path", "zoo", "split", "num_rows", "num_bytes", "sha256", "rows_per_row_group"}],
     "skipped": [{"zoo", "model_id", "epoch", "reason"}]}

``sha256`` (hex, of the whole file) is absent in manifests written before checksums were recorded; those
still read, with sizes checked but no hash (see reader.py).

A model's rows are contiguous in one file, starting at ``row``, one per entry of ``epochs``; row group g
of a file holds rows [g*R, (g+1)*R) with R its ``rows_per_row_group``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mzsane import storage
from mzsane.errors import DataError, StorageError
from mzsane.shards.schema import SCHEMA_VERSION, SPLITS
from mzsane.tokens.layout import TokenLayout

MANIFEST = "manifest.json"
PARTS_DIR = "_zoos"
SETTINGS = ("tokensize", "include_bn", "include_running_stats", "weight_threshold", "encoding", "compression")


@dataclass
class Manifest:
    """A loaded manifest.json (see module docstring); ``url`` is the dataset root it was read from."""

    url: str
    tokensize: int
    include_bn: bool
    include_running_stats: bool
    weight_threshold: float
    encoding: str
    compression: str
    layouts: dict = field(default_factory=dict)
    zoos: dict = field(default_factory=dict)
    models: list = field(default_factory=list)
    files: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def layout(self, layout_id: str) -> TokenLayout:
        if layout_id not in self.layouts:
            raise DataError(f"layout {layout_id!r} is not in the shard manifest at '{self.url}'; known: "
                            f"{', '.join(sorted(self.layouts))}")
        return TokenLayout.from_dict(self.layouts[layout_id])

    @property
    def max_positions(self) -> list[int]:
        """Embedding-table sizes [tokens, layers, rows] covering every layout (each = max index + 1)."""
        sizes = [TokenLayout.from_dict(d).max_positions for d in self.layouts.values()]
        return [max(s[i] for s in sizes) for i in range(3)] if sizes else [0, 0, 0]

    def check_max_positions(self, max_positions: list[int]) -> None:
        """DataError when any layout's positions exceed a model's position tables (empty = sized from here)."""
        if max_positions:
            for layout_id in sorted(self.layouts):
                self.layout(layout_id).check_max_positions(max_positions)

    def file_url(self, path: str) -> str:
        return storage.join(self.url, path)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("url")
        d["weight_threshold"] = _json_float(self.weight_threshold)
        return d

    @classmethod
    def from_dict(cls, d: dict, url: str) -> Manifest:
        version = int(d.get("schema_version", 0)) if isinstance(d, dict) else 0
        if version > SCHEMA_VERSION:
            raise DataError(f"shard manifest '{storage.join(url, MANIFEST)}' has schema_version {version}, newer than "
                            f"this mzsane understands ({SCHEMA_VERSION}); upgrade mzsane or rebuild the shards")
        try:
            kwargs = {k: d[k] for k in ("tokensize", "include_bn", "include_running_stats", "encoding",
                                        "compression", "layouts", "zoos", "models", "files", "skipped")}
        except (KeyError, TypeError):
            raise DataError(f"shard manifest '{storage.join(url, MANIFEST)}' is incomplete; rebuild the shards "
                            f"with `mzsane shards build`") from None
        return cls(url=url, weight_threshold=float(d.get("weight_threshold", math.inf)),
                   schema_version=version, **kwargs)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def settings_of(tokens_cfg: Any, encoding: str, compression: str) -> dict:
    """The build settings every zoo of one dataset must share."""
    return {"tokensize": int(tokens_cfg.tokensize), "include_bn": bool(tokens_cfg.include_bn),
            "include_running_stats": bool(tokens_cfg.include_running_stats),
            "weight_threshold": _json_float(float(tokens_cfg.weight_threshold)), "encoding": encoding,
            "compression": compression}


def read_manifest(url: str) -> Manifest:
    """Load ``{url}/manifest.json``; DataError when it is absent, incomplete or from a newer schema."""
    murl = storage.join(url, MANIFEST)
    try:
        data = storage.read_json(murl)
    except StorageError:
        if not storage.exists(murl):
            raise DataError(f"no shard dataset at '{url}' (manifest.json missing); build it with "
                            f"`mzsane shards build ZOOS... --out {url}`") from None
        raise
    return Manifest.from_dict(data, url)


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
    storage.write_json(storage.join(manifest.url, MANIFEST), manifest.to_dict())


def summary(manifest: Manifest) -> dict:
    """What `mzsane shards info` prints: zoos, models, tokens, bytes and splits."""
    splits = dict.fromkeys(SPLITS, 0)
    zoos = {}
    for zoo, info in sorted(manifest.zoos.items()):
        zoo_bytes = sum(f["num_bytes"] for f in manifest.files if f["zoo"] == zoo)
        zoos[zoo] = {"dataset": info["dataset"], "architecture": info["architecture"],
                     "models": info["num_models"], "checkpoints": info["num_rows"], "splits": info["splits"],
                     "tokens_per_checkpoint": info["num_tokens"], "bytes": zoo_bytes,
                     "bytes_per_model": zoo_bytes // max(info["num_models"], 1),
                     "rows_per_epoch": _rows_per_epoch(manifest, zoo)}
        for s, n in info["splits"].items():
            splits[s] = splits.get(s, 0) + n
    return {"url": manifest.url, "schema_version": manifest.schema_version, "tokensize": manifest.tokensize,
            "encoding": f"{manifest.encoding}+{manifest.compression}", "zoos": zoos,
            "models": len(manifest.models), "checkpoints": sum(f["num_rows"] for f in manifest.files),
            "tokens": sum(manifest.zoos[m["zoo"]]["num_tokens"] * len(m["epochs"]) for m in manifest.models),
            "bytes": sum(f["num_bytes"] for f in manifest.files), "files": len(manifest.files),
            "splits_models": splits, "skipped_checkpoints": len(manifest.skipped),
            "max_positions": manifest.max_positions}


def _rows_per_epoch(manifest: Manifest, zoo: str) -> dict[str, dict[str, int]]:
    """Checkpoints of one zoo per saved epoch and split, so ``data.epochs`` can be chosen knowingly."""
    out: dict[str, dict[str, int]] = {}
    for m in manifest.models:
        if m["zoo"] == zoo:
            for e in m["epochs"]:
                counts = out.setdefault(str(int(e)), dict.fromkeys(SPLITS, 0))
                counts[m["split"]] = counts.get(m["split"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


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
