"""The Parquet row: one checkpoint (zoo, model, epoch) with its full token matrix, stored once.

Windows and permutations are drawn at training time, so a checkpoint is never stored in several permuted
or windowed copies (the reference stored six permuted copies of fifty windows: ~739 MB per ResNet-18).

Why ``tokens`` is ``fixed_size_binary[N*D*4]`` (raw little-endian float32) with LZ4 pages — measured on
this machine (2 shared cores, pyarrow 26, `mzsane.bench.shards.measure_encodings`: 96 rows of 1,024x288
float32 with the padding of a real layout, row groups of 8; read = ParquetFile row groups -> numpy, warm
page cache; MB = 1e6 bytes, 113 MB raw):

    ResNet-18 padding (88% of entries are weights)   CNN-s padding (18% are weights)
    encoding / compression   MB    write  read MB/s  |  MB    write  read MB/s
    fixed_size_binary none   113.3   490   3,136     |  113.3   751   1,845
    fixed_size_binary lz4    105.1   249   1,957     |   45.0   267     669
    fixed_size_binary zstd    95.4   320     566     |   28.9   197     421
    fixed_size_list   none   120.2   206     238     |   94.4   119     294
    fixed_size_list   lz4    112.6    79     409     |   49.1    84     370
    fixed_size_list   zstd   102.8   108     222     |   35.4    88     251
    large_binary      none   113.3   221   1,369     |  113.3   185   1,290
    large_binary      lz4    105.1   216   1,269     |   45.0   252     703
    large_binary      zstd    95.4   233     561     |   28.9   155     320

Fixed-size binary reads fastest in every column: it decodes zero-copy into a [rows, N, D] numpy view,
while lists pay for their offsets/validity handling (the infra notes saw the same order on S3: binary
374-436 MiB/s vs lists 112-189 MiB/s). LZ4 because small zoos are mostly zero padding: it stores CNN-s
tokens in 40% of the bytes, which wins on any real network, and still decodes at 0.7-2 GB/s, well above
what a training step consumes; zstd saves a little more but reads 3-5x slower. Trained float32 weights
themselves hardly compress (ResNet-18: -7%). The reader decodes all three encodings, so a dataset written
with another choice stays readable (the manifest records encoding and compression).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2  # 2: manifest.json lists no models, a Parquet model index does (index.py); 1 still reads
ENCODINGS = ("fixed_size_binary", "fixed_size_list", "large_binary")
DEFAULT_ENCODING = "fixed_size_binary"
DEFAULT_COMPRESSION = "lz4"
META_COLUMNS = ("zoo", "model_id", "epoch", "split", "layout_id", "train_acc", "val_acc", "test_acc")
SPLITS = ("train", "val", "test")


@dataclass
class Row:
    """One checkpoint ready to be written: metadata plus tokens_ND (float32 [N, D])."""

    zoo: str
    model_id: str
    epoch: int
    split: str
    layout_id: str
    train_acc: float
    val_acc: float
    test_acc: float
    tokens_ND: np.ndarray


def token_type(num_tokens: int, tokensize: int, encoding: str) -> pa.DataType:
    width = num_tokens * tokensize
    if encoding == "fixed_size_binary":
        return pa.binary(width * 4)
    if encoding == "fixed_size_list":
        return pa.list_(pa.float32(), width)
    if encoding == "large_binary":
        return pa.large_binary()
    raise ValueError(f"unknown token encoding {encoding!r}")


def arrow_schema(num_tokens: int, tokensize: int, encoding: str = DEFAULT_ENCODING) -> pa.Schema:
    return pa.schema([
        ("zoo", pa.string()), ("model_id", pa.string()), ("epoch", pa.int32()), ("split", pa.string()),
        ("layout_id", pa.string()), ("train_acc", pa.float32()), ("val_acc", pa.float32()),
        ("test_acc", pa.float32()), ("tokens", token_type(num_tokens, tokensize, encoding)),
    ])


def rows_to_table(rows: list[Row], num_tokens: int, tokensize: int, encoding: str = DEFAULT_ENCODING) -> pa.Table:
    """Arrow table of rows; the token buffer is one contiguous float32 block (no per-row Python objects)."""
    flat = np.ascontiguousarray(np.stack([r.tokens_ND for r in rows]), dtype="<f4").reshape(len(rows), -1)
    width = num_tokens * tokensize
    assert flat.shape[1] == width, (flat.shape, width)
    data = pa.py_buffer(flat)
    if encoding == "fixed_size_binary":
        tokens = pa.Array.from_buffers(pa.binary(width * 4), len(rows), [None, data])
    elif encoding == "fixed_size_list":
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), width)
    elif encoding == "large_binary":
        offsets = np.arange(len(rows) + 1, dtype=np.int64) * width * 4
        tokens = pa.Array.from_buffers(pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), data])
    else:
        raise ValueError(f"unknown token encoding {encoding!r}")
    columns = {
        "zoo": pa.array([r.zoo for r in rows], pa.string()),
        "model_id": pa.array([r.model_id for r in rows], pa.string()),
        "epoch": pa.array([int(r.epoch) for r in rows], pa.int32()),
        "split": pa.array([r.split for r in rows], pa.string()),
        "layout_id": pa.array([r.layout_id for r in rows], pa.string()),
        "train_acc": pa.array([r.train_acc for r in rows], pa.float32()),
        "val_acc": pa.array([r.val_acc for r in rows], pa.float32()),
        "test_acc": pa.array([r.test_acc for r in rows], pa.float32()),
        "tokens": tokens,
    }
    return pa.Table.from_pydict(columns, schema=arrow_schema(num_tokens, tokensize, encoding))


def table_tokens(column: pa.ChunkedArray | pa.Array, num_tokens: int, tokensize: int) -> np.ndarray:
    """float32 [rows, N, D] view of a ``tokens`` column in any of the ENCODINGS (zero-copy when possible)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = num_tokens * tokensize
    n = len(arr)
    if pa.types.is_fixed_size_binary(arr.type):
        buf = arr.buffers()[1]
        out = np.frombuffer(buf, dtype="<f4", count=n * width, offset=arr.offset * width * 4)
    elif pa.types.is_fixed_size_list(arr.type):
        out = arr.flatten().to_numpy(zero_copy_only=False)
    elif pa.types.is_large_binary(arr.type) or pa.types.is_binary(arr.type):
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(arr.type) else np.int32,
                                count=n + 1, offset=arr.offset * (8 if pa.types.is_large_binary(arr.type) else 4))
        start = int(offsets[0])
        out = np.frombuffer(arr.buffers()[2], dtype="<f4", count=n * width, offset=start)
    else:
        raise ValueError(f"unsupported tokens column type {arr.type}")
    return out.reshape(n, num_tokens, tokensize)
