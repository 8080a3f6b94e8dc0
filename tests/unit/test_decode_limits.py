"""Bounded decoding: file-size, channel and sample limits, block-wise downmix and resampling.

The crafted FLAC is the reviewed attack: ~100 KB that declare 50 s of 8-channel 192 kHz audio. The peak memory
block-wise decoding buys is measured in a child process, in tests/integration/test_decode_limits.py.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

import m2d2.audio.decode as decode_module
from m2d2 import io as storage
from m2d2.audio import (
    DECODE_ISSUES,
    AudioDecodeError,
    decode_audio,
    downmix,
    load_audio,
    read_audio_file,
    resample,
)
from m2d2.data.features import LogMelStore, extract_features
from m2d2.data.manifest import manifest_table, probe_manifest, write_manifest
from m2d2.data.shards import FeatureConfig

SR = 16000
MIB = 2**20


# ------------------------------------------------------------------------------------------------ crafted files
def write_big_files(root: Path) -> Path:
    """The crafted FLAC (8 ch, 192 kHz, 50 s of a per-channel DC level: ~100 KB) and a 5-minute 48 kHz stereo
    WAV (58 MB), each with a tiny warm-up file of the same format, written into ``root``."""
    levels = (0.25 * (1 - 0.1 * np.arange(8))).astype(np.float32)
    with sf.SoundFile(root / "crafted.flac", "w", 192000, 8, format="FLAC", subtype="PCM_24") as handle:
        second = np.broadcast_to(levels, (192000, 8))
        for _ in range(50):
            handle.write(second)
    sf.write(root / "crafted.warm.flac", np.broadcast_to(levels, (4000, 8)), 192000, subtype="PCM_24")
    t = np.arange(48000) / 48000
    with sf.SoundFile(root / "long.wav", "w", 48000, 2, subtype="PCM_16") as handle:
        for s in range(300):
            handle.write(np.stack([0.3 * np.sin(2 * np.pi * 440 * (t + s)), 0.2 * np.sin(2 * np.pi * 660 * (t + s))], 1))
    sf.write(root / "long.warm.wav", np.full((4800, 2), 0.1), 48000, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> Path:
    return write_big_files(tmp_path_factory.mktemp("big"))


def test_crafted_flac_is_the_reviewed_attack(big_files):
    size = (big_files / "crafted.flac").stat().st_size
    info = sf.info(big_files / "crafted.flac")
    assert size < 120_000 and (info.channels, info.samplerate, info.frames) == (8, 192000, 50 * 192000)
    assert info.frames * info.channels * 4 > 290 * MIB  # what holding it as float32 once would cost


# ------------------------------------------------------------------------------------------------ refusals
def _wav(path: Path, channels: int, seconds: float, sr: int = SR, fmt: str = "WAV") -> Path:
    t = np.arange(int(seconds * sr)) / sr
    data = np.stack([0.3 * np.sin(2 * np.pi * (200 + 50 * c) * t) for c in range(channels)], axis=1)
    sf.write(path, data, sr, format=fmt)
    return path


def test_new_issue_kinds_are_quarantine_reasons():
    assert {"too_large", "too_many_channels"} <= set(DECODE_ISSUES)


def test_more_channels_than_the_limit_are_refused(tmp_path):
    path = _wav(tmp_path / "nine.wav", 9, 0.3)
    with pytest.raises(AudioDecodeError, match=r"nine\.wav has 9 channels.*limit of 8.*max_channels") as err:
        decode_audio(path)
    assert err.value.kind == "too_many_channels"
    with pytest.raises(AudioDecodeError, match="limit of 4"):
        decode_audio(path, max_channels=4)
    assert decode_audio(path, max_channels=9).channels == 9
    assert decode_audio(path, max_channels=None).wave.shape == (int(0.3 * SR),)
    assert decode_audio(_wav(tmp_path / "eight.wav", 8, 0.3)).channels == 8  # the default admits 7.1


def test_files_over_the_size_limit_are_refused_before_reading(tmp_path, monkeypatch):
    path = _wav(tmp_path / "big.wav", 1, 2.0)  # 64 KB
    size = path.stat().st_size
    limit_mb = (size - 1) / MIB
    for source in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        with pytest.raises(AudioDecodeError, match=r"over the file size limit of .* MiB \(setting max_file_mb\)") as err:
            decode_audio(source, max_file_mb=limit_mb, name="big.wav")
        assert err.value.kind == "too_large" and "big.wav" in str(err.value)
    assert decode_audio(path, max_file_mb=size / MIB).wave.numel() == 2 * SR

    opened = []
    real_open = storage.open_binary
    monkeypatch.setattr(storage, "open_binary", lambda uri: opened.append(uri) or real_open(uri))
    with pytest.raises(AudioDecodeError, match="max_file_mb") as err:
        read_audio_file(path, max_file_mb=limit_mb)
    assert err.value.kind == "too_large" and opened == []  # refused from its size: not one byte read
    data, digest = read_audio_file(path, max_file_mb=size / MIB)
    assert opened == [path] and data == path.read_bytes() and digest == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError):
        read_audio_file(tmp_path / "missing.wav")


def test_bounded_readers_stop_at_the_limit(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    data, digest = storage.read_limited(path, 256_000)
    assert digest == hashlib.sha256(data).hexdigest() and len(data) == 256_000
    assert storage.sha256_limited(path, None, block_size=1000) == (digest, 256_000)
    for reader in (storage.read_limited, storage.sha256_limited):
        with pytest.raises(storage.FileTooLargeError) as err:
            reader(path, 255_999)
        assert (err.value.size, err.value.limit) == (256_000, 255_999)


def test_sample_budget_counts_frames_times_channels_of_the_kept_part(tmp_path):
    path = _wav(tmp_path / "stereo.wav", 2, 1.0)  # 16000 frames x 2 channels
    assert decode_audio(path, max_samples=32000).wave.numel() == SR
    with pytest.raises(AudioDecodeError, match=r"32,000 samples \(16,000 frames x 2 channels\).*budget of 31,999 "
                                               r"\(setting max_samples\); lower max_seconds") as err:
        decode_audio(path, max_samples=31999)
    assert err.value.kind == "too_large" and "stereo.wav" in str(err.value)
    capped = decode_audio(path, max_seconds=0.5, max_samples=16000)  # only the kept half counts
    assert capped.capped and capped.wave.numel() == SR // 2
    with pytest.raises(AudioDecodeError, match="first max_seconds would decode 16,004 samples"):
        decode_audio(path, max_seconds=0.5001, max_samples=16000)
    with pytest.raises(AudioDecodeError, match="max_samples"):
        load_audio(path, max_samples=100)


def test_default_budget_refuses_the_crafted_file_uncapped_only_when_it_is_over(tmp_path):
    """With the defaults the 8-channel 192 kHz file decodes (50 s = 76.8 M samples < 2**28); one declaring 3 min
    is refused from its header before any sample is decoded, and is accepted once capped."""
    path = tmp_path / "long8.flac"
    with sf.SoundFile(path, "w", 192000, 8, format="FLAC", subtype="PCM_16") as handle:
        block = np.full((192000 * 10, 8), 3277, dtype=np.int16)  # int16: no float conversion, twice as fast
        for _ in range(18):
            handle.write(block)
    assert path.stat().st_size < 500_000
    with pytest.raises(AudioDecodeError, match="whole file would decode 276,480,000 samples") as err:
        decode_audio(path)
    assert err.value.kind == "too_large"
    short = decode_audio(path, max_seconds=1.0)
    assert short.capped and short.wave.numel() == SR and short.peak == pytest.approx(0.1, abs=1e-4)


# ------------------------------------------------------------------------------------------------ block-wise decoding
def test_blockwise_downmix_equals_one_whole_downmix_bit_for_bit(tmp_path, monkeypatch):
    """5 channels over several blocks (and a last partial one), at the file rate and resampled."""
    monkeypatch.setattr(decode_module, "BLOCK_SAMPLES", 5 * 4096)
    rng = np.random.default_rng(3)
    for sr in (SR, 44100):
        data = (rng.standard_normal((3 * 4096 * 5 + 777, 5)) * 0.2).astype(np.float32)
        path = tmp_path / f"five_{sr}.wav"
        sf.write(path, data, sr, subtype="FLOAT")
        whole = downmix(torch.from_numpy(np.ascontiguousarray(data.T)))
        decoded = decode_audio(path)
        assert torch.equal(decoded.wave, resample(whole, sr, SR).contiguous())
        assert decoded.peak == float(np.abs(data).max())


def test_peak_and_non_finite_samples_are_found_in_any_block_and_channel(tmp_path, monkeypatch):
    monkeypatch.setattr(decode_module, "BLOCK_SAMPLES", 3 * 1024)
    data = np.full((10 * 1024, 3), 0.1, dtype=np.float32)
    data[9 * 1024 + 5, 2] = -0.75  # last block, last channel, opposite to the others
    path = tmp_path / "peak.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    decoded = decode_audio(path)
    assert decoded.peak == 0.75
    assert float(decoded.wave[9 * 1024 + 5]) == pytest.approx((0.1 + 0.1 - 0.75) / 3, abs=1e-7)
    data[100, 0] = np.nan
    data[8 * 1024, 1] = np.inf
    data[8 * 1024 + 1, 2] = -np.inf
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match=r"NaN or infinite samples \(3 of 30720\)") as err:
        decode_audio(path)
    assert err.value.kind == "non_finite"


# ------------------------------------------------------------------------------------------------ ingestion
def test_ingestion_quarantines_files_over_a_limit_and_keeps_going(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    files = {
        "good": _wav(audio / "good.wav", 1, 1.0),  # 32 KB, 16000 samples
        "big_file": _wav(audio / "big_file.wav", 1, 3.0),  # 96 KB > max_file_mb
        "many_samples": _wav(audio / "many_samples.flac", 4, 1.0, fmt="FLAC"),  # 64000 samples > max_samples
        "nine_channels": _wav(audio / "nine_channels.wav", 9, 0.1),  # FLAC stops at 8 channels
    }
    assert files["big_file"].stat().st_size > 0.05 * MIB > max(files[k].stat().st_size for k in files if k != "big_file")
    rows = [{"clip_id": clip, "source": "fixture", "audio_uri": f"audio/{path.name}", "split": "train",
             "captions": [f"a tone called {clip}"], "labels": ["tone"]} for clip, path in files.items()]
    table = probe_manifest(manifest_table(rows), str(tmp_path), progress=False, max_file_mb=0.05)
    probed = {r["clip_id"]: r for r in table.to_pylist()}
    assert probed["big_file"]["content_hash"] is None and probed["big_file"]["duration_s"] is None  # not read
    assert probed["nine_channels"]["channels"] == 9 and probed["good"]["content_hash"] is not None
    write_manifest(table, str(tmp_path / "manifest.parquet"))
    cfg = FeatureConfig(max_seconds=2.0, norm_crop_frames=64, norm_samples=20, max_file_mb=0.05, max_samples=40000)
    out = tmp_path / "features"
    extract_features(tmp_path / "manifest.parquet", tmp_path, out, cfg, progress=False)
    quarantine = {q["clip_id"]: q for q in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert {c: q["kind"] for c, q in quarantine.items()} == {
        "big_file": "too_large", "many_samples": "too_large", "nine_channels": "too_many_channels"}
    assert "max_file_mb" in quarantine["big_file"]["reason"] and "big_file.wav" in quarantine["big_file"]["reason"]
    assert "max_samples" in quarantine["many_samples"]["reason"]
    assert "max_channels" in quarantine["nine_channels"]["reason"]
    assert LogMelStore(out, "train").clip_ids == ["good"]
    assert json.loads((out / "stats.json").read_text())["config"]["max_channels"] == 8
