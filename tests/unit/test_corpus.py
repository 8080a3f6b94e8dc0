"""`m2d2 corpus`: a folder of audio with a captions CSV -> a validated snapshot the pipeline reads."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from m2d2.cli import main
from m2d2.config import loads
from m2d2.data.corpus import CorpusSpecError, SourceSpec
from m2d2.data.manifest import read_manifest
from m2d2.pipeline import PipelineConfig, resolve_corpus_source


@pytest.fixture
def folder(tmp_path):
    audio = tmp_path / "my audio"
    audio.mkdir()
    rate, rows = 16000, ["file_name,caption,labels"]
    for k in range(12):
        tone = 0.2 * np.sin(2 * np.pi * (200 + 50 * k) * np.arange(rate) / rate)
        sf.write(audio / f"clip{k:02d}.wav", tone.astype(np.float32), rate)
        rows.append(f"clip{k:02d}.wav,a tone of {200 + 50 * k} hertz,tone")
    sf.write(audio / "copy.wav", sf.read(audio / "clip03.wav")[0].astype(np.float32), rate)  # clip03's bytes
    rows.append("copy.wav,the same tone again,tone")
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    rows += ["broken.wav,a broken file,tone", "gone.wav,a file that is not there,tone"]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_a_folder_with_captions_becomes_a_snapshot_the_pipeline_can_train_on(folder, capsys):
    out = folder / "corpora"
    code = main(["corpus", "--folder", str(folder / "my audio"), "--captions", str(folder / "captions.csv"),
                 "--eval-fraction", "0.3", "--out", str(out), "--name", "2026-12-06T000000Z", "--workers", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    snap = out / "2026-12-06T000000Z"
    manifest = read_manifest(str(snap / "manifest.parquet"))
    quarantine = pq.read_table(snap / "quarantine.parquet").to_pylist()
    assert {(q["clip_id"], q["kind"]) for q in quarantine} == {("custom:broken.wav", "unreadable"),
                                                              ("custom:gone.wav", "missing")}
    assert all(h for h in manifest.column("content_hash").to_pylist())  # every kept file probed and hashed
    splits = dict(zip(manifest.column("clip_id").to_pylist(), manifest.column("split").to_pylist(), strict=True))
    summary = json.loads((snap / "summary.json").read_text())
    assert sum(summary["clips"]["eval"].values()) == list(splits.values()).count("eval") > 0
    leaked = pq.read_table(snap / "leakage.parquet").to_pylist()
    # clip03 and copy.wav hold the same bytes: whichever is training data and shares them with an eval clip is gone
    for row in leaked:
        assert row["reason"] == "content_hash" and splits.get(row["held_out_clip_id"]) == "eval"
    assert len(manifest) + len(quarantine) + len(leaked) == 15  # nothing dropped silently
    assert f"corpus snapshot {snap}" in printed and "quarantined 2 (missing 1, unreadable 1)" in printed
    cfg = loads((snap / "pipeline.yaml").read_text(), PipelineConfig)  # a valid --cfg file
    assert cfg.corpus_source == str(snap) and cfg.audio_roots == [str((folder / "my audio").resolve())]
    assert cfg.stages["stage2.1"].data.min_captions == cfg.stages["stage2.1-as"].data.min_captions == 1  # one caption
    assert "&id" not in (snap / "pipeline.yaml").read_text()  # plain YAML a user can edit, no anchors
    assert resolve_corpus_source(str(out / "latest")) == str(snap)
    again = main(["corpus", "--folder", str(folder / "my audio"), "--out", str(out), "--name", "2026-12-06T000000Z"])
    assert again == 2 and "already holds a snapshot" in capsys.readouterr().err


def test_bad_specs_fail_with_the_key_named(folder, capsys):
    with pytest.raises(CorpusSpecError, match=r"kind 'audiocap' is not one of folder, audioset"):
        SourceSpec.from_dict({"kind": "audiocap", "audio_root": "x"})
    with pytest.raises(CorpusSpecError, match=r"\(clotho\): unknown argument\(s\) csv; known:"):
        SourceSpec.from_dict({"kind": "clotho", "audio_root": "x", "csv": "y"})
    with pytest.raises(CorpusSpecError, match=r"\(audiocaps\): missing csv_paths"):
        SourceSpec.from_dict({"kind": "audiocaps", "audio_root": "x"})
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump({"sources": [{"kind": "folder", "audio_root": str(folder / "my audio"),
                                                 "eval_fraction": 1.5}]}))
    assert main(["corpus", "--spec", str(spec), "--out", str(folder / "c")]) == 2
    assert "eval_fraction=1.5 must be in [0, 1)" in capsys.readouterr().err
    (folder / "bad.csv").write_text("caption\nno file name column\n")
    assert main(["corpus", "--folder", str(folder / "my audio"), "--captions", str(folder / "bad.csv"),
                 "--out", str(folder / "c")]) == 2
    assert "file_name" in capsys.readouterr().err
