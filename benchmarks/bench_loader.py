"""Data-loading throughput: the sharded log-mel store vs the reference layout (one float32 .npy per clip).

Both layouts are measured in this one run, with float32 crops out:

1. From ``s3://`` (a moto S3 server on loopback, started here): one epoch over N clips in random order from a
   cold start. Reference layout: GET the clip's ``(1, 80, 1001)`` float32 ``.npy``, load it, crop 608 frames.
   Shard store: fetch the shards (into the local cache), then crop from the memory maps. Same fetch concurrency.
2. From local disk, warm cache, one process with one torch thread: training crops/s per core through
   ``CropDataset`` (608 and 1001 frames), vs ``np.load`` + crop of per-clip files.
3. Ingestion: decode + resample + log-mel + shard write of generated 10-s clips (16 kHz WAV and 44.1 kHz stereo
   FLAC), one thread, as x real time per core.

    python benchmarks/bench_loader.py [--quick] [--clips 2000] [--concurrency 8] [--shard-mb 64]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from m2d2.data.features import LogMelStore, extract_features
from m2d2.data.loader import CropDataset
from m2d2.data.manifest import manifest_table, write_manifest
from m2d2.data.shards import FeatureConfig, LogMelClip, import_logmels

CROP = 608
FRAMES = 1001
BUCKET = "m2d2-bench"


class SyntheticClips(Sequence):
    """N distinct raw log-mels [80, 1001] float32, made on demand (N x 320 KB never sits in memory at once)."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n = n
        self.bases = [rng.normal(-7.0, 4.0, (80, FRAMES)).astype(np.float32) for _ in range(8)]

    def __len__(self) -> int:
        return self.n

    def lms(self, i: int) -> np.ndarray:
        return np.roll(self.bases[i % 8], i, axis=1) + np.float32(i * 1e-3)

    def __getitem__(self, i: int) -> LogMelClip:  # type: ignore[override]
        return LogMelClip(f"clip-{i:05d}", self.lms(i), (f"caption {i}",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in its own process (so it does not share this process's GIL), on a free loopback port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint)
    import fsspec

    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
    fsspec.filesystem("s3").mkdir(BUCKET)
    return proc, endpoint


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _reference_crop(data: bytes, start: int) -> torch.Tensor:
    lms = np.load(io.BytesIO(data))  # (1, 80, 1001) float32, as wav_to_lms.py writes
    return torch.from_numpy(np.ascontiguousarray(lms[0, :, start : start + CROP]))


def _starts(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, FRAMES - CROP + 1, n)


def bench_s3(clips: SyntheticClips, concurrency: int, shard_mb: float, tmp: Path) -> dict[str, float]:
    import fsspec

    fs = fsspec.filesystem("s3")
    n = len(clips)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: fs.pipe_file(f"{BUCKET}/reference/{i:05d}.npy", _npy_bytes(clips.lms(i)[None])),
                      range(n)))
    upload_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    import_logmels(f"s3://{BUCKET}/shards", {"train": clips}, FeatureConfig(norm_samples=500, shard_mb=shard_mb),
                   progress=False)
    upload_shards = time.perf_counter() - t0
    order = np.random.default_rng(1).permutation(n)
    starts = _starts(n, 2)

    def reference(i: int) -> torch.Tensor:
        return _reference_crop(fs.cat_file(f"{BUCKET}/reference/{order[i]:05d}.npy"), int(starts[i]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        ref_crops = list(pool.map(reference, range(n)))
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = LogMelStore(f"s3://{BUCKET}/shards", "train", cache_dir=tmp / "cache", prefetch=False)
    store.prefetch(concurrency=concurrency, progress=False)
    fetched = time.perf_counter() - t0
    shard_crops = [store.crop_tensor(int(order[i]), int(starts[i]), CROP) for i in range(n)]
    shard_s = time.perf_counter() - t0
    worst = max(float((a - b).abs().max()) for a, b in zip(ref_crops, shard_crops, strict=True))
    t0 = time.perf_counter()
    for i in range(n):
        store.crop_tensor(int(order[i]), int(starts[i]), CROP)
    warm_s = time.perf_counter() - t0
    return {"upload_ref_s": upload_ref, "upload_shards_s": upload_shards, "ref_s": ref_s, "shard_s": shard_s,
            "fetch_s": fetched, "warm_s": warm_s, "max_abs_diff": worst,
            "shard_bytes": sum(m["bytes"] for m in store._shards.values())}


def bench_local(clips: SyntheticClips, tmp: Path, shard_mb: float) -> dict[str, float]:
    n = len(clips)
    import_logmels(str(tmp / "local"), {"train": clips}, FeatureConfig(norm_samples=500, shard_mb=shard_mb),
                   progress=False)
    ref_dir = tmp / "reference"
    ref_dir.mkdir()
    for i in range(n):
        np.save(ref_dir / f"{i:05d}.npy", clips.lms(i)[None])
    store = LogMelStore(tmp / "local", "train")
    out = {}
    for crop in (CROP, FRAMES):
        data = CropDataset(store, crop, seed=0)
        for i in range(min(n, 500)):  # warm the page cache and the maps
            data[i]
        t0 = time.perf_counter()
        for i in range(n):
            data[i]
        out[f"store_{crop}"] = n / (time.perf_counter() - t0)
    starts = _starts(n, 3)
    for i in range(min(n, 500)):
        np.load(ref_dir / f"{i:05d}.npy")
    t0 = time.perf_counter()
    for i in range(n):
        lms = np.load(ref_dir / f"{i:05d}.npy")
        torch.from_numpy(np.ascontiguousarray(lms[0, :, starts[i] : starts[i] + CROP]))
    out["reference_608"] = n / (time.perf_counter() - t0)
    return out


def bench_ingest(tmp: Path, clips: int) -> dict[str, float]:
    root = tmp / "audio"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        sr, channels, fmt = (16000, 1, "wav") if i % 2 == 0 else (44100, 2, "flac")
        t = np.arange(10 * sr) / sr
        wave = 0.2 * np.sin(2 * np.pi * (200 + 40 * i) * t)[:, None] + 0.02 * rng.standard_normal((t.size, channels))
        sf.write(root / f"{i}.{fmt}", wave, sr)
        rows.append({"clip_id": f"c{i}", "source": "bench", "audio_uri": f"{i}.{fmt}", "split": "train",
                     "captions": ["a tone"], "labels": []})
    write_manifest(manifest_table(rows), str(root / "manifest.parquet"))
    t0 = time.perf_counter()
    extract_features(root / "manifest.parquet", root, tmp / "ingested", FeatureConfig(norm_samples=200),
                     splits=("train",), progress=False)
    wall = time.perf_counter() - t0
    stored = len(LogMelStore(tmp / "ingested", "train"))
    if stored != clips:
        raise RuntimeError(f"ingestion stored {stored} of {clips} clips")
    return {"audio_s": 10.0 * clips, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 clips, fewer ingestion clips (< 1 minute)")
    parser.add_argument("--clips", type=int, default=None, help="clips per layout (default 2000; 400 with --quick)")
    parser.add_argument("--concurrency", type=int, default=8, help="parallel GETs, the same for both layouts")
    parser.add_argument("--shard-mb", type=float, default=64.0)
    args = parser.parse_args()
    n = args.clips or (400 if args.quick else 2000)
    torch.set_num_threads(1)
    clips = SyntheticClips(n)
    started = time.perf_counter()
    proc, endpoint = start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            s3 = bench_s3(clips, args.concurrency, args.shard_mb, tmp)
            local = bench_local(clips, tmp, args.shard_mb)
            ingest = bench_ingest(tmp, 6 if args.quick else 20)
    finally:
        proc.terminate()
        proc.wait()
    ref_rate, shard_rate = n / s3["ref_s"], n / s3["shard_s"]
    print(f"clips: {n} x float32 80x{FRAMES} log-mel, crops of {CROP} frames, float32 out; torch threads 1; "
          f"cores visible: {os.cpu_count()}")
    print(f"\n[s3:// moto server at {endpoint}, {args.concurrency} concurrent GETs, cold start, one epoch]")
    print(f"  upload: reference {n} objects {s3['upload_ref_s']:.1f} s | shard store "
          f"{s3['shard_bytes'] / 2**20:.0f} MB float16 in {args.shard_mb:.0f}-MB shards {s3['upload_shards_s']:.1f} s")
    print(f"  reference layout (GET one .npy per clip): {ref_rate:8.0f} crops/s  ({s3['ref_s']:.1f} s)")
    print(f"  shard store (fetch shards, then crop):    {shard_rate:8.0f} crops/s  ({s3['shard_s']:.1f} s, of which "
          f"fetch {s3['fetch_s']:.1f} s)")
    print(f"  ratio shard / reference, first epoch:     {shard_rate / ref_rate:8.1f}x")
    print(f"  later epochs (shards cached):            {n / s3['warm_s']:8.0f} crops/s, "
          f"{n / s3['warm_s'] / ref_rate:.0f}x the reference (which fetches again every epoch)")
    print(f"  max |crop difference| (float16 storage): {s3['max_abs_diff']:.2e}")
    print("\n[local disk, warm page cache, one process, one thread = per core]")
    print(f"  shard store, CropDataset {CROP} frames:    {local['store_608']:8.0f} crops/s per core")
    print(f"  shard store, CropDataset {FRAMES} frames:   {local['store_1001']:8.0f} crops/s per core")
    print(f"  reference layout, np.load + crop {CROP}:   {local['reference_608']:8.0f} crops/s per core")
    print(f"  ratio shard / reference ({CROP}):           {local['store_608'] / local['reference_608']:8.1f}x")
    print("\n[ingestion: decode + resample + log-mel + shard write, one thread]")
    print(f"  {ingest['audio_s']:.0f} s of audio (half 16 kHz WAV, half 44.1 kHz stereo FLAC) in {ingest['wall_s']:.1f} s:"
          f" {ingest['audio_s'] / ingest['wall_s']:.0f}x real time per core")
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
