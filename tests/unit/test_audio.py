"""Tests for m2d2.audio: the log-mel front end against an independent float64 NumPy reference, decoding, stats.

The reference below is written from the formulas (no torchaudio, no librosa), so agreement means the front end
computes what the M2D papers describe, not merely what one library happens to do.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d2.audio import (
    AudioDecodeError,
    AudioInfo,
    LogMelConfig,
    LogMelSpectrogram,
    NormStats,
    audio_info,
    compute_norm_stats,
    downmix,
    load_audio,
    resample,
)

SR = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
F_MIN, F_MAX = 50.0, 8000.0
LOG_EPS = 1.1920929e-07
TOLERANCE = 1e-3  # max |log-mel difference| allowed against the float64 reference
LEVELS_DBFS = (-40, -20, 0)


# ----------------------------------------------------------------------------------------------------------------
# float64 NumPy reference
# ----------------------------------------------------------------------------------------------------------------


def hz_to_mel_slaney(f: np.ndarray | float) -> np.ndarray:
    """Slaney mel: linear 3f/200 below 1 kHz, logarithmic above (15 mel at 1 kHz)."""
    f = np.asarray(f, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    above = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / log_step
    return np.where(f >= 1000.0, above, 3.0 * f / 200.0)


def mel_to_hz_slaney(m: np.ndarray | float) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    above = 1000.0 * np.exp(log_step * (m - 15.0))
    return np.where(m >= 15.0, above, 200.0 * m / 3.0)


@functools.cache
def reference_mel_basis() -> np.ndarray:
    """(80, 201) Slaney filterbank with Slaney area normalisation, from the formulas."""
    mel_points = np.linspace(hz_to_mel_slaney(F_MIN), hz_to_mel_slaney(F_MAX), N_MELS + 2)
    hz = mel_to_hz_slaney(mel_points)
    fft_freqs = np.linspace(0.0, SR / 2, N_FFT // 2 + 1)
    basis = np.zeros((N_MELS, N_FFT // 2 + 1))
    for i in range(N_MELS):
        lower, centre, upper = hz[i], hz[i + 1], hz[i + 2]
        rising = (fft_freqs - lower) / (centre - lower)
        falling = (upper - fft_freqs) / (upper - centre)
        basis[i] = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return basis


def reference_hann(n: int = N_FFT) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def reference_log_mel(wave: np.ndarray) -> np.ndarray:
    """[S] float64 waveform -> [80, 1 + S // 160] natural-log mel power."""
    wave = np.asarray(wave, dtype=np.float64)
    padded = np.pad(wave, (N_FFT // 2, N_FFT // 2), mode="reflect")
    num_frames = 1 + len(wave) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:num_frames]
    power = np.abs(np.fft.rfft(frames * reference_hann(), n=N_FFT, axis=-1)) ** 2  # [T, 201]
    return np.log(reference_mel_basis() @ power.T + LOG_EPS)


# ----------------------------------------------------------------------------------------------------------------
# test signals (all float64 NumPy, peak-normalised later)
# ----------------------------------------------------------------------------------------------------------------


def _two_pole_resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    """y[n] = x[n] + a1 y[n-1] + a2 y[n-2], a pole pair at radius exp(-pi B / sr) and angle 2 pi F / sr."""
    radius = np.exp(-np.pi * bandwidth / SR)
    a1 = 2.0 * radius * np.cos(2.0 * np.pi * freq / SR)
    a2 = -radius * radius
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    for n, xn in enumerate(x.tolist()):
        yn = xn + a1 * y1 + a2 * y2
        y[n] = yn
        y2, y1 = y1, yn
    return y


def _speech_like(num_samples: int, f0_range: tuple[float, float], formants: list[tuple[float, float]]) -> np.ndarray:
    """A glottal pulse train with a gliding f0, shaped by three formant resonators (a crude vowel)."""
    t = np.arange(num_samples) / SR
    f0 = f0_range[0] + (f0_range[1] - f0_range[0]) * 0.5 * (1.0 - np.cos(2.0 * np.pi * t / t[-1]))
    phase = np.cumsum(f0) / SR
    pulses = np.diff(np.floor(phase), prepend=0.0)  # 1 at each glottal closure
    source = np.convolve(pulses, np.hanning(24), mode="same")  # soften the impulses a little
    y = source
    for freq, bandwidth in formants:
        y = _two_pole_resonator(y, freq, bandwidth)
    return y - y.mean()


@functools.cache
def signal_family(name: str) -> np.ndarray:
    """[B, S] float64 batch for one family; B and S differ between families to also exercise odd lengths."""
    rng = np.random.default_rng(1234)
    if name == "white_noise":
        return rng.standard_normal((3, 16000 + 123))
    if name == "tones":
        t = np.arange(2 * SR + 77) / SR
        return np.stack([np.sin(2 * np.pi * f * t + p) for f, p in [(440.0, 0.0), (3000.0, 1.0), (1234.5, 2.0)]])
    if name == "chirps":
        duration = 3.0
        t = np.arange(int(duration * SR)) / SR
        sweep = (7900.0 - 50.0) / duration
        return np.stack([np.sin(2 * np.pi * (50.0 * t + 0.5 * sweep * t * t) + p) for p in (0.0, 0.7)])
    if name == "speech_like":
        n = int(2.5 * SR) + 31
        return np.stack(
            [
                _speech_like(n, (100.0, 160.0), [(700.0, 130.0), (1220.0, 70.0), (2600.0, 160.0)]),
                _speech_like(n, (150.0, 220.0), [(300.0, 60.0), (2300.0, 100.0), (3000.0, 200.0)]),
            ]
        )
    raise KeyError(name)


FAMILIES = ("white_noise", "tones", "chirps", "speech_like")


def at_level(batch: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale each row to the given peak level, then round to float32 (what the module receives)."""
    peak = np.abs(batch).max(axis=-1, keepdims=True)
    return (batch / peak * 10.0 ** (dbfs / 20.0)).astype(np.float32)


@pytest.fixture(scope="module")
def frontend() -> LogMelSpectrogram:
    return LogMelSpectrogram()


def max_abs_diff_to_reference(frontend: LogMelSpectrogram, family: str, dbfs: float) -> float:
    wave32 = at_level(signal_family(family), dbfs)
    out = frontend(torch.from_numpy(wave32))
    assert out.dtype == torch.float32
    assert out.shape == (wave32.shape[0], N_MELS, 1 + wave32.shape[1] // HOP)
    ref = np.stack([reference_log_mel(row.astype(np.float64)) for row in wave32])
    return float(np.abs(out.numpy().astype(np.float64) - ref).max())


# ----------------------------------------------------------------------------------------------------------------
# front end: numerical agreement
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dbfs", LEVELS_DBFS)
@pytest.mark.parametrize("family", FAMILIES)
def test_log_mel_matches_float64_reference(frontend: LogMelSpectrogram, family: str, dbfs: float) -> None:
    assert max_abs_diff_to_reference(frontend, family, dbfs) <= TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_by_one(frontend: LogMelSpectrogram, family: str) -> None:
    wave = torch.from_numpy(at_level(signal_family(family), -20))
    batched = frontend(wave)
    for i in range(wave.shape[0]):
        single = frontend(wave[i])
        assert single.shape == batched.shape[1:]
        torch.testing.assert_close(single, batched[i], rtol=0, atol=1e-5)


def test_window_is_periodic_hann_summing_to_200(frontend: LogMelSpectrogram) -> None:
    window = frontend.window
    assert window.shape == (N_FFT,)
    assert window.dtype == torch.float32
    assert abs(float(window.double().sum()) - 200.0) < 1e-4
    np.testing.assert_allclose(window.double().numpy(), reference_hann(), rtol=0, atol=1e-7)


def test_mel_filterbank_shape_and_values(frontend: LogMelSpectrogram) -> None:
    fb = frontend.mel_filters
    assert fb.shape == (N_FFT // 2 + 1, N_MELS)  # torchaudio stores [n_freqs, n_mels]
    assert fb.T.shape == (80, 201)  # the reference's (80, 201) mel basis
    np.testing.assert_allclose(fb.T.double().numpy(), reference_mel_basis(), rtol=0, atol=1e-6)
    assert (fb.sum(dim=0) > 0).all(), "every mel band must cover at least one FFT bin"


def test_default_config_is_the_paper_setting() -> None:
    assert LogMelConfig() == LogMelConfig(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80, f_min=50.0, f_max=8000.0
    )
    with pytest.raises(ValueError):
        LogMelConfig(f_max=9000.0)


# ----------------------------------------------------------------------------------------------------------------
# front end: shapes, inputs, module hygiene
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "frames"), [(201, 2), (16000, 101), (97280, 609), (160000, 1001)])
def test_frame_count(frontend: LogMelSpectrogram, num_samples: int, frames: int) -> None:
    assert frontend.frames_for(num_samples) == frames
    assert LogMelConfig().frames_for(num_samples) == frames
    out = frontend(torch.zeros(1, num_samples))
    assert out.shape == (1, N_MELS, frames)


@pytest.mark.parametrize("num_samples", [200, 10])
def test_too_short_input_raises(frontend: LogMelSpectrogram, num_samples: int) -> None:
    with pytest.raises(ValueError, match=r"at least 201.*[Pp]ad"):
        frontend(torch.zeros(num_samples))
    with pytest.raises(ValueError, match="at least 201"):
        frontend(torch.zeros(2, num_samples))


def test_one_dimensional_input(frontend: LogMelSpectrogram) -> None:
    wave = torch.from_numpy(at_level(signal_family("tones"), -20))[0]
    out = frontend(wave)
    assert out.shape == (N_MELS, 1 + wave.numel() // HOP)
    torch.testing.assert_close(out, frontend(wave[None])[0], rtol=0, atol=1e-5)


def test_bad_input_rank_and_dtype(frontend: LogMelSpectrogram) -> None:
    with pytest.raises(ValueError, match="shape"):
        frontend(torch.zeros(1, 1, 16000))
    with pytest.raises(TypeError, match="floating-point"):
        frontend(torch.zeros(16000, dtype=torch.int16))


def test_output_is_float32_whatever_the_input_dtype(frontend: LogMelSpectrogram) -> None:
    wave32 = torch.from_numpy(at_level(signal_family("speech_like"), -20))
    expected = frontend(wave32)
    torch.testing.assert_close(frontend(wave32.double()), expected, rtol=0, atol=0)
    wave_bf16 = wave32.to(torch.bfloat16)
    out = frontend(wave_bf16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, frontend(wave_bf16.float()), rtol=0, atol=0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out_autocast = frontend(wave32)
    assert out_autocast.dtype == torch.float32
    torch.testing.assert_close(out_autocast, expected, rtol=0, atol=0)


def test_no_trainable_parameters_and_no_state() -> None:
    module = LogMelSpectrogram()
    assert list(module.parameters()) == []
    assert dict(module.state_dict()) == {}  # window and mel filters are non-persistent buffers
    buffer_names = {name for name, _ in module.named_buffers()}
    assert buffer_names == {"melspec.spectrogram.window", "melspec.mel_scale.fb"}  # still moved by .to(device)
    module.load_state_dict({})  # an empty state dict is a complete one


def test_half_cast_does_not_degrade_filters() -> None:
    """``model.half()`` / DeepSpeed bf16 casts every floating buffer; the front end must keep float32 filters."""
    wave = torch.from_numpy(at_level(signal_family("white_noise"), -20))
    module = LogMelSpectrogram()
    expected = module(wave)
    module.to(torch.bfloat16)
    assert module.window.dtype == torch.float32
    assert module.mel_filters.dtype == torch.float32
    torch.testing.assert_close(module(wave), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------------


def _tone(freq: float, sr: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return amplitude * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize(
    ("sr", "channels", "fmt", "subtype"),
    [
        (44100, 2, "WAV", "PCM_16"),
        (22050, 1, "FLAC", "PCM_16"),
        (16000, 1, "WAV", "PCM_16"),
        (48000, 3, "WAV", "FLOAT"),
        (44100, 2, "FLAC", "PCM_24"),
    ],
)
def test_load_audio_rate_channels_and_length(tmp_path, sr: int, channels: int, fmt: str, subtype: str) -> None:
    num_samples = int(1.37 * sr) + 5
    data = np.stack([_tone(300.0 * (c + 1), sr, num_samples / sr) for c in range(channels)], axis=1)
    path = tmp_path / f"clip_{sr}_{channels}.{fmt.lower()}"
    sf.write(path, data, sr, format=fmt, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == torch.float32
    assert wave.ndim == 1
    assert abs(wave.numel() - round(num_samples * 16000 / sr)) <= 1
    assert torch.isfinite(wave).all()
    info = audio_info(path)
    assert info == AudioInfo(sample_rate=sr, channels=channels, frames=num_samples, duration_s=num_samples / sr)


def test_downmix_averages_channels(tmp_path) -> None:
    x = _tone(440.0, SR, 0.5)
    opposite = tmp_path / "opposite.wav"
    sf.write(opposite, np.stack([x, -x], axis=1), SR, subtype="FLOAT")
    assert load_audio(opposite).abs().max() < 1e-7
    left_only = tmp_path / "left_only.wav"
    sf.write(left_only, np.stack([x, np.zeros_like(x)], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(left_only).numpy(), (x.astype(np.float32) / 2), rtol=0, atol=1e-7)


def test_downmix_and_resample_helpers() -> None:
    stereo = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    torch.testing.assert_close(downmix(stereo), torch.tensor([2.0, 3.0, 4.0]))
    mono = torch.arange(5.0)
    assert downmix(mono) is mono
    assert resample(mono, 16000, 16000) is mono
    assert resample(torch.zeros(44100), 44100, 16000).shape == (16000,)
    with pytest.raises(ValueError):
        resample(mono, 0, 16000)


def test_resampled_tone_keeps_its_frequency(tmp_path) -> None:
    path = tmp_path / "tone_44k.wav"
    sf.write(path, _tone(1000.0, 44100, 1.0), 44100, subtype="PCM_16")
    wave = load_audio(path).numpy().astype(np.float64)
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    peak_hz = np.argmax(spectrum) * SR / len(wave)
    assert abs(peak_hz - 1000.0) <= 1.0


def test_bytes_and_file_objects_decode_like_paths(tmp_path) -> None:
    path = tmp_path / "tone.flac"
    sf.write(path, _tone(700.0, 22050, 0.4), 22050, format="FLAC")
    expected = load_audio(path)
    raw = path.read_bytes()
    torch.testing.assert_close(load_audio(raw), expected, rtol=0, atol=0)
    stream = io.BytesIO(raw)
    assert audio_info(stream).sample_rate == 22050
    assert stream.tell() == 0  # audio_info leaves a stream where it found it
    torch.testing.assert_close(load_audio(stream), expected, rtol=0, atol=0)


def test_undecodable_and_empty_files_raise(tmp_path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(AudioDecodeError, match="garbage.wav"):
        load_audio(garbage)
    with pytest.raises(AudioDecodeError, match="garbage.wav"):
        audio_info(garbage)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match="empty.wav"):
        load_audio(empty)
    no_frames = tmp_path / "no_frames.wav"
    sf.write(no_frames, np.zeros((0, 1)), SR)
    with pytest.raises(AudioDecodeError, match="no_frames.wav.*no samples"):
        load_audio(no_frames)
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "missing.wav")
    assert issubclass(AudioDecodeError, ValueError)


def test_non_finite_samples_raise(tmp_path) -> None:
    path = tmp_path / "nan.wav"
    data = _tone(440.0, SR, 0.2).astype(np.float32)
    data[100] = np.nan
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="nan.wav.*NaN"):
        load_audio(path)


# ----------------------------------------------------------------------------------------------------------------
# normalisation statistics
# ----------------------------------------------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)


def _random_clips(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(-7.0, 4.0, size=(N_MELS, t)).astype(np.float32) for t in (150, 230, 400)]


def test_norm_stats_deterministic_per_seed() -> None:
    clips = _random_clips()
    a = compute_norm_stats(clips, crop_frames=100, num_samples=300, seed=3)
    b = compute_norm_stats(clips, crop_frames=100, num_samples=300, seed=3)
    c = compute_norm_stats(clips, crop_frames=100, num_samples=300, seed=4)
    assert a == b
    assert a != c
    assert abs(a.mean - (-7.0)) < 0.1 and abs(a.std - 4.0) < 0.1


def test_norm_stats_leave_global_rngs_alone() -> None:
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    compute_norm_stats(_random_clips(), crop_frames=100, num_samples=20)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_norm_stats_match_a_two_pass_computation_over_the_same_crops() -> None:
    """Replays the documented draws (the clip of each crop, then each clip's crop starts from its own generator)
    and compares with np.mean / np.std."""
    clips = _random_clips(1)
    crop, n = 120, 50
    counts = np.bincount(np.random.default_rng([9, 0x5EED]).integers(0, len(clips), n), minlength=len(clips))
    crops = []
    for j, clip in enumerate(clips):
        rng = np.random.default_rng([9, 1, j])
        for _ in range(counts[j]):
            start = int(rng.integers(0, clip.shape[-1] - crop + 1))
            crops.append(clip[:, start : start + crop].astype(np.float64))
    assert len(crops) == n
    values = np.concatenate([c.ravel() for c in crops])
    stats = compute_norm_stats(clips, crop_frames=crop, num_samples=n, seed=9)
    assert stats.mean == pytest.approx(values.mean(), abs=1e-10)
    assert stats.std == pytest.approx(values.std() + EPS32, abs=1e-10)


def test_norm_stats_are_the_feature_stores(tmp_path) -> None:
    """One implementation: a store written from the same clips holds the statistics compute_norm_stats gives."""
    from m2d2.data.shards import FeatureConfig, LogMelClip, import_logmels

    clips = [c.astype(np.float16) for c in _random_clips(2)]  # the store keeps float16
    report = import_logmels(str(tmp_path / "store"), {"train": [LogMelClip(f"c{i}", c) for i, c in enumerate(clips)]},
                            FeatureConfig(norm_crop_frames=100, norm_samples=300, seed=7), progress=False)
    stats = compute_norm_stats(clips, crop_frames=100, num_samples=300, seed=7)
    assert report.norm_stats.mean == pytest.approx(stats.mean, rel=1e-12, abs=0)
    assert report.norm_stats.std == pytest.approx(stats.std, rel=1e-12, abs=0)


def test_norm_stats_hand_made_values() -> None:
    constant = [np.full((N_MELS, 50), -6.5, dtype=np.float32), np.full((N_MELS, 70), -6.5, dtype=np.float32)]
    stats = compute_norm_stats(constant, crop_frames=40)
    assert stats.mean == pytest.approx(-6.5, abs=1e-12)
    assert stats.std == pytest.approx(EPS32, abs=1e-12)
    # crop = full length and both clips hold the values 0..7: mean 3.5 and population std sqrt(5.25), whatever
    # the draws are.
    a = np.arange(8.0).reshape(2, 4)
    b = a[::-1, ::-1].copy() * 1.0
    stats = compute_norm_stats([a, torch.from_numpy(b)], crop_frames=4, num_samples=101)
    assert stats.mean == pytest.approx(3.5, abs=1e-12)
    assert stats.std == pytest.approx(np.sqrt(5.25) + EPS32, abs=1e-12)


def test_norm_stats_short_clips_are_zero_padded_in_the_log_domain() -> None:
    short = np.full((N_MELS, 50), -10.0, dtype=np.float32)
    stats = compute_norm_stats([short], crop_frames=100, num_samples=10)
    # every crop is 50 frames of -10 followed by 50 frames of 0: mean -5, std 5
    assert stats.mean == pytest.approx(-5.0, abs=1e-12)
    assert stats.std == pytest.approx(5.0 + EPS32, abs=1e-12)
    # mixing in a long clip of -10 moves the mean between -10 and -5
    mixed = compute_norm_stats([short, np.full((N_MELS, 300), -10.0)], crop_frames=100, num_samples=400)
    assert -10.0 < mixed.mean < -5.0


def test_norm_stats_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        compute_norm_stats([], crop_frames=10)
    with pytest.raises(ValueError):
        compute_norm_stats([np.zeros((N_MELS, 20))], crop_frames=0)
    with pytest.raises(ValueError, match="NaN"):
        compute_norm_stats([np.full((N_MELS, 20), np.nan)], crop_frames=10, num_samples=2)


def test_norm_stats_tensor_round_trip() -> None:
    stats = NormStats(mean=-7.26178, std=4.35115)
    t = stats.as_tensor()
    assert t.dtype == torch.float32 and t.shape == (2,)
    back = NormStats.from_tensor(t)
    assert back.mean == pytest.approx(stats.mean, rel=1e-6) and back.std == pytest.approx(stats.std, rel=1e-6)
    assert NormStats.from_tensor([0.0, 1.0]) == NormStats(0.0, 1.0)
    with pytest.raises(ValueError):
        NormStats.from_tensor(torch.zeros(3))
    with pytest.raises(ValueError):
        NormStats(mean=0.0, std=0.0)
