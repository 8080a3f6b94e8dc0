"""Caption-embedding cache: each unique caption embedded once, read by training through a memory map.

Training and evaluation read vectors from here and never load the sentence encoder. The reference held pickled
``{clip_id: float16 array}`` dicts in every process (about 22 GB each at paper scale); here a float16 ``.npy``
matrix is memory-mapped (shared page cache, resident memory bounded by :class:`CaptionEmbeddings`), and a
Parquet index maps the normalised caption key (:mod:`m2d2.text.keys`) to a row, so a caption repeated across
clips and datasets costs one row. The format is in :mod:`m2d2.text.index`; building it at scale in shards is
in :mod:`m2d2.text.shards`.
"""

from __future__ import annotations

import logging
import mmap
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from m2d2.text.index import KEY, open_matrix, read_keys, read_meta
from m2d2.text.keys import NORMALIZATION, caption_hash, caption_key

if TYPE_CHECKING:
    from m2d2.models.config import OfflineTextConfig
    from m2d2.text.encoders import RemoteCodePolicy
    from m2d2.text.offline import OfflineTextEncoder
    from m2d2.text.shards import ShardPlan

__all__ = ["CaptionEmbeddings", "caption_hash", "caption_key", "embed_captions", "is_current"]

log = logging.getLogger(__name__)


def default_workdir(out_path: str | Path) -> Path:
    """Where the shards of ``<dir>/<name>.parquet`` go: ``<dir>/<name>.shards``."""
    return Path(out_path).with_suffix(".shards")


def is_current(out_path: str | Path, plan: ShardPlan) -> bool:
    """True when ``out_path`` is a complete cache made from exactly ``plan`` (same captions, encoder, batches)."""
    out_path = Path(out_path)
    try:
        _, meta = read_meta(out_path)
    except (OSError, ValueError):
        return False
    matrix = out_path.parent / str(meta.get("matrix", ""))
    return meta.get("plan_id") == plan.plan_id and meta.get("normalization") == NORMALIZATION and matrix.is_file()


def embed_captions(
    captions: Iterable[str],
    config: OfflineTextConfig,
    out_path: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    *,
    n_shards: int = 1,
    bucket: bool = False,
    max_tokens: int | None = None,
    dtype: str = "auto",
    workdir: str | Path | None = None,
    keep_shards: bool = False,
    encoder: OfflineTextEncoder | None = None,
    remote_code: RemoteCodePolicy | None = None,
) -> int:
    """Embed the unique captions with the encoder of ``config`` into the cache ``out_path``; returns its rows.

    One process runs :func:`~m2d2.text.shards.plan_shards`, every shard and the merge. Shards committed by an
    earlier (killed) call are reused, and an up-to-date cache is left as is, so a re-run resumes and gives the
    same bytes. ``bucket`` orders batches by token length (faster, see ``benchmarks/bench_embed.py``); the
    default keeps the text-ordered batches of the pre-shard cache, so the demo's vectors stay bit-identical.
    ``encoder`` reuses a loaded model; ``remote_code`` is the user's permission for a code-shipping encoder
    (default: from the environment, see :class:`~m2d2.text.encoders.RemoteCodePolicy`). The shard directory
    (``workdir``: local or ``s3://``, default ``<out>.shards``) is removed after the merge unless ``keep_shards``;
    the cache itself, ``out_path``, is a local file (its matrix is memory-mapped).
    """
    from m2d2.shards import is_committed
    from m2d2.text.shards import embed_shard, merge_shards, plan_shards, remove_workdir

    began = time.perf_counter()
    plan = plan_shards(captions, n_shards, config, batch_size=batch_size, max_tokens=max_tokens, bucket=bucket,
                       dtype=dtype, remote_code=remote_code)
    if is_current(out_path, plan):
        log.info("caption cache %s is up to date (%d rows)", out_path, plan.rows)
        return plan.rows
    work = str(workdir) if workdir is not None else str(default_workdir(out_path))
    embedded = 0
    for shard in range(plan.n_shards):
        if encoder is None and not is_committed(plan.shard(work, shard)):
            from m2d2.text.offline import OfflineTextEncoder

            encoder = OfflineTextEncoder(config, device=device, dtype=dtype, remote_code=remote_code)
        result = embed_shard(plan, shard, work, device=device, encoder=encoder)
        embedded += 0 if result.skipped else result.rows
    rows = merge_shards(plan, work, out_path)
    if not keep_shards:
        remove_workdir(work)
    seconds = time.perf_counter() - began
    log.info("embedded %d captions (%d unique, %d computed now) -> %s in %.1f s: %.1f input captions/s",
             plan.n_input, rows, embedded, out_path, seconds, plan.n_input / seconds)
    return rows


# A page fault on a file mapping also maps up to 64 KiB of neighbouring pages that are already in the page cache
# (the kernel's fault-around, not switched off by MADV_RANDOM), so a looked-up row may cost that much resident.
FAULT_AROUND = 64 << 10


def _exact_key(text: str) -> bytes:
    """Key of the pre-matrix caches: the exact text, not normalised."""
    return bytes.fromhex(caption_hash(text))


class CaptionEmbeddings:
    """Lookup ``caption -> float16 vector`` over a cache written by :func:`embed_captions` / ``merge_shards``.

    Holds only the sorted keys and rows in memory (about 24 bytes per unique caption); the matrix is
    memory-mapped, opened lazily in each process (pickling drops the map, so DataLoader workers and spawned
    ranks reopen it). Looked-up rows are copied out, and once lookups may have mapped ``release_bytes`` (each row
    counted with the kernel's 64 KiB fault-around) the mapped pages are dropped from this process
    (``MADV_DONTNEED``; they stay in the shared page cache), so resident memory stays bounded however many rows
    an epoch touches. ``release_bytes=0`` never drops them.
    """

    def __init__(self, path: str | Path, release_bytes: int = 64 << 20):
        self.path = Path(path)
        self.release_bytes = release_bytes
        self.encoder, self.meta = read_meta(self.path)
        self._map: mmap.mmap | None = None
        self._matrix: np.ndarray | None = None
        self._touched = 0
        columns = pq.read_schema(self.path).names
        if "embedding" in columns:  # pre-matrix format: one Parquet holding the vectors, keyed by exact text
            self._load_legacy()
            return
        if self.meta.get("normalization") != NORMALIZATION:
            raise ValueError(f"caption cache {self.path} uses caption normalisation {self.meta.get('normalization')!r}"
                             f", this code {NORMALIZATION!r}: rebuild it")
        self._key = caption_key
        self._keys, self._rows = read_keys(self.path)
        self.dim = int(self.meta["dim"])
        self.matrix_path = self.path.parent / self.meta["matrix"]
        if not self.matrix_path.is_file():
            raise FileNotFoundError(f"caption cache {self.path} names matrix {self.matrix_path}, which is missing")

    def _load_legacy(self) -> None:
        table = pq.read_table(self.path)
        column = table.column("embedding").combine_chunks()
        self.dim = column.type.list_size
        self._matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
        raw = np.asarray([bytes.fromhex(h) for h in table.column("caption_hash").to_pylist()], dtype=KEY)
        order = np.argsort(raw, kind="stable")
        self._keys, self._rows = raw[order], order.astype(np.int64)
        self._key = _exact_key
        self.matrix_path = None

    # ------------------------------------------------------------------ process-local memory map
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state["matrix_path"] is not None:  # the map is per process; a legacy cache's vectors travel along
            state.update(_map=None, _matrix=None, _touched=0)
        return state

    @property
    def vectors(self) -> np.ndarray:
        """The whole ``[rows, dim]`` float16 matrix (read-only memory map; index it, do not copy it)."""
        if self._matrix is None:
            self._map, self._matrix = open_matrix(self.matrix_path)
            if self._matrix.shape != (int(self.meta["rows"]), self.dim) or self._matrix.dtype != np.float16:
                raise ValueError(f"{self.matrix_path} holds {self._matrix.shape} {self._matrix.dtype}, the index "
                                 f"says ({self.meta['rows']}, {self.dim}) float16")
        return self._matrix

    def release(self) -> None:
        """Drop this process's mapped pages of the matrix (they are re-read from the page cache on demand)."""
        self._touched = 0
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._matrix = None
        if self._map is not None:
            self._map.close()
            self._map = None

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.asarray([self._key(c) for c in captions], dtype=KEY).reshape(-1)
        pos = np.searchsorted(self._keys, wanted)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == wanted[found]
        return pos, found

    def __contains__(self, caption: str) -> bool:
        return bool(self._find([caption])[1][0])

    def missing(self, captions: Iterable[str]) -> list[str]:
        """The distinct captions that have no row (sorted): one vectorised pass, for checking a whole store up
        front (``c not in cache`` per caption is ~100x slower over millions of captions)."""
        distinct = sorted(set(captions))
        return [c for c, ok in zip(distinct, self._find(distinct)[1], strict=True) if not ok] if distinct else []

    def rows(self, captions: Sequence[str]) -> np.ndarray:
        """Matrix rows of ``captions`` (int64); a caption missing from the cache is an error naming it."""
        pos, found = self._find(captions)
        if not found.all():
            raise KeyError(f"caption not in the embedding cache: {captions[int(np.argmin(found))]!r}")
        return self._rows[pos]

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """``[len(rows), dim]`` float16 copies of matrix rows."""
        rows = np.asarray(rows, dtype=np.int64)
        out = self.vectors[rows]
        if self._map is not None and self.release_bytes:
            self._touched += len(rows) * (out.itemsize * self.dim + FAULT_AROUND)
            if self._touched >= self.release_bytes:
                self.release()
        return out

    def lookup(self, captions: Sequence[str]) -> np.ndarray:
        """``[len(captions), dim]`` float16; a caption missing from the cache is an error naming it."""
        return self.take(self.rows(captions))

    def check_encoder(self, config: OfflineTextConfig) -> None:
        """Fail clearly if the cache was made by another encoder than the model expects."""
        expected = {"kind": config.kind, "path": config.path, "dim": config.dim}
        got = {k: self.encoder.get(k) for k in expected}
        if got != expected:
            raise ValueError(f"caption cache was embedded with {got}, but the model expects {expected}")
