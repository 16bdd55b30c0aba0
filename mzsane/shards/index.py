"""The model index: one Parquet row per stored checkpoint, ``{shards_url}/_index/models-{sha256[:16]}.parquet``.

Why a Parquet file and not the manifest's JSON list: at 10^6 checkpoints a JSON ``models`` list is ~250 MB
that every reader parses in full (~47 s measured by ``mzsane bench scale``) before it can choose 1,000 models;
as Parquet it is a few MB whose selection reads only the columns and row groups it needs (``zoo``/``split``
min/max statistics prune row groups, ``model_id`` is the only column read to draw the models), in well under
a second. The manifest stays the commit point and the table of contents: it records this file's path, rows,
size and sha256 like a part file, and the file name carries its hash, so a build that dies after writing a
new index leaves the committed manifest pointing at the old, untouched one.

Rows are ordered (zoo, split, model_id, epoch) as the writer merges its zoos, so a model's rows are adjacent
and ``zoo``/``split`` runs are long (row groups of 32,768 rows are pruned by their statistics). Columns::

    zoo, model_id, split, status, file: string   epoch: int32   row: int64 (row in ``file``)
    test_acc, val_acc: float64, null where the zoo recorded NaN

A model entry (the dict the selection passes around, as in manifests before the index) is rebuilt from its
rows: ``{"zoo", "model_id", "split", "status", "file", "row" (its first row), "epochs", "test_acc",
"val_acc"}``; ``models_to_table`` and ``table_to_models`` are exact inverses.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mzsane import storage
from mzsane.errors import DataError, MzsaneError

INDEX_DIR = "_index"
ROWS_PER_GROUP = 32_768
SCHEMA = pa.schema([("zoo", pa.string()), ("model_id", pa.string()), ("split", pa.string()),
                    ("status", pa.string()), ("file", pa.string()), ("epoch", pa.int32()), ("row", pa.int64()),
                    ("test_acc", pa.float64()), ("val_acc", pa.float64())])
MODEL_KEYS = ("zoo", "model_id", "split", "status", "file")


def models_to_table(models: Sequence[dict]) -> pa.Table:
    """One row per (model, saved epoch), in the order of ``models``."""
    cols: dict[str, list] = {name: [] for name in SCHEMA.names}
    for m in models:
        first = int(m["row"])
        tests, vals = m.get("test_acc") or [], m.get("val_acc") or []
        for k, epoch in enumerate(m["epochs"]):
            for key in MODEL_KEYS:
                cols[key].append(m.get(key, "ok" if key == "status" else ""))
            cols["epoch"].append(int(epoch))
            cols["row"].append(first + k)
            cols["test_acc"].append(tests[k] if k < len(tests) else None)
            cols["val_acc"].append(vals[k] if k < len(vals) else None)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def table_to_models(table: pa.Table) -> list[dict]:
    """Model entries from index rows (adjacent rows of one (zoo, model_id) form one entry)."""
    zoo, model_id, split, status, file, epoch, row, test_acc, val_acc = (
        table.column(name).to_pylist() for name in SCHEMA.names)
    out: list[dict] = []
    current: dict = {}
    for i in range(table.num_rows):
        if i and model_id[i] == model_id[i - 1] and zoo[i] == zoo[i - 1]:
            current["epochs"].append(epoch[i])
            current["test_acc"].append(test_acc[i])
            current["val_acc"].append(val_acc[i])
        else:
            current = {"zoo": zoo[i], "model_id": model_id[i], "split": split[i], "status": status[i],
                       "file": file[i], "row": row[i], "epochs": [epoch[i]], "test_acc": [test_acc[i]],
                       "val_acc": [val_acc[i]]}
            out.append(current)
    return out


def write_index(dataset_url: str, models: Sequence[dict]) -> dict:
    """Write the index of ``models`` (atomically, named by its hash); returns its manifest entry."""
    return write_table(dataset_url, models_to_table(models))


def write_table(dataset_url: str, table: pa.Table) -> dict:
    """Write index rows already in SCHEMA and in index order (the benchmark builds 10^6 of them column-wise)."""
    assert table.schema.equals(SCHEMA), table.schema
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROWS_PER_GROUP, compression="zstd", write_page_checksum=True,
                   write_statistics=["zoo", "split", "model_id"])
    data = sink.getvalue().to_pybytes()
    sha256 = hashlib.sha256(data).hexdigest()
    path = f"{INDEX_DIR}/models-{sha256[:16]}.parquet"
    storage.write_bytes(storage.join(dataset_url, path), data)
    return {"path": path, "num_rows": table.num_rows, "num_bytes": len(data), "sha256": sha256}


def load_index(dataset_url: str, entry: dict) -> bytes:
    """The index file's bytes, checked against its manifest entry (size and sha256: a few ms per MB)."""
    url = storage.join(dataset_url, entry["path"])
    try:
        data = storage.read_bytes(url)
    except MzsaneError as err:
        missing = not storage.exists(url)
        reason = "it is missing" if missing else (str(err).splitlines() or ["unreadable"])[0][:160]
        raise DataError(f"shard model index '{url}' cannot be read ({reason}); the dataset is damaged, rebuild it "
                        f"with `mzsane shards build`") from None
    if len(data) != int(entry["num_bytes"]):
        raise DataError(f"shard model index '{url}' has {len(data)} bytes, the manifest says {entry['num_bytes']}; "
                        f"it is truncated or was replaced, rebuild the dataset")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"shard model index '{url}' does not match its manifest checksum (sha256); it is corrupt, "
                        f"rebuild the dataset")
    try:  # the footer alone: its row count must be the manifest's before any column is read
        rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"shard model index '{url}' cannot be read ({str(err)[:120]}); rebuild the dataset") from None
    if rows != int(entry["num_rows"]):
        raise DataError(f"shard model index '{url}' holds {rows:,} rows, the manifest says {int(entry['num_rows']):,}; "
                        f"the dataset is damaged or crafted, rebuild it")
    return data


def iter_batches(data: bytes, url: str, columns: Sequence[str], batch_rows: int = 65_536):
    """The index's rows in bounded batches (memory independent of its length), as ``read_table`` would fail."""
    try:
        yield from pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=batch_rows, columns=list(columns))
    except (OSError, pa.ArrowException, KeyError) as err:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"shard model index '{url}' cannot be read ({text}); the dataset is damaged, rebuild it") \
            from None


def read_table(data: bytes, url: str, columns: Sequence[str] | None = None, zoos: Sequence[str] = (),
               split: str = "", model_ids: Sequence[str] | None = None) -> pa.Table:
    """Rows of the index, only ``columns`` (None = all), filtered by zoo, split and model ids (pushed down to
    the row groups' statistics); ``url`` names the file in the one-line error of a damaged index."""
    if model_ids is not None and not model_ids:
        return SCHEMA.empty_table().select(list(columns) if columns else SCHEMA.names)
    filters = []
    if zoos:
        filters.append(("zoo", "in", list(zoos)))
    if split:
        filters.append(("split", "=", split))
    if model_ids is not None:
        filters.append(("model_id", "in", list(model_ids)))
    try:
        return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None,
                             filters=filters or None, page_checksum_verification=True)
    except (OSError, pa.ArrowException, KeyError) as err:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"shard model index '{url}' cannot be read ({text}); the dataset is damaged, rebuild it") \
            from None


def model_ids(data: bytes, url: str, zoo: str, split: str) -> list[str]:
    """Sorted ids of the models of one zoo and split (one column read)."""
    table = read_table(data, url, ["model_id"], zoos=[zoo], split=split)
    return sorted(pc.unique(table.column("model_id")).to_pylist())


def check_index(dataset_url: str, entry: dict) -> str:
    """``mzsane shards verify``: size, sha256 and every page checksum of the index; what was checked."""
    data = load_index(dataset_url, entry)
    table = read_table(data, storage.join(dataset_url, entry["path"]))
    if table.num_rows != int(entry["num_rows"]):
        raise DataError(f"shard model index '{storage.join(dataset_url, entry['path'])}' holds {table.num_rows} rows, "
                        f"the manifest says {entry['num_rows']}; rebuild the dataset")
    return "size+sha256+pages"
