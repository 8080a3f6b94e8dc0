"""On-disk format of a caption-embedding cache: a float16 ``.npy`` matrix plus a Parquet index.

``<name>.parquet`` (the index) holds ``caption_key`` (16-byte key, see :mod:`m2d2.text.keys`) sorted
ascending, ``row`` (into the matrix) and ``caption`` (the text that was embedded), and in its metadata the
encoder config and the matrix file name. ``<name>.<plan id>.f16.npy`` is a plain ``.npy`` file, so every
process memory-maps it instead of loading it (2.5 M x 4096 x 2 B = 20 GB at paper scale).

The index is written last, atomically, and names its matrix: its presence marks a complete cache, and a crash
between the two writes leaves the previous index pointing at the previous matrix.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2d2.io import atomic_write_bytes
from m2d2.shards import npy_header

ENCODER_META = b"m2d2.text_encoder"  # asdict(OfflineTextConfig) as JSON (also in the pre-matrix format)
CACHE_META = b"m2d2.caption_cache"  # format, matrix file, shape, plan id, sha256 of the matrix, ...
FORMAT = 2
KEY = np.dtype("S16")
INDEX_ROW_GROUP = 1 << 18


def matrix_name(index_path: str | Path, plan_id: str) -> str:
    return f"{Path(index_path).stem}.{plan_id[:16]}.f16.npy"


def write_index(index_path: str | Path, keys: np.ndarray, rows: np.ndarray, captions: Sequence[str],
                encoder: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write the index (sorted by key) for ``keys[i] -> rows[i]``; ``meta`` must name the matrix."""
    keys = np.ascontiguousarray(keys, dtype=KEY)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("caption keys of an index must be unique")
    order = np.argsort(keys, kind="stable")
    sorted_keys = np.ascontiguousarray(keys[order])
    key_array = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(sorted_keys)])
    table = pa.table({
        "caption_key": key_array,
        "row": pa.array(np.asarray(rows, dtype=np.int64)[order]),
        "caption": pa.array([captions[i] for i in order], type=pa.string()),
    }).replace_schema_metadata({ENCODER_META: json.dumps(encoder, sort_keys=True),
                                CACHE_META: json.dumps({"format": FORMAT, **meta}, sort_keys=True)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=INDEX_ROW_GROUP)
    atomic_write_bytes(index_path, sink.getvalue().to_pybytes())


def read_meta(index_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(encoder config, cache meta)`` from the index's Parquet metadata, without reading rows."""
    meta = pq.read_schema(index_path).metadata or {}
    return json.loads(meta.get(ENCODER_META, b"{}")), json.loads(meta.get(CACHE_META, b"{}"))


def _fill_keys(index_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    source = pq.ParquetFile(index_path)
    total = source.metadata.num_rows
    keys, rows = np.empty(total, dtype=KEY), np.empty(total, dtype=np.int64)
    filled = 0
    for batch in source.iter_batches(batch_size=INDEX_ROW_GROUP, columns=["caption_key", "row"]):
        column = batch.column("caption_key")
        n = len(column)
        keys[filled : filled + n] = np.frombuffer(column.buffers()[1], dtype=KEY, count=n,
                                                  offset=column.offset * KEY.itemsize)
        rows[filled : filled + n] = batch.column("row").to_numpy()
        filled += n
    return keys, rows


def read_keys(index_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted keys [N] S16, rows [N] int64)``: 24 bytes per caption in memory.

    Read one row group at a time into preallocated arrays, then hand the reader's buffers back to the system
    (once the reader is gone, or the pool keeps them): 2.5 M keys cost ~60 MB of arrays + ~50 MB of RSS.
    """
    keys, rows = _fill_keys(index_path)
    pa.default_memory_pool().release_unused()
    return keys, rows


def npy_layout(source: str | Path | BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-order ``.npy`` file (a local path, or an open binary handle read from
    its start), read from its header only."""
    if not isinstance(source, (str, os.PathLike)):
        return _header(source, getattr(source, "name", "npy stream"))
    with open(source, "rb") as handle:
        return _header(handle, source)


def _header(handle: BinaryIO, name: object) -> tuple[tuple[int, ...], np.dtype, int]:
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise ValueError(f"{name}: Fortran-ordered arrays are not supported")
    return shape, dtype, handle.tell()


def open_matrix(path: str | Path) -> tuple[mmap.mmap, np.ndarray]:
    """Read-only memory map of a ``.npy`` matrix; pages load on access and are shared by all processes.

    ``MADV_RANDOM`` stops read-ahead/fault-around from mapping neighbours of each looked-up row.
    """
    shape, dtype, offset = npy_layout(path)
    expected, size = npy_data_size(path)
    if size != expected:
        raise ValueError(f"{path}: {size} bytes, but its header says {shape} {dtype} ({expected} bytes)")
    with open(path, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(view, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        view.madvise(mmap.MADV_RANDOM)
    return view, np.ndarray(shape, dtype=dtype, buffer=view, offset=offset)


def npy_data_size(path: str | Path) -> tuple[int, int]:
    """``(expected, actual)`` file size of a ``.npy``: a file cut short by a crash has ``actual < expected``."""
    shape, dtype, offset = npy_layout(path)
    return offset + int(np.prod(shape)) * dtype.itemsize, os.stat(path).st_size


def write_sparse_npy(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str = np.float16) -> None:
    """A ``.npy`` of ``shape`` with only its header written and its size set by ``truncate`` (a sparse file of
    zeros on most file systems): large matrices for benchmarks and tests without writing their data."""
    header = npy_header(shape, dtype)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize)
