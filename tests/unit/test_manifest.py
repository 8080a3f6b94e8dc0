"""Manifest schema and validation, probing, and the leakage filter (by id, origin, content hash, blacklist)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from m2d2.data import sources
from m2d2.data.leakage import filter_leakage, select
from m2d2.data.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    label_caption,
    manifest_table,
    probe_manifest,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from tests.helpers import FIXTURES

FIX = FIXTURES / "sources"


def _row(clip_id: str, **extra) -> dict:
    return {"clip_id": clip_id, "source": "test", "audio_uri": f"{clip_id}.wav", "split": "train", **extra}


def test_label_caption_forms():
    assert label_caption(["Dog"]) == "The sound of Dog."
    assert label_caption(["dog", "car_horn"]) == "The sound of dog and car horn."
    assert label_caption(["A", "B", "C"]) == "The sound of A, B, and C."
    with pytest.raises(ValueError):
        label_caption([" "])


def test_validation_names_row_and_field_for_every_rule():
    table = pa.table({
        "clip_id": ["ok", "ok", "", "d"],
        "source": ["s", "s", "s", None],
        "audio_uri": ["a", "b", "c", "d"],
        "duration_s": [1.0, -2.0, float("nan"), None],
        "sample_rate": [16000, 0, None, None],
        "channels": [1, 1, 0, None],
        "captions": [["fine"], [""], None, []],
        "labels": [[], ["x"], [], [None]],
        "split": ["train", "Train", "eval", "test"],
        "content_hash": [None, "abc", "0" * 64, None],
    })
    with pytest.raises(ManifestError) as info:
        validate_manifest(table)
    message = str(info.value)
    for expected in ("row 1 (clip_id 'ok'): field 'clip_id' duplicates row 0",
                     "row 2 (clip_id ''): field 'clip_id' must be a non-empty string",
                     "row 3 (clip_id 'd'): field 'source' must be a non-empty string",
                     "row 1 (clip_id 'ok'): field 'split' must be lower-case",
                     "row 1 (clip_id 'ok'): field 'duration_s' must be null or a positive finite number, got -2.0",
                     "row 2 (clip_id ''): field 'duration_s'",
                     "row 1 (clip_id 'ok'): field 'sample_rate' must be null or >= 1, got 0",
                     "row 2 (clip_id ''): field 'channels'",
                     "row 1 (clip_id 'ok'): field 'captions' must be a list of non-empty strings",
                     "row 2 (clip_id ''): field 'captions'",
                     "row 3 (clip_id 'd'): field 'labels'",
                     "row 1 (clip_id 'ok'): field 'content_hash' must be null or 64 lower-case hex"):
        assert expected in message, expected
    assert "row 0" not in message.replace("duplicates row 0", "")


def test_missing_columns_and_wrong_types():
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['source'\]"):
        validate_manifest(pa.table({"clip_id": ["a"], "audio_uri": ["a"], "captions": [[]], "labels": [[]],
                                    "split": ["train"]}))
    with pytest.raises(ManifestError, match="column 'duration_s' has type string"):
        validate_manifest(manifest_table([_row("a")]).set_column(3, "duration_s", pa.array(["long"])))
    # Unknown-until-probed columns may be absent: they come back as nulls, in schema order.
    minimal = validate_manifest(pa.table({"clip_id": ["a"], "source": ["s"], "audio_uri": ["a"], "captions": [["c"]],
                                          "labels": [[]], "split": ["train"]}))
    assert minimal.schema == MANIFEST_SCHEMA and minimal.column("content_hash").null_count == 1


def test_write_read_round_trip_and_probe(tmp_path):
    rng = np.random.default_rng(0)
    for name, sr, ch in (("mono", 16000, 1), ("stereo", 44100, 2)):
        sf.write(tmp_path / f"{name}.wav", 0.1 * rng.standard_normal((sr // 2, ch)), sr)
    (tmp_path / "broken.wav").write_bytes(b"not audio")
    table = manifest_table([_row("mono"), _row("stereo", duration_s=9.0), _row("broken"), _row("missing")])
    write_manifest(table, str(tmp_path / "manifest.parquet"))
    assert read_manifest(str(tmp_path / "manifest.parquet")).equals(table)
    probed = {r["clip_id"]: r for r in probe_manifest(table, str(tmp_path), progress=False).to_pylist()}
    assert probed["mono"]["duration_s"] == 0.5 and probed["mono"]["sample_rate"] == 16000
    assert probed["stereo"]["channels"] == 2 and probed["stereo"]["duration_s"] == 9.0  # known values kept
    assert probed["stereo"]["content_hash"] == hashlib.sha256((tmp_path / "stereo.wav").read_bytes()).hexdigest()
    assert probed["broken"]["content_hash"] is not None and probed["broken"]["duration_s"] is None
    assert probed["missing"]["content_hash"] is None  # nothing dropped: the row stays, ingestion quarantines it


def _fixture_corpus() -> tuple[pa.Table, pa.Table]:
    root = "/data"
    training = sources.concat_manifests([
        sources.audioset_manifest(str(FIX / "audioset" / "balanced_train_segments.csv"), root,
                                  class_labels=str(FIX / "audioset" / "class_labels_indices.csv"),
                                  ontology=str(FIX / "audioset" / "ontology.json")),
        sources.vggsound_manifest(str(FIX / "vggsound" / "vggsound.csv"), root, split="train"),
        *[sources.wavcaps_manifest(str(FIX / "wavcaps" / f"{n}.json"), root)
          for n in ("fsd_final", "bbc_final", "sb_final", "as_final")],
    ])
    held_out = sources.concat_manifests([
        sources.audiocaps_manifest(str(FIX / "audiocaps" / "test.csv"), root),
        sources.clotho_manifest(str(FIX / "clotho" / "clotho_captions_evaluation.csv"), root,
                                metadata_csvs=str(FIX / "clotho" / "clotho_metadata_evaluation.csv")),
        sources.esc50_manifest(str(FIX / "esc50" / "meta" / "esc50.csv"), root),
        sources.urbansound8k_manifest(str(FIX / "urbansound8k" / "metadata" / "UrbanSound8K.csv"), root),
    ])
    return training, held_out


def test_leakage_filter_removes_every_reused_recording_and_says_why():
    training, held_out = _fixture_corpus()
    report = filter_leakage(training, held_out)
    removed = {r["clip_id"]: r for r in report.removed.to_pylist()}
    # AudioCaps test is an AudioSet segment; WavCaps AudioSet_SL re-publishes it; ESC-50 / US8K / Clotho come
    # from Freesound recordings that WavCaps FreeSound also holds.
    assert removed["audioset:7fmOlUlwoNg_000020"]["reason"] == "origin"
    assert removed["audioset:7fmOlUlwoNg_000020"]["held_out_clip_id"] == "audiocaps:7fmOlUlwoNg_000020"
    assert removed["wavcaps:AudioSet_SL/Y7fmOlUlwoNg"]["key"] == "yt:7fmOlUlwoNg"
    assert removed["wavcaps:FreeSound/100032"]["held_out_source"] == "esc50"
    assert removed["wavcaps:FreeSound/180913"]["held_out_source"] == "us8k"
    assert removed["wavcaps:FreeSound/12345"]["held_out_source"] == "clotho"
    assert len(removed) == 5
    kept = set(report.kept.column("clip_id").to_pylist())
    assert kept.isdisjoint(removed) and len(kept) + len(removed) == training.num_rows
    assert report.counts() == {"removed": 5, "removed_origin": 5, "unhashed": training.num_rows}


def test_leakage_by_clip_id_content_hash_and_blacklist_only_in_training_splits():
    digest = "ab" * 32
    manifest = manifest_table([
        _row("same-id"), _row("same-bytes", content_hash=digest), _row("blocked", origin="fs:1"), _row("clean"),
        _row("eval-copy", split="test", content_hash=digest),
    ])
    held = manifest_table([_row("same-id"), _row("other-name", content_hash=digest, split="test")])
    report = filter_leakage(manifest, [held], blocked_origins={"fs:1"})
    reasons = {r["clip_id"]: r["reason"] for r in report.removed.to_pylist()}
    assert reasons == {"same-id": "clip_id", "same-bytes": "content_hash", "blocked": "blacklist"}
    assert report.kept.column("clip_id").to_pylist() == ["clean", "eval-copy"]  # test split untouched
    assert report.unhashed == 3
    assert select(manifest, splits=["test"]).column("clip_id").to_pylist() == ["eval-copy"]
