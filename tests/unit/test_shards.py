"""Sharded log-mel store: every bad-input class lands in quarantine, shards are independent and idempotent (the
s3:// path, on a moto server, is in tests/integration/test_shards.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from m2d2 import shards as shards_module
from m2d2.audio import LogMelSpectrogram, load_audio
from m2d2.data.features import LogMelStore, extract_features, load_norm_stats, store_report
from m2d2.data.manifest import manifest_table, write_manifest
from m2d2.data.shards import (
    FeatureConfig,
    IncompleteStoreError,
    LogMelClip,
    build_shard,
    finish_store,
    import_logmels,
    plan_store,
    read_plan,
    shard_uri,
)
from m2d2.shards import ShardCorruptError

SR = 16000
CFG = FeatureConfig(max_seconds=2.0, norm_crop_frames=64, norm_samples=200, shard_mb=0.05)


def _tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = amp * np.sin(2 * np.pi * freq * t) * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))
    return np.stack([wave * (1 - 0.3 * c) for c in range(channels)], axis=1) if channels > 1 else wave


def _encoded(data: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


#: clip -> (file name, file bytes or None for "do not create", expected quarantine kind or None for "stored")
def _bad_inputs() -> dict[str, tuple[str, bytes | None, str | None]]:
    nan = _tone(0.5, SR).astype(np.float32)
    nan[100] = np.nan
    inf = _tone(0.5, SR).astype(np.float32)
    inf[7] = np.inf
    truncated = {fmt: _encoded(_tone(1.0, SR), SR, fmt, sub) for fmt, sub in
                 (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("MP3", "MPEG_LAYER_III"))}
    noise = np.random.default_rng(0).standard_normal(int(4.0 * SR)) * 0.05
    return {
        "good": ("good.wav", _encoded(_tone(1.0, SR), SR, "WAV"), None),
        "stereo_44k": ("stereo_44k.flac", _encoded(_tone(0.8, 44100, channels=2), 44100, "FLAC"), None),
        "odd_rate": ("odd_rate.wav", _encoded(_tone(0.5, 44099, 300.0), 44099, "WAV"), None),
        "narrowband": ("narrowband.wav", _encoded(_tone(0.6, 8000, 500.0), 8000, "WAV"), None),
        "mp3": ("clip.mp3", _encoded(_tone(1.0, SR, 600.0), SR, "MP3", "MPEG_LAYER_III"), None),
        "long": ("long.wav", _encoded(noise, SR, "WAV"), None),  # 4 s, capped at max_seconds = 2
        "corrupt": ("corrupt.wav", np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                    "corrupt"),
        "empty": ("empty.wav", b"", "empty"),
        "no_frames": ("no_frames.wav", _encoded(np.zeros((0, 1)), SR, "WAV"), "empty"),
        "truncated_wav": ("truncated.wav", truncated["WAV"][: len(truncated["WAV"]) // 2], "truncated"),
        "truncated_flac": ("truncated.flac", truncated["FLAC"][: len(truncated["FLAC"]) // 2], "truncated"),
        "truncated_mp3": ("truncated.mp3", truncated["MP3"][: len(truncated["MP3"]) // 2], "truncated"),
        "nan": ("nan.wav", _encoded(nan, SR, "WAV", "FLOAT"), "non_finite"),
        "inf": ("inf.wav", _encoded(inf, SR, "WAV", "FLOAT"), "non_finite"),
        "silent": ("silent.wav", _encoded(np.zeros(SR), SR, "WAV"), "silent"),
        "bad_rate": ("bad_rate.wav", _encoded(_tone(0.5, 1000, 100.0), 1000, "WAV"), "bad_sample_rate"),
        "m4a": ("song.m4a", b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(2000), "unsupported_format"),
        "missing": ("missing.wav", None, "missing"),
        "changed": ("changed.wav", _encoded(_tone(0.7, SR, 900.0), SR, "WAV"), "hash_mismatch"),
    }


def _corpus(root: Path, extra_eval: int = 2) -> Path:
    """Every bad-input class in the training split, plus a few clean eval clips; returns the manifest path."""
    rows = []
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for clip, (name, data, _) in _bad_inputs().items():
        if data is not None:
            (root / "audio" / name).write_bytes(data)
        rows.append({"clip_id": clip, "source": "fixture", "audio_uri": f"audio/{name}", "split": "train",
                     "captions": [f"a recording called {clip}"], "labels": ["tone"],
                     "content_hash": "0" * 64 if clip == "changed" else None})
    for i in range(extra_eval):
        (root / "audio" / f"eval{i}.wav").write_bytes(_encoded(_tone(0.9, SR, 350.0 + 100 * i), SR, "WAV"))
        rows.append({"clip_id": f"eval{i}", "source": "fixture", "audio_uri": f"audio/eval{i}.wav", "split": "eval",
                     "captions": ["an eval tone"], "labels": ["tone"]})
    write_manifest(manifest_table(rows), str(root / "manifest.parquet"))
    return root / "manifest.parquet"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_store(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "features"
    stats = extract_features(corpus, corpus.parent, out, CFG, progress=False)
    return out, stats


def test_every_bad_input_class_is_quarantined_with_its_reason_and_the_run_goes_on(local_store):
    out, stats = local_store
    expected = {clip: kind for clip, (_, _, kind) in _bad_inputs().items()}
    quarantine = {q["clip_id"]: q for q in pq.read_table(out / "quarantine.parquet").to_pylist()}
    assert {c: q["kind"] for c, q in quarantine.items()} == {c: k for c, k in expected.items() if k}
    for clip, row in quarantine.items():
        name = _bad_inputs()[clip][0]
        assert name in row["reason"] and row["audio_uri"] == f"audio/{name}", row
    train = LogMelStore(out, "train")
    assert sorted(train.clip_ids) == sorted(c for c, k in expected.items() if k is None)  # nothing else lost
    report = store_report(out)
    assert report.counts == {"train": 6, "eval": 2} and report.quarantined == len(quarantine)
    assert report.quarantined_by_kind["truncated"] == 3 and report.flagged == {"capped": 1, "padded": 0}
    metrics = report.metrics()
    assert metrics["quarantined_silent"] == 1 and metrics["clips_train"] == 6 and metrics["norm_std"] == stats.std
    long = train.clip_ids.index("long")
    assert train.frames(long) == 201 and train.flags[long] == ["capped"]  # the 2 s cap, decoded no further
    assert load_norm_stats(out) == stats


def test_stored_log_mels_match_the_front_end_within_float16(local_store, corpus):
    out, _ = local_store
    store = LogMelStore(out, "train")
    frontend = LogMelSpectrogram()
    for clip, name in (("good", "good.wav"), ("stereo_44k", "stereo_44k.flac"), ("odd_rate", "odd_rate.wav")):
        i = store.clip_ids.index(clip)
        expected = frontend(load_audio(corpus.parent / "audio" / name)).numpy()
        assert store[i].shape == expected.shape == (80, store.frames(i))
        assert np.abs(store[i] - expected).max() < 8e-3
        crop = store.crop(i, 5, 40)
        assert crop.dtype == np.float32 and np.array_equal(crop, store[i][:, 5:45])
    i = store.clip_ids.index("good")
    padded = store.crop(i, store.frames(i) - 3, 10, pad_value=-15.9)
    assert np.array_equal(padded[:, :3], store[i][:, -3:]) and np.all(padded[:, 3:] == np.float32(-15.9))


def test_shards_are_independent_idempotent_and_sharding_does_not_change_the_result(corpus, local_store, tmp_path):
    out, stats = local_store
    plan = plan_store(str(corpus), str(tmp_path / "s"), str(corpus.parent), CFG, ("train", "eval"))
    assert len(plan) >= 4 and {s.split for s in plan.shards} == {"train", "eval"}
    assert plan == type(plan).from_json(plan.to_json()) == read_plan(plan.uri)
    for k in reversed(range(len(plan))):  # any order, as map tasks finish
        assert build_shard(plan, k, progress=False).status == "built"
    report = finish_store(plan)
    assert [build_shard(plan, k, progress=False).status for k in range(len(plan))] == ["skipped"] * len(plan)
    # A crash that lost shard 2's marker: only shard 2 is redone, to identical bytes.
    npy = Path(shard_uri(str(tmp_path / "s"), 2, "npy"))
    before = hashlib.sha256(npy.read_bytes()).hexdigest()
    Path(shard_uri(str(tmp_path / "s"), 2, "done.json")).unlink()
    assert [build_shard(plan, k, progress=False).status for k in range(len(plan))].count("built") == 1
    assert hashlib.sha256(npy.read_bytes()).hexdigest() == before
    assert finish_store(plan).counts == report.counts
    # One big shard per split (extract_features above used many small ones): same clips, same statistics.
    single = plan_store(str(corpus), str(tmp_path / "one"), str(corpus.parent),
                         FeatureConfig(**{**CFG.__dict__, "shard_mb": 256.0}), ("train", "eval"))
    assert len(single) == 2
    for k in range(len(single)):
        build_shard(single, k, progress=False)
    one = finish_store(single)
    assert one.norm_stats.mean == pytest.approx(stats.mean, rel=1e-12) and one.norm_crops == report.norm_crops
    a, b = LogMelStore(out, "train"), LogMelStore(tmp_path / "one", "train")
    assert list(a.clip_ids) == list(b.clip_ids) and all(np.array_equal(a[i], b[i]) for i in range(len(a)))


def test_a_changed_plan_invalidates_committed_shards_before_rewriting(corpus, tmp_path):
    plan = plan_store(str(corpus), str(tmp_path / "s"), str(corpus.parent), CFG, ("eval",))
    for k in range(len(plan)):
        build_shard(plan, k, progress=False)
    finish_store(plan)
    assert (tmp_path / "s" / "_COMPLETE.json").exists()
    other = plan_store(str(corpus), str(tmp_path / "s"), str(corpus.parent),
                        FeatureConfig(**{**CFG.__dict__, "max_seconds": 0.5}), ("eval",))
    with pytest.raises(IncompleteStoreError, match="not committed"):
        finish_store(other)
    calls = []
    original = shards_module._put

    def crash_after_npy(uri: str, data: bytes) -> None:
        calls.append(uri)
        if uri.endswith("index.parquet"):
            raise OSError("simulated crash")
        original(uri, data)

    shards_module._put = crash_after_npy
    try:
        with pytest.raises(OSError, match="simulated crash"):
            build_shard(other, 0, progress=False)
    finally:
        shards_module._put = original
    # The old marker and the store's completion marker went first: nothing can pair new bytes with old indexes.
    assert not (tmp_path / "s" / "_COMPLETE.json").exists()
    assert not Path(shard_uri(str(tmp_path / "s"), 0, "done.json")).exists()
    with pytest.raises(FileNotFoundError, match="not a complete feature store"):
        LogMelStore(tmp_path / "s", "eval")


def test_import_of_reference_style_npy_clips(tmp_path):
    rng = np.random.default_rng(0)
    clips = [LogMelClip(f"c{i}", rng.normal(-7, 4, (1, 80, 50 + 30 * i)).astype(np.float32), ("a caption",))
             for i in range(6)]
    report = import_logmels(str(tmp_path / "imp"), {"train": clips},
                            FeatureConfig(norm_crop_frames=64, norm_samples=300, shard_mb=0.02), progress=False)
    store = LogMelStore(tmp_path / "imp", "train")
    assert len(store) == 6 and len(store.shard_ids()) > 1
    for i, clip in enumerate(clips):
        assert np.abs(store[i] - clip.lms[0]).max() < 8e-3
    assert report.norm_stats.mean == pytest.approx(-7 * 0.9, abs=1.5) and report.norm_crops == 300


def test_damage_after_commit_is_caught_rebuilt_exactly_and_orphans_are_swept(corpus, tmp_path):
    plan = plan_store(str(corpus), str(tmp_path / "s"), str(corpus.parent), CFG, ("eval",))
    assert len(plan) >= 2
    for k in range(len(plan)):
        build_shard(plan, k, progress=False)
    finish_store(plan)
    first = LogMelStore(tmp_path / "s", "eval")
    clips = [first[i] for i in range(len(first))]
    # Bytes damaged after the commit (same size): the reader refuses them before any is used ...
    npy = Path(shard_uri(str(tmp_path / "s"), 1, "npy"))
    good = npy.read_bytes()
    npy.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(ShardCorruptError, match=r"shard 1 of .* sha256 .* features step again"):
        LogMelStore(tmp_path / "s", "eval")
    assert LogMelStore(tmp_path / "s", "eval", prefetch=False)[0] is not None  # shard 0 is fine on its own
    # ... and running the build again rebuilds exactly the damaged shard, to the bytes it had.
    assert [build_shard(plan, k, progress=False).status for k in range(len(plan))] == \
        ["skipped", "built"] + ["skipped"] * (len(plan) - 2)
    assert npy.read_bytes() == good
    # Orphans: a killed write's temporary file, the shard of an earlier plan with more shards, a foreign marker.
    folder = tmp_path / "s" / "shards"
    orphans = [".shard-00000.npy.x1y2.tmp", "shard-00099.npy", "shard-00099.index.parquet", "shard-00099.done.json"]
    for name in orphans:
        (folder / name).write_bytes(b"left behind")
    kept = sorted(p.name for p in folder.iterdir() if p.name not in orphans)
    finish_store(plan)
    assert sorted(p.name for p in folder.iterdir()) == kept
    again = LogMelStore(tmp_path / "s", "eval")
    assert all(np.array_equal(again[i], clips[i]) for i in range(len(clips)))
