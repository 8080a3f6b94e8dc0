"""Decode audio files into the mono 16 kHz float32 waveforms the front end expects.

``soundfile`` (libsndfile) does the decoding: WAV, FLAC, OGG/Vorbis, MP3 (libsndfile >= 1.1) and more, with no
ffmpeg dependency. Channels are averaged (the reference used ``librosa.load(mono=True)``, which also averages)
and the rate is converted with torchaudio's band-limited sinc resampler.

Web-scale corpora hold every kind of broken file, so a failure is an :class:`AudioDecodeError` whose ``kind``
says which (``empty``, ``corrupt``, ``unsupported_format``, ``truncated``, ``non_finite``, ``bad_sample_rate``):
ingestion turns it into a quarantine row instead of a crash or a silent drop.
"""

from __future__ import annotations

import io
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio

__all__ = [
    "AudioDecodeError",
    "AudioInfo",
    "AudioSource",
    "DecodedAudio",
    "DECODE_ISSUES",
    "audio_info",
    "decode_audio",
    "downmix",
    "is_silent",
    "load_audio",
    "resample",
]

#: A local path, an open binary file-like object, or the encoded file's bytes.
AudioSource = str | os.PathLike | BinaryIO | bytes | bytearray | memoryview

# What can be wrong with a file; each is a quarantine reason of its own.
EMPTY = "empty"  # 0 bytes, or a valid header with no samples
CORRUPT = "corrupt"  # not parseable as any audio format libsndfile knows
UNSUPPORTED = "unsupported_format"  # a real audio container libsndfile cannot read (MP4/AAC, WebM, WMA, ...)
TRUNCATED = "truncated"  # the stream ends or breaks before the length its header declares
NON_FINITE = "non_finite"  # NaN or +-inf samples (float WAV/FLAC can carry them)
BAD_SAMPLE_RATE = "bad_sample_rate"  # outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]: a broken header, not audio
SILENT = "silent"  # digital silence; decided by the caller (see :func:`is_silent`)
DECODE_ISSUES = (EMPTY, CORRUPT, UNSUPPORTED, TRUNCATED, NON_FINITE, BAD_SAMPLE_RATE, SILENT)

MIN_SAMPLE_RATE = 4000
MAX_SAMPLE_RATE = 768000
#: Containers/codecs libsndfile does not read; a file named like this (or starting with their magic bytes) is
#: reported as an unsupported format rather than as corrupt, so the fix (transcode it) is obvious.
UNSUPPORTED_EXTENSIONS = frozenset({".m4a", ".mp4", ".aac", ".webm", ".mkv", ".wma", ".asf", ".amr", ".3gp", ".ape",
                                    ".wv", ".mid", ".midi", ".ra"})
_WAV_DATA_LENGTH = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF - 1}  # placeholders written by piping encoders


class AudioDecodeError(ValueError):
    """The input could not be turned into a usable waveform; ``kind`` is one of :data:`DECODE_ISSUES`."""

    def __init__(self, message: str, kind: str = CORRUPT):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file, read without decoding the samples (for manifests)."""

    sample_rate: int
    channels: int
    frames: int
    duration_s: float


@dataclass(frozen=True)
class DecodedAudio:
    """A decoded clip plus the facts ingestion records about it."""

    wave: torch.Tensor  # [S] float32 mono at the requested rate
    sample_rate: int  # of the file
    channels: int  # of the file
    duration_s: float  # of the whole file as its header declares it, before any cap
    capped: bool  # only the first ``max_seconds`` were decoded
    peak: float  # max |sample| of the decoded part, before downmix and resampling


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


def _head(target: str | BinaryIO, size: int = 16) -> bytes:
    """The first bytes of the input (for magic numbers), leaving a stream where it was."""
    if isinstance(target, str):
        with open(target, "rb") as handle:
            return handle.read(size)
    if not (hasattr(target, "seek") and target.seekable()):
        return b""
    position = target.tell()
    try:
        return target.read(size)
    finally:
        target.seek(position)


def _is_empty(target: str | BinaryIO) -> bool:
    if isinstance(target, str):
        return os.path.getsize(target) == 0
    return _head(target, 1) == b"" and hasattr(target, "seek") and target.seekable()


# Leading magic bytes of audio containers libsndfile cannot read.
_UNSUPPORTED_MAGIC = (
    (b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (b"0&\xb2u\x8ef\xcf\x11", "ASF/WMA"),
    (b"#!AMR", "AMR"),
    (b"MAC ", "Monkey's Audio"),
    (b"wvpk", "WavPack"),
    (b"MThd", "MIDI (not a recording)"),
)


def _unsupported_container(head: bytes, name: str) -> str | None:
    """Name of a known audio container that libsndfile cannot read, from magic bytes or the file extension."""
    if head[4:8] == b"ftyp":
        return "MP4/M4A (AAC or ALAC)"
    for magic, container in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return container
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "raw AAC (ADTS)"
    ext = os.path.splitext(name.split("?")[0])[1].lower()
    return ext if ext in UNSUPPORTED_EXTENSIONS else None


def _wav_truncation(extra_info: str) -> str | None:
    """libsndfile clamps a WAV whose data chunk claims more bytes than the file holds and notes it in its log."""
    match = _WAV_DATA_LENGTH.search(extra_info)
    if not match:
        return None
    declared, present = int(match.group(1)), int(match.group(2))
    if declared in _STREAMING_SIZES or present >= declared:
        return None
    return f"its data chunk declares {declared} bytes but the file holds {present}"


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
    return torchaudio.functional.resample(wave, *_rate_ratio(orig_sr, target_sr))


def _rate_ratio(orig_sr: int, target_sr: int, limit: int = 1000) -> tuple[int, int]:
    """``orig : target`` in lowest terms, or the nearest ratio with both terms <= ``limit``.

    torchaudio builds one filter phase per output step of the reduced ratio: 44100 -> 16000 is 441 : 160, but an
    odd rate such as 44099 Hz reduces to 44099 : 16000 and takes minutes per clip. The nearest small ratio
    (283 : 780 there) shifts pitch and length by < 2e-4 relative, far below anything audible or learnable.
    """
    g = math.gcd(orig_sr, target_sr)
    if max(orig_sr, target_sr) // g <= limit:
        return orig_sr // g, target_sr // g
    ratio = Fraction(target_sr, orig_sr)
    approx = ratio.limit_denominator(limit) if ratio < 1 else 1 / (1 / ratio).limit_denominator(limit)
    return approx.denominator, approx.numerator


def is_silent(peak: float, threshold_dbfs: float) -> bool:
    """True when the clip's peak is at or below ``threshold_dbfs`` (-90 dBFS is one LSB of 16-bit audio)."""
    return peak <= 10.0 ** (threshold_dbfs / 20.0)


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


def decode_audio(source: AudioSource, target_sr: int = 16000, max_seconds: float | None = None,
                 name: str | None = None) -> DecodedAudio:
    """Decode ``source`` (at most its first ``max_seconds``) to mono float32 at ``target_sr``, checking it.

    Only the kept prefix is decoded, so an hour-long file costs what ``max_seconds`` of it costs. ``name``
    (e.g. the URI the bytes came from) is used in messages and to recognise unsupported formats by extension.

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError: with ``kind`` set to what is wrong (see :data:`DECODE_ISSUES`, except ``silent``,
            which is the caller's policy: see :func:`is_silent` and ``DecodedAudio.peak``).
    """
    name = name or _describe(source)
    target = _as_soundfile_input(source)
    if _is_empty(target):
        raise AudioDecodeError(f"audio {name} is empty (0 bytes)", EMPTY)
    head = _head(target)
    try:
        handle = sf.SoundFile(target)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        container = _unsupported_container(head, name)
        if container:
            raise AudioDecodeError(f"cannot decode audio {name}: {container} is not supported by libsndfile; "
                                   "convert it to FLAC or WAV", UNSUPPORTED) from exc
        raise AudioDecodeError(f"cannot decode audio {name}: {exc}", CORRUPT) from exc
    with handle:
        sample_rate, channels, declared = int(handle.samplerate), int(handle.channels), int(handle.frames)
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise AudioDecodeError(f"audio {name} declares a sample rate of {sample_rate} Hz (accepted: "
                                   f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE})", BAD_SAMPLE_RATE)
        if declared <= 0:
            raise AudioDecodeError(f"audio {name} contains no samples", EMPTY)
        problem = _wav_truncation(handle.extra_info)
        if problem:
            raise AudioDecodeError(f"audio {name} is truncated: {problem}", TRUNCATED)
        limit = declared if max_seconds is None else min(declared, math.ceil(max_seconds * sample_rate))
        blocks, got = [], 0
        try:
            while got < limit:
                block = handle.read(frames=min(limit - got, 1 << 20), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(block)
                got += block.shape[0]
        except (sf.SoundFileError, RuntimeError) as exc:
            raise AudioDecodeError(f"audio {name} is truncated: decoding broke after {got} of {declared} frames "
                                   f"({exc})", TRUNCATED) from exc
    # MP3 headers give an estimate; a shortfall beyond a few codec frames means the stream was cut.
    if limit - got > max(4608, limit // 100):
        raise AudioDecodeError(f"audio {name} is truncated: {got} of {limit} declared frames decoded", TRUNCATED)
    if got == 0:
        raise AudioDecodeError(f"audio {name} contains no samples", EMPTY)
    data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    finite = np.isfinite(data)
    if not finite.all():
        raise AudioDecodeError(f"audio {name} contains NaN or infinite samples ({int((~finite).sum())} of "
                               f"{data.size})", NON_FINITE)
    peak = float(np.abs(data).max())
    wave = downmix(torch.from_numpy(np.ascontiguousarray(data.T)))
    return DecodedAudio(wave=resample(wave, sample_rate, target_sr).contiguous(), sample_rate=sample_rate,
                        channels=channels, duration_s=declared / sample_rate, capped=got < declared, peak=peak)


def load_audio(source: AudioSource, target_sr: int = 16000, max_seconds: float | None = None) -> torch.Tensor:
    """Decode ``source`` to a 1-D float32 mono waveform at ``target_sr`` (see :func:`decode_audio`).

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError: undecodable data, no samples, or NaN/Inf samples (float WAVs can carry them, and one
            NaN would poison a whole batch downstream).
    """
    return decode_audio(source, target_sr, max_seconds).wave
