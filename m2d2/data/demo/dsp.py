"""Signal building blocks of the demo recipes: filters, noise, tones and envelopes (float64, mono, any rate).

Separate from the recipes so that each sound class reads as a few lines of synthesis rather than of NumPy
plumbing, and so the background and stereo stages of the corpus reuse the same filters and tones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
Rng = np.random.Generator

#: Synthesised content stays below this frequency, so a 16 kHz file (Nyquist 8 kHz) holds every class intact.
MAX_CONTENT_HZ: float = 7000.0


@functools.lru_cache(maxsize=64)
def band_gain(size: int, sr: int, lo: float, hi: float, order: int, tilt: float) -> Array:
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


def fast_len(n: int) -> int:
    """Smallest 5-smooth length >= n: FFTs of lengths with large prime factors are many times slower."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            best = min(best, p35 * (1 << max(0, (-(-n // p35) - 1).bit_length())))
            p35 *= 3
        p5 *= 5
    return best


def bandpass(x: Array, sr: int, lo: float, hi: float, order: int = 2, tilt: float = 0.0) -> Array:
    """Band-pass ``x`` in the FFT domain (zero-padded to a fast length)."""
    n = len(x)
    size = fast_len(n)
    return np.fft.irfft(np.fft.rfft(x, size) * band_gain(size, sr, lo, hi, order, tilt), size)[:n]


def noise(rng: Rng, n: int, sr: int, lo: float, hi: float, order: int = 2, tilt: float = 0.0) -> Array:
    """Band-limited Gaussian noise with unit RMS, drawn directly as a shaped random spectrum (one inverse FFT)."""
    size = fast_len(n)
    re_im = rng.standard_normal((2, size // 2 + 1), dtype=np.float32)
    spec = (re_im[0] + 1j * re_im[1]) * band_gain(size, sr, lo, hi, order, tilt)
    x = np.fft.irfft(spec, size)[:n]
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def sin32(x: Array | float) -> NDArray[np.float32]:
    """``sin`` in float32, much faster than float64 in NumPy; for arguments below ~1e3 rad (LFOs, short events)."""
    return np.sin(np.asarray(x, dtype=np.float32))


def cycles(freq: Array | float, n: int, sr: int, start: float = 0.0) -> Array:
    """Unwrapped phase in cycles (float64) of a tone whose frequency may vary per sample."""
    if np.ndim(freq) == 0:
        return start + np.arange(n) * (float(freq) / sr)
    return start + np.cumsum(freq) / sr


def tone(phase: Array) -> NDArray[np.float32]:
    """``sin(2 pi phase)`` of a phase in cycles: wrapped in float64 first, so float32 keeps full precision."""
    return sin32(2.0 * np.pi * (phase - np.floor(phase)))


def harmonics(phase: Array, f_max: float, amps: Sequence[float], sr: int) -> NDArray[np.float32]:
    """Sum of ``amps[k-1] * sin(2 pi k phase)``, dropping harmonics that would exceed the content limit.

    Uses the recurrence ``sin(k p) = 2 cos(p) sin((k-1) p) - sin((k-2) p)``: one sin/cos pair instead of one
    sin per harmonic, which is what keeps harmonic-rich classes (the horn) cheap.
    """
    limit = min(MAX_CONTENT_HZ, 0.45 * sr)
    wrapped = (2.0 * np.pi * (phase - np.floor(phase))).astype(np.float32)
    prev, cur = np.zeros_like(wrapped), np.sin(wrapped)
    two_cos = 2.0 * np.cos(wrapped)
    out = np.zeros_like(wrapped)
    for k, amp in enumerate(amps, start=1):
        if k * f_max > limit:
            break
        out += np.float32(amp) * cur
        prev, cur = cur, two_cos * cur - prev
    return out


def decay(t: Array, tau: float) -> NDArray[np.float32]:
    """``exp(-t / tau)`` in float32."""
    return np.exp(np.asarray(-t / tau, dtype=np.float32))


def gate(n: int, sr: int, onsets: Sequence[float], lengths: Sequence[float], attack: float, release: float) -> Array:
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


def decays(n: int, sr: int, onsets: Sequence[float], taus: Sequence[float], amps: Sequence[float]) -> Array:
    """Sum of exponential decays ``amp * exp(-t / tau)`` starting at each onset (cut after 7 tau)."""
    env = np.zeros(n)
    for onset, tau, amp in zip(onsets, taus, amps):
        i0 = int(round(onset * sr))
        m = min(int(7 * tau * sr) + 1, n - i0)
        if m > 0:
            env[i0 : i0 + m] += amp * np.exp(-np.arange(m) / (tau * sr))
    return env


def fade(x: Array, sr: int, fade_in: float, fade_out: float) -> Array:
    """Linear fade in and out along the last axis."""
    n = x.shape[-1]
    t = np.arange(n) / sr
    return x * np.clip(np.minimum(t / fade_in, (n / sr - t) / fade_out), 0.0, 1.0)


def place(out: Array, onset: float, sr: int, event: Array) -> None:
    """Add ``event`` into ``out`` starting at ``onset`` seconds (truncated at the end)."""
    i0 = int(round(onset * sr))
    m = min(len(event), len(out) - i0)
    if m > 0:
        out[i0 : i0 + m] += event[:m]
