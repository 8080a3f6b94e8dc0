"""Decode audio files into the mono 16 kHz float32 waveforms the front end expects.

``soundfile`` (libsndfile) does the decoding: WAV, FLAC, OGG/Vorbis, MP3 (libsndfile >= 1.1) and more, with no
ffmpeg dependency. Channels are averaged (the reference used ``librosa.load(mono=True)``, which also averages)
and the rate is converted with torchaudio's band-limited sinc resampler.

Web-scale corpora hold every kind of broken file, so a failure is an :class:`AudioDecodeError` whose ``kind``
says which (``empty``, ``corrupt``, ``unsupported_format``, ``truncated``, ``non_finite``, ``bad_sample_rate``,
``too_large``, ``too_many_channels``): ingestion turns it into a quarantine row instead of a crash or a silent drop.

**Bounded memory.** A tiny, highly compressed file can declare hours of many-channel audio, so decoding is
bounded three ways: the file size is checked before anything is read (``max_file_mb``), the samples to decode
(frames x channels of the kept prefix) are checked against ``max_samples`` from the header, and files with more
than ``max_channels`` channels are refused. Samples are read in blocks of at most :data:`BLOCK_SAMPLES` and each
block is averaged to mono at once, and long signals are resampled piecewise, so peak memory is the kept mono
signal plus one block and one resampling piece, not frames x channels.
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

from m2d2 import io as storage

__all__ = [
    "AudioDecodeError",
    "AudioInfo",
    "AudioSource",
    "DecodedAudio",
    "DECODE_ISSUES",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_FILE_MB",
    "DEFAULT_MAX_SAMPLES",
    "audio_info",
    "decode_audio",
    "downmix",
    "is_silent",
    "load_audio",
    "read_audio_file",
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
TOO_LARGE = "too_large"  # the file is over ``max_file_mb``, or its kept part over ``max_samples`` samples
TOO_MANY_CHANNELS = "too_many_channels"  # more than ``max_channels`` channels
DECODE_ISSUES = (EMPTY, CORRUPT, UNSUPPORTED, TRUNCATED, NON_FINITE, BAD_SAMPLE_RATE, SILENT, TOO_LARGE,
                 TOO_MANY_CHANNELS)

#: Files larger than this (MiB) are refused before they are read: ingestion holds one file's bytes at a time.
DEFAULT_MAX_FILE_MB = 512.0
#: More channels than this are refused: 7.1 surround is the most a recording for this model plausibly has,
#: and a header declaring hundreds of channels multiplies the decoding cost.
DEFAULT_MAX_CHANNELS = 8
#: Budget of decoded samples (frames x channels of the kept prefix): 2**28, e.g. 10 min of 8-channel 48 kHz or
#: 23 min of mono 192 kHz. The kept mono signal is at most this many float32 values (1 GiB).
DEFAULT_MAX_SAMPLES = 1 << 28
#: Samples (frames x channels) read per block before the block is averaged to mono: 4 MiB of float32.
BLOCK_SAMPLES = 1 << 20
#: Longer signals are resampled piecewise (see :func:`resample`); 30 s at up to 279 kHz is one piece.
RESAMPLE_CHUNK_SAMPLES = 1 << 23
#: Context (in steps of the reduced input rate) around each piece: torchaudio's default kernel (6 zero crossings,
#: rolloff 0.99) reaches ``6 / 0.99 + 1`` < 8 steps, so 64 leaves every kept output its full support.
_RESAMPLE_MARGIN_STEPS = 64

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
    """Paths go to soundfile as-is (missing files raise FileNotFoundError); bytes are wrapped in BytesIO.

    ``bytes`` are wrapped without a copy (BytesIO shares an immutable buffer until written to), so decoding a
    file read into memory does not hold it twice.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"audio file not found: {path}")
        return path
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if isinstance(source, bytearray | memoryview):
        return io.BytesIO(bytes(source))
    return source


def _input_size(target: str | BinaryIO) -> int | None:
    """Bytes left in the input: a path's size, a seekable stream's remaining length; None for a pipe."""
    if isinstance(target, str):
        return os.path.getsize(target)
    if not (hasattr(target, "seek") and target.seekable()):
        return None
    position = target.tell()
    try:
        target.seek(0, os.SEEK_END)
        return target.tell() - position
    finally:
        target.seek(position)


def _file_too_large(name: str, size: int, max_file_mb: float) -> AudioDecodeError:
    return AudioDecodeError(f"audio {name} is {size / 2**20:.1f} MiB, over the file size limit of {max_file_mb:g} MiB "
                            "(setting max_file_mb)", TOO_LARGE)


def _max_bytes(max_file_mb: float | None) -> int | None:
    return None if max_file_mb is None else int(max_file_mb * 2**20)


def read_audio_file(uri: str | os.PathLike, max_file_mb: float | None = DEFAULT_MAX_FILE_MB) -> tuple[bytes, str]:
    """The bytes of ``uri`` (local path or fsspec URI) and their sha256, read once and never past the limit.

    The size is checked before anything is read, so an oversized file costs no memory; the caller hashes and
    decodes the same bytes (a file replaced in between cannot be stored under the old hash).

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: it cannot be read.
        AudioDecodeError: ``too_large``, over ``max_file_mb``.
    """
    try:
        return storage.read_limited(uri, _max_bytes(max_file_mb))
    except storage.FileTooLargeError as exc:
        raise _file_too_large(str(uri), exc.size, max_file_mb) from exc


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

    Output length is ``ceil(S * target_sr / orig_sr)``. Signals longer than :data:`RESAMPLE_CHUNK_SAMPLES` are
    resampled in overlapping pieces: torchaudio's convolution needs several times its input in scratch memory
    (~7x at 48 -> 16 kHz), so a 10-minute file would need gigabytes at once. Each piece carries enough real
    context on both sides that every kept output sees exactly the samples it sees in one pass.
    """
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    if orig_sr == target_sr:
        return wave
    orig, new = _rate_ratio(orig_sr, target_sr)
    length = wave.shape[-1]
    groups = -(-length // orig)  # the convolution steps by `orig` input samples, `new` outputs per step
    pieces = -(-groups * orig // RESAMPLE_CHUNK_SAMPLES)
    if pieces <= 1:
        return torchaudio.functional.resample(wave, orig, new)
    per_piece = -(-groups // pieces)  # equal pieces: no tiny last one
    margin = _RESAMPLE_MARGIN_STEPS
    out = []
    for g0 in range(0, groups, per_piece):
        g1 = min(groups, g0 + per_piece)
        s0 = max(0, g0 - margin)
        piece = torchaudio.functional.resample(wave[..., s0 * orig : min(length, (g1 + margin) * orig)], orig, new)
        out.append(piece[..., (g0 - s0) * new : (g1 - s0) * new])
    target = int(torch.ceil(torch.as_tensor(new * length / orig)))  # torchaudio's own (float32) length rule
    return torch.cat(out, dim=-1)[..., :target]


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


def _too_many_samples(name: str, frames: int, channels: int, max_samples: int, capped: bool) -> AudioDecodeError:
    what = "its first max_seconds" if capped else "the whole file"
    return AudioDecodeError(f"audio {name}: {what} would decode {frames * channels:,} samples ({frames:,} frames x "
                            f"{channels} channels), over the budget of {max_samples:,} (setting max_samples); "
                            "lower max_seconds or raise max_samples", TOO_LARGE)


def decode_audio(source: AudioSource, target_sr: int = 16000, max_seconds: float | None = None,
                 name: str | None = None, *, max_file_mb: float | None = DEFAULT_MAX_FILE_MB,
                 max_channels: int | None = DEFAULT_MAX_CHANNELS,
                 max_samples: int | None = DEFAULT_MAX_SAMPLES) -> DecodedAudio:
    """Decode ``source`` (at most its first ``max_seconds``) to mono float32 at ``target_sr``, checking it.

    Only the kept prefix is decoded, so an hour-long file costs what ``max_seconds`` of it costs, and it is
    decoded in blocks that are averaged to mono at once: peak memory is the kept mono signal plus one block of
    :data:`BLOCK_SAMPLES`, whatever the channel count. ``name`` (e.g. the URI the bytes came from) is used in
    messages and to recognise unsupported formats by extension. The limits (``None`` = none) are checked before
    any sample is decoded: ``max_file_mb`` on the input's size, ``max_channels`` and ``max_samples`` (frames x
    channels of the kept prefix) on the header.

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError: with ``kind`` set to what is wrong (see :data:`DECODE_ISSUES`, except ``silent``,
            which is the caller's policy: see :func:`is_silent` and ``DecodedAudio.peak``).
    """
    name = name or _describe(source)
    target = _as_soundfile_input(source)
    size = _input_size(target)
    if size == 0:
        raise AudioDecodeError(f"audio {name} is empty (0 bytes)", EMPTY)
    limit_bytes = _max_bytes(max_file_mb)
    if limit_bytes is not None and size is not None and size > limit_bytes:
        raise _file_too_large(name, size, max_file_mb)
    head = _head(target)
    try:
        handle = sf.SoundFile(target)
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        container = _unsupported_container(head, name)
        if container:
            raise AudioDecodeError(f"cannot decode audio {name}: {container} is not supported by libsndfile; "
                                   "convert it to FLAC or WAV", UNSUPPORTED) from exc
        # soundfile names an in-memory input by its repr (an address): name it as the caller did, so the same
        # bytes always give the same reason (quarantine tables are compared across runs)
        reason = str(exc) if isinstance(target, str) else str(exc).replace(repr(target), repr(name))
        raise AudioDecodeError(f"cannot decode audio {name}: {reason}", CORRUPT) from exc
    with handle:
        sample_rate, channels, declared = int(handle.samplerate), int(handle.channels), int(handle.frames)
        if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
            raise AudioDecodeError(f"audio {name} declares a sample rate of {sample_rate} Hz (accepted: "
                                   f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE})", BAD_SAMPLE_RATE)
        if declared <= 0:
            raise AudioDecodeError(f"audio {name} contains no samples", EMPTY)
        if max_channels is not None and channels > max_channels:
            raise AudioDecodeError(f"audio {name} has {channels} channels, more than the limit of {max_channels} "
                                   "(setting max_channels)", TOO_MANY_CHANNELS)
        problem = _wav_truncation(handle.extra_info)
        if problem:
            raise AudioDecodeError(f"audio {name} is truncated: {problem}", TRUNCATED)
        limit = declared if max_seconds is None else min(declared, math.ceil(max_seconds * sample_rate))
        if max_samples is not None and limit * channels > max_samples:
            raise _too_many_samples(name, limit, channels, max_samples, limit < declared)
        mono, got, peak, non_finite = _read_mono(handle, limit, name, declared)
    # MP3 headers give an estimate; a shortfall beyond a few codec frames means the stream was cut.
    if limit - got > max(4608, limit // 100):
        raise AudioDecodeError(f"audio {name} is truncated: {got} of {limit} declared frames decoded", TRUNCATED)
    if got == 0:
        raise AudioDecodeError(f"audio {name} contains no samples", EMPTY)
    if non_finite:
        raise AudioDecodeError(f"audio {name} contains NaN or infinite samples ({non_finite} of "
                               f"{got * channels})", NON_FINITE)
    wave = torch.from_numpy(mono[:got])
    return DecodedAudio(wave=resample(wave, sample_rate, target_sr).contiguous(), sample_rate=sample_rate,
                        channels=channels, duration_s=declared / sample_rate, capped=got < declared, peak=peak)


def _read_mono(handle: sf.SoundFile, limit: int, name: str, declared: int) -> tuple[np.ndarray, int, float, int]:
    """Read up to ``limit`` frames block by block into a float32 mono array (channel mean, as :func:`downmix`).

    Returns the array (``got`` valid frames), ``got``, the peak |sample| over all channels before the downmix and
    the number of non-finite samples. The mono array is allocated for ``limit`` frames, but its pages cost
    memory only once written, so a header that over-declares its length costs nothing.
    """
    channels = handle.channels
    # A power of two: torch reduces the tail of a row (length mod its vector width) on another path, so blocks
    # whose length is a multiple of every vector width give bit-identical means to one [C, S] downmix.
    block_frames = 1 << max(0, (BLOCK_SAMPLES // channels).bit_length() - 1)
    try:
        mono = np.empty(limit, dtype=np.float32)
    except MemoryError as exc:  # only without a max_samples budget: a header declaring absurdly many frames
        raise AudioDecodeError(f"audio {name} declares {limit:,} frames, more than memory can hold; set "
                               "max_seconds or max_samples", TOO_LARGE) from exc
    buffer = np.empty((min(limit, block_frames), channels), dtype=np.float32)
    got, peak, non_finite = 0, 0.0, 0
    try:
        while got < limit:
            block = handle.read(out=buffer[: min(limit - got, block_frames)])
            n = block.shape[0]
            if n == 0:
                break
            block_peak = float(np.abs(block).max())
            if not math.isfinite(block_peak):  # NaN propagates through max, inf is inf: count them only then
                non_finite += int(block.size - np.isfinite(block).sum())
            else:
                peak = max(peak, block_peak)
            if channels == 1:
                mono[got : got + n] = block[:, 0]
            else:  # the same reduction as downmix() on [C, S], so results do not depend on the block size
                mono[got : got + n] = downmix(torch.from_numpy(np.ascontiguousarray(block.T))).numpy()
            got += n
    except (sf.SoundFileError, RuntimeError) as exc:
        raise AudioDecodeError(f"audio {name} is truncated: decoding broke after {got} of {declared} frames "
                               f"({exc})", TRUNCATED) from exc
    return mono, got, peak, non_finite


def load_audio(source: AudioSource, target_sr: int = 16000, max_seconds: float | None = None, *,
               max_file_mb: float | None = DEFAULT_MAX_FILE_MB, max_channels: int | None = DEFAULT_MAX_CHANNELS,
               max_samples: int | None = DEFAULT_MAX_SAMPLES) -> torch.Tensor:
    """Decode ``source`` to a 1-D float32 mono waveform at ``target_sr`` (see :func:`decode_audio`).

    Raises:
        FileNotFoundError: a path that does not exist.
        AudioDecodeError: undecodable data, no samples, NaN/Inf samples (float WAVs can carry them, and one
            NaN would poison a whole batch downstream), or over a limit (``too_large``, ``too_many_channels``).
    """
    return decode_audio(source, target_sr, max_seconds, max_file_mb=max_file_mb, max_channels=max_channels,
                        max_samples=max_samples).wave
