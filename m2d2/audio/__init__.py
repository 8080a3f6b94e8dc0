"""Audio front end: decoding to 16 kHz mono, the M2D log-mel transform, and log-mel normalisation stats."""

from m2d2.audio.decode import (
    DECODE_ISSUES,
    DEFAULT_MAX_CHANNELS,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_SAMPLES,
    AudioDecodeError,
    AudioInfo,
    DecodedAudio,
    audio_info,
    decode_audio,
    downmix,
    is_silent,
    load_audio,
    read_audio_file,
    resample,
)
from m2d2.audio.frontend import LogMelConfig, LogMelSpectrogram
from m2d2.audio.stats import NormStats, compute_norm_stats

__all__ = [
    "DECODE_ISSUES",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_FILE_MB",
    "DEFAULT_MAX_SAMPLES",
    "AudioDecodeError",
    "AudioInfo",
    "DecodedAudio",
    "LogMelConfig",
    "LogMelSpectrogram",
    "NormStats",
    "audio_info",
    "compute_norm_stats",
    "decode_audio",
    "downmix",
    "is_silent",
    "load_audio",
    "read_audio_file",
    "resample",
]
