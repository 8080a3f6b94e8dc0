"""Audio front end: decoding to 16 kHz mono, the M2D log-mel transform, and log-mel normalisation stats."""

from m2d2.audio.decode import AudioDecodeError, AudioInfo, audio_info, downmix, load_audio, resample
from m2d2.audio.frontend import LogMelConfig, LogMelSpectrogram
from m2d2.audio.stats import NormStats, compute_norm_stats

__all__ = [
    "AudioDecodeError",
    "AudioInfo",
    "LogMelConfig",
    "LogMelSpectrogram",
    "NormStats",
    "audio_info",
    "compute_norm_stats",
    "downmix",
    "load_audio",
    "resample",
]
