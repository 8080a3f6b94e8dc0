"""Synthetic demo corpus: ten NumPy-synthesised sound classes with instance captions and a Parquet manifest.

Why synthetic: ``make demo`` must train and evaluate M2D2 end to end on CPU, offline, in minutes. Real data sets
are large and licence-bound; these clips are small and deterministic, yet hard enough for learning to be
measurable. Every class has its own spectro-temporal recipe, and every instance draws its pitch register, number
of events, tempo, loudness, duration and background noise, which its captions then describe, so a model has to
learn both what a class sounds like and how the words relate to the sound. The files deliberately mix sample
rates (16-48 kHz), mono and stereo, WAV and FLAC, so the decode path (resample, downmix) does real work.

Determinism: each clip draws from its own ``SeedSequence(seed, spawn_key=(split, class, index))``, split into
independent streams for attributes, captions and audio. The same config therefore gives byte-identical files and
manifest, and changing one split's size (or the caption templates) never changes another clip's audio.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from numpy.typing import NDArray
from tqdm import tqdm

from m2d2.data.manifest import REQUIRED_SCHEMA
from m2d2.io import atomic_write_bytes

__all__ = [
    "DEMO_CLASSES",
    "DEMO_MANIFEST_SCHEMA",
    "DemoClip",
    "DemoCorpusConfig",
    "generate_demo_corpus",
    "plan_demo_corpus",
    "zero_shot_prompt",
]

log = logging.getLogger(__name__)

Array = NDArray[np.float64]
Rng = np.random.Generator

#: Length of the training crop (80 x 208 log-mel frames at 100 frames/s); no clip may be shorter.
TRAINING_CROP_S: float = 2.08
#: Smallest allowed ``eval_per_class``: fewer eval clips make zero-shot accuracy too noisy to compare runs.
#: A module constant (looked up at validation time) so tests can lower it with ``monkeypatch``.
MIN_EVAL_PER_CLASS: int = 20
#: Synthesised content stays below this frequency, so a 16 kHz file (Nyquist 8 kHz) holds every class intact.
MAX_CONTENT_HZ: float = 7000.0
#: Bump when the synthesis or caption code changes: it is part of ``corpus.json``, so old corpora regenerate.
GENERATOR_VERSION: int = 1

SPLITS: tuple[str, ...] = ("train", "eval")
BACKGROUNDS: tuple[str, ...] = ("none", "hiss", "hum")
MANIFEST_FILE = "manifest.parquet"
CORPUS_FILE = "corpus.json"
_EXTENSIONS = {"WAV": "wav", "FLAC": "flac"}

#: The demo writes the project's manifest schema (its required columns), like every source adapter.
DEMO_MANIFEST_SCHEMA = REQUIRED_SCHEMA


def zero_shot_prompt(label: str) -> str:
    """The zero-shot classification prompt for ``label``; training captions never contain its ``can be heard``."""
    return f"{label} can be heard"


@dataclass(frozen=True)
class DemoCorpusConfig:
    """Parameters of the demo corpus generator; ``corpus.json`` stores them, and equal configs give equal bytes.

    Attributes:
        seed: root of every clip's ``SeedSequence``; the only source of randomness.
        train_per_class: training clips per class.
        eval_per_class: evaluation clips per class (at least ``MIN_EVAL_PER_CLASS`` = 20, so accuracy is not noise).
        min_duration_s: shortest clip; at least the 2.08 s training crop (the clip's frame count is rounded up, so
            resampling to 16 kHz never drops below it).
        max_duration_s: longest clip. Event classes lengthen a clip (up to this) to fit their events, so
            durations are spread over the whole range.
        formats: ``(sample_rate, channels, container)`` choices, cycled per clip (``(class + index) % len``), so
            every class gets every format once it has ``len(formats)`` clips. Rates >= 16 kHz, 1 or 2 channels,
            ``"WAV"`` or ``"FLAC"`` (lossless, so files are byte-deterministic).
        subtype: soundfile sample encoding of every file.
        peak_dbfs_range: per-clip peak level is drawn uniformly from this range (dB re full scale). Below -22 dBFS
            captions may call a clip quiet/faint, above -13 dBFS loud.
        background_weights: relative odds of background ``none`` / ``hiss`` (white noise, low-passed at 7 kHz,
            independent per channel) / ``hum`` (50 or 60 Hz mains hum with harmonics). "none" still carries a
            room-tone floor 60 dB under the peak, so silent gaps are not digital zeros.
        snr_db_range: signal-to-background ratio (RMS over the clip, dB) for hiss and hum, drawn uniformly. Below
            20 dB captions call the background noticeable, otherwise faint.
        captions_per_clip: inclusive range of the number of distinct captions per clip.
        max_pan: stereo clips place the source at a pan position drawn from ``[-max_pan, max_pan]``
            (constant-power law), so the two channels differ and downmixing is real work.
        shadow_cutoff_hz_range: stereo clips low-pass the far channel (first order, like head shadow) at a
            cutoff drawn from this range. A pan plus a filter, not a delay: a delay would comb-filter the mono
            downmix and could notch a whistle out of it.
    """

    seed: int = 0
    train_per_class: int = 48
    eval_per_class: int = 24
    min_duration_s: float = 2.6
    max_duration_s: float = 4.0
    formats: tuple[tuple[int, int, str], ...] = (
        (16000, 1, "WAV"),
        (22050, 1, "FLAC"),
        (44100, 2, "WAV"),
        (48000, 2, "FLAC"),
        (32000, 1, "WAV"),
    )
    subtype: str = "PCM_16"
    peak_dbfs_range: tuple[float, float] = (-30.0, -6.0)
    background_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    snr_db_range: tuple[float, float] = (12.0, 30.0)
    captions_per_clip: tuple[int, int] = (2, 3)
    max_pan: float = 0.4
    shadow_cutoff_hz_range: tuple[float, float] = (2500.0, 6000.0)

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from JSON) to tuples so equal configs compare and serialise equal.
        object.__setattr__(self, "formats", tuple((int(r), int(c), str(f).upper()) for r, c, f in self.formats))
        for name in (
            "peak_dbfs_range",
            "background_weights",
            "snr_db_range",
            "captions_per_clip",
            "shadow_cutoff_hz_range",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.train_per_class < 0:
            raise ValueError(f"train_per_class must be >= 0, got {self.train_per_class}")
        if self.eval_per_class < MIN_EVAL_PER_CLASS:
            raise ValueError(f"eval_per_class must be >= {MIN_EVAL_PER_CLASS}, got {self.eval_per_class}")
        if not TRAINING_CROP_S <= self.min_duration_s <= self.max_duration_s:
            raise ValueError(
                f"need {TRAINING_CROP_S} <= min_duration_s <= max_duration_s, got "
                f"{self.min_duration_s}, {self.max_duration_s}"
            )
        if not self.formats:
            raise ValueError("formats must not be empty")
        for rate, channels, container in self.formats:
            if rate < 16000 or channels not in (1, 2) or container not in _EXTENSIONS:
                raise ValueError(
                    f"format {(rate, channels, container)}: need rate >= 16000, 1-2 channels, one of "
                    f"{sorted(_EXTENSIONS)}"
                )
        lo, hi = self.peak_dbfs_range
        if not lo <= hi <= 0.0:
            raise ValueError(f"peak_dbfs_range must satisfy lo <= hi <= 0, got {self.peak_dbfs_range}")
        if len(self.background_weights) != len(BACKGROUNDS) or min(self.background_weights) < 0:
            raise ValueError(f"background_weights needs {len(BACKGROUNDS)} non-negative weights")
        if sum(self.background_weights) <= 0:
            raise ValueError("background_weights must not all be zero")
        if self.snr_db_range[0] > self.snr_db_range[1]:
            raise ValueError(f"snr_db_range must be (lo, hi), got {self.snr_db_range}")
        if not 1 <= self.captions_per_clip[0] <= self.captions_per_clip[1] <= 3:
            raise ValueError(f"captions_per_clip must be within 1..3, got {self.captions_per_clip}")
        if not 0.0 <= self.max_pan <= 1.0:
            raise ValueError(f"need 0 <= max_pan <= 1, got {self.max_pan}")
        if not 0.0 < self.shadow_cutoff_hz_range[0] <= self.shadow_cutoff_hz_range[1]:
            raise ValueError(f"shadow_cutoff_hz_range must be (lo, hi) > 0, got {self.shadow_cutoff_hz_range}")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "eval": self.eval_per_class}[split]


@dataclass(frozen=True)
class DemoClip:
    """One planned clip: everything drawn for it except the samples, so captions can be checked against the truth.

    ``attributes`` holds the class-specific draws (``register``, ``count``, ``onsets_s``, ``tempo`` ...) plus the
    stereo ``pan`` / ``shadow_hz``; ``num_frames`` is the file's length in samples per channel.
    """

    clip_id: str
    split: str
    label: str
    class_index: int
    index: int
    sample_rate: int
    channels: int
    format: str
    num_frames: int
    peak_dbfs: float
    background: str
    snr_db: float | None
    attributes: dict[str, Any] = field(compare=False)
    captions: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.sample_rate

    @property
    def audio_uri(self) -> str:
        return f"audio/{self.split}/{self.clip_id}.{_EXTENSIONS[self.format]}"


# ----------------------------------------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: Every count word a caption may use; tests check that exactly the right one appears.
COUNT_WORD_RE = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|once|twice)\b")


def _pick(rng: Rng, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(*words: str) -> str:
    return " ".join(w for w in words if w)


def _a(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{_NUMBER_WORDS[n]} times")


def _counted(n: int, singular: str, plural: str, *adjectives: str) -> str:
    """'three quick rings', 'one long honk'."""
    return _join(_NUMBER_WORDS[n], *adjectives, singular if n == 1 else plural)


_LOUDNESS = {"quiet": ("faint", "quiet", "soft", "distant"), "loud": ("loud", "very loud", "strong"), "moderate": ("",)}
_TEMPO_ADV = {
    "fast": ("quickly", "in quick succession", "rapidly", "in a fast rhythm"),
    "slow": ("slowly", "with long pauses", "at a slow pace", "unhurriedly"),
}
_TEMPO_ADJ = {"fast": ("quick", "rapid", "fast"), "slow": ("slow", "unhurried", "well-spaced")}
_BACKGROUND = {
    ("none", "faint"): ("in a quiet room", "with no background noise", "against silence"),
    ("hiss", "faint"): ("over faint background hiss", "with a light hiss underneath", "over soft static"),
    ("hiss", "noticeable"): (
        "over noticeable background hiss",
        "with steady static in the background",
        "against a hissing noise floor",
    ),
    ("hum", "faint"): ("over a faint mains hum", "with a low electrical hum in the background", "over a soft hum"),
    ("hum", "noticeable"): (
        "over a noticeable electrical hum",
        "with a buzzing mains hum underneath",
        "against a droning hum",
    ),
}


def _loud(rng: Rng, a: dict[str, Any], p: float = 0.6) -> str:
    """A loudness adjective for the clip's level, used in a fraction ``p`` of captions."""
    return _pick(rng, _LOUDNESS[a["level"]]) if rng.random() < p else ""


def _pitch(rng: Rng, a: dict[str, Any], high: Sequence[str], low: Sequence[str]) -> str:
    return _pick(rng, high if a["register"] == "high" else low)


# ----------------------------------------------------------------------------------------------------------------
# Signal helpers (all float64, mono, any sample rate)
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _band_gain(size: int, sr: int, lo: float, hi: float, order: int, tilt: float) -> Array:
    """Butterworth-like band-pass magnitude on the ``rfft`` bins of ``size`` (lo <= 0: low-pass only).

    ``tilt`` adds a spectral slope in dB/octave re 1 kHz. Cached: a clip asks for the same shape several times.
    """
    f = np.maximum(np.fft.rfftfreq(size, 1.0 / sr), 1e-3)
    r = (f / min(hi, MAX_CONTENT_HZ)) ** 2
    denom = 1.0 + r**order
    if lo > 0:
        denom *= 1.0 + ((lo / f) ** 2) ** order
    gain = 1.0 / np.sqrt(denom)
    if tilt:
        gain *= np.exp(np.log(np.maximum(f, 20.0) / 1000.0) * (tilt / 6.02))
    gain.setflags(write=False)
    return gain


def _fast_len(n: int) -> int:
    """Smallest 5-smooth length >= n: FFTs of clip lengths with large prime factors are ~20x slower."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            best = min(best, p35 * (1 << max(0, (-(-n // p35) - 1).bit_length())))
            p35 *= 3
        p5 *= 5
    return best


def _filter(x: Array, sr: int, lo: float, hi: float, order: int = 2, tilt: float = 0.0) -> Array:
    """Band-pass ``x`` in the FFT domain (zero-padded to a fast length)."""
    n = len(x)
    size = _fast_len(n)
    return np.fft.irfft(np.fft.rfft(x, size) * _band_gain(size, sr, lo, hi, order, tilt), size)[:n]


def _noise(rng: Rng, n: int, sr: int, lo: float, hi: float, order: int = 2, tilt: float = 0.0) -> Array:
    """Band-limited Gaussian noise with unit RMS, drawn directly as a shaped random spectrum (one inverse FFT)."""
    size = _fast_len(n)
    re_im = rng.standard_normal((2, size // 2 + 1), dtype=np.float32)
    spec = (re_im[0] + 1j * re_im[1]) * _band_gain(size, sr, lo, hi, order, tilt)
    x = np.fft.irfft(spec, size)[:n]
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _sin(x: Array | float) -> NDArray[np.float32]:
    """``sin`` in float32, ~6x faster than float64 in NumPy; for arguments below ~1e3 rad (LFOs, short events)."""
    return np.sin(np.asarray(x, dtype=np.float32))


def _cycles(freq: Array | float, n: int, sr: int, start: float = 0.0) -> Array:
    """Unwrapped phase in cycles (float64) of a tone whose frequency may vary per sample."""
    if np.ndim(freq) == 0:
        return start + np.arange(n) * (float(freq) / sr)
    return start + np.cumsum(freq) / sr


def _tone(cycles: Array) -> NDArray[np.float32]:
    """``sin(2 pi cycles)``: wrapped in float64 first, so float32 keeps full precision for long tones."""
    return _sin(2.0 * np.pi * (cycles - np.floor(cycles)))


def _harmonics(cycles: Array, f_max: float, amps: Sequence[float], sr: int) -> NDArray[np.float32]:
    """Sum of ``amps[k-1] * sin(2 pi k cycles)``, dropping harmonics that would exceed the content limit.

    Uses the recurrence ``sin(k p) = 2 cos(p) sin((k-1) p) - sin((k-2) p)``: one sin/cos pair instead of one
    sin per harmonic, which made harmonic-rich classes (the horn) 5x cheaper.
    """
    limit = min(MAX_CONTENT_HZ, 0.45 * sr)
    wrapped = (2.0 * np.pi * (cycles - np.floor(cycles))).astype(np.float32)
    prev, cur = np.zeros_like(wrapped), np.sin(wrapped)
    two_cos = 2.0 * np.cos(wrapped)
    out = np.zeros_like(wrapped)
    for k, amp in enumerate(amps, start=1):
        if k * f_max > limit:
            break
        out += np.float32(amp) * cur
        prev, cur = cur, two_cos * cur - prev
    return out


def _decay(t: Array, tau: float) -> NDArray[np.float32]:
    """``exp(-t / tau)`` in float32."""
    return np.exp(np.asarray(-t / tau, dtype=np.float32))


def _gate(n: int, sr: int, onsets: Sequence[float], lengths: Sequence[float], attack: float, release: float) -> Array:
    """Sum of trapezoidal on/off envelopes (linear ramps) at the given onsets."""
    env = np.zeros(n)
    for onset, length in zip(onsets, lengths):
        i0 = int(round(onset * sr))
        m = min(int(round(length * sr)), n - i0)
        if m <= 0:
            continue
        t = np.arange(m) / sr
        env[i0 : i0 + m] += np.clip(np.minimum(t / attack, (length - t) / release), 0.0, 1.0)
    return env


def _decays(n: int, sr: int, onsets: Sequence[float], taus: Sequence[float], amps: Sequence[float]) -> Array:
    """Sum of exponential decays ``amp * exp(-t / tau)`` starting at each onset (cut after 7 tau)."""
    env = np.zeros(n)
    for onset, tau, amp in zip(onsets, taus, amps):
        i0 = int(round(onset * sr))
        m = min(int(7 * tau * sr) + 1, n - i0)
        if m > 0:
            env[i0 : i0 + m] += amp * np.exp(-np.arange(m) / (tau * sr))
    return env


def _fade(x: Array, sr: int, fade_in: float = 0.05, fade_out: float = 0.1) -> Array:
    """Linear fade in and out along the last axis."""
    n = x.shape[-1]
    t = np.arange(n) / sr
    return x * np.clip(np.minimum(t / fade_in, (n / sr - t) / fade_out), 0.0, 1.0)


def _place(out: Array, onset: float, sr: int, event: Array) -> None:
    """Add ``event`` into ``out`` starting at ``onset`` seconds (truncated at the end)."""
    i0 = int(round(onset * sr))
    m = min(len(event), len(out) - i0)
    if m > 0:
        out[i0 : i0 + m] += event[:m]


# ----------------------------------------------------------------------------------------------------------------
# Event layout shared by the event classes
# ----------------------------------------------------------------------------------------------------------------


def _layout(rng: Rng, cfg: DemoCorpusConfig, count: int, period: float, jitter: float = 0.0) -> dict[str, Any]:
    """Onsets of ``count`` events every ``period`` s, in a clip only a little longer than the events.

    The block of events sits near the middle of the clip (lead = 25-75% of the spare time), and the clip is at
    most 0.9 s longer than the block unless ``min_duration_s`` forces more. With the default durations every
    2.08 s crop therefore overlaps the events: a crop of silence labelled "a car horn" would teach nothing. The
    period shrinks if the events would not fit ``max_duration_s``; ``jitter`` moves onsets by up to that fraction
    of the period, so rhythms are not machine-exact.
    """
    period = min(period, (cfg.max_duration_s - 0.2) / count)
    block = count * period
    duration = float(np.clip(block + rng.uniform(0.3, 0.9), cfg.min_duration_s, cfg.max_duration_s))
    lead = (duration - block) * float(rng.uniform(0.25, 0.75))
    offsets = rng.uniform(-jitter, jitter, count) * period if jitter else np.zeros(count)
    offsets[0] = 0.0
    onsets = [round(lead + i * period + float(o), 4) for i, o in enumerate(offsets)]
    return {"count": count, "period_s": round(period, 4), "onsets_s": onsets, "duration_s": duration}


def _free_duration(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    return {"duration_s": float(rng.uniform(cfg.min_duration_s, cfg.max_duration_s))}


def _coin(rng: Rng, a: str, b: str) -> str:
    return a if rng.random() < 0.5 else b


# ----------------------------------------------------------------------------------------------------------------
# The classes: draw (attributes) -> synth (samples) -> captions (candidate sentences)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recipe:
    label: str
    slug: str
    summary: str
    draw: Callable[[Rng, DemoCorpusConfig], dict[str, Any]]
    synth: Callable[[dict[str, Any], int, int, Rng], Array]
    captions: Callable[[dict[str, Any], Rng], list[str]]


# --- a siren: a continuous harmonic tone swept up and down (slow wail or fast yelp) --------------------------------


def _siren_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, speed = _coin(rng, "high", "low"), _coin(rng, "slow", "fast")
    return {
        "register": register,
        "speed": speed,
        "center_hz": float(rng.uniform(1000, 1400) if register == "high" else rng.uniform(550, 750)),
        "sweep_hz": float(rng.uniform(0.25, 0.45) if speed == "slow" else rng.uniform(2.5, 4.0)),
        "depth": float(rng.uniform(0.22, 0.32)),
        **_free_duration(rng, cfg),
    }


def _siren_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    t = np.arange(n) / sr
    freq = a["center_hz"] * (1.0 + a["depth"] * _sin(2 * np.pi * a["sweep_hz"] * t + rng.uniform(0, 2 * np.pi)))
    x = _harmonics(_cycles(freq, n, sr), float(freq.max()), (1.0, 0.45, 0.25, 0.12), sr)
    return _fade(x, sr)


def _siren_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("high-pitched", "shrill", "piercing"), ("low-pitched", "deep", "low"))

    slow = a["speed"] == "slow"
    adv = _pick(
        rng,
        ("slowly", "in long sweeps", "with a slow rise and fall")
        if slow
        else ("rapidly", "in quick yelps", "with a fast warble"),
    )
    adj = _pick(rng, ("slow", "long", "drawn-out") if slow else ("fast", "rapid", "urgent"))
    wail = "wail" if slow else "yelp"
    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'siren'))} wails {adv}",
        f"{_a(_join(adj, pitch(), 'siren'))} sweeping up and down",
        f"an emergency siren with {_a(_join(_loud(rng, a), pitch(), adj, wail))}",
        f"the {_join(adj, wail)} of {_a(_join(_loud(rng, a), pitch(), 'siren'))}",
        f"{_a(_join(pitch(), 'siren tone'))} rising and falling {adv}",
    ]


# --- a ringing telephone: bursts of a two-tone ring with a 15-25 Hz trill --------------------------------------


def _phone_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, tempo = _coin(rng, "high", "low"), _coin(rng, "fast", "slow")
    count = int(rng.integers(2, 5))
    period = float(rng.uniform(0.45, 0.55) if tempo == "fast" else rng.uniform(0.85, 1.0))
    return {
        "register": register,
        "tempo": tempo,
        "tone_hz": float(rng.uniform(1000, 1300) if register == "high" else rng.uniform(400, 520)),
        "trill_hz": float(rng.uniform(15, 25)),
        **_layout(rng, cfg, count, period),
    }


def _phone_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    t = np.arange(n) / sr
    f1 = a["tone_hz"]
    if a["register"] == "high":  # electronic warble: alternate between two tones at the trill rate
        f2 = f1 * 1.25
        switch = 0.5 + 0.5 * np.tanh(8 * _sin(2 * np.pi * a["trill_hz"] * t))
        freq = f1 + (f2 - f1) * switch
        tone = _harmonics(_cycles(freq, n, sr), f2, (1.0, 0.3, 0.15), sr)
    else:  # bell-like: two close tones, amplitude-modulated by the striker
        f2 = f1 * 1.09
        tone = _harmonics(_cycles(f1, n, sr), f1, (1.0, 0.5, 0.3, 0.2), sr)
        tone += _harmonics(_cycles(f2, n, sr, 0.15), f2, (1.0, 0.5, 0.3, 0.2), sr)
        tone *= 0.55 + 0.45 * _sin(2 * np.pi * a["trill_hz"] * t)
    lengths = [0.6 * a["period_s"]] * a["count"]
    return tone * _gate(n, sr, a["onsets_s"], lengths, 0.01, 0.02)


def _phone_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("shrill", "high-pitched", "electronic"), ("low", "old-fashioned", "mellow"))

    n, tempo = a["count"], a["tempo"]
    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'telephone'))} rings {_times(n)}, {_pick(rng, _TEMPO_ADV[tempo])}",
        f"{_counted(n, 'ring', 'rings', _pick(rng, _TEMPO_ADJ[tempo]))} from {_a(_join(pitch(), 'phone'))}",
        f"{_a(_join(_loud(rng, a), 'phone'))} ringing {_times(n)} {_pick(rng, _TEMPO_ADV[tempo])}",
        f"the {pitch()} ring of a telephone, {_counted(n, 'ring', 'rings')} in a row",
        f"someone's {pitch()} telephone rings {_times(n)}",
    ]


# --- birdsong: short FM chirps sweeping up or down at 1.8-6.3 kHz ------------------------------------------------


def _bird_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, tempo, direction = _coin(rng, "high", "low"), _coin(rng, "fast", "slow"), _coin(rng, "rising", "falling")
    count = int(rng.integers(3, 9))
    period = float(rng.uniform(0.16, 0.22) if tempo == "fast" else rng.uniform(0.35, 0.45))
    return {
        "register": register,
        "tempo": tempo,
        "direction": direction,
        "base_hz": float(rng.uniform(3200, 4200) if register == "high" else rng.uniform(1800, 2600)),
        "span": float(rng.uniform(1.25, 1.5)),
        "chirp_s": float(rng.uniform(0.05, 0.11)),
        **_layout(rng, cfg, count, period, jitter=0.12),
    }


def _bird_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    out = np.zeros(n)
    for onset in a["onsets_s"]:
        length = a["chirp_s"] * rng.uniform(0.85, 1.15)
        m = int(length * sr)
        u = np.arange(m) / m
        lo, hi = a["base_hz"] * rng.uniform(0.95, 1.05), a["base_hz"] * a["span"]
        freq = lo + (hi - lo) * (u if a["direction"] == "rising" else 1.0 - u) ** 1.5
        chirp = _tone(_cycles(freq, m, sr)) * _sin(np.pi * u) ** 2 * rng.uniform(0.6, 1.0)
        _place(out, onset, sr, chirp)
    return out


def _bird_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("high", "high-pitched", "thin"), ("low", "lower", "mellow"))

    def direction() -> str:
        return _pick(
            rng, ("rising", "upward-sweeping") if a["direction"] == "rising" else ("falling", "downward-sweeping")
        )

    n, tempo = a["count"], a["tempo"]
    return [
        f"{_a(_join(_loud(rng, a), 'bird'))} chirps {_times(n)} {_pick(rng, _TEMPO_ADV[tempo])}",
        f"birdsong with {_counted(n, 'chirp', 'chirps', pitch(), direction())}",
        f"{_counted(n, 'chirp', 'chirps', _pick(rng, _TEMPO_ADJ[tempo]), pitch())} from a small bird",
        f"a songbird sings {_counted(n, 'note', 'notes', direction())} {_pick(rng, _TEMPO_ADV[tempo])}",
        f"{_join(_loud(rng, a), 'birdsong')}: {_counted(n, 'chirp', 'chirps', direction())}, "
        f"{_pick(rng, _TEMPO_ADV[tempo])}",
    ]


# --- a drum beat: pitch-dropping kicks (low) or toms (high), optionally with snare hits -------------------------


def _drum_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, tempo = _coin(rng, "low", "high"), _coin(rng, "fast", "slow")
    count = int(rng.integers(4, 8))
    period = float(rng.uniform(0.22, 0.28) if tempo == "fast" else rng.uniform(0.4, 0.5))
    return {
        "register": register,
        "tempo": tempo,
        "snare": bool(rng.random() < 0.5),
        "drum_hz": float(rng.uniform(50, 75) if register == "low" else rng.uniform(140, 220)),
        "decay_s": float(rng.uniform(0.12, 0.2) if register == "low" else rng.uniform(0.08, 0.12)),
        **_layout(rng, cfg, count, period, jitter=0.03),
    }


def _drum_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    out = np.zeros(n)
    m = int(7 * a["decay_s"] * sr)
    t = np.arange(m) / sr
    f0 = a["drum_hz"]
    freq = f0 + 1.5 * f0 * _decay(t, 0.03)
    hit = np.tanh(2.0 * _tone(_cycles(freq, m, sr)) * _decay(t, a["decay_s"]))
    click_m = int(0.004 * sr)
    hit[:click_m] += 0.3 * _noise(rng, click_m, sr, 1000, 6000, order=1) * np.linspace(1, 0, click_m)
    snare_m = int(0.18 * sr)
    ts = np.arange(snare_m) / sr
    for i, onset in enumerate(a["onsets_s"]):
        if a["snare"] and i % 2 == 1:
            body = 0.4 * _sin(2 * np.pi * 190 * ts) + _noise(rng, snare_m, sr, 1500, 6500)
            _place(out, onset, sr, 0.7 * body * _decay(ts, 0.06))
        else:
            _place(out, onset, sr, hit * rng.uniform(0.8, 1.0))
    return out


def _drum_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("high", "tight", "high-pitched"), ("deep", "low", "booming"))

    n, tempo = a["count"], a["tempo"]
    snare = _pick(rng, (" with a snare on every other beat", " alternating with snare hits")) if a["snare"] else ""
    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'drum'))} beats {_times(n)} {_pick(rng, _TEMPO_ADV[tempo])}{snare}",
        f"{_counted(n, 'drum hit', 'drum hits', pitch())} {_pick(rng, _TEMPO_ADV[tempo])}",
        f"{_a(_join(_pick(rng, _TEMPO_ADJ[tempo]), 'drum beat'))} of "
        f"{_counted(n, 'stroke', 'strokes', pitch())}{snare}",
        f"{_join(_loud(rng, a), pitch())} drumming, {_counted(n, 'beat', 'beats')} {_pick(rng, _TEMPO_ADV[tempo])}",
        f"someone strikes {_a(_join(pitch(), 'drum'))} {_times(n)}{snare}",
    ]


# --- rain: a broadband noise bed plus random droplets (pattering noise bursts or ringing drips on metal) ---------


def _rain_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    intensity, surface = _coin(rng, "light", "heavy"), _coin(rng, "ground", "metal")
    return {
        "intensity": intensity,
        "surface": surface,
        "drops_per_s": float(rng.uniform(6, 15) if intensity == "light" else rng.uniform(30, 60)),
        "gust_hz": float(rng.uniform(0.1, 0.3)),
        **_free_duration(rng, cfg),
    }


def _rain_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    heavy = a["intensity"] == "heavy"
    t = np.arange(n) / sr
    bed = _noise(rng, n, sr, 300 if heavy else 1500, 7000, tilt=-1.5 if heavy else 1.0)
    bed *= (1.0 if heavy else 0.25) * (1.0 + 0.2 * _sin(2 * np.pi * a["gust_hz"] * t))
    k = int(rng.poisson(a["drops_per_s"] * n / sr))
    onsets = rng.uniform(0, n / sr, k)
    amps = np.exp(rng.uniform(np.log(0.2), 0.0, k)) * (2.0 if heavy else 3.0)
    if a["surface"] == "ground":
        drops = _noise(rng, n, sr, 1000, 6000) * _decays(n, sr, onsets, rng.uniform(0.003, 0.008, k), amps)
    else:
        drops = np.zeros(n)
        for onset, amp in zip(onsets, amps):
            tau, f = rng.uniform(0.02, 0.05), rng.uniform(2000, 5000)
            m = int(5 * tau * sr)
            tt = np.arange(m) / sr
            _place(drops, float(onset), sr, 0.5 * amp * _sin(2 * np.pi * f * tt) * _decay(tt, tau))
    return _fade(bed + drops, sr, 0.2, 0.2)


def _rain_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    heavy = a["intensity"] == "heavy"

    def intensity() -> str:
        return _pick(rng, ("heavy", "pouring", "intense") if heavy else ("light", "gentle", "soft"))

    metal = a["surface"] == "metal"
    surface = _pick(
        rng,
        ("a tin roof", "a metal roof", "a metal sheet") if metal else ("the pavement", "the ground", "a stone path"),
    )
    drops = _pick(
        rng, ("ringing drips on metal", "pinging drops") if metal else ("pattering drops", "tapping droplets")
    )
    return [
        f"{_join(intensity(), 'rain')} falling on {surface}",
        f"the patter of {_join(_loud(rng, a), intensity(), 'rain')} on {surface}",
        _join(
            _loud(rng, a, 0.4),
            _pick(rng, ("rain pours down steadily", "rain hammers down", "a heavy shower pours down"))
            if heavy
            else _pick(rng, ("rain drizzles gently", "rain patters softly", "rain sprinkles lightly")),
        ),
        f"{_join(_loud(rng, a), intensity(), 'rainfall')} with {drops}",
        f"a {_pick(rng, ('downpour', 'rainstorm') if heavy else ('drizzle', 'light shower'))} with {drops}",
    ]


# --- a car horn: a buzzy two-note chord (major third) in one to three honks -------------------------------------


def _horn_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, length = _coin(rng, "high", "low"), _coin(rng, "short", "long")
    count = int(rng.integers(1, 4))
    honk = float(rng.uniform(0.18, 0.3) if length == "short" else rng.uniform(0.7, 1.05))
    return {
        "register": register,
        "length": length,
        "honk_s": honk,
        "horn_hz": float(rng.uniform(420, 520) if register == "high" else rng.uniform(300, 380)),
        **_layout(rng, cfg, count, honk + float(rng.uniform(0.15, 0.35))),
    }


def _horn_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    saw = [1.0 / k for k in range(1, 16)]
    f1 = a["horn_hz"]
    tone = _harmonics(_cycles(f1, n, sr), f1, saw, sr) + _harmonics(_cycles(f1 * 1.26, n, sr, 0.3), f1 * 1.26, saw, sr)
    honk = min(a["honk_s"], 0.9 * a["period_s"])
    return np.tanh(np.float32(1.5) * tone) * _gate(n, sr, a["onsets_s"], [honk] * a["count"], 0.015, 0.03)


def _horn_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("high", "bright", "high-pitched"), ("low", "deep", "low-pitched"))

    n = a["count"]
    short = a["length"] == "short"

    def length() -> str:
        return _pick(rng, ("short", "brief", "quick") if short else ("long", "sustained", "drawn-out"))

    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'car horn'))} honks {_times(n)}",
        f"{_counted(n, 'honk', 'honks', length())} from {_a(_join(_loud(rng, a), pitch(), 'car horn'))}",
        f"a driver sounds {_a(_join(pitch(), 'horn'))} {_times(n)}, {'briefly' if short else 'holding it down'}",
        f"{_a(_join(pitch(), 'car horn'))} blares {_times(n)}, {'in short bursts' if short else 'long and loud'}",
        f"traffic noise: {_counted(n, 'honk', 'honks', length(), pitch())} of a car horn",
    ]


# --- a whistle: a pure tone at 1.3-3.2 kHz with breath noise, steady or with a pea trill ------------------------


def _whistle_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, tempo = _coin(rng, "high", "low"), _coin(rng, "fast", "slow")
    count = int(rng.integers(2, 5))
    period = float(rng.uniform(0.35, 0.45) if tempo == "fast" else rng.uniform(0.75, 0.9))
    return {
        "register": register,
        "tempo": tempo,
        "trill": bool(rng.random() < 0.5),
        "whistle_hz": float(rng.uniform(2700, 3500) if register == "high" else rng.uniform(1700, 2200)),
        "trill_hz": float(rng.uniform(25, 35)),
        **_layout(rng, cfg, count, period, jitter=0.05),
    }


def _whistle_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    t = np.arange(n) / sr
    f = a["whistle_hz"]
    if a["trill"]:
        freq = f * (1.0 + 0.04 * _sin(2 * np.pi * a["trill_hz"] * t))
        amp = 0.75 + 0.25 * _sin(2 * np.pi * a["trill_hz"] * t)
    else:
        freq, amp = f * (1.0 + 0.005 * _sin(2 * np.pi * 5.0 * t)), 1.0
    tone = amp * _tone(_cycles(freq, n, sr)) + 0.08 * _noise(rng, n, sr, f * 0.8, f * 1.25, order=3)
    return tone * _gate(n, sr, a["onsets_s"], [0.55 * a["period_s"]] * a["count"], 0.01, 0.02)


def _whistle_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("shrill", "high-pitched", "piercing"), ("low", "low-pitched", "mellow"))

    n, tempo = a["count"], a["tempo"]
    trill = _pick(rng, ("trilling", "warbling") if a["trill"] else ("steady", "pure-toned"))
    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'whistle'))} blows {_times(n)}, {_pick(rng, _TEMPO_ADV[tempo])}",
        f"{_counted(n, 'blast', 'blasts', _pick(rng, _TEMPO_ADJ[tempo]) + ',', pitch(), 'whistle')}",
        f"a referee blows {_a(_join(trill, 'whistle'))} {_times(n)}",
        f"someone whistles {_counted(n, 'blast', 'blasts', _pick(rng, _TEMPO_ADJ[tempo]), pitch())}",
        f"{_a(_join(_loud(rng, a), trill, pitch(), 'whistle'))}, {_counted(n, 'blast', 'blasts')} "
        f"{_pick(rng, _TEMPO_ADV[tempo])}",
    ]


# --- an engine hum: a low sawtooth with firing-rate AM and rumble, idling or revving ----------------------------


def _engine_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, state = _coin(rng, "low", "high"), _coin(rng, "idle", "revving")
    return {
        "register": register,
        "state": state,
        "engine_hz": float(rng.uniform(28, 40) if register == "low" else rng.uniform(60, 90)),
        "cutoff_hz": float(rng.uniform(900, 1400) if register == "low" else rng.uniform(1500, 2500)),
        "rev_depth": float(rng.uniform(0.6, 1.0)) if state == "revving" else 0.0,
        **_free_duration(rng, cfg),
    }


def _engine_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    t = np.arange(n) / sr
    bump = _sin(np.pi * t / t[-1]) ** 2  # revving: up to a peak mid-clip and back down
    freq = a["engine_hz"] * (1.0 + a["rev_depth"] * bump + 0.01 * _sin(2 * np.pi * 0.7 * t))
    cycles = _cycles(freq, n, sr)
    saw = 2.0 * (cycles - np.floor(cycles)) - 1.0
    x = _filter(saw * (1.0 + 0.3 * _tone(cycles / 2)), sr, 0, a["cutoff_hz"])  # AM at half rate: firing order
    x = x / (np.sqrt(np.mean(x**2)) + 1e-12) + 0.3 * _noise(rng, n, sr, 0, 800)
    return _fade(x, sr, 0.15, 0.15)


def _engine_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("higher-pitched", "buzzing", "whiny"), ("deep", "low", "rumbling"))

    idle = a["state"] == "idle"
    verb = _pick(
        rng,
        ("idles steadily", "hums evenly", "runs at a steady idle")
        if idle
        else ("revs up and back down", "revs up and then settles", "speeds up and slows again"),
    )
    state = _pick(rng, ("idling", "steady") if idle else ("revving", "accelerating"))
    return [
        f"{_a(_join(_loud(rng, a), pitch(), 'engine'))} {verb}",
        f"the {pitch()} hum of {_a(_join(state, 'engine'))}",
        f"{_a(_join(_loud(rng, a), pitch(), 'motor'))} drones and {verb}",
        f"{_a(_join(state, 'engine'))} with {_a(_join(pitch(), 'rumble'))}",
        f"{_a(_join(state, pitch(), 'car engine'))} running",
    ]


# --- footsteps: heel-toe clicks on a hard floor or noisy crunches on gravel, walking or running -----------------


def _steps_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    pace, surface = _coin(rng, "walking", "running"), _coin(rng, "hard", "gravel")
    count = int(rng.integers(3, 7) if pace == "walking" else rng.integers(4, 9))
    period = float(rng.uniform(0.45, 0.55) if pace == "walking" else rng.uniform(0.25, 0.3))
    return {"pace": pace, "surface": surface, **_layout(rng, cfg, count, period, jitter=0.05)}


def _steps_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    k = a["count"]
    onsets = np.asarray(a["onsets_s"])
    amps = rng.uniform(0.7, 1.0, k)
    if a["surface"] == "hard":
        toe = onsets + rng.uniform(0.05, 0.08, k)
        env = _decays(n, sr, onsets, [0.012] * k, amps) + _decays(n, sr, toe, [0.008] * k, 0.5 * amps)
        x = _noise(rng, n, sr, 300, 5000) * env
        thump = _decays(n, sr, onsets, [0.03] * k, amps) * _tone(_cycles(rng.uniform(90, 150), n, sr))
        return x + 0.8 * thump
    env = _gate(n, sr, onsets, rng.uniform(0.08, 0.14, k), 0.005, 0.06) * amps.mean()
    block = max(1, int(0.002 * sr))  # gravel: a crunch is a burst of random grains ~2 ms apart
    grains = np.repeat(np.square(np.square(rng.random(n // block + 1))), block)[:n]
    return _noise(rng, n, sr, 800, 7000) * env * (0.2 + grains)


def _steps_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    n, running = a["count"], a["pace"] == "running"
    gravel = a["surface"] == "gravel"

    def surface() -> str:
        return _pick(
            rng,
            ("gravel", "a gravel path", "crunchy gravel") if gravel else ("a hard floor", "a tiled floor", "concrete"),
        )

    verb = _pick(rng, ("runs", "hurries", "jogs") if running else ("walks", "strolls", "paces"))
    adj = _pick(rng, ("running", "fast", "hurried") if running else ("walking", "slow", "unhurried"))
    return [
        f"{_counted(n, 'footstep', 'footsteps', _loud(rng, a))} on {surface()}",
        f"someone {verb} across {surface()}, taking {_counted(n, 'step', 'steps')}",
        f"{_join(adj, 'footsteps')}, {_counted(n, 'step', 'steps')} on {surface()}",
        f"a person {verb} {_counted(n, 'step', 'steps', _loud(rng, a))} over {surface()}",
        f"the sound of {_counted(n, 'step', 'steps', adj)} on {surface()}",
    ]


# --- a church bell: inharmonic partials (hum, prime, minor third, fifth ...) with long decays, one to four tolls --


_BELL_RATIOS = (0.5, 1.0, 1.19, 1.5, 2.0, 2.52, 3.0, 4.07)
_BELL_AMPS = (0.5, 1.0, 0.6, 0.35, 0.5, 0.3, 0.25, 0.15)
_BELL_TAUS = (2.5, 1.5, 1.2, 1.0, 0.7, 0.5, 0.4, 0.3)


def _bell_draw(rng: Rng, cfg: DemoCorpusConfig) -> dict[str, Any]:
    register, tempo = _coin(rng, "high", "low"), _coin(rng, "fast", "slow")
    count = int(rng.integers(1, 5))
    period = float(rng.uniform(0.55, 0.7) if tempo == "fast" else rng.uniform(0.95, 1.2))
    return {
        "register": register,
        "tempo": tempo,
        "bell_hz": float(rng.uniform(500, 800) if register == "high" else rng.uniform(220, 330)),
        **_layout(rng, cfg, count, period),
    }


def _bell_synth(a: dict[str, Any], sr: int, n: int, rng: Rng) -> Array:
    t = np.arange(n) / sr
    scale = 0.8 if a["register"] == "high" else 1.2
    strike = np.zeros(n)
    for ratio, amp, tau in zip(_BELL_RATIOS, _BELL_AMPS, _BELL_TAUS):
        f = a["bell_hz"] * ratio * rng.uniform(0.995, 1.005)
        strike += amp * _tone(_cycles(f, n, sr, rng.random())) * _decay(t, tau * scale)
    click = int(0.005 * sr)
    strike[:click] += 0.5 * _noise(rng, click, sr, 500, 5000, order=1) * np.linspace(1, 0, click)
    out = np.zeros(n)
    for onset in a["onsets_s"]:
        _place(out, onset, sr, strike * rng.uniform(0.85, 1.0))
    return out


def _bell_captions(a: dict[str, Any], rng: Rng) -> list[str]:
    def pitch() -> str:
        return _pitch(rng, a, ("high", "bright", "small"), ("deep", "low", "large"))

    n, tempo = a["count"], a["tempo"]
    return [
        f"{_a(_join(_loud(rng, a), 'church bell'))} tolls {_times(n)}",
        f"{_counted(n, 'stroke', 'strokes', _pick(rng, _TEMPO_ADJ[tempo]) if n > 1 else '')} of "
        f"{_a(_join(pitch(), 'church bell'))}",
        f"{_a(_join(_loud(rng, a), pitch(), 'bell'))} rings out {_times(n)}"
        + (f", {_pick(rng, _TEMPO_ADV[tempo])}" if n > 1 else ""),
        f"the {pitch()} toll of a church bell, struck {_times(n)}",
        f"{_a(_join(pitch(), 'bell'))} in a church tower chimes {_times(n)}",
    ]


_RECIPES: tuple[_Recipe, ...] = (
    _Recipe(
        "a siren",
        "siren",
        "harmonic tone swept up and down: slow wail (0.25-0.45 Hz) or fast yelp (2.5-4 Hz)",
        _siren_draw,
        _siren_synth,
        _siren_captions,
    ),
    _Recipe(
        "a ringing telephone",
        "ringing_telephone",
        "2-4 ring bursts of a two-tone ring with a 15-25 Hz trill",
        _phone_draw,
        _phone_synth,
        _phone_captions,
    ),
    _Recipe(
        "birdsong",
        "birdsong",
        "3-8 short FM chirps sweeping up or down between 1.8 and 6.3 kHz",
        _bird_draw,
        _bird_synth,
        _bird_captions,
    ),
    _Recipe(
        "a drum beat",
        "drum_beat",
        "4-7 pitch-dropping drum hits (50-75 Hz kick or 140-220 Hz tom), maybe snare",
        _drum_draw,
        _drum_synth,
        _drum_captions,
    ),
    _Recipe(
        "rain",
        "rain",
        "broadband noise bed plus Poisson droplets (noise patter or ringing drips on metal)",
        _rain_draw,
        _rain_synth,
        _rain_captions,
    ),
    _Recipe(
        "a car horn",
        "car_horn",
        "1-3 honks of a saturated sawtooth chord (major third, 300-650 Hz)",
        _horn_draw,
        _horn_synth,
        _horn_captions,
    ),
    _Recipe(
        "a whistle",
        "whistle",
        "2-4 blasts of a pure 1.3-3.2 kHz tone with breath noise, steady or trilled",
        _whistle_draw,
        _whistle_synth,
        _whistle_captions,
    ),
    _Recipe(
        "an engine hum",
        "engine_hum",
        "low-passed 28-90 Hz sawtooth with firing AM and rumble, idling or revving",
        _engine_draw,
        _engine_synth,
        _engine_captions,
    ),
    _Recipe(
        "footsteps",
        "footsteps",
        "3-8 heel-toe clicks on a hard floor or granular crunches on gravel",
        _steps_draw,
        _steps_synth,
        _steps_captions,
    ),
    _Recipe(
        "a church bell",
        "church_bell",
        "1-4 tolls of inharmonic bell partials with 0.3-2.5 s decays",
        _bell_draw,
        _bell_synth,
        _bell_captions,
    ),
)

#: The class labels, in the stable order used for class indices and seeds. Each reads naturally in the prompt.
DEMO_CLASSES: tuple[str, ...] = tuple(r.label for r in _RECIPES)


# ----------------------------------------------------------------------------------------------------------------
# Planning (attributes and captions) and rendering (samples)
# ----------------------------------------------------------------------------------------------------------------


def _clip_seeds(seed: int, split: str, class_index: int, index: int) -> list[np.random.SeedSequence]:
    """Independent attribute / caption / audio streams of one clip, keyed by its position, not by list order."""
    return np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), class_index, index)).spawn(3)


def _level(peak_dbfs: float) -> str:
    return "quiet" if peak_dbfs < -22.0 else "loud" if peak_dbfs > -13.0 else "moderate"


def _choose_captions(
    recipe: _Recipe, a: dict[str, Any], background: str, snr_db: float | None, k: int, rng: Rng
) -> tuple[str, ...]:
    """``k`` distinct captions from the class templates, some with a phrase about the background."""
    candidates = recipe.captions(a, rng)
    order = rng.permutation(len(candidates))
    strength = "faint" if background == "none" or (snr_db or 0.0) >= 20.0 else "noticeable"
    out: list[str] = []
    for i in order:
        text = candidates[int(i)]
        if rng.random() < (0.3 if background == "none" else 0.7):
            text = f"{text}, {_pick(rng, _BACKGROUND[background, strength])}"
        text = re.sub(r"\s+", " ", text).strip()
        text = text[0].upper() + text[1:]
        if text not in out:
            out.append(text)
        if len(out) == k:
            break
    return tuple(out)


def _plan_clip(cfg: DemoCorpusConfig, split: str, class_index: int, index: int) -> DemoClip:
    recipe = _RECIPES[class_index]
    attr_seed, caption_seed, _ = _clip_seeds(cfg.seed, split, class_index, index)
    rng = np.random.default_rng(attr_seed)
    rate, channels, container = cfg.formats[(class_index + index) % len(cfg.formats)]
    peak_dbfs = round(float(rng.uniform(*cfg.peak_dbfs_range)), 2)
    weights = np.asarray(cfg.background_weights, dtype=np.float64)
    background = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=weights / weights.sum()))]
    snr_db = round(float(rng.uniform(*cfg.snr_db_range)), 2)
    pan = float(rng.uniform(-cfg.max_pan, cfg.max_pan))
    shadow_hz = float(rng.uniform(*cfg.shadow_cutoff_hz_range))
    attributes = recipe.draw(rng, cfg)
    attributes["level"] = _level(peak_dbfs)
    if channels == 2:
        attributes.update(pan=round(pan, 4), shadow_hz=round(shadow_hz, 1))
    num_frames = math.ceil(attributes["duration_s"] * rate)
    crng = np.random.default_rng(caption_seed)
    k = int(crng.integers(cfg.captions_per_clip[0], cfg.captions_per_clip[1] + 1))
    snr = snr_db if background != "none" else None
    return DemoClip(
        clip_id=f"demo-{split}-{recipe.slug}-{index:04d}",
        split=split,
        label=recipe.label,
        class_index=class_index,
        index=index,
        sample_rate=rate,
        channels=channels,
        format=container,
        num_frames=num_frames,
        peak_dbfs=peak_dbfs,
        background=background,
        snr_db=snr,
        attributes=attributes,
        captions=_choose_captions(recipe, attributes, background, snr, k, crng),
    )


def plan_demo_corpus(config: DemoCorpusConfig = DemoCorpusConfig()) -> list[DemoClip]:  # noqa: B008
    """Every clip's attributes and captions, train then eval, class by class; cheap (no audio is synthesised)."""
    return [
        _plan_clip(config, split, class_index, index)
        for split in SPLITS
        for class_index in range(len(_RECIPES))
        for index in range(config.per_class(split))
    ]


def _background(kind: str, n: int, sr: int, channels: int, rng: Rng) -> Array:
    """[channels, n] unit-RMS background: independent low-passed hiss per channel, or one mains hum for both."""
    if kind == "hiss":
        return np.stack([_noise(rng, n, sr, 0, MAX_CONTENT_HZ, order=4) for _ in range(channels)])
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = _harmonics(_cycles(mains, n, sr, rng.random()), mains, (1.0, 0.6, 0.5, 0.3, 0.25, 0.15), sr)
    hum = hum / (np.sqrt(np.mean(hum**2)) + 1e-12)
    return np.repeat(hum[None], channels, axis=0)


def render_clip(clip: DemoClip, seed: int) -> NDArray[np.float32]:
    """Synthesise ``clip`` as a [frames, channels] float32 array at its own rate, peak-normalised to its level."""
    recipe = _RECIPES[clip.class_index]
    rng = np.random.default_rng(_clip_seeds(seed, clip.split, clip.class_index, clip.index)[2])
    sr, n, a = clip.sample_rate, clip.num_frames, clip.attributes
    source = recipe.synth(a, sr, n, rng)
    if clip.channels == 2:  # constant-power pan; the far channel is also low-passed (head shadow)
        angle = (a["pan"] + 1.0) * np.pi / 4
        shadowed = _filter(source, sr, 0, a["shadow_hz"], order=1)
        left, right = (shadowed, source) if a["pan"] >= 0 else (source, shadowed)
        x = np.stack([np.cos(angle) * left, np.sin(angle) * right])
    else:
        x = source[None]
    rms = float(np.sqrt(np.mean(x**2))) + 1e-12
    if clip.background != "none":
        x = x + _background(clip.background, n, sr, clip.channels, rng) * rms * 10 ** (-(clip.snr_db or 0.0) / 20)
    x = _fade(x, sr, 0.005, 0.02)  # no click at either end, whatever the recipe left there
    floor = np.abs(x).max() * 1e-3  # room tone 60 dB below the peak: gaps are quiet, not digital zeros
    x = x + floor * 3.4641 * (rng.random(x.shape, dtype=np.float32) - 0.5)  # uniform, unit RMS
    x = x * (10 ** (clip.peak_dbfs / 20) / (np.abs(x).max() + 1e-12))
    return np.ascontiguousarray(x.T, dtype=np.float32)


def _encode(clip: DemoClip, samples: NDArray[np.float32], subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, clip.sample_rate, format=clip.format, subtype=subtype)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Corpus writer
# ----------------------------------------------------------------------------------------------------------------


def _corpus_record(config: DemoCorpusConfig) -> dict[str, Any]:
    """What ``corpus.json`` holds, as JSON would read it back (lists, not tuples), so records compare equal."""
    record = {
        "generator": "m2d2.data.demo",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "classes": list(DEMO_CLASSES),
        "counts": {split: config.per_class(split) * len(DEMO_CLASSES) for split in SPLITS},
        "manifest": MANIFEST_FILE,
    }
    return json.loads(json.dumps(record))


def _is_complete(out_dir: Path, record: dict[str, Any], clips: Sequence[DemoClip]) -> bool:
    try:
        existing = json.loads((out_dir / CORPUS_FILE).read_text())
    except (OSError, ValueError):
        return False
    if existing != record or not (out_dir / MANIFEST_FILE).is_file():
        return False
    return all((out_dir / clip.audio_uri).is_file() for clip in clips)


def generate_demo_corpus(
    out_dir: str | Path,
    config: DemoCorpusConfig = DemoCorpusConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    progress: bool = True,
) -> Path:
    """Write the demo corpus under ``out_dir`` and return the manifest path.

    Layout: ``audio/<split>/<clip_id>.<ext>``, ``manifest.parquet`` and ``corpus.json`` (config, classes, counts).
    ``corpus.json`` is written last and removed first, so its presence marks a complete corpus: when it matches
    ``config`` (and every file is there) nothing is regenerated. Otherwise every clip is rewritten and files of
    an earlier, larger corpus are removed. Every write is atomic (temporary name, then rename).
    """
    out_dir = Path(out_dir)
    record = _corpus_record(config)
    clips = plan_demo_corpus(config)
    manifest_path = out_dir / MANIFEST_FILE
    if _is_complete(out_dir, record, clips):
        log.info("demo corpus in %s is up to date (%d clips)", out_dir, len(clips))
        return manifest_path
    (out_dir / CORPUS_FILE).unlink(missing_ok=True)
    rows: dict[str, list[Any]] = {name: [] for name in DEMO_MANIFEST_SCHEMA.names}
    for clip in tqdm(clips, desc="demo corpus", unit="clip", disable=not progress):
        data = _encode(clip, render_clip(clip, config.seed), config.subtype)
        atomic_write_bytes(out_dir / clip.audio_uri, data)
        for name, value in (
            ("clip_id", clip.clip_id),
            ("source", "demo"),
            ("audio_uri", clip.audio_uri),
            ("duration_s", clip.duration_s),
            ("sample_rate", clip.sample_rate),
            ("channels", clip.channels),
            ("captions", list(clip.captions)),
            ("labels", [clip.label]),
            ("split", clip.split),
            ("content_hash", hashlib.sha256(data).hexdigest()),
        ):
            rows[name].append(value)
    _remove_stale(out_dir, {clip.audio_uri for clip in clips})
    table = pa.table(rows, schema=DEMO_MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(manifest_path, buf.getvalue())
    atomic_write_bytes(out_dir / CORPUS_FILE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log.info("wrote demo corpus: %s clips to %s", record["counts"], out_dir)
    return manifest_path


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete demo clips left by an earlier config (only files named like ours, only under audio/<split>/)."""
    for split in SPLITS:
        folder = out_dir / "audio" / split
        if not folder.is_dir():
            continue
        for path in folder.glob("demo-*"):
            if path.suffix.lstrip(".") in _EXTENSIONS.values() and f"audio/{split}/{path.name}" not in keep:
                path.unlink()
