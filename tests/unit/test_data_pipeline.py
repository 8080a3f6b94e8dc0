"""Feature store, caption-embedding cache, the training datasets and the rank-sharded loader (with worker
processes, the loader's resume and the parallel feature extraction are in tests/integration/test_data_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from m2d2.audio import LogMelSpectrogram, load_audio
from m2d2.data.features import FeatureConfig, LogMelStore, extract_features, load_norm_stats
from m2d2.data.loader import CropDataset, collate
from m2d2.models import OfflineTextConfig
from m2d2.text.cache import CaptionEmbeddings, caption_hash, embed_captions
from tests.helpers import MINILM


def _write_corpus(root, rows):
    (root / "audio").mkdir(parents=True, exist_ok=True)
    records = []
    for clip_id, seconds, sr, channels, split, captions in rows:
        t = np.arange(int(seconds * sr)) / sr
        wave = 0.2 * np.sin(2 * np.pi * (300 + 100 * len(records)) * t)
        data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
        sf.write(root / "audio" / f"{clip_id}.wav", data, sr)
        records.append({"clip_id": clip_id, "source": "tones", "audio_uri": f"audio/{clip_id}.wav", "split": split,
                        "captions": captions, "labels": ["tone"]})
    pq.write_table(pa.Table.from_pylist(records), root / "manifest.parquet")
    return root / "manifest.parquet"


def make_corpus(tmp_path):
    """Four tones of mixed rates and channels and one undecodable file, under ``tmp_path / "corpus"``."""
    rows = [
        ("a", 1.0, 16000, 1, "train", ["a low tone", "a steady low tone"]),
        ("b", 0.5, 44100, 2, "train", ["a short tone"]),
        ("c", 2.0, 22050, 1, "train", ["a long tone"]),
        ("d", 1.5, 48000, 2, "eval", ["an eval tone"]),
    ]
    manifest = _write_corpus(tmp_path / "corpus", rows)
    (tmp_path / "corpus" / "audio" / "broken.wav").write_bytes(b"not audio at all")
    table = pq.read_table(manifest).to_pylist()
    table.append({"clip_id": "broken", "source": "tones", "audio_uri": "audio/broken.wav", "split": "train",
                  "captions": ["nothing"], "labels": ["tone"]})
    pq.write_table(pa.Table.from_pylist(table), manifest)
    return tmp_path / "corpus"


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def test_extract_features_stores_every_clip_and_quarantines_bad_ones(corpus, tmp_path):
    out = tmp_path / "features"
    stats = extract_features(corpus / "manifest.parquet", corpus, out, FeatureConfig(norm_crop_frames=64,
                                                                                    norm_samples=50))
    train = LogMelStore(out, "train")
    assert train.clip_ids == ["a", "b", "c"] and len(LogMelStore(out, "eval")) == 1
    frontend = LogMelSpectrogram()
    for i, clip in enumerate(["a", "b", "c"]):
        expected = frontend(load_audio(corpus / "audio" / f"{clip}.wav")).numpy()
        assert train[i].shape == expected.shape and train.frames(i) == expected.shape[1]
        assert np.abs(train[i] - expected).max() < 8e-3  # float16 storage of values of magnitude <= 16
    assert train.captions[0] == ["a low tone", "a steady low tone"]
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [q["clip_id"] for q in quarantine] == ["broken"] and "broken.wav" in quarantine[0]["reason"]
    assert load_norm_stats(out) == stats and stats.std > 0


def test_store_crop_pads_with_zero_in_the_raw_log_domain(corpus, tmp_path):
    extract_features(corpus / "manifest.parquet", corpus, tmp_path / "f", FeatureConfig(norm_crop_frames=32,
                                                                                        norm_samples=10))
    store = LogMelStore(tmp_path / "f", "train")
    n = store.frames(1)  # the 0.5 s clip: 51 frames
    crop = store.crop(1, n - 10, 30)
    assert np.array_equal(crop[:, :10], store[1][:, -10:]) and np.all(crop[:, 10:] == 0)
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        LogMelStore(tmp_path / "f", "test")


def test_caption_cache_round_trip_and_encoder_check(tmp_path):
    cfg = OfflineTextConfig(kind="hf-mean-pool", path=MINILM, dim=384)
    captions = ["a dog barks", "rain falls", "a dog barks"]
    rows = embed_captions(captions, cfg, tmp_path / "caps.parquet")
    assert rows == 2
    cache = CaptionEmbeddings(tmp_path / "caps.parquet")
    assert len(cache) == 2 and "rain falls" in cache and cache.dim == 384
    vec = cache.lookup(["rain falls", "a dog barks"])
    assert vec.dtype == np.float16 and vec.shape == (2, 384)
    from m2d2.text import OfflineTextEncoder

    direct = OfflineTextEncoder(cfg).encode(["rain falls"]).numpy()
    assert np.abs(vec[0].astype(np.float32) - direct[0]).max() < 2e-3
    cache.check_encoder(cfg)
    with pytest.raises(ValueError, match="expects"):
        cache.check_encoder(OfflineTextConfig(kind="nv-embed-v2", path="/models/x", dim=4096))
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cache.lookup(["an unseen caption"])
    assert caption_hash("a") != caption_hash("a ") and len(caption_hash("x")) == 32


def test_crop_dataset_is_a_function_of_seed_epoch_and_index(corpus, tmp_path):
    extract_features(corpus / "manifest.parquet", corpus, tmp_path / "f", FeatureConfig(norm_crop_frames=32,
                                                                                        norm_samples=10))
    store = LogMelStore(tmp_path / "f", "train")
    data = CropDataset(store, crop_frames=64, seed=3)
    first = [data[i] for i in range(3)]
    again = CropDataset(store, crop_frames=64, seed=3)
    for (x1, t1), (x2, t2) in zip(first, [again[i] for i in (0, 1, 2)], strict=True):
        assert torch.equal(x1, x2) and t1 == t2
    data.set_epoch(1)
    moved = [data[i] for i in range(3)]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, moved, strict=True))
    assert all(x.shape == (80, 64) for x, _ in first)
    assert first[0][1] in store.captions[0]
    lms, texts = collate(first)
    assert lms.shape == (3, 80, 64) and isinstance(texts, list)
    # Every caption of a multi-caption clip gets drawn over epochs (uniform choice per clip).
    drawn = set()
    for epoch in range(20):
        data.set_epoch(epoch)
        drawn.add(data[0][1])
    assert drawn == set(store.captions[0])
    # The caption is choose_caption's draw from the item's generator, after the crop start (clip 2 is longer).
    from m2d2.text.choice import choose_caption

    for epoch in range(5):
        data.set_epoch(epoch)
        for i in range(3):
            rng = np.random.default_rng([3, epoch, i])
            if store.frames(i) > 64:
                rng.integers(0, store.frames(i) - 64 + 1)
            assert data[i][1] == store.captions[i][choose_caption(len(store.captions[i]), rng)]


def test_crop_dataset_with_vectors_and_missing_captions(corpus, tmp_path):
    extract_features(corpus / "manifest.parquet", corpus, tmp_path / "f", FeatureConfig(norm_crop_frames=32,
                                                                                        norm_samples=10))
    store = LogMelStore(tmp_path / "f", "train")
    cfg = OfflineTextConfig(kind="hf-mean-pool", path=MINILM, dim=384)
    embed_captions([c for caps in store.captions for c in caps], cfg, tmp_path / "caps.parquet")
    data = CropDataset(store, 64, CaptionEmbeddings(tmp_path / "caps.parquet"))
    lms, vec = collate([data[0], data[1]])
    assert vec.shape == (2, 384) and vec.dtype == torch.float32
    store.captions[1] = []
    with pytest.raises(ValueError, match="no caption"):
        CropDataset(store, 64)


def test_workspace_token_changes_when_the_data_root_is_recreated(tmp_path):
    from m2d2.pipeline import PipelineConfig, rooted, workspace_token

    root = tmp_path / "runs"
    first = workspace_token(str(root))
    assert first.startswith(str(root.resolve()) + "#") and workspace_token(str(root)) == first
    import shutil

    shutil.rmtree(root)
    second = workspace_token(str(root))
    assert second != first  # cache keys built on the token cannot point into the deleted tree
    assert rooted(PipelineConfig(), second).data_root == str(root.resolve())


def test_short_clips_pad_with_the_configured_raw_log_value(corpus, tmp_path):
    extract_features(corpus / "manifest.parquet", corpus, tmp_path / "f", FeatureConfig(norm_crop_frames=32,
                                                                                        norm_samples=10))
    store = LogMelStore(tmp_path / "f", "train")
    short = store.clip_ids.index("b")  # 51 frames
    default = CropDataset(store, 64, subset=[short])[0][0]
    silence = CropDataset(store, 64, subset=[short], pad_value=-15.9424)[0][0]
    assert torch.all(default[:, 51:] == 0) and torch.all(silence[:, 51:] == -15.9424)
    assert torch.equal(default[:, :51], silence[:, :51])
