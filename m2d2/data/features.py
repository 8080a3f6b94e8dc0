"""Log-mel feature store: the sequential ingestion driver and the reader training uses.

The store is written by :mod:`m2d2.data.shards` (float16 shards + Parquet indexes + commit markers, local or
``s3://``). :func:`extract_features` runs the same ``plan_store`` -> ``build_shard`` -> ``finish_store`` steps
the cluster workflow runs as a map task, one shard after the other, so the demo and the cluster share one
ingestion implementation.

Reading from S3 goes through a **local shard cache**, not per-crop range reads: a training crop is ~97 KB and
random, so range reads would cost one request per sample (the reference's one-object-per-clip problem again),
while a shard of a few hundred MB downloads at full bandwidth once and is then memory-mapped like a local store
by every DataLoader worker and every rank on the node (a file lock makes one process download it). Cached shards
are named by their sha256 (from ``_COMPLETE.json``) and verified on download, so a cache can never serve bytes of
another store or version. The cache needs local disk for the split's shards (``M2D2_CACHE_DIR``, default
``~/.cache/m2d2/shards``).

**Never train on damaged bytes.** A process that opens a split checks every shard it will read against the sha256
in ``_COMPLETE.json`` once (hashing runs on several threads at disk speed; DataLoader workers inherit the result):
a damaged cached copy is removed and fetched again, a damaged shard of a local store raises
:class:`m2d2.shards.ShardCorruptError` (running the features step again rebuilds it).
"""

from __future__ import annotations

import contextlib
import fcntl
import io as _io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from m2d2 import io
from m2d2.audio import NormStats
from m2d2.data.shards import (
    COMPLETE_FILE,
    NORM_SPLIT,
    STATS_FILE,
    FeatureConfig,
    ShardPlan,
    ShardResult,
    StoreReport,
    build_shard,
    finish_store,
    plan_store,
)
from m2d2.shards import ShardCorruptError

log = logging.getLogger(__name__)

__all__ = ["FeatureConfig", "LogMelStore", "extract_features", "fetch_shard", "fetch_shards", "load_norm_stats",
           "store_report"]

_CHUNK = 16 * 2**20


def extract_features(
    manifest: str | Path,
    corpus_root: str | Path,
    out_dir: str | Path,
    config: FeatureConfig | None = None,
    splits: Sequence[str] = ("train", "eval"),
    progress: bool = True,
    workers: int = 1,
) -> NormStats:
    """Log-mel of every clip of ``manifest`` (rows of ``splits``) into a sharded store at ``out_dir`` (local path
    or ``s3://``), plus normalisation stats of training crops, which are stored and returned.

    :func:`~m2d2.data.shards.plan_store`, every :func:`~m2d2.data.shards.build_shard`,
    :func:`~m2d2.data.shards.finish_store`: the steps the workflow runs as plan task, map task and finish task.
    Re-running after a crash redoes only the shards that were not committed. Rejected clips are listed in ``quarantine.parquet``; counts are in ``stats.json`` (see
    :func:`store_report`). ``workers`` > 1 builds shards in that many processes, one torch thread each.
    """
    if NORM_SPLIT not in splits:
        raise ValueError(f"splits {tuple(splits)} lack '{NORM_SPLIT}': the normalisation statistics need "
                         "training clips")
    plan = plan_store(str(manifest), str(out_dir), str(corpus_root), config or FeatureConfig(), tuple(splits))
    built = 0
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/fsspec state
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_build_single_threaded, plan.to_json(), k) for k in range(len(plan))]
            for future in tqdm(as_completed(futures), total=len(futures), desc="log-mel shards", unit="shard",
                               disable=not progress, leave=False):
                built += future.result().status == "built"
    else:
        for k in tqdm(range(len(plan)), desc="log-mel shards", unit="shard", disable=not progress, leave=False):
            built += build_shard(plan, k, progress=progress).status == "built"
    log.info("feature store %s: %d of %d shards built now", out_dir, built, len(plan))
    stats = finish_store(plan).norm_stats
    assert stats is not None  # plan_store asked for the training split
    return stats


def _build_single_threaded(plan_json: str, k: int) -> ShardResult:
    """Process-pool entry point: one shard with one torch thread (parallelism comes from running shards side by
    side; intra-op threads would only fight over the same cores)."""
    torch.set_num_threads(1)
    return build_shard(ShardPlan.from_json(plan_json), k, progress=False)


def _read_json(uri: str) -> dict[str, Any]:
    return json.loads(io.read_bytes(uri))


def load_norm_stats(feature_dir: str | Path) -> NormStats:
    """The store's normalisation statistics (computed once at ingestion, never at training start)."""
    meta = _read_json(io.join(str(feature_dir), STATS_FILE))
    if meta.get("norm_mean") is None:
        raise ValueError(f"feature store {feature_dir} has no training split, hence no normalisation statistics")
    return NormStats(meta["norm_mean"], meta["norm_std"])


def store_report(feature_dir: str | Path) -> StoreReport:
    """Counts of a finished store (clips per split, quarantine by kind, flags) for logging."""
    return StoreReport.from_stats(_read_json(io.join(str(feature_dir), STATS_FILE)))


def _cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or os.environ.get("M2D2_CACHE_DIR") or Path.home() / ".cache" / "m2d2" / "shards")


def _cached(root: Path, sha256: str, size: int) -> Path | None:
    target = root / f"{io.check_token(sha256, 'shard sha256', io.SHA256_HEX)}.npy"
    return target if target.is_file() and target.stat().st_size == size else None


def fetch_shards(shards: Sequence[tuple[str, str, int]], cache_dir: str | Path | None = None,
                 concurrency: int = 8, verify: bool = True) -> list[Path]:
    """Local copies of shard objects ``(uri, sha256, bytes)`` in the cache, downloaded once per node; with
    ``verify`` a copy already in the cache is re-hashed first and fetched again if it was damaged.

    Missing shards are fetched as ranged GETs of 16 MB, ``concurrency`` at a time across all of them (one stream
    per object is far below what S3 serves), written in place, then verified against the store's sha256 before
    they are renamed into the cache. Other processes on the node wait on a per-shard file lock and then find
    the file there.
    """
    root = _cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    for _, sha, _ in shards:  # cache file names come from the store's marker files: outside input
        io.check_token(sha, "shard sha256", io.SHA256_HEX)
    wanted = sorted(set(shards), key=lambda item: item[1])
    hits = [item for item in wanted if _cached(root, item[1], item[2]) is not None]
    if verify and hits:  # a copy that was damaged on this disk after its download is fetched again
        with ThreadPoolExecutor(max_workers=min(max(1, concurrency), len(hits))) as pool:
            digests = list(pool.map(lambda item: io.sha256_limited(root / f"{item[1]}.npy", None)[0], hits))
        for (uri, sha, _), digest in zip(hits, digests, strict=True):
            if digest != sha:
                log.warning("cached copy of %s is damaged (sha256 %s, expected %s): fetching it again", uri,
                            digest[:12], sha[:12])
                (root / f"{sha}.npy").unlink(missing_ok=True)
    todo = [item for item in wanted if _cached(root, item[1], item[2]) is None]
    temps: dict[str, Path] = {}
    with contextlib.ExitStack() as locks:
        for _, sha, _ in todo:  # one global order: processes never wait on each other in a cycle
            lock = locks.enter_context(open(root / f"{sha}.lock", "w"))  # closing it releases the flock
            fcntl.flock(lock, fcntl.LOCK_EX)
        locks.callback(lambda: [path.unlink(missing_ok=True) for path in temps.values()])
        todo = [item for item in todo if _cached(root, item[1], item[2]) is None]
        for _, sha, size in todo:
            temps[sha] = root / f".{sha}.{os.getpid()}.tmp"
            with open(temps[sha], "wb") as handle:
                handle.truncate(size)
        ranges = [(uri, sha, start, min(start + _CHUNK, size)) for uri, sha, size in todo
                  for start in range(0, size, _CHUNK)]

        def get(task: tuple[str, str, int, int]) -> None:
            uri, sha, start, end = task
            fs, path = fsspec.core.url_to_fs(uri)
            data = io.retrying(lambda: fs.cat_file(path, start=start, end=end), uri, f"read bytes [{start}, {end})")
            if len(data) != end - start:
                raise OSError(f"shard {uri} does not match the store's {COMPLETE_FILE}: got {len(data)} bytes for "
                              f"range [{start}, {end}); the store changed while it was read")
            fd = os.open(temps[sha], os.O_WRONLY)
            try:
                os.pwrite(fd, data, start)
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            list(pool.map(get, ranges))
        for uri, sha, _ in todo:
            digest = io.sha256_limited(temps[sha], None, _CHUNK)[0]
            if digest != sha:
                raise OSError(f"shard {uri} does not match the store's {COMPLETE_FILE} (sha256 {digest},"
                              f" expected {sha}): the store changed while it was read")
            os.replace(temps[sha], root / f"{sha}.npy")
    return [root / f"{sha}.npy" for _, sha, _ in shards]


def fetch_shard(uri: str, sha256: str, size: int, cache_dir: str | Path | None = None, verify: bool = True) -> Path:
    """Local copy of one shard object (see :func:`fetch_shards`)."""
    return fetch_shards([(uri, sha256, size)], cache_dir, concurrency=4, verify=verify)[0]


class _Column(Sequence):
    """A list-like view of an Arrow column: values become Python objects only when read, so an index of
    millions of captions is not millions of Python objects copied into every DataLoader worker."""

    def __init__(self, array: pa.Array):
        self._array = array
        self._changed: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if i in self._changed:
            return self._changed[i]
        return self._array[i].as_py()

    def __setitem__(self, i: int, value: Any) -> None:
        self._changed[i + len(self) if i < 0 else i] = value

    def __iter__(self) -> Iterator[Any]:
        values = self._array.to_pylist()
        for i, value in self._changed.items():
            values[i] = value
        return iter(values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"_Column({len(self)} values)"


class LogMelStore(Sequence):
    """Read-only view of one split: ``store[i]`` is clip ``i``'s raw log-mel ``[n_mels, T]`` as float32.

    ``feature_dir`` is a local directory or an ``s3://`` prefix; remote shards are fetched into ``cache_dir``
    (see the module docstring), all of the split's shards up front when ``prefetch`` (the default: training
    touches every shard in its first steps anyway), else on first use. Every shard is checked against its sha256
    once per process before it is read (``verify``; up front with ``prefetch``). The store pickles without its
    memory maps but with what it verified, so DataLoader workers re-open the maps lazily and hash nothing again.
    """

    def __init__(self, feature_dir: str | Path, split: str, cache_dir: str | Path | None = None,
                 prefetch: bool = True, progress: bool = True, verify: bool = True):
        self.uri = str(feature_dir)
        self.split = split
        self.remote = not io.is_local(self.uri)
        self._cache_dir = cache_dir
        try:
            complete = _read_json(io.join(self.uri, COMPLETE_FILE))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} is not a complete feature store (no {COMPLETE_FILE}); build it with "
                                    "extract_features or plan_store/build_shard/finish_store") from None
        try:
            index = pq.read_table(_io.BytesIO(io.read_bytes(io.join(self.uri, f"{split}.index.parquet"))))
        except FileNotFoundError:
            raise FileNotFoundError(f"no '{split}' split in feature store {self.uri}") from None
        self.n_mels = int(complete["n_mels"])
        self._shards = {int(s["index"]): s for s in complete["shards"]}
        self.clip_ids: Sequence[str] = _Column(index.column("clip_id").combine_chunks())
        self.sources: Sequence[str] = _Column(index.column("source").combine_chunks())
        self.labels: Sequence[list[str]] = _Column(index.column("labels").combine_chunks())
        self.captions: Sequence[list[str]] = _Column(index.column("captions").combine_chunks())
        self.flags: Sequence[list[str]] = _Column(index.column("flags").combine_chunks())
        self._shard_of = index.column("shard").to_numpy().astype(np.int64)
        self._offsets = index.column("offset").to_numpy().astype(np.int64)
        self._frames = index.column("frames").to_numpy().astype(np.int64)
        self._arrays: dict[int, np.ndarray] = {}
        self._verify = verify
        self._ready: set[int] = set()  # shards this process (or its parent) fetched and, with verify, checked
        if prefetch:
            self.prefetch(progress=progress)

    # ------------------------------------------------------------------------------------------------ shards
    def shard_ids(self) -> list[int]:
        return sorted({int(k) for k in np.unique(self._shard_of)})

    def _remote(self, k: int) -> tuple[str, str, int]:
        meta = self._shards[k]
        return io.join(self.uri, *meta["file"].split("/")), meta["sha256"], int(meta["bytes"])

    def _shard_path(self, k: int) -> Path:
        """The local file of shard ``k``, checked against its sha256 if this process has not done so yet."""
        if not self.remote:
            path = io.local_path(io.join(self.uri, *self._shards[k]["file"].split("/")))
            if self._verify and k not in self._ready:
                self._check_local(k, path)
            return path
        uri, sha, size = self._remote(k)
        cached = _cache_dir(self._cache_dir) / f"{sha}.npy"
        if k in self._ready and cached.is_file():
            return cached
        path = fetch_shard(uri, sha, size, self._cache_dir, verify=self._verify)
        self._ready.add(k)
        return path

    def _check_local(self, k: int, path: Path) -> None:
        expected = self._shards[k]["sha256"]
        try:
            digest = io.sha256_limited(path, None)[0]
        except FileNotFoundError:
            raise ShardCorruptError(f"shard {k} of {self.uri} ({path}) is missing; run the features step again to "
                                    "rebuild it") from None
        if digest != expected:
            raise ShardCorruptError(f"shard {k} of {self.uri} ({path}) has sha256 {digest[:12]}, but "
                                    f"{COMPLETE_FILE} recorded {expected[:12]}: its bytes were damaged after it was "
                                    "written. Run the features step again: it rebuilds exactly the damaged shards")
        self._ready.add(k)

    def prefetch(self, concurrency: int = 8, progress: bool = True) -> None:
        """Make every shard of the split ready to read: fetched into the local cache (remote store) and checked
        against its sha256 (``verify``), ``concurrency`` at a time."""
        ids = [k for k in self.shard_ids() if k not in self._ready]
        if not ids:
            return
        if not self.remote:
            if self._verify:
                with ThreadPoolExecutor(max_workers=min(concurrency, len(ids))) as pool:
                    list(pool.map(lambda k: self._shard_path(k), ids))
            return
        shards = [self._remote(k) for k in ids]
        if progress:
            log.info("fetching %d shards (%.1f GB) of %s into the cache", len(shards),
                     sum(s[2] for s in shards) / 2**30, self.uri)
        fetch_shards(shards, self._cache_dir, concurrency, verify=self._verify)
        self._ready.update(ids)

    def _array(self, k: int) -> np.ndarray:
        array = self._arrays.get(k)
        if array is None:
            # copy-on-write map: writable views (torch wants them), nothing ever written back, pages shared
            array = np.load(self._shard_path(k), mmap_mode="c")
            if array.ndim != 2 or array.shape[1] != self.n_mels or array.dtype != np.float16:
                raise ValueError(f"shard {k} of {self.uri} has shape {array.shape} {array.dtype}, expected "
                                 f"[frames, {self.n_mels}] float16")
            self._arrays[k] = array
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    # ------------------------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._frames)

    def frames(self, i: int) -> int:
        return int(self._frames[i])

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        return i + len(self) if i < 0 else i

    def crop_tensor(self, i: int, start: int, frames: int, pad_value: float = 0.0) -> torch.Tensor:
        """``frames`` frames of clip ``i`` from ``start`` as a float32 ``[n_mels, frames]`` tensor; past the clip's
        end it is right-padded with ``pad_value`` in the raw log domain (0, as the reference: see
        :class:`m2d2.data.loader.CropDataset`). The float16 -> float32 conversion runs in torch (vectorised)."""
        i = self._check(i)
        n = int(self._frames[i])
        begin = int(self._offsets[i]) + start
        take = max(0, min(frames, n - start))
        src = torch.from_numpy(self._array(int(self._shard_of[i]))[begin : begin + take])  # [take, n_mels] f16
        if take == frames:
            return src.T.float()  # strided view of a fresh float32 buffer: no extra copy
        out = torch.full((self.n_mels, frames), float(pad_value), dtype=torch.float32)
        out[:, :take] = src.T
        return out

    def crop(self, i: int, start: int, frames: int, pad_value: float = 0.0) -> np.ndarray:
        """:meth:`crop_tensor` as a NumPy array."""
        return self.crop_tensor(i, start, frames, pad_value).numpy()

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        i = self._check(i)
        return np.ascontiguousarray(self.crop(i, 0, int(self._frames[i])))
