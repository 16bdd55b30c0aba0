"""``mzsane shards build``: zoo checkpoints -> tokens -> Parquet part files -> per-zoo part manifest -> manifest.

Resumable by construction: every file is written atomically; a zoo counts as done only once its part
manifest ``_zoos/{zoo}.json`` exists (written after all its part files), and the dataset ``manifest.json``
is written last, as the union of the committed zoos, right after the model index it names (index.py). A
re-run skips committed zoos, redoes an interrupted one (overwriting its orphaned part files), and removes part
files no committed zoo references. A failed build never touches files an earlier manifest references, so
earlier data stays readable.

Files never mix zoos or splits; a model's checkpoints are contiguous in one file (see manifest.py), which
lets the reader plan row-group reads from the manifest alone. Row groups and files are capped in bytes
(64 MiB / 1 GiB) so a ResNet-18 zoo (50.6 MB per checkpoint) streams with bounded memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import zlib
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from mzsane import storage
from mzsane.errors import DataError
from mzsane.shards import manifest as mf
from mzsane.shards.index import INDEX_DIR
from mzsane.shards.schema import (
    DEFAULT_COMPRESSION,
    DEFAULT_ENCODING,
    SCHEMA_VERSION,
    SPLITS,
    Row,
    arrow_schema,
    rows_to_table,
)
from mzsane.tokens.layout import TokenLayout, layout_from_state_dict
from mzsane.tokens.tokenize import tokenize
from mzsane.zoo.architectures import build_model
from mzsane.zoo.records import FilteredCheckpoint, ZooReader
from mzsane.zoo.store import find_zoos, open_zoo

ROW_GROUP_BYTES = 64 * 2**20
FILE_BYTES = 2**30
_PART = re.compile(r"^part-(\d{5,})\.parquet$")


def split_counts(num_models: int, fractions: list[float]) -> tuple[int, int, int]:
    """(train, val, test) model counts of a zoo of ``num_models`` under ``split_models``: they depend on the count
    alone, so a sweep can size a zoo without drawing any split (O(1), not a permutation per candidate size)."""
    n = int(num_models)

    def count(frac: float) -> int:
        return 0 if frac <= 0 else (max(1, round(frac * n)) if n >= 3 else int(frac * n))

    n_val, n_test = count(fractions[1]), count(fractions[2])
    return n - n_val - n_test, n_val, n_test


def split_models(model_ids: list[str], fractions: list[float], seed: int, zoo: str) -> dict[str, str]:
    """Assign each model to train/val/test: a seeded permutation (per zoo), cut 70/15/15 by default.

    Unlike the reference's floor() cuts, every non-zero split gets at least one model once a zoo has 3,
    so the tiny zoos of tests still have a val and a test model.
    """
    ids = sorted(model_ids)
    n = len(ids)
    order = [ids[i] for i in np.random.default_rng([int(seed), zlib.crc32(zoo.encode())]).permutation(n)]
    n_train, n_val, _ = split_counts(n, fractions)
    return {m: "train" if i < n_train else "val" if i < n_train + n_val else "test" for i, m in enumerate(order)}


def zoo_layout(reader: ZooReader, tokens_cfg: Any) -> TokenLayout:
    """The token layout of a zoo, from a freshly built model of its architecture (validates the name)."""
    info = reader.info
    reference = build_model(info.architecture, **dict(info.arch_kwargs)).state_dict()
    return layout_from_state_dict(reference, tokens_cfg.tokensize, tokens_cfg.include_bn,
                                  tokens_cfg.include_running_stats)


def _structure(layout: TokenLayout) -> tuple:
    return tuple((e.shape, bool(e.bias_key), e.layer, e.rows, e.chunks, e.first_token) for e in layout.entries)


def tokenize_like(state_dict: dict, layout: TokenLayout, cache: dict, where: str) -> np.ndarray:
    """Tokens of a checkpoint in the zoo's layout, also when only its key names differ.

    Model Zoos nets shift their ``module_list`` indices when dropout modules exist, so one zoo with mixed
    dropout holds checkpoints whose keys differ but whose tensors (shapes, order) are the same network;
    they tokenize identically through a layout of their own keys. Anything else is a mismatch.
    """
    keys = tuple(state_dict)
    if keys not in cache:
        own = layout
        if not set(layout.token_keys()) <= set(keys):
            own = layout_from_state_dict(state_dict, layout.tokensize, layout.include_bn, layout.include_running_stats)
            if _structure(own) != _structure(layout):
                raise DataError(f"checkpoint '{where}' does not match the zoo's architecture (its tensors differ from "
                                f"a freshly built model); fix zoo.json's architecture/arch_kwargs or remove the model")
        cache[keys] = own
    try:
        return tokenize(state_dict, cache[keys]).numpy()
    except (DataError, RuntimeError, ValueError, KeyError) as err:  # same keys, other shapes
        raise DataError(f"checkpoint '{where}' does not match the zoo's architecture ({_first_line(err)}); fix "
                        f"zoo.json's architecture/arch_kwargs or remove the model") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


class _HashingFile:
    """Passes Parquet's writes through to the storage file while hashing them: the manifest's checksum and size
    cost no second read of the file (on S3 that would be a second download)."""

    def __init__(self, fh: Any):
        self._fh, self.sha256, self.num_bytes = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.num_bytes += memoryview(data).nbytes
        self._fh.write(data)
        return memoryview(data).nbytes

    def tell(self) -> int:
        return self.num_bytes

    def flush(self) -> None:
        self._fh.flush()

    @property
    def closed(self) -> bool:
        return False


class _PartFile:
    """One Parquet file being written: rows buffered into row groups of exactly R rows."""

    def __init__(self, url: str, layout: TokenLayout, rows_per_group: int, encoding: str, compression: str):
        self.url, self.layout, self.rows_per_group, self.encoding = url, layout, rows_per_group, encoding
        self.num_rows = 0
        self._buffer: list[Row] = []
        self._ctx = storage.open_write(url)
        self._fh = _HashingFile(self._ctx.__enter__())
        # page checksums (CRC32 per data page) let every reader detect a flipped byte in the pages it reads
        self._writer = pq.ParquetWriter(self._fh, arrow_schema(layout.num_tokens, layout.tokensize, encoding),
                                        compression=compression, write_statistics=["epoch", "model_id"],
                                        write_page_checksum=True)

    def add(self, row: Row) -> None:
        self._buffer.append(row)
        self.num_rows += 1
        if len(self._buffer) == self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            table = rows_to_table(self._buffer, self.layout.num_tokens, self.layout.tokensize, self.encoding)
            self._writer.write_table(table, row_group_size=len(self._buffer))
            self._buffer = []

    def close(self) -> tuple[int, str]:
        """(bytes, sha256 hex) of the finished file, once it is in place."""
        self._flush()
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return self._fh.num_bytes, self._fh.sha256.hexdigest()

    def abort(self, exc: BaseException) -> None:
        """Drop the half-written file (the object never appears)."""
        with contextlib.suppress(Exception):  # the file is being discarded anyway
            self._writer.close()
        self._ctx.__exit__(type(exc), exc, exc.__traceback__)


def _write_zoo(reader: ZooReader, layout: TokenLayout, out_url: str, settings: dict, split_cfg: dict,
               shards_cfg: Any, first_index: int, progress: bool) -> dict:
    """Write one zoo's part files and return its part manifest (not yet committed)."""
    info = reader.info
    zoo = info.zoo
    records = reader.models()
    skipped = [{"zoo": zoo, "model_id": r.model_id, "epoch": -1, "reason": f"model status {r.status}: {r.error}"}
               for r in records if r.status == "failed"]
    records = [r for r in records if r.status != "failed"]
    assign = split_models([r.model_id for r in records], split_cfg["fractions"], split_cfg["seed"], zoo)
    wanted = set(split_cfg["epochs"])
    epochs_of = {r.model_id: [e for e in r.checkpoint_epochs if not wanted or e in wanted] for r in records}
    row_bytes = layout.num_tokens * layout.tokensize * 4
    per_group = max(1, min(shards_cfg.rows_per_row_group, ROW_GROUP_BYTES // row_bytes))
    per_file = max(per_group, min(shards_cfg.rows_per_file, FILE_BYTES // row_bytes))
    files: list[dict] = []
    models: list[dict] = []
    index = first_index
    row_count = sum(map(len, epochs_of.values()))
    bar = tqdm(total=sum(map(len, epochs_of.values())), desc=f"shards {zoo}", unit="ckpt", disable=not progress,
               file=sys.stderr)
    current: _PartFile | None = None
    layouts_by_keys: dict = {}
    aligner, alignment = _reference_aligner(reader, records, assign, epochs_of, split_cfg, settings)
    try:
        for split in SPLITS:
            for rec in sorted((r for r in records if assign[r.model_id] == split), key=lambda r: r.model_id):
                epochs = epochs_of[rec.model_id]
                if current is not None and current.num_rows + len(epochs) > per_file:
                    files.append(_file_entry(current, zoo, split, out_url))
                    current = None
                entry = {"zoo": zoo, "model_id": rec.model_id, "split": split, "status": rec.status, "file": "",
                         "row": 0, "epochs": [], "test_acc": [], "val_acc": []}
                perms = aligner.fit(reader.load_checkpoint(rec.model_id, epochs[-1])) if aligner and epochs else None
                for epoch in epochs:
                    bar.update(1)
                    try:
                        state_dict = reader.load_checkpoint(rec.model_id, epoch,
                                                             float(settings["weight_threshold"]))
                    except FilteredCheckpoint as err:
                        skipped.append({"zoo": zoo, "model_id": rec.model_id, "epoch": epoch, "reason": str(err)})
                        tqdm.write(f"skipped: {err}", file=sys.stderr)
                        continue
                    if perms is not None:
                        state_dict = aligner.apply(state_dict, perms)
                    metrics = rec.metrics(epoch)
                    if current is None:
                        current = _PartFile(storage.join(out_url, f"part-{index:05d}.parquet"), layout, per_group,
                                            settings["encoding"], settings["compression"])
                        index += 1
                    if not entry["epochs"]:
                        entry["file"], entry["row"] = current.url.rsplit("/", 1)[-1], current.num_rows
                    current.add(Row(zoo, rec.model_id, epoch, split, layout.layout_id, metrics["train_acc"],
                                    metrics["val_acc"], metrics["test_acc"],
                                    tokenize_like(state_dict, layout, layouts_by_keys,
                                                  reader.checkpoint_url(rec.model_id, epoch))))
                    entry["epochs"].append(int(epoch))
                    entry["test_acc"].append(_num(metrics["test_acc"]))
                    entry["val_acc"].append(_num(metrics["val_acc"]))
                if entry["epochs"]:
                    models.append(entry)
            if current is not None:
                files.append(_file_entry(current, zoo, split, out_url))
                current = None
    except BaseException as err:
        if current is not None:
            with contextlib.suppress(Exception):  # the temp file goes either way; keep the original error
                current.abort(err)
        for entry in files:  # this zoo's finished part files: no part manifest will ever reference them
            storage.remove(storage.join(out_url, entry["path"]))
        if storage.is_disk_full(err):
            raise storage.disk_full(out_url, needed=row_count * row_bytes) from None
        raise
    finally:
        bar.close()
    splits = {s: sum(1 for m in models if m["split"] == s) for s in SPLITS}
    zoo_info = {"dataset": info.dataset, "architecture": info.architecture, "arch_kwargs": dict(info.arch_kwargs),
                "layout_id": layout.layout_id, "num_tokens": layout.num_tokens, "source": reader.url,
                "num_models": len(models), "num_rows": sum(len(m["epochs"]) for m in models), "splits": splits}
    return {"schema_version": SCHEMA_VERSION, "zoo": zoo, "settings": settings, "split": split_cfg,
            "layouts": {layout.layout_id: layout.to_dict()}, "info": zoo_info, "models": models, "files": files,
            "skipped": skipped, **({"alignment": alignment} if alignment else {})}


def _reference_aligner(reader: ZooReader, records: list, assign: dict[str, str], epochs_of: dict[str, list[int]],
                       split_cfg: dict, settings: dict) -> tuple[Any, dict]:
    """(aligner, {"reference", "epoch"}) when the split record asks for alignment, else (None, {}): the
    reference is the zoo's first train-split model (by id) at its last sharded epoch, so it is a model the
    backbone trains on and the same one on every re-run."""
    if not split_cfg.get("align_to_reference"):
        return None, {}
    from mzsane.tokens.alignment import ReferenceAligner

    train = sorted(r.model_id for r in records if assign[r.model_id] == "train" and epochs_of[r.model_id])
    if not train:
        raise DataError(f"zoo {reader.info.zoo} has no train-split model to align to; set "
                        "shards.align_to_reference=false or grow the zoo")
    ref_id, ref_epoch = train[0], epochs_of[train[0]][-1]
    reference = reader.load_checkpoint(ref_id, ref_epoch, float(settings["weight_threshold"]))
    return ReferenceAligner(reference, reader.info.architecture), {"reference": ref_id, "epoch": int(ref_epoch)}


def _num(x: float) -> float | None:
    return None if x != x else float(x)


def _file_entry(part: _PartFile, zoo: str, split: str, out_url: str) -> dict:
    num_bytes, sha256 = part.close()
    return {"path": part.url.rsplit("/", 1)[-1], "zoo": zoo, "split": split, "num_rows": part.num_rows,
            "num_bytes": num_bytes, "sha256": sha256, "rows_per_row_group": part.rows_per_group}


def _check_compatible(out_url: str, parts: dict[str, dict], settings: dict) -> None:
    if storage.exists(storage.join(out_url, mf.MANIFEST)):
        # refuses a manifest from a newer schema before anything is written (a damaged index is rewritten)
        mf.read_manifest(out_url, check_index=False)
    for zoo, part in parts.items():
        old = part["settings"]
        if int(old["tokensize"]) != settings["tokensize"]:
            raise DataError(f"shard dataset '{out_url}' holds tokensize {old['tokensize']} (zoo {zoo}), not "
                            f"{settings['tokensize']}; set tokens.tokensize={old['tokensize']} or use a new --out")
        diff = [k for k in settings if str(old.get(k)) != str(settings[k])]
        if diff:
            raise DataError(f"shard dataset '{out_url}' was built with other {', '.join(diff)} (zoo {zoo}); use the "
                            f"same settings or a new --out")


def build_shards(zoo_urls: list[str], out_url: str, tokens_cfg: Any, shards_cfg: Any, *,
                 max_positions: list[int] | tuple = (), encoding: str = DEFAULT_ENCODING,
                 compression: str = DEFAULT_COMPRESSION, progress: bool = True) -> mf.Manifest:
    """Shard the given zoos into ``out_url`` (adding to what is there); returns the written manifest."""
    readers = [open_zoo(url) for url in zoo_urls]
    names = [r.info.zoo for r in readers]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"zoo name(s) {dup} given twice; each zoo in a shard dataset needs a unique name")
    settings = mf.settings_of(tokens_cfg, encoding, compression)
    split_cfg = {"fractions": [float(f) for f in shards_cfg.split_fractions], "seed": int(shards_cfg.split_seed),
                 "epochs": sorted(int(e) for e in shards_cfg.epochs)}
    if getattr(shards_cfg, "align_to_reference", False):  # only then: earlier datasets keep their split record
        split_cfg["align_to_reference"] = True
    folders = (out_url, storage.join(out_url, mf.PARTS_DIR), storage.join(out_url, INDEX_DIR))
    for folder in folders:  # temp files of a killed earlier build
        for name in storage.remove_stale_temps(folder):
            print(f"removed {name}, a partial file of an interrupted build, from {folder}", file=sys.stderr)
    parts = mf.read_parts(out_url)
    _check_compatible(out_url, parts, settings)
    layouts = []
    for reader in readers:  # every layout error (unknown architecture, positions) before any write
        layout = zoo_layout(reader, tokens_cfg)
        if max_positions:
            layout.check_max_positions(list(max_positions))
        layouts.append(layout)
    next_index = 1 + max((int(_PART.match(f["path"]).group(1)) for p in parts.values() for f in p["files"]),
                         default=-1)
    for reader, layout in zip(readers, layouts):
        zoo = reader.info.zoo
        if zoo in parts:
            if parts[zoo]["split"] != split_cfg:
                raise DataError(f"zoo {zoo} in '{out_url}' was sharded with split/epochs {parts[zoo]['split']}; use "
                                f"the same shards settings or a new --out")
            print(f"zoo {zoo}: already in {out_url}, skipping (delete {mf.PARTS_DIR}/{zoo}.json there to re-shard it)",
                  file=sys.stderr)
            continue
        part = _write_zoo(reader, layout, out_url, settings, split_cfg, shards_cfg, next_index, progress)
        next_index += len(part["files"])
        storage.write_json(storage.join(out_url, mf.PARTS_DIR, f"{zoo}.json"), part)
        parts[zoo] = part
    if not parts:
        raise DataError("no zoos to shard; pass at least one zoo folder")
    manifest = mf.merge_parts(out_url, parts)
    referenced = {f["path"] for f in manifest.files}
    for name in storage.listdir(out_url):
        if _PART.match(name) and name not in referenced:
            storage.remove(storage.join(out_url, name))  # orphan of an interrupted build
    mf.write_manifest(manifest)
    return manifest


def build_shards_cli(args: Any) -> mf.Manifest:
    """``mzsane shards build ZOOS... --out URL``; each ZOO may also be a folder of zoos."""
    cfg = args.cfg
    urls = [u for path in args.zoos for u in find_zoos(path)]
    manifest = build_shards(urls, args.out, cfg.tokens, cfg.shards, max_positions=cfg.model.max_positions)
    print(json.dumps(mf.summary(manifest), indent=2, sort_keys=True))
    return manifest
