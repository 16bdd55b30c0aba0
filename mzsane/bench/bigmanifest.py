"""The 10^6-row manifest figure of ``mzsane bench scale``: can a reader load a huge shard dataset's table of
contents and pick a sub-zoo from it in seconds?

Synthetic (no part files are written, nothing reads them): ``num_zoos`` zoos of one-checkpoint models, split
70/15/15 and laid out as ``mzsane shards build`` lays them out (per zoo and split, models sorted, 256 rows per
part file). The same dataset is written twice: in today's format (manifest.json + the Parquet model index,
``shards/index.py``) and, for comparison, as a schema 1 manifest with every model inline in JSON (what every
reader parsed before the index; ~47 s at 10^6 rows). Timed per format: ``read_manifest`` (load), then
``select`` of 2 zoos x up to 1,000 train models (select); both formats must choose the same rows.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pyarrow as pa

ROWS_PER_FILE = 256
SPLIT_OF = ("train",) * 14 + ("val",) * 3 + ("test",) * 3  # model i is SPLIT_OF[i % 20]: 70/15/15


def synthetic_dataset(num_rows: int, num_zoos: int = 10) -> tuple[dict, pa.Table, list[dict]]:
    """(manifest fields without models, index table in index order, part file entries) of a synthetic dataset."""
    from mzsane.shards import index as idx
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.zoo.architectures import build_model

    layout = layout_from_state_dict(build_model("cnn_s").state_dict(), 288)
    per_zoo = num_rows // num_zoos
    cols: dict[str, list] = {name: [] for name in idx.SCHEMA.names}
    zoos, files = {}, []
    for z in range(num_zoos):
        zoo = f"z{z:02d}"
        splits = {s: [i for i in range(per_zoo) if SPLIT_OF[i % 20] == s] for s in ("train", "val", "test")}
        zoos[zoo] = {"dataset": "mnist", "architecture": "cnn_s", "arch_kwargs": {}, "layout_id": layout.layout_id,
                     "num_tokens": layout.num_tokens, "source": "", "num_models": per_zoo, "num_rows": per_zoo,
                     "splits": {s: len(ids) for s, ids in splits.items()}}
        for split, ids in splits.items():
            for k, i in enumerate(ids):
                if k % ROWS_PER_FILE == 0:
                    files.append({"path": f"part-{len(files):05d}.parquet", "zoo": zoo, "split": split,
                                  "num_rows": min(ROWS_PER_FILE, len(ids) - k),
                                  "num_bytes": min(ROWS_PER_FILE, len(ids) - k) * 60_000, "rows_per_row_group": 8})
                cols["zoo"].append(zoo)
                cols["model_id"].append(f"m{i:06d}")
                cols["split"].append(split)
                cols["status"].append("ok")
                cols["file"].append(files[-1]["path"])
                cols["epoch"].append(1)
                cols["row"].append(k % ROWS_PER_FILE)
                cols["test_acc"].append(0.5)
                cols["val_acc"].append(0.5)
    settings = {"tokensize": 288, "include_bn": True, "include_running_stats": False,
                "weight_threshold": float("inf"), "encoding": "fixed_size_binary", "compression": "none",
                "layouts": {layout.layout_id: layout.to_dict()}, "zoos": zoos, "skipped": []}
    return settings, pa.Table.from_pydict(cols, schema=idx.SCHEMA), files


def _timed_selection(url: str, take: int) -> tuple[dict, object]:
    from mzsane.shards.manifest import read_manifest
    from mzsane.shards.select import select

    t0 = time.perf_counter()
    m = read_manifest(url)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sel = select(m, zoos=["z00", "z01"], num_models_per_zoo=take, split="train", seed=0)
    rows = sel.rows()
    select_s = time.perf_counter() - t0
    return {"manifest_load_s": round(load_s, 3), "select_s": round(select_s, 3),
            "load_and_select_s": round(load_s + select_s, 3), "selected_rows": len(rows)}, (m, rows)


def big_manifest(num_rows: int, scratch: str, num_zoos: int = 10, compare_json: bool = True) -> dict:
    """Write the synthetic dataset's manifest (+ index) of ``num_rows`` rows, time load and select a sub-zoo."""
    from mzsane.shards import index as idx
    from mzsane.shards.manifest import MANIFEST, Manifest, write_manifest
    from mzsane.shards.select import select

    settings, table, files = synthetic_dataset(num_rows, num_zoos)
    per_zoo = num_rows // num_zoos
    take = min(1000, per_zoo * 7 // 10 // 2)
    url = os.path.join(scratch, "big-index")
    t0 = time.perf_counter()
    manifest = Manifest(url=url, files=files, index=idx.write_table(url, table), **settings)
    write_manifest(manifest)
    write_s = time.perf_counter() - t0
    out = {"manifest_rows": num_rows, "rows": num_rows, "format": "manifest.json + Parquet model index",
           "index_mb": round(manifest.index["num_bytes"] / 2**20, 2),
           "manifest_kb": round(os.path.getsize(os.path.join(url, MANIFEST)) / 2**10, 1),
           "write_s": round(write_s, 2), "selected": f"2 zoos x {take} train models"}
    timed, (m, rows) = _timed_selection(url, take)
    out.update(timed)
    t0 = time.perf_counter()
    whole = select(m, zoos=["z00"], split="train", seed=0).num_rows
    out["select_whole_zoo_s"] = round(time.perf_counter() - t0, 3)
    out["whole_zoo_rows"] = whole
    del m
    if compare_json:
        out["json_format"] = _json_format(url, settings, table, files, take, rows)
    shutil.rmtree(url, ignore_errors=True)
    return out


def _json_format(index_url: str, settings: dict, table: pa.Table, files: list[dict], take: int, rows: list) -> dict:
    """The same dataset as a schema 1 manifest (every model inline in JSON): the figure the index replaced."""
    from mzsane.shards import index as idx
    from mzsane.shards.manifest import MANIFEST, Manifest

    url = index_url + "-json"
    os.makedirs(url, exist_ok=True)
    doc = Manifest(url=url, files=files, models=idx.table_to_models(table), **settings).to_dict()
    with open(os.path.join(url, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    del doc
    size = os.path.getsize(os.path.join(url, MANIFEST))
    timed, (_, json_rows) = _timed_selection(url, take)
    shutil.rmtree(url, ignore_errors=True)
    return {"manifest_mb": round(size / 2**20, 1), **timed, "same_selection": json_rows == rows}
