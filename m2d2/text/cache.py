"""Caption-embedding cache: each unique caption embedded once, stored as Parquet keyed by caption hash.

Training and evaluation read vectors from here and never load the sentence encoder. Compared with the
reference's pickled ``{clip_id: float16 array}`` dicts (22 GB per process at paper scale), rows are keyed by
the caption text itself, so duplicates across clips and datasets cost one row, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2d2.io import atomic_write_bytes
from m2d2.models.config import OfflineTextConfig

log = logging.getLogger(__name__)


def caption_hash(text: str) -> str:
    """Stable 128-bit key of a caption (BLAKE2b of its UTF-8 bytes, hex)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def embed_captions(
    captions: Iterable[str],
    config: OfflineTextConfig,
    out_path: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
) -> int:
    """Embed the unique captions with the offline encoder of ``config``; returns the number of rows written.

    Vectors are stored as float16 (as the reference does) in a fixed-size-list column; the encoder's kind,
    path and dimension go into the Parquet metadata so a mismatched model config is caught at load time.
    """
    from tqdm import tqdm

    from m2d2.text.offline import OfflineTextEncoder

    unique = sorted(set(captions))
    if not unique:
        raise ValueError("no captions to embed")
    encoder = OfflineTextEncoder(config, device=device)
    chunks = []
    for start in tqdm(range(0, len(unique), batch_size), desc="embed captions", unit="batch", leave=False):
        chunks.append(encoder.encode(unique[start : start + batch_size], batch_size=batch_size).numpy())
    vectors = np.concatenate(chunks).astype(np.float16)
    flat = pa.array(vectors.reshape(-1), type=pa.float16())
    table = pa.table(
        {
            "caption_hash": [caption_hash(c) for c in unique],
            "caption": unique,
            "embedding": pa.FixedSizeListArray.from_arrays(flat, config.dim),
        }
    ).replace_schema_metadata({"m2d2.text_encoder": json.dumps(asdict(config))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out_path, sink.getvalue().to_pybytes())
    log.info("embedded %d unique captions -> %s", len(unique), out_path)
    return len(unique)


class CaptionEmbeddings:
    """In-memory lookup ``caption -> vector`` over a cache written by :func:`embed_captions`."""

    def __init__(self, path: str | Path):
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        self.encoder = json.loads(meta.get(b"m2d2.text_encoder", b"{}"))
        column = table.column("embedding").combine_chunks()
        self.dim = column.type.list_size
        self.vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        self._row = {h: i for i, h in enumerate(table.column("caption_hash").to_pylist())}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, caption: str) -> bool:
        return caption_hash(caption) in self._row

    def check_encoder(self, config: OfflineTextConfig) -> None:
        """Fail clearly if the cache was made by another encoder than the model expects."""
        expected = {"kind": config.kind, "path": config.path, "dim": config.dim}
        got = {k: self.encoder.get(k) for k in expected}
        if got != expected:
            raise ValueError(f"caption cache was embedded with {got}, but the model expects {expected}")

    def lookup(self, captions: Sequence[str]) -> np.ndarray:
        """``[len(captions), dim]`` float16; a caption missing from the cache is an error naming it."""
        rows = []
        for caption in captions:
            row = self._row.get(caption_hash(caption))
            if row is None:
                raise KeyError(f"caption not in the embedding cache: {caption!r}")
            rows.append(row)
        return self.vectors[np.asarray(rows, dtype=np.int64)]
