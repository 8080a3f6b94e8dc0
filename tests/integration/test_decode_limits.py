"""Bounded decoding: the peak memory a decode of the crafted FLAC and of a long WAV costs, and a long signal
resampled in pieces identical to one pass (5 rates over 200k samples: ~5 s on 2 cores).

Peak memory is measured in a fresh interpreter (numpy, libsndfile and torch allocate outside Python, so
tracemalloc would not see them): the child imports everything and decodes a small warm-up file first, resets its
high-water mark, then reads ``ru_maxrss`` around one decode. The crafted FLAC is the reviewed attack: ~100 KB
that declare 50 s of 8-channel 192 kHz audio (written by tests/unit/test_decode_limits.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import m2d2.audio.decode as decode_module
from m2d2.audio import resample
from tests.helpers import subprocess_env
from tests.unit.test_decode_limits import SR, write_big_files


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> Path:
    return write_big_files(tmp_path_factory.mktemp("big"))


# ------------------------------------------------------------------------------------------------ peak memory
#: (file, max_seconds, bound on the peak-RSS increase of one decode in MiB). Measured on the reference machine,
#: block-wise code: 104, 97 and 264 MiB; the previous whole-array code: 989, 593 and 685 MiB.
MEMORY_CASES = {
    "crafted_flac_whole": ("crafted.flac", None, 200),
    "crafted_flac_30s_cap": ("crafted.flac", 30.0, 160),
    "long_wav_whole": ("long.wav", None, 400),
}

CHILD = r"""
import gc, json, resource, sys
import numpy, soundfile, torch, torchaudio  # everything imported before the baseline
torch.set_num_threads(1)
from m2d2.audio import decode_audio
audio, warm, max_seconds = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "none" else float(sys.argv[3]))
decode_audio(warm, 16000, max_seconds)  # codecs loaded, resampling kernels built
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
except OSError:
    pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = decode_audio(audio, 16000, max_seconds)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta_mib": (after - before) / 1024, "samples": out.wave.numel(), "peak": out.peak,
                  "channels": out.channels, "capped": out.capped}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MEMORY_CASES))
def test_peak_memory_of_a_decode_is_bounded(big_files, case):
    name, max_seconds, bound_mib = MEMORY_CASES[case]
    path = big_files / name
    warm = path.with_name(path.stem + ".warm" + path.suffix)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(warm), str(max_seconds).lower()],
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    info = sf.info(path)
    kept = info.frames if max_seconds is None else min(info.frames, int(max_seconds * info.samplerate))
    assert abs(result["samples"] - kept * SR / info.samplerate) <= 1  # it did decode all it should
    assert result["capped"] == (kept < info.frames) and result["channels"] == info.channels
    assert result["delta_mib"] < bound_mib, f"{case}: decoding raised peak RSS by {result['delta_mib']:.0f} MiB"


# ------------------------------------------------------------------------------------------------ block-wise decoding
def test_long_signals_are_resampled_in_pieces_identical_to_one_pass(monkeypatch):
    monkeypatch.setattr(decode_module, "RESAMPLE_CHUNK_SAMPLES", 1 << 15)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal(200_001).astype(np.float32) * 0.3)
    for orig, target in ((48000, SR), (44100, SR), (192000, SR), (8000, SR), (11025, SR)):
        expected = torchaudio.functional.resample(x, *decode_module._rate_ratio(orig, target))
        got = resample(x, orig, target)
        assert got.shape == expected.shape and torch.equal(got, expected), (orig, target)
    monkeypatch.setattr(decode_module, "_RESAMPLE_MARGIN_STEPS", 0)  # without context the seams are audible
    assert (resample(x, 48000, SR) - torchaudio.functional.resample(x, 3, 1)).abs().max() > 1e-3
