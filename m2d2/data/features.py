"""Log-mel feature store: one memory-mapped float16 array per split plus a Parquet index.

Replaces the reference's one-``.npy``-per-clip layout: a split is ``<split>.lms.npy`` of shape
``[n_mels, total_frames]`` (clips concatenated along time) and ``<split>.index.parquet`` with each clip's
offset, length, labels and captions. Readers memory-map the array, so many DataLoader workers share one
page cache instead of each opening thousands of files. Clips that fail to decode are listed in
``quarantine.parquet`` with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from m2d2.audio import AudioDecodeError, LogMelSpectrogram, NormStats, compute_norm_stats, load_audio
from m2d2.io import atomic_write_bytes

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
QUARANTINE_FILE = "quarantine.parquet"
INDEX_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("offset", pa.int64()),
        ("frames", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("clip_id", pa.string()), ("audio_uri", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class FeatureConfig:
    """How features are made; stored next to them so a reader knows what it got."""

    sample_rate: int = 16000
    min_seconds: float = 0.0  # zero-pad shorter waveforms (the reference pads to 6.1 s); 0 keeps them as they are
    max_seconds: float = 30.0  # truncate longer waveforms, as the reference's pre-processing does
    norm_crop_frames: int = 608  # crop length of the normalisation statistics (the training crop)
    norm_samples: int = 5000
    seed: int = 0


def _write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def _extract_split(rows: list[dict], corpus_root: Path, out_dir: Path, split: str, cfg: FeatureConfig,
                   frontend: LogMelSpectrogram) -> tuple[int, list[dict]]:
    """Decode and transform one split into its store; returns (clips stored, quarantine rows)."""
    mels, index, quarantine, offset = [], [], [], 0
    for row in tqdm(rows, desc=f"log-mel {split}", unit="clip", leave=False):
        uri = row["audio_uri"]
        path = Path(uri) if os.path.isabs(uri) else corpus_root / uri
        try:
            wave = load_audio(path, cfg.sample_rate)
        except (AudioDecodeError, FileNotFoundError) as exc:
            quarantine.append({"clip_id": row["clip_id"], "audio_uri": uri, "reason": str(exc)})
            continue
        wave = wave[: int(cfg.max_seconds * cfg.sample_rate)]
        min_len = max(int(cfg.min_seconds * cfg.sample_rate), frontend.config.min_samples)
        if wave.numel() < min_len:
            wave = torch.nn.functional.pad(wave, (0, min_len - wave.numel()))
        with torch.inference_mode():
            lms = frontend(wave).numpy()
        mels.append(lms.astype(np.float16))
        index.append({"clip_id": row["clip_id"], "source": row.get("source") or "", "offset": offset,
                      "frames": lms.shape[-1],
                      "labels": list(row.get("labels") or []), "captions": list(row.get("captions") or [])})
        offset += lms.shape[-1]
    n_mels = frontend.config.n_mels
    tmp = out_dir / f".{split}.lms.npy.tmp"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_mels, offset))
    for row, lms in zip(index, mels, strict=True):
        array[:, row["offset"] : row["offset"] + row["frames"]] = lms
    array.flush()
    del array
    os.replace(tmp, out_dir / f"{split}.lms.npy")
    _write_parquet(pa.Table.from_pylist(index, schema=INDEX_SCHEMA), out_dir / f"{split}.index.parquet")
    return len(index), quarantine


def extract_features(
    manifest: str | Path,
    corpus_root: str | Path,
    out_dir: str | Path,
    config: FeatureConfig | None = None,
    splits: Sequence[str] = ("train", "eval"),
) -> NormStats:
    """Log-mel of every clip of ``manifest`` (through :mod:`m2d2.audio`) + normalisation stats of training crops.

    The stats are written to ``stats.json`` and returned; the training split must be present.
    """
    cfg = config or FeatureConfig()
    out_dir, corpus_root = Path(out_dir), Path(corpus_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(manifest)
    frontend = LogMelSpectrogram()
    counts, quarantine = {}, []
    for split in splits:
        rows = [r for r in table.to_pylist() if r["split"] == split]
        counts[split], bad = _extract_split(rows, corpus_root, out_dir, split, cfg, frontend)
        quarantine += bad
    _write_parquet(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), out_dir / QUARANTINE_FILE)
    if quarantine:
        log.warning("%d clips quarantined (see %s)", len(quarantine), out_dir / QUARANTINE_FILE)
    train = LogMelStore(out_dir, "train")
    if len(train) == 0:
        raise ValueError(f"no training clip could be decoded from {manifest}")
    stats = compute_norm_stats(train, cfg.norm_crop_frames, cfg.norm_samples, cfg.seed)
    meta = {"norm_mean": stats.mean, "norm_std": stats.std, "counts": counts, "quarantined": len(quarantine),
            "config": asdict(cfg)}
    atomic_write_bytes(out_dir / STATS_FILE, json.dumps(meta, indent=2).encode())
    return stats


def load_norm_stats(feature_dir: str | Path) -> NormStats:
    meta = json.loads((Path(feature_dir) / STATS_FILE).read_text())
    return NormStats(meta["norm_mean"], meta["norm_std"])


class LogMelStore(Sequence):
    """Read-only view of one split: ``store[i]`` is clip ``i``'s raw log-mel ``[n_mels, T]`` as float32."""

    def __init__(self, feature_dir: str | Path, split: str):
        feature_dir = Path(feature_dir)
        index_path = feature_dir / f"{split}.index.parquet"
        if not index_path.exists():
            raise FileNotFoundError(f"no '{split}' split in feature store {feature_dir}")
        index = pq.read_table(index_path).to_pydict()
        self.split = split
        self.clip_ids: list[str] = index["clip_id"]
        self.sources: list[str] = index.get("source") or [""] * len(self.clip_ids)
        self.labels: list[list[str]] = index["labels"]
        self.captions: list[list[str]] = index["captions"]
        self._offsets = np.asarray(index["offset"], dtype=np.int64)
        self._frames = np.asarray(index["frames"], dtype=np.int64)
        self._array = np.load(feature_dir / f"{split}.lms.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.clip_ids)

    def frames(self, i: int) -> int:
        return int(self._frames[i])

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"clip {i} out of range for {len(self)} clips")
        start = int(self._offsets[i])
        return np.asarray(self._array[:, start : start + int(self._frames[i])], dtype=np.float32)

    def crop(self, i: int, start: int, frames: int) -> np.ndarray:
        """``frames`` frames from ``start``; past the clip's end it is right-padded with 0 (raw log domain)."""
        n = self.frames(i)
        begin = int(self._offsets[i]) + start
        take = max(0, min(frames, n - start))
        out = np.zeros((self._array.shape[0], frames), dtype=np.float32)
        out[:, :take] = self._array[:, begin : begin + take]
        return out
