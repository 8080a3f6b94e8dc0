"""Short clips are padded as the reference pads them: the waveform, with silence, to 6.1 s, before the log-mel."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf
import torch

from m2d2 import presets
from m2d2.audio.frontend import LogMelSpectrogram
from m2d2.data.features import LogMelStore
from m2d2.data.manifest import manifest_table, write_manifest
from m2d2.data.shards import build_shard, finish_store, read_plan
from m2d2.pipeline import step_settings
from m2d2.pipeline.data import feature_config, plan_features


def test_the_paper_pads_waveforms_to_6_1_s_and_the_demo_documents_that_it_does_not():
    assert presets.pipeline_config("paper").min_clip_seconds == 6.1
    assert step_settings(presets.pipeline_config("paper")).features.min_seconds == 6.1
    assert feature_config(step_settings(presets.pipeline_config("paper")).features).min_seconds == 6.1
    assert presets.pipeline_config("demo").min_clip_seconds == 0.0


def test_a_short_clip_is_zero_padded_before_the_log_mel_as_the_reference_does(tmp_path):
    rate = 16000
    wave = (0.1 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)  # 2 s
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "a.wav", wave, rate)
    write_manifest(manifest_table([{"clip_id": "x:a", "source": "x", "audio_uri": "audio/a.wav", "split": "train",
                                    "captions": ["a tone"], "labels": []}]), str(tmp_path / "manifest.parquet"))
    settings = step_settings(presets.pipeline_config("paper", norm_samples=4)).features
    settings.norm_crop_frames = 16
    refs = plan_features(settings, str(tmp_path / "runs"), str(tmp_path))
    plan = read_plan(refs[0].plan)
    for ref in refs:
        build_shard(plan, ref.index, progress=False)
    finish_store(plan)
    store = plan.store_uri
    index = pq.read_table(f"{store}/train.index.parquet").to_pylist()[0]
    # The reference rule: zero-pad the waveform to 6.1 s, then the log-mel of the padded waveform.
    frontend = LogMelSpectrogram()
    padded = torch.nn.functional.pad(torch.from_numpy(wave), (0, int(6.1 * rate) - wave.size))
    expected = frontend(padded).numpy()  # [n_mels, frames]
    unpadded = frontend(torch.from_numpy(wave)).numpy()
    assert index["frames"] == expected.shape[1] == 611 and unpadded.shape[1] == 201 and "padded" in index["flags"]
    stored = LogMelStore(store, "train", progress=False)[0].astype(np.float32)  # [n_mels, frames], kept as float16
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=0.01)  # float16 storage
    tail = stored[:, -300:]  # silence: the log of the frontend's eps in every band, not raw-log 0
    assert np.allclose(tail, tail.min(), atol=0.02) and tail.max() < -15
