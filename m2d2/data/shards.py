"""Sharded log-mel store: :func:`plan_store`, :func:`build_shard` for each shard (a Flyte map task),
:func:`finish_store`; the commit protocol is :mod:`m2d2.shards`.

Layout under the store URI (a local directory or an ``s3://`` prefix)::

    plan.json                       the plan (:func:`plan_store`): shard tasks read it by URI
    shards/shard-00000.npy          float16 [frames, n_mels], time-major: the clips of the shard back to back,
                                    so a training crop is one contiguous read (97 KB for 608 frames)
    shards/shard-00000.index.parquet   one row per stored clip: offset and length in the shard, captions, labels...
    shards/shard-00000.quarantine.parquet   clips of the shard that were rejected, with kind and reason
    shards/shard-00000.done.json    commit marker, written last: fingerprint, sha256 and size of each file above,
                                    counts, and the shard's share of the normalisation statistics
    <split>.index.parquet           (finish) every stored clip of the split
    quarantine.parquet              (finish) every rejected clip of every split
    stats.json                      (finish) normalisation statistics, counts, quarantine counts, config
    _COMPLETE.json                  (finish, written last) the shard table readers use; its presence = complete

Atomicity (see :mod:`m2d2.shards`): every file appears whole or not at all, and a shard counts only once its
``.done.json`` carries the plan's fingerprint, so a crash anywhere leaves at most invisible files and a re-run
rebuilds exactly the shards without a valid marker (``build_shard`` skips the others). Rebuilding a shard first
removes its old marker and the store's ``_COMPLETE.json``, so no reader can ever pair new shard bytes with an old
index.

Normalisation statistics (one scalar mean/std, as M2D uses) come from ``norm_samples`` random training crops in
the same pass that writes the shards: the draws are a pure function of the seed and the number of training
clips, each shard measures the crops that fall on its clips (float64 moments, from the stored float16 values the
loader will see) and :func:`finish_store` merges them (Chan et al.). Draws that fall on a quarantined clip are
lost and counted (``norm_crops_lost``).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from m2d2 import io
from m2d2.audio import (
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_SAMPLES,
    AudioDecodeError,
    LogMelConfig,
    LogMelSpectrogram,
    NormStats,
    decode_audio,
    is_silent,
    read_audio_file,
)
from m2d2.audio.stats import Moments as _Moments
from m2d2.audio.stats import crop_generator, norm_draws
from m2d2.audio.stats import crop_moments as _crop_moments
from m2d2.data.manifest import AudioAccess, resolve_audio_uri, validate_manifest
from m2d2.shards import Shard, ShardRef, ShardWriter, build, npy_header, read_markers, shard_refs, sweep

log = logging.getLogger(__name__)

FORMAT = "m2d2-logmel-shards/1"
SHARD_DIR = "shards"
PLAN_FILE = "plan.json"
COMPLETE_FILE = "_COMPLETE.json"
STATS_FILE = "stats.json"
QUARANTINE_FILE = "quarantine.parquet"
NORM_SPLIT = "train"

INDEX_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),  # first frame of the clip in its shard
        ("frames", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
        ("duration_s", pa.float64()),  # of the file, before the cap
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("content_hash", pa.string()),
        ("origin", pa.string()),
        ("flags", pa.list_(pa.string())),  # capped (longer than max_seconds), padded (shorter than min_seconds)
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("audio_uri", pa.string()),
        ("kind", pa.string()),  # missing, unreadable, hash_mismatch, or an m2d2.audio.decode issue (incl. silent)
        ("reason", pa.string()),  # a sentence naming the file and the problem
    ]
)


@dataclass(frozen=True)
class FeatureConfig:
    """How features are made; stored next to them so a reader knows what it got."""

    sample_rate: int = 16000
    min_seconds: float = 0.0  # zero-pad shorter waveforms (the reference pads to 6.1 s); 0 keeps them as they are
    max_seconds: float = 30.0  # decode only the first 30 s, as the reference's pre-processing truncates
    norm_crop_frames: int = 608  # crop length of the normalisation statistics (the training crop)
    norm_samples: int = 5000
    seed: int = 0
    shard_mb: float = 256.0  # target shard size; one clip never spans two shards
    # Clips whose peak is at or below this (-90 dBFS: at most 1 LSB of 16-bit audio) are quarantined as silent:
    # their log-mel is a constant log(eps), teaches M2D nothing, pairs a caption with nothing and drags the
    # normalisation mean down. None keeps them.
    silence_dbfs: float | None = -90.0
    # Decoding limits (None = none): larger files, more channels, or more decoded samples (frames x channels of
    # the kept max_seconds) are quarantined as too_large / too_many_channels instead of exhausting the task's
    # memory. See m2d2.audio.decode.
    max_file_mb: float | None = DEFAULT_MAX_FILE_MB
    max_channels: int | None = DEFAULT_MAX_CHANNELS
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    # Where manifest audio_uri values may point (see m2d2.data.manifest.AudioAccess): relative names under the
    # audio root; absolute ones only under the audio root or these roots; only these schemes. Others are
    # quarantined as unsafe_uri, never read.
    audio_schemes: tuple[str, ...] = AudioAccess.schemes
    audio_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists back
        object.__setattr__(self, "audio_schemes", tuple(self.audio_schemes))
        object.__setattr__(self, "audio_roots", tuple(self.audio_roots))

    @property
    def audio_access(self) -> AudioAccess:
        return AudioAccess(self.audio_schemes, self.audio_roots)


@dataclass(frozen=True)
class ShardSpec:
    """Rows ``[start, stop)`` of the manifest (only those of ``split`` are stored); ``split_offset`` = rows of
    ``split`` before ``start``, so per-clip randomness depends on the clip's position, not on the sharding."""

    index: int
    split: str
    start: int
    stop: int
    split_offset: int
    clips: int


@dataclass(frozen=True)
class ShardPlan:
    """Everything a shard task needs; JSON-serialisable (:meth:`to_json`) to cross a task boundary."""

    manifest_uri: str
    manifest_sha256: str
    manifest_bytes: int
    audio_root: str
    store_uri: str
    config: FeatureConfig
    split_sizes: dict[str, int]
    shards: tuple[ShardSpec, ...]

    def __len__(self) -> int:
        return len(self.shards)

    def fingerprint(self, k: int | None = None) -> str:
        """Identity of shard ``k`` (or of the whole plan): a committed shard is reused only if this matches."""
        base = {"format": FORMAT, "manifest": self.manifest_sha256, "audio_root": self.audio_root,
                "config": asdict(self.config), "split_sizes": self.split_sizes}
        base["shards"] = [asdict(s) for s in self.shards] if k is None else asdict(self.shards[k])
        return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()

    @property
    def uri(self) -> str:
        """Where :func:`plan_store` stores the plan: ``<store>/plan.json``."""
        return io.join(self.store_uri, PLAN_FILE)

    def shard(self, k: int) -> Shard:
        """Shard ``k``'s files (``<store>/shards/shard-<k>.*``) and the fingerprint its marker must carry."""
        return Shard(io.join(self.store_uri, SHARD_DIR), shard_name(k), self.fingerprint(k))

    def refs(self, workspace: str = "") -> list[ShardRef]:
        """One :class:`~m2d2.shards.ShardRef` per shard, for a map task (``workspace``: a cache-key salt)."""
        return shard_refs(self.uri, len(self), workspace)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardPlan:
        raw = json.loads(text)
        raw["config"] = FeatureConfig(**raw["config"])
        raw["shards"] = tuple(ShardSpec(**s) for s in raw["shards"])
        return cls(**raw)


@dataclass
class ShardResult:
    """What one shard task did (``status``: ``built`` or ``skipped``, i.e. already committed)."""

    index: int
    split: str
    status: str
    clips: int
    quarantined: int
    frames: int
    bytes: int
    audio_seconds: float  # seconds of audio decoded (after the cap)
    seconds: float  # wall time of the build (0 when skipped)
    quarantine_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class StoreReport:
    """Outcome of a whole store, flat enough for MLflow (:meth:`metrics`)."""

    norm_stats: NormStats | None
    counts: dict[str, int]
    quarantined: int
    quarantined_by_kind: dict[str, int]
    flagged: dict[str, int]
    norm_crops: int
    norm_crops_lost: int
    audio_seconds: float

    @classmethod
    def from_stats(cls, meta: dict[str, Any]) -> StoreReport:
        """The report of a finished store from its ``stats.json``."""
        stats = NormStats(meta["norm_mean"], meta["norm_std"]) if meta.get("norm_mean") is not None else None
        return cls(norm_stats=stats, counts=meta.get("counts", {}), quarantined=meta.get("quarantined", 0),
                   quarantined_by_kind=meta.get("quarantined_by_kind", {}), flagged=meta.get("flagged", {}),
                   norm_crops=meta.get("norm_crops", 0), norm_crops_lost=meta.get("norm_crops_lost", 0),
                   audio_seconds=meta.get("audio_seconds", 0.0))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {f"clips_{k}": v for k, v in self.counts.items()}
        out.update({"quarantined": self.quarantined, "norm_crops": self.norm_crops,
                    "norm_crops_lost": self.norm_crops_lost, "audio_hours": self.audio_seconds / 3600})
        out.update({f"quarantined_{k}": v for k, v in self.quarantined_by_kind.items()})
        out.update({f"flagged_{k}": v for k, v in self.flagged.items()})
        if self.norm_stats:
            out.update({"norm_mean": self.norm_stats.mean, "norm_std": self.norm_stats.std})
        return out


# ----------------------------------------------------------------------------------------------------- storage
def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        return json.loads(io.read_bytes(uri))
    except FileNotFoundError:
        return None


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as Parquet file bytes, for an atomic write to a local path or ``s3://``."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_parquet(uri: str) -> pa.Table:
    return pq.read_table(_io.BytesIO(io.read_bytes(uri)))


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_uri(store: str, k: int, suffix: str) -> str:
    """``<store>/shards/shard-<k>.<suffix>`` (suffix: ``npy``, ``index.parquet``, ``quarantine.parquet``,
    ``done.json``)."""
    return io.join(str(store), SHARD_DIR, f"{shard_name(k)}.{suffix}")


def read_plan(uri: str) -> ShardPlan:
    """The plan :func:`plan_store` stored at ``uri``."""
    return ShardPlan.from_json(io.read_bytes(uri).decode())


# ----------------------------------------------------------------------------------------------------- plan
def _estimated_frames(duration: float | None, cfg: FeatureConfig, mel: LogMelConfig) -> int:
    seconds = cfg.max_seconds if duration is None or not math.isfinite(duration) else min(duration, cfg.max_seconds)
    seconds = max(seconds, cfg.min_seconds)
    return mel.frames_for(int(seconds * cfg.sample_rate))


def plan_store(manifest: str, store: str, audio_root: str | None = None, config: FeatureConfig | None = None,
               splits: Sequence[str] | None = None) -> ShardPlan:
    """Cut the manifest's rows into shards of about ``config.shard_mb`` and store the plan at ``plan.uri``
    (``<store>/plan.json``), where shard tasks read it.

    A shard holds one split and a contiguous range of manifest rows (rows of splits outside ``splits``, default
    all, are skipped); sizes are estimated from ``duration_s`` (``max_seconds`` when unknown). ``audio_root``
    (default: the manifest's directory) resolves relative ``audio_uri`` values. When the training split is asked
    for, it must have rows: the normalisation statistics come from it.
    """
    cfg = config or FeatureConfig()
    mel = LogMelConfig()
    if cfg.sample_rate != mel.sample_rate:
        raise ValueError(f"the front end runs at {mel.sample_rate} Hz; FeatureConfig.sample_rate is {cfg.sample_rate}")
    manifest = str(manifest)
    data = io.read_bytes(manifest)
    table = validate_manifest(pq.read_table(_io.BytesIO(data)))
    if audio_root is None:
        audio_root = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    wanted = set(splits) if splits else None
    budget = cfg.shard_mb * 2**20
    row_bytes = mel.n_mels * 2  # float16
    shards: list[ShardSpec] = []
    split_sizes: dict[str, int] = {}
    current: dict[str, Any] | None = None

    def close(stop: int) -> None:
        if current and current["clips"]:
            shards.append(ShardSpec(len(shards), current["split"], current["start"], stop, current["offset"],
                                    current["clips"]))

    for i, (split, duration) in enumerate(zip(table.column("split").to_pylist(),
                                              table.column("duration_s").to_pylist(), strict=True)):
        if wanted is not None and split not in wanted:
            continue
        size = _estimated_frames(duration, cfg, mel) * row_bytes
        if current is None or current["split"] != split or (current["clips"] and current["bytes"] + size > budget):
            close(i)
            current = {"split": split, "start": i, "offset": split_sizes.get(split, 0), "clips": 0, "bytes": 0}
        current["clips"] += 1
        current["bytes"] += size
        split_sizes[split] = split_sizes.get(split, 0) + 1
    close(table.num_rows)
    if (wanted is None or NORM_SPLIT in wanted) and not split_sizes.get(NORM_SPLIT):
        raise ValueError(f"{manifest} has no '{NORM_SPLIT}' rows: the normalisation statistics need training clips")
    if wanted:
        absent = sorted(wanted - set(split_sizes))
        if absent:
            log.warning("manifest %s has no rows of split(s) %s", manifest, absent)
    plan = ShardPlan(manifest_uri=manifest, manifest_sha256=hashlib.sha256(data).hexdigest(),
                     manifest_bytes=len(data), audio_root=str(audio_root), store_uri=str(store), config=cfg,
                     split_sizes=split_sizes, shards=tuple(shards))
    io.atomic_write_bytes(plan.uri, plan.to_json().encode())
    return plan


def _manifest_rows(plan: ShardPlan, spec: ShardSpec) -> list[dict[str, Any]]:
    """The rows of ``spec`` (only its split), reading just the Parquet row groups that hold them."""
    return io.retrying(lambda: _read_manifest_rows(plan, spec), plan.manifest_uri, f"read shard {spec.index}'s rows")


def _read_manifest_rows(plan: ShardPlan, spec: ShardSpec) -> list[dict[str, Any]]:
    fs, path = fsspec.core.url_to_fs(plan.manifest_uri)
    if fs.size(path) != plan.manifest_bytes:
        raise RuntimeError(f"manifest {plan.manifest_uri} changed since the shards were planned; plan again")
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups, first, seen = [], None, 0
        for g in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(g).num_rows
            if seen + n > spec.start and seen < spec.stop:
                groups.append(g)
                first = seen if first is None else first
            seen += n
        table = parquet.read_row_groups(groups).slice(spec.start - (first or 0), spec.stop - spec.start)
    rows = [r for r in validate_manifest(table).to_pylist() if r["split"] == spec.split]
    if len(rows) != spec.clips:
        raise RuntimeError(f"shard {spec.index}: expected {spec.clips} '{spec.split}' rows in manifest rows "
                           f"[{spec.start}, {spec.stop}), found {len(rows)}; the manifest changed, plan again")
    return rows


# ----------------------------------------------------------------------------------------------------- build
def _norm_allocation(config: FeatureConfig, split_sizes: dict[str, int], spec: ShardSpec) -> np.ndarray:
    """How many of the ``norm_samples`` crops land on each clip of ``spec`` (uniform draws with replacement
    over all training clips, as the reference samples; independent of how the clips are sharded)."""
    n = split_sizes.get(NORM_SPLIT, 0)
    if spec.split != NORM_SPLIT or n == 0 or config.norm_samples <= 0:
        return np.zeros(spec.clips, dtype=np.int64)
    draws = norm_draws(config.seed, n, config.norm_samples)
    local = draws[(draws >= spec.split_offset) & (draws < spec.split_offset + spec.clips)] - spec.split_offset
    return np.bincount(local, minlength=spec.clips)


def _write_shard(out: ShardWriter, payload: bytes | bytearray, index: list[dict[str, Any]],
                 quarantine: list[dict[str, Any]]) -> None:
    """Shard files other than the marker (which :func:`m2d2.shards.build` writes last)."""
    out.put("npy", payload)
    out.put("index.parquet", parquet_bytes(pa.Table.from_pylist(index, INDEX_SCHEMA)))
    out.put("quarantine.parquet", parquet_bytes(pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA)))


def build_shard(plan: ShardPlan, k: int, progress: bool = True) -> ShardResult:
    """Decode, transform and store shard ``k`` of ``plan``; a no-op if it is already committed.

    Safe to run concurrently for different ``k`` and to re-run after a crash. Bad inputs never stop the shard:
    each is a quarantine row (kind + reason); only storage or programming errors raise.
    """
    done = build(plan.shard(k), lambda out: _make_shard(plan, k, out, progress))
    return ShardResult(**{f.name: done.info[f.name] for f in fields(ShardResult) if f.name != "status"},
                       status="built" if done.built else "skipped")


def _make_shard(plan: ShardPlan, k: int, out: ShardWriter, progress: bool) -> dict[str, Any]:
    """Shard ``k``'s files (through ``out``) and what its marker records (the store's ``_COMPLETE.json`` goes
    first: no reader may pair the new bytes with an old index)."""
    spec = plan.shards[k]
    cfg = plan.config
    started = time.perf_counter()
    io.remove(io.join(plan.store_uri, COMPLETE_FILE))
    rows = _manifest_rows(plan, spec)
    allocation = _norm_allocation(cfg, plan.split_sizes, spec)
    frontend = LogMelSpectrogram()
    n_mels = frontend.config.n_mels
    min_len = max(int(cfg.min_seconds * cfg.sample_rate), frontend.config.min_samples)
    mels: list[np.ndarray] = []
    index: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    moments, lost, audio_seconds, offset = _Moments(), 0, 0.0, 0

    def reject(j: int, kind: str, reason: str) -> None:
        nonlocal lost
        row = rows[j]
        quarantine.append({"clip_id": row["clip_id"], "source": row["source"], "split": row["split"],
                           "audio_uri": row["audio_uri"], "kind": kind, "reason": reason})
        lost += int(allocation[j])  # normalisation crops drawn for this clip cannot be measured

    for j, row in enumerate(tqdm(rows, desc=f"shard {k} ({spec.split})", unit="clip", disable=not progress,
                                 leave=False)):
        try:
            uri = resolve_audio_uri(row["audio_uri"], plan.audio_root, cfg.audio_access)
        except io.UnsafePathError as exc:
            reject(j, "unsafe_uri", str(exc))
            continue
        try:
            data, digest = read_audio_file(uri, cfg.max_file_mb)  # size checked first; read once, hashed
        except FileNotFoundError:
            reject(j, "missing", f"audio file not found: {uri}")
            continue
        except io.StorageError:  # the store kept failing: the clip is fine, the shard is not built (retry it)
            raise
        except OSError as exc:
            reject(j, "unreadable", f"cannot read {uri}: {type(exc).__name__}: {exc}")
            continue
        except AudioDecodeError as exc:  # too_large
            reject(j, exc.kind, str(exc))
            continue
        if row["content_hash"] and row["content_hash"] != digest:
            reject(j, "hash_mismatch", f"audio {uri} has sha256 {digest}, the manifest says {row['content_hash']}")
            continue
        try:
            decoded = decode_audio(data, cfg.sample_rate, cfg.max_seconds, name=uri, max_file_mb=cfg.max_file_mb,
                                   max_channels=cfg.max_channels, max_samples=cfg.max_samples)
        except AudioDecodeError as exc:
            reject(j, exc.kind, str(exc))
            continue
        finally:
            del data  # free the encoded bytes before the front end runs
        if cfg.silence_dbfs is not None and is_silent(decoded.peak, cfg.silence_dbfs):
            level = 20 * math.log10(decoded.peak) if decoded.peak > 0 else -math.inf
            reject(j, "silent", f"audio {uri} is silent: peak {level:.1f} dBFS <= {cfg.silence_dbfs} dBFS")
            continue
        wave, flags = decoded.wave, ["capped"] if decoded.capped else []
        audio_seconds += wave.numel() / cfg.sample_rate
        if wave.numel() < min_len:
            wave = torch.nn.functional.pad(wave, (0, min_len - wave.numel()))
            flags.append("padded")
        with torch.inference_mode():
            lms = frontend(wave).T.contiguous().to(torch.float16).numpy()  # [T, n_mels], as stored
        if allocation[j]:
            rng = crop_generator(cfg.seed, spec.split_offset + j)
            _crop_moments(lms, int(allocation[j]), cfg.norm_crop_frames, rng, moments)
        mels.append(lms)
        index.append({"clip_id": row["clip_id"], "source": row["source"], "shard": k, "offset": offset,
                      "frames": lms.shape[0], "labels": row["labels"], "captions": row["captions"],
                      "duration_s": decoded.duration_s, "sample_rate": decoded.sample_rate,
                      "channels": decoded.channels, "content_hash": digest, "origin": row.get("origin"),
                      "flags": flags})
        offset += lms.shape[0]
    payload = bytearray(npy_header((offset, n_mels)))
    for lms in mels:
        payload += lms.data  # no intermediate copies: a shard is a few hundred MB
    del mels
    kinds: dict[str, int] = {}
    for q in quarantine:
        kinds[q["kind"]] = kinds.get(q["kind"], 0) + 1
    result = ShardResult(index=k, split=spec.split, status="built", clips=len(index), quarantined=len(quarantine),
                         frames=offset, bytes=len(payload), audio_seconds=audio_seconds,
                         seconds=time.perf_counter() - started, quarantine_kinds=kinds)
    info = {**asdict(result), "format": FORMAT, "n_mels": n_mels,
            "moments": {"count": moments.count, "mean": moments.mean, "m2": moments.m2},
            "norm_crops": int(allocation.sum()) - lost, "norm_crops_lost": lost,
            "flagged": {f: sum(f in r["flags"] for r in index) for f in ("capped", "padded")}}
    info.pop("status")
    _write_shard(out, payload, index, quarantine)
    if quarantine:
        log.info("shard %d: %d clips stored, %d quarantined %s", k, len(index), len(quarantine), kinds)
    return info


# ----------------------------------------------------------------------------------------------------- finish
class IncompleteStoreError(RuntimeError):
    """``finish_store`` found shards without a valid commit marker."""


def finish_store(plan: ShardPlan) -> StoreReport:
    """Merge the committed shards into per-split indexes, the quarantine table and ``stats.json``; write
    ``_COMPLETE.json`` last; the store's report (normalisation statistics, counts).

    Idempotent. Once every shard is committed, the shard folder is swept of files no marker lists (see
    :func:`m2d2.shards.sweep`). Raises :class:`IncompleteStoreError` naming uncommitted shards, and ``ValueError``
    when the plan has a training split but no training clip could be decoded.
    """
    store = plan.store_uri
    shards = [plan.shard(k) for k in range(len(plan))]
    done = _read_json(io.join(store, COMPLETE_FILE))
    if done is not None and done.get("plan") == plan.fingerprint():
        report = StoreReport.from_stats(_read_json(io.join(store, STATS_FILE)) or {})
        markers = read_markers(shards, check_files=False)
    else:
        markers = read_markers(shards)
        missing = [k for k, m in enumerate(markers) if m is None]
        if missing:
            raise IncompleteStoreError(f"{len(missing)} of {len(plan)} shards of {store} are not committed "
                                       f"(e.g. {missing[:10]}); run build_shard(plan, k) for them")
        report = _finalize(store, [_entry(m) for m in markers], plan.split_sizes, plan.fingerprint(), plan.config,
                           {"manifest": plan.manifest_uri, "manifest_sha256": plan.manifest_sha256})
    if all(m is not None for m in markers):  # every shard committed: what no marker lists belongs to no one
        sweep(io.join(store, SHARD_DIR), list(zip(shards, markers, strict=True)))
    log.info("feature store %s: %d shards, clips %s, %d quarantined", store, len(plan), report.counts,
             report.quarantined)
    if NORM_SPLIT in plan.split_sizes and not report.counts.get(NORM_SPLIT):
        raise ValueError(f"no training clip could be decoded from {plan.manifest_uri} (see {QUARANTINE_FILE})")
    return report


def _entry(marker: dict[str, Any]) -> dict[str, Any]:
    """What finishing needs of a shard's marker: the job's record plus the sha256 and size of its ``.npy``."""
    npy = marker["files"]["npy"]
    return {**marker["info"], "sha256": npy["sha256"], "bytes": npy["bytes"]}


def _finalize(store: str, markers: list[dict[str, Any]], split_sizes: dict[str, int], fingerprint: str,
              config: FeatureConfig, provenance: dict[str, Any]) -> StoreReport:
    """Per-split indexes, quarantine table, ``stats.json``, then ``_COMPLETE.json`` from committed markers."""
    indexes: dict[str, list[pa.Table]] = {split: [] for split in split_sizes}
    quarantines = []
    for k in tqdm(range(len(markers)), desc="finalize store", unit="shard", leave=False):
        indexes[markers[k]["split"]].append(_read_parquet(shard_uri(store, k, "index.parquet")))
        quarantines.append(_read_parquet(shard_uri(store, k, "quarantine.parquet")))
    for split, tables in indexes.items():
        table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
        io.atomic_write_bytes(io.join(store, f"{split}.index.parquet"), parquet_bytes(table))
    quarantine = pa.concat_tables(quarantines) if quarantines else QUARANTINE_SCHEMA.empty_table()
    io.atomic_write_bytes(io.join(store, QUARANTINE_FILE), parquet_bytes(quarantine))
    moments = _Moments()
    for m in markers:
        if m["split"] == NORM_SPLIT:
            moments.merge(_Moments(**m["moments"]))
    stats = None
    if NORM_SPLIT in split_sizes:
        if moments.count == 0:
            raise ValueError(f"no training crop could be measured for the normalisation statistics of {store} "
                             f"({sum(m['clips'] for m in markers if m['split'] == NORM_SPLIT)} training clips stored)")
        stats = moments.norm_stats()
    by_kind: dict[str, int] = {}
    for m in markers:
        for kind, n in m["quarantine_kinds"].items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    counts = {split: sum(m["clips"] for m in markers if m["split"] == split) for split in split_sizes}
    meta = {"format": FORMAT, "norm_mean": stats.mean if stats else None, "norm_std": stats.std if stats else None,
            "norm_crops": sum(m["norm_crops"] for m in markers),
            "norm_crops_lost": sum(m["norm_crops_lost"] for m in markers), "counts": counts,
            "quarantined": quarantine.num_rows, "quarantined_by_kind": by_kind,
            "flagged": {f: sum(m["flagged"][f] for m in markers) for f in ("capped", "padded")},
            "audio_seconds": sum(m["audio_seconds"] for m in markers), "config": asdict(config), **provenance}
    io.atomic_write_bytes(io.join(store, STATS_FILE), json.dumps(meta, indent=2).encode())
    complete = {"format": FORMAT, "plan": fingerprint, "n_mels": markers[0]["n_mels"] if markers else 80,
                "dtype": "float16", "layout": "[frames, n_mels] per shard, clips back to back",
                "shards": [{"index": k, "split": m["split"], "file": f"{SHARD_DIR}/{shard_name(k)}.npy",
                            "sha256": m["sha256"], "bytes": m["bytes"], "frames": m["frames"], "clips": m["clips"]}
                           for k, m in enumerate(markers)]}
    io.atomic_write_bytes(io.join(store, COMPLETE_FILE), json.dumps(complete, indent=1).encode())
    if quarantine.num_rows:
        log.warning("%d clips quarantined (see %s): %s", quarantine.num_rows, io.join(store, QUARANTINE_FILE), by_kind)
    return StoreReport.from_stats(meta)


# ----------------------------------------------------------------------------------------------------- import
@dataclass(frozen=True)
class LogMelClip:
    """A log-mel computed elsewhere: raw (unnormalised) ``[n_mels, T]``; leading singleton axes (the
    reference's ``(1, 80, T)`` ``.npy`` files) are accepted."""

    clip_id: str
    lms: np.ndarray
    captions: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    source: str = "imported"


def import_logmels(store: str, splits: dict[str, Sequence[LogMelClip]], config: FeatureConfig | None = None,
                   progress: bool = True) -> StoreReport:
    """Write a complete store from ready log-mels, e.g. an existing one-``.npy``-per-clip dataset, without decoding
    audio again. Same files, commit markers and normalisation statistics as :func:`build_shard` +
    :func:`finish_store`; ``splits[split][i]`` may load lazily (only one clip is held at a time). A shard whose
    bytes are already committed (a re-run) is not written again."""
    cfg = config or FeatureConfig()
    budget = cfg.shard_mb * 2**20
    sizes = {split: len(clips) for split, clips in splits.items()}
    markers: list[dict[str, Any]] = []
    fingerprints: list[str] = []
    for split, clips in splits.items():
        spec_start = 0
        while spec_start < len(clips):
            k = len(fingerprints)
            payload, index, offset, n_mels = bytearray(), [], 0, None
            stop = spec_start
            while stop < len(clips) and (stop == spec_start or offset * (n_mels or 80) * 2 < budget):
                clip = clips[stop]
                lms = np.asarray(clip.lms).reshape(-1, np.asarray(clip.lms).shape[-1])
                if n_mels is None:
                    n_mels = lms.shape[0]
                elif lms.shape[0] != n_mels:
                    raise ValueError(f"clip {clip.clip_id!r} has {lms.shape[0]} mel bins, others {n_mels}")
                stored = np.ascontiguousarray(lms.T, dtype=np.float16)
                payload += stored.tobytes()
                index.append({"clip_id": clip.clip_id, "source": clip.source, "shard": k, "offset": offset,
                              "frames": stored.shape[0], "labels": list(clip.labels), "captions": list(clip.captions),
                              "flags": []})
                offset += stored.shape[0]
                stop += 1
            spec = ShardSpec(k, split, spec_start, stop, spec_start, stop - spec_start)
            allocation = _norm_allocation(cfg, sizes, spec)
            moments = _Moments()
            if allocation.any():
                for j in np.flatnonzero(allocation):
                    stored = np.frombuffer(bytes(payload[index[j]["offset"] * n_mels * 2:
                                                         (index[j]["offset"] + index[j]["frames"]) * n_mels * 2]),
                                           dtype=np.float16).reshape(-1, n_mels)
                    rng = crop_generator(cfg.seed, spec_start + int(j))
                    _crop_moments(stored, int(allocation[j]), cfg.norm_crop_frames, rng, moments)
            data = npy_header((offset, n_mels or 80)) + bytes(payload)
            info = {"index": k, "split": split, "clips": len(index), "quarantined": 0, "frames": offset,
                    "bytes": len(data), "audio_seconds": 0.0, "seconds": 0.0, "quarantine_kinds": {},
                    "format": FORMAT, "n_mels": n_mels or 80,
                    "moments": {"count": moments.count, "mean": moments.mean, "m2": moments.m2},
                    "norm_crops": int(allocation.sum()), "norm_crops_lost": 0, "flagged": {"capped": 0, "padded": 0}}
            # Identity of an imported shard: its bytes, its index rows and its share of the statistics.
            fingerprint = hashlib.sha256(json.dumps({
                "format": FORMAT, "import": hashlib.sha256(data).hexdigest(), "index": index, "info": info,
            }, sort_keys=True).encode()).hexdigest()

            def make(out: ShardWriter, data=data, index=index, info=info) -> dict[str, Any]:
                io.remove(io.join(store, COMPLETE_FILE))
                _write_shard(out, data, index, [])
                return info

            markers.append(build(Shard(io.join(store, SHARD_DIR), shard_name(k), fingerprint), make).marker)
            fingerprints.append(fingerprint)
            spec_start = stop
            if progress:
                log.info("imported shard %d (%s): %d clips", k, split, len(index))
    fingerprint = hashlib.sha256("".join(fingerprints).encode()).hexdigest()
    return _finalize(store, [_entry(m) for m in markers], sizes, fingerprint, cfg, {"imported": True})
