"""Decode audio files into the mono 16 kHz float32 waveforms the front end expects.

``soundfile`` (libsndfile) does the decoding: WAV, FLAC, OGG/Vorbis, MP3 (libsndfile >= 1.1) and more, with no
ffmpeg dependency. Channels are averaged (the reference used ``librosa.load(mono=True)``, which also averages)
and the rate is converted with torchaudio's band-limited sinc resampler.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = ["AudioDecodeError", "AudioInfo", "AudioSource", "audio_info", "downmix", "load_audio", "resample"]

#: A local path, an open binary file-like object, or the encoded file's bytes.
AudioSource = str | os.PathLike | BinaryIO | bytes | bytearray | memoryview


class AudioDecodeError(ValueError):
    """The input could not be turned into a usable waveform (bad format, empty, NaN/Inf samples)."""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file, read without decoding the samples (for manifests)."""

    sample_rate: int
    channels: int
    frames: int
    duration_s: float


def _describe(source: AudioSource) -> str:
    """A name for error messages: the path, the file object's name, or '<N bytes>'."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes in memory>"
    name = getattr(source, "name", None)
    return str(name) if name else f"<{type(source).__name__}>"


def _as_soundfile_input(source: AudioSource) -> str | BinaryIO:
    """Paths go to soundfile as-is (missing files raise FileNotFoundError); bytes are wrapped in BytesIO."""
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"audio file not found: {path}")
        return path
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(bytes(source))
    return source


def downmix(wave: torch.Tensor) -> torch.Tensor:
    """[C, S] -> [S] by averaging channels (a [S] input is returned unchanged).

    Averaging, not summing, keeps the level of a centred mono source the same as in a mono file.
    """
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise ValueError(f"expected [channels, samples] or [samples], got shape {tuple(wave.shape)}")
    if wave.shape[0] == 1:
        return wave[0]
    return wave.mean(dim=0)


def resample(wave: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Resample along the last axis with torchaudio's windowed-sinc resampler; no-op when the rates match.

    Output length is ``ceil(S * target_sr / orig_sr)``.
    """
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave
    return torchaudio.functional.resample(wave, orig_sr, target_sr)


def audio_info(source: AudioSource) -> AudioInfo:
    """Sample rate, channels, frames and duration from the file header (no decoding).

    A file-like source is returned to its original position afterwards, so it can still be decoded.
    """
    name = _describe(source)
    target = _as_soundfile_input(source)
    position = target.tell() if hasattr(target, "seek") and target.seekable() else None
    try:
        info = sf.info(target)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise AudioDecodeError(f"cannot read audio header of {name}: {exc}") from exc
    finally:
        if position is not None:
            target.seek(position)
    return AudioInfo(
        sample_rate=int(info.samplerate),
        channels=int(info.channels),
        frames=int(info.frames),
        duration_s=float(info.frames) / float(info.samplerate),
    )


def load_audio(source: AudioSource, target_sr: int = 16000) -> torch.Tensor:
    """Decode ``source`` to a 1-D float32 mono waveform at ``target_sr``.

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError: undecodable data, no samples, or NaN/Inf samples (float WAVs can carry them, and one
            NaN would poison a whole batch downstream).
    """
    name = _describe(source)
    target = _as_soundfile_input(source)
    try:
        data, sample_rate = sf.read(target, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        raise AudioDecodeError(f"cannot decode audio {name}: {exc}") from exc
    if data.size == 0:
        raise AudioDecodeError(f"audio {name} contains no samples")
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"audio {name} contains NaN or infinite samples")
    wave = downmix(torch.from_numpy(np.ascontiguousarray(data.T)))
    return resample(wave, sample_rate, target_sr).contiguous()
