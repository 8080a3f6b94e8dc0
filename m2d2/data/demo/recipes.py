"""The ten demo sound classes, as one table of recipes: what each clip draws, how it sounds, how it is described.

A row holds what differs between classes as data (attribute ranges, gate and fade settings, caption words and
templates); drawing, layout and caption rendering are implemented once, below the row type. Only the synthesis
itself is code per class, because each class has its own spectro-temporal shape; the shared on/off gating of
tonal event classes and the fades of continuous ones are row settings.

Every instance draws its pitch register, number of events, tempo and duration, and its captions name them, so
a model has to learn both what a class sounds like and how the words relate to the sound. The draws, and the
order in which they happen, define the corpus: reordering a row's draws changes every clip of that class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from m2d2.data.demo import dsp
from m2d2.data.demo.dsp import Array, Rng
from m2d2.data.demo.language import LOUDNESS, Words, render_captions

Attributes = dict[str, Any]
Range = tuple[float, float]


# ----------------------------------------------------------------------------------------------------------------
# Row parts: attribute draws, gates
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coin:
    """A fair coin between two values: ``heads`` when ``rng.random() < 0.5``."""

    name: str
    heads: Any
    tails: Any

    def draw(self, rng: Rng, drawn: Attributes) -> Any:
        return self.heads if rng.random() < 0.5 else self.tails


@dataclass(frozen=True)
class Uniform:
    """A uniform float from ``ranges``, or from ``ranges[drawn[by]]`` when the range depends on an earlier draw.

    A plain number in place of a range is a constant and draws nothing (an idling engine does not rev).
    ``offset`` names an earlier draw to add (a horn's period is its honk plus a gap).
    """

    name: str
    ranges: Range | Mapping[Any, Range | float]
    by: str | None = None
    offset: str | None = None

    def draw(self, rng: Rng, drawn: Attributes) -> Any:
        bounds = self.ranges if self.by is None else self.ranges[drawn[self.by]]
        if not isinstance(bounds, tuple):
            return bounds
        value = float(rng.uniform(*bounds))
        return value if self.offset is None else drawn[self.offset] + value


@dataclass(frozen=True)
class Count:
    """The number of events, an integer in ``[lo, hi)``, optionally depending on an earlier draw."""

    ranges: tuple[int, int] | Mapping[Any, tuple[int, int]]
    by: str | None = None
    name: ClassVar[str] = "count"

    def draw(self, rng: Rng, drawn: Attributes) -> Any:
        lo, hi = self.ranges if self.by is None else self.ranges[drawn[self.by]]
        return int(rng.integers(lo, hi))


Draw = Coin | Uniform | Count


@dataclass(frozen=True)
class Gate:
    """Switches a continuous sound on at each event: for ``duty`` of the period, or for the drawn ``hold``
    attribute capped at that, with linear attack and release ramps (seconds)."""

    duty: float
    attack_s: float
    release_s: float
    hold: str | None = None

    def envelope(self, a: Attributes, sr: int, n: int) -> Array:
        on = self.duty * a["period_s"]
        if self.hold is not None:
            on = min(a[self.hold], on)
        return dsp.gate(n, sr, a["onsets_s"], [on] * a["count"], self.attack_s, self.release_s)


def _layout(
    rng: Rng, count: int, period: float, jitter: float, min_duration_s: float, max_duration_s: float
) -> Attributes:
    """Onsets of ``count`` events every ``period`` s, in a clip only a little longer than the events.

    The block of events sits near the middle of the clip (lead = 25-75% of the spare time), and the clip is at
    most 0.9 s longer than the block unless ``min_duration_s`` forces more. With the default durations every
    2.08 s crop therefore overlaps the events: a crop of silence labelled "a car horn" would teach nothing. The
    period shrinks if the events would not fit ``max_duration_s``; ``jitter`` moves onsets by up to that fraction
    of the period, so rhythms are not machine-exact.
    """
    period = min(period, (max_duration_s - 0.2) / count)
    block = count * period
    duration = float(np.clip(block + rng.uniform(0.3, 0.9), min_duration_s, max_duration_s))
    lead = (duration - block) * float(rng.uniform(0.25, 0.75))
    offsets = rng.uniform(-jitter, jitter, count) * period if jitter else np.zeros(count)
    offsets[0] = 0.0
    onsets = [round(lead + i * period + float(o), 4) for i, o in enumerate(offsets)]
    return {"count": count, "period_s": round(period, 4), "onsets_s": onsets, "duration_s": duration}


# ----------------------------------------------------------------------------------------------------------------
# The row type, with the one implementation of drawing, synthesis and captioning
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One sound class.

    Attributes:
        label: the class name, also the zero-shot prompt's subject ("a siren can be heard").
        slug: the label in clip ids.
        summary: what the class sounds like, for people reading the table.
        draws: the clip's attributes, drawn in this order. A class that draws ``count`` and ``period`` is an
            event class: they become evenly spaced onsets (``jitter``: how far an onset may move, as a fraction
            of the period) and the clip's duration; any other class draws a free duration.
        sound: the class's synthesis, ``(attributes, sample_rate, frames, rng) -> samples``.
        gate: switches ``sound`` on at each event, for tonal event classes.
        fade: ``(in, out)`` seconds of linear fade, for continuous classes that would otherwise start abruptly.
        words: the class's caption words, by name (see :mod:`m2d2.data.demo.language`).
        captions: caption templates; every clip renders all of them, then a few are chosen.
    """

    label: str
    slug: str
    summary: str
    draws: tuple[Draw, ...]
    sound: Callable[[Attributes, int, int, Rng], Array]
    words: Mapping[str, Words]
    captions: tuple[str, ...]
    jitter: float = 0.0
    gate: Gate | None = None
    fade: tuple[float, float] | None = None

    def draw(self, rng: Rng, min_duration_s: float, max_duration_s: float) -> Attributes:
        """The clip's attributes: the row's draws, then its event layout or free duration."""
        drawn: Attributes = {}
        for spec in self.draws:
            drawn[spec.name] = spec.draw(rng, drawn)
        if "count" not in drawn:
            return {**drawn, "duration_s": float(rng.uniform(min_duration_s, max_duration_s))}
        count, period = drawn.pop("count"), drawn.pop("period")
        return {**drawn, **_layout(rng, count, period, self.jitter, min_duration_s, max_duration_s)}

    def synthesise(self, a: Attributes, sr: int, n: int, rng: Rng) -> Array:
        """``n`` mono samples at ``sr`` of the clip with attributes ``a``."""
        x = self.sound(a, sr, n, rng)
        if self.gate is not None:
            x = x * self.gate.envelope(a, sr, n)
        if self.fade is not None:
            x = dsp.fade(x, sr, *self.fade)
        return x

    def caption_candidates(self, a: Attributes, rng: Rng) -> list[str]:
        """Every caption template filled in for the clip with attributes ``a``."""
        return render_captions(self.captions, self.words, a, rng)


def _pitch(high: tuple[str, ...], low: tuple[str, ...]) -> Words:
    """Pitch words, by the drawn register."""
    return Words("register", {"high": high, "low": low})


# ----------------------------------------------------------------------------------------------------------------
# Synthesis of each class
# ----------------------------------------------------------------------------------------------------------------


def _siren(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A continuous harmonic tone swept up and down around its centre (slow wail or fast yelp)."""
    t = np.arange(n) / sr
    sweep = dsp.sin32(2 * np.pi * a["sweep_hz"] * t + rng.uniform(0, 2 * np.pi))
    freq = a["center_hz"] * (1.0 + a["depth"] * sweep)
    return dsp.harmonics(dsp.cycles(freq, n, sr), float(freq.max()), (1.0, 0.45, 0.25, 0.12), sr)


def _phone(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A two-tone ring with a trill; the gate cuts it into rings."""
    t = np.arange(n) / sr
    f1 = a["tone_hz"]
    if a["register"] == "high":  # electronic warble: alternate between two tones at the trill rate
        f2 = f1 * 1.25
        switch = 0.5 + 0.5 * np.tanh(8 * dsp.sin32(2 * np.pi * a["trill_hz"] * t))
        freq = f1 + (f2 - f1) * switch
        return dsp.harmonics(dsp.cycles(freq, n, sr), f2, (1.0, 0.3, 0.15), sr)
    # bell-like: two close tones, amplitude-modulated by the striker
    f2 = f1 * 1.09
    tone = dsp.harmonics(dsp.cycles(f1, n, sr), f1, (1.0, 0.5, 0.3, 0.2), sr)
    tone += dsp.harmonics(dsp.cycles(f2, n, sr, 0.15), f2, (1.0, 0.5, 0.3, 0.2), sr)
    tone *= 0.55 + 0.45 * dsp.sin32(2 * np.pi * a["trill_hz"] * t)
    return tone


def _bird(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """Short FM chirps, each a little different in length, pitch and level."""
    out = np.zeros(n)
    for onset in a["onsets_s"]:
        length = a["chirp_s"] * rng.uniform(0.85, 1.15)
        m = int(length * sr)
        u = np.arange(m) / m
        lo, hi = a["base_hz"] * rng.uniform(0.95, 1.05), a["base_hz"] * a["span"]
        freq = lo + (hi - lo) * (u if a["direction"] == "rising" else 1.0 - u) ** 1.5
        chirp = dsp.tone(dsp.cycles(freq, m, sr)) * dsp.sin32(np.pi * u) ** 2 * rng.uniform(0.6, 1.0)
        dsp.place(out, onset, sr, chirp)
    return out


def _drum(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """Pitch-dropping drum hits with a click, every other one replaced by a snare when the clip has one."""
    out = np.zeros(n)
    m = int(7 * a["decay_s"] * sr)
    t = np.arange(m) / sr
    f0 = a["drum_hz"]
    freq = f0 + 1.5 * f0 * dsp.decay(t, 0.03)
    hit = np.tanh(2.0 * dsp.tone(dsp.cycles(freq, m, sr)) * dsp.decay(t, a["decay_s"]))
    click_m = int(0.004 * sr)
    hit[:click_m] += 0.3 * dsp.noise(rng, click_m, sr, 1000, 6000, order=1) * np.linspace(1, 0, click_m)
    snare_m = int(0.18 * sr)
    ts = np.arange(snare_m) / sr
    for i, onset in enumerate(a["onsets_s"]):
        if a["snare"] and i % 2 == 1:
            body = 0.4 * dsp.sin32(2 * np.pi * 190 * ts) + dsp.noise(rng, snare_m, sr, 1500, 6500)
            dsp.place(out, onset, sr, 0.7 * body * dsp.decay(ts, 0.06))
        else:
            dsp.place(out, onset, sr, hit * rng.uniform(0.8, 1.0))
    return out


def _rain(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A broadband noise bed plus random droplets: pattering noise bursts, or ringing drips on metal."""
    heavy = a["intensity"] == "heavy"
    t = np.arange(n) / sr
    bed = dsp.noise(rng, n, sr, 300 if heavy else 1500, 7000, tilt=-1.5 if heavy else 1.0)
    bed *= (1.0 if heavy else 0.25) * (1.0 + 0.2 * dsp.sin32(2 * np.pi * a["gust_hz"] * t))
    k = int(rng.poisson(a["drops_per_s"] * n / sr))
    onsets = rng.uniform(0, n / sr, k)
    amps = np.exp(rng.uniform(np.log(0.2), 0.0, k)) * (2.0 if heavy else 3.0)
    if a["surface"] == "ground":
        drops = dsp.noise(rng, n, sr, 1000, 6000) * dsp.decays(n, sr, onsets, rng.uniform(0.003, 0.008, k), amps)
    else:
        drops = np.zeros(n)
        for onset, amp in zip(onsets, amps):
            tau, f = rng.uniform(0.02, 0.05), rng.uniform(2000, 5000)
            m = int(5 * tau * sr)
            tt = np.arange(m) / sr
            dsp.place(drops, float(onset), sr, 0.5 * amp * dsp.sin32(2 * np.pi * f * tt) * dsp.decay(tt, tau))
    return bed + drops


def _horn(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A buzzy two-note chord (major third) of saturated sawtooths; the gate cuts it into honks."""
    saw = [1.0 / k for k in range(1, 16)]
    f1, f2 = a["horn_hz"], a["horn_hz"] * 1.26
    tone = dsp.harmonics(dsp.cycles(f1, n, sr), f1, saw, sr) + dsp.harmonics(dsp.cycles(f2, n, sr, 0.3), f2, saw, sr)
    return np.tanh(np.float32(1.5) * tone)


def _whistle(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A pure tone with breath noise, steady or with a pea trill; the gate cuts it into blasts."""
    t = np.arange(n) / sr
    f = a["whistle_hz"]
    if a["trill"]:
        freq = f * (1.0 + 0.04 * dsp.sin32(2 * np.pi * a["trill_hz"] * t))
        amp = 0.75 + 0.25 * dsp.sin32(2 * np.pi * a["trill_hz"] * t)
    else:
        freq, amp = f * (1.0 + 0.005 * dsp.sin32(2 * np.pi * 5.0 * t)), 1.0
    return amp * dsp.tone(dsp.cycles(freq, n, sr)) + 0.08 * dsp.noise(rng, n, sr, f * 0.8, f * 1.25, order=3)


def _engine(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """A low-passed sawtooth with firing-order AM and rumble, idling or revving up and back down."""
    t = np.arange(n) / sr
    bump = dsp.sin32(np.pi * t / t[-1]) ** 2  # revving: up to a peak mid-clip and back down
    freq = a["engine_hz"] * (1.0 + a["rev_depth"] * bump + 0.01 * dsp.sin32(2 * np.pi * 0.7 * t))
    phase = dsp.cycles(freq, n, sr)
    saw = 2.0 * (phase - np.floor(phase)) - 1.0
    x = dsp.bandpass(saw * (1.0 + 0.3 * dsp.tone(phase / 2)), sr, 0, a["cutoff_hz"])  # AM at half rate: firing order
    return x / (np.sqrt(np.mean(x**2)) + 1e-12) + 0.3 * dsp.noise(rng, n, sr, 0, 800)


def _steps(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """Heel-toe clicks with a thump on a hard floor, or bursts of crunching grains on gravel."""
    k = a["count"]
    onsets = np.asarray(a["onsets_s"])
    amps = rng.uniform(0.7, 1.0, k)
    if a["surface"] == "hard":
        toe = onsets + rng.uniform(0.05, 0.08, k)
        env = dsp.decays(n, sr, onsets, [0.012] * k, amps) + dsp.decays(n, sr, toe, [0.008] * k, 0.5 * amps)
        x = dsp.noise(rng, n, sr, 300, 5000) * env
        thump = dsp.decays(n, sr, onsets, [0.03] * k, amps) * dsp.tone(dsp.cycles(rng.uniform(90, 150), n, sr))
        return x + 0.8 * thump
    env = dsp.gate(n, sr, onsets, rng.uniform(0.08, 0.14, k), 0.005, 0.06) * amps.mean()
    block = max(1, int(0.002 * sr))  # gravel: a crunch is a burst of random grains ~2 ms apart
    grains = np.repeat(np.square(np.square(rng.random(n // block + 1))), block)[:n]
    return dsp.noise(rng, n, sr, 800, 7000) * env * (0.2 + grains)


# A church bell's inharmonic partials (hum, prime, minor third, fifth ...): frequency ratios, levels, decays (s).
_BELL_RATIOS = (0.5, 1.0, 1.19, 1.5, 2.0, 2.52, 3.0, 4.07)
_BELL_AMPS = (0.5, 1.0, 0.6, 0.35, 0.5, 0.3, 0.25, 0.15)
_BELL_TAUS = (2.5, 1.5, 1.2, 1.0, 0.7, 0.5, 0.4, 0.3)


def _bell(a: Attributes, sr: int, n: int, rng: Rng) -> Array:
    """One strike of slightly detuned inharmonic partials with long decays, tolled at each onset."""
    t = np.arange(n) / sr
    scale = 0.8 if a["register"] == "high" else 1.2
    strike = np.zeros(n)
    for ratio, amp, tau in zip(_BELL_RATIOS, _BELL_AMPS, _BELL_TAUS):
        f = a["bell_hz"] * ratio * rng.uniform(0.995, 1.005)
        strike += amp * dsp.tone(dsp.cycles(f, n, sr, rng.random())) * dsp.decay(t, tau * scale)
    click = int(0.005 * sr)
    strike[:click] += 0.5 * dsp.noise(rng, click, sr, 500, 5000, order=1) * np.linspace(1, 0, click)
    out = np.zeros(n)
    for onset in a["onsets_s"]:
        dsp.place(out, onset, sr, strike * rng.uniform(0.85, 1.0))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------

RECIPES: tuple[Recipe, ...] = (
    Recipe(
        label="a siren",
        slug="siren",
        summary="harmonic tone swept up and down: slow wail (0.25-0.45 Hz) or fast yelp (2.5-4 Hz)",
        draws=(
            Coin("register", "high", "low"),
            Coin("speed", "slow", "fast"),
            Uniform("center_hz", {"high": (1000, 1400), "low": (550, 750)}, by="register"),
            Uniform("sweep_hz", {"slow": (0.25, 0.45), "fast": (2.5, 4.0)}, by="speed"),
            Uniform("depth", (0.22, 0.32)),
        ),
        sound=_siren,
        fade=(0.05, 0.1),
        words={
            "speed_adv": Words(
                "speed",
                {
                    "slow": ("slowly", "in long sweeps", "with a slow rise and fall"),
                    "fast": ("rapidly", "in quick yelps", "with a fast warble"),
                },
                once=True,
            ),
            "speed_adj": Words(
                "speed", {"slow": ("slow", "long", "drawn-out"), "fast": ("fast", "rapid", "urgent")}, once=True
            ),
            "wail": Words("speed", {"slow": "wail", "fast": "yelp"}),
            "pitch": _pitch(("high-pitched", "shrill", "piercing"), ("low-pitched", "deep", "low")),
        },
        captions=(
            "{a $loud $pitch siren} wails $speed_adv",
            "{a $speed_adj $pitch siren} sweeping up and down",
            "an emergency siren with {a $loud $pitch $speed_adj $wail}",
            "the {$speed_adj $wail} of {a $loud $pitch siren}",
            "{a $pitch siren tone} rising and falling $speed_adv",
        ),
    ),
    Recipe(
        label="a ringing telephone",
        slug="ringing_telephone",
        summary="2-4 ring bursts of a two-tone ring with a 15-25 Hz trill",
        draws=(
            Coin("register", "high", "low"),
            Coin("tempo", "fast", "slow"),
            Count((2, 5)),
            Uniform("period", {"fast": (0.45, 0.55), "slow": (0.85, 1.0)}, by="tempo"),
            Uniform("tone_hz", {"high": (1000, 1300), "low": (400, 520)}, by="register"),
            Uniform("trill_hz", (15, 25)),
        ),
        sound=_phone,
        gate=Gate(duty=0.6, attack_s=0.01, release_s=0.02),
        words={"pitch": _pitch(("shrill", "high-pitched", "electronic"), ("low", "old-fashioned", "mellow"))},
        captions=(
            "{a $loud $pitch telephone} rings $times, $tempo_adv",
            "{$count $tempo_adj ring|rings} from {a $pitch phone}",
            "{a $loud phone} ringing $times $tempo_adv",
            "the $pitch ring of a telephone, {$count ring|rings} in a row",
            "someone's $pitch telephone rings $times",
        ),
    ),
    Recipe(
        label="birdsong",
        slug="birdsong",
        summary="3-8 short FM chirps sweeping up or down between 1.8 and 6.3 kHz",
        draws=(
            Coin("register", "high", "low"),
            Coin("tempo", "fast", "slow"),
            Coin("direction", "rising", "falling"),
            Count((3, 9)),
            Uniform("period", {"fast": (0.16, 0.22), "slow": (0.35, 0.45)}, by="tempo"),
            Uniform("base_hz", {"high": (3200, 4200), "low": (1800, 2600)}, by="register"),
            Uniform("span", (1.25, 1.5)),
            Uniform("chirp_s", (0.05, 0.11)),
        ),
        jitter=0.12,
        sound=_bird,
        words={
            "pitch": _pitch(("high", "high-pitched", "thin"), ("low", "lower", "mellow")),
            "direction": Words(
                "direction", {"rising": ("rising", "upward-sweeping"), "falling": ("falling", "downward-sweeping")}
            ),
        },
        captions=(
            "{a $loud bird} chirps $times $tempo_adv",
            "birdsong with {$count $pitch $direction chirp|chirps}",
            "{$count $tempo_adj $pitch chirp|chirps} from a small bird",
            "a songbird sings {$count $direction note|notes} $tempo_adv",
            "{$loud birdsong}: {$count $direction chirp|chirps}, $tempo_adv",
        ),
    ),
    Recipe(
        label="a drum beat",
        slug="drum_beat",
        summary="4-7 pitch-dropping drum hits (50-75 Hz kick or 140-220 Hz tom), maybe snare",
        draws=(
            Coin("register", "low", "high"),
            Coin("tempo", "fast", "slow"),
            Count((4, 8)),
            Uniform("period", {"fast": (0.22, 0.28), "slow": (0.4, 0.5)}, by="tempo"),
            Coin("snare", True, False),
            Uniform("drum_hz", {"low": (50, 75), "high": (140, 220)}, by="register"),
            Uniform("decay_s", {"low": (0.12, 0.2), "high": (0.08, 0.12)}, by="register"),
        ),
        jitter=0.03,
        sound=_drum,
        words={
            "snare": Words(
                "snare",
                {True: (" with a snare on every other beat", " alternating with snare hits"), False: ""},
                once=True,
            ),
            "pitch": _pitch(("high", "tight", "high-pitched"), ("deep", "low", "booming")),
        },
        captions=(
            "{a $loud $pitch drum} beats $times $tempo_adv$snare",
            "{$count $pitch drum hit|hits} $tempo_adv",
            "{a $tempo_adj drum beat} of {$count $pitch stroke|strokes}$snare",
            "{$loud $pitch} drumming, {$count beat|beats} $tempo_adv",
            "someone strikes {a $pitch drum} $times$snare",
        ),
    ),
    Recipe(
        label="rain",
        slug="rain",
        summary="broadband noise bed plus Poisson droplets (noise patter or ringing drips on metal)",
        draws=(
            Coin("intensity", "light", "heavy"),
            Coin("surface", "ground", "metal"),
            Uniform("drops_per_s", {"light": (6, 15), "heavy": (30, 60)}, by="intensity"),
            Uniform("gust_hz", (0.1, 0.3)),
        ),
        sound=_rain,
        fade=(0.2, 0.2),
        words={
            "surface": Words(
                "surface",
                {
                    "metal": ("a tin roof", "a metal roof", "a metal sheet"),
                    "ground": ("the pavement", "the ground", "a stone path"),
                },
                once=True,
            ),
            "drops": Words(
                "surface",
                {
                    "metal": ("ringing drips on metal", "pinging drops"),
                    "ground": ("pattering drops", "tapping droplets"),
                },
                once=True,
            ),
            "intensity": Words(
                "intensity", {"heavy": ("heavy", "pouring", "intense"), "light": ("light", "gentle", "soft")}
            ),
            "loud_rarely": Words("level", LOUDNESS, p=0.4),
            "pour": Words(
                "intensity",
                {
                    "heavy": ("rain pours down steadily", "rain hammers down", "a heavy shower pours down"),
                    "light": ("rain drizzles gently", "rain patters softly", "rain sprinkles lightly"),
                },
            ),
            "shower": Words("intensity", {"heavy": ("downpour", "rainstorm"), "light": ("drizzle", "light shower")}),
        },
        captions=(
            "{$intensity rain} falling on $surface",
            "the patter of {$loud $intensity rain} on $surface",
            "{$loud_rarely $pour}",
            "{$loud $intensity rainfall} with $drops",
            "a $shower with $drops",
        ),
    ),
    Recipe(
        label="a car horn",
        slug="car_horn",
        summary="1-3 honks of a saturated sawtooth chord (major third, 300-650 Hz)",
        draws=(
            Coin("register", "high", "low"),
            Coin("length", "short", "long"),
            Count((1, 4)),
            Uniform("honk_s", {"short": (0.18, 0.3), "long": (0.7, 1.05)}, by="length"),
            Uniform("horn_hz", {"high": (420, 520), "low": (300, 380)}, by="register"),
            Uniform("period", (0.15, 0.35), offset="honk_s"),
        ),
        sound=_horn,
        gate=Gate(duty=0.9, attack_s=0.015, release_s=0.03, hold="honk_s"),
        words={
            "pitch": _pitch(("high", "bright", "high-pitched"), ("low", "deep", "low-pitched")),
            "length": Words(
                "length", {"short": ("short", "brief", "quick"), "long": ("long", "sustained", "drawn-out")}
            ),
            "briefly": Words("length", {"short": "briefly", "long": "holding it down"}),
            "bursts": Words("length", {"short": "in short bursts", "long": "long and loud"}),
        },
        captions=(
            "{a $loud $pitch car horn} honks $times",
            "{$count $length honk|honks} from {a $loud $pitch car horn}",
            "a driver sounds {a $pitch horn} $times, $briefly",
            "{a $pitch car horn} blares $times, $bursts",
            "traffic noise: {$count $length $pitch honk|honks} of a car horn",
        ),
    ),
    Recipe(
        label="a whistle",
        slug="whistle",
        summary="2-4 blasts of a pure 1.3-3.2 kHz tone with breath noise, steady or trilled",
        draws=(
            Coin("register", "high", "low"),
            Coin("tempo", "fast", "slow"),
            Count((2, 5)),
            Uniform("period", {"fast": (0.35, 0.45), "slow": (0.75, 0.9)}, by="tempo"),
            Coin("trill", True, False),
            Uniform("whistle_hz", {"high": (2700, 3500), "low": (1700, 2200)}, by="register"),
            Uniform("trill_hz", (25, 35)),
        ),
        jitter=0.05,
        sound=_whistle,
        gate=Gate(duty=0.55, attack_s=0.01, release_s=0.02),
        words={
            "pitch": _pitch(("shrill", "high-pitched", "piercing"), ("low", "low-pitched", "mellow")),
            "trill": Words("trill", {True: ("trilling", "warbling"), False: ("steady", "pure-toned")}, once=True),
        },
        captions=(
            "{a $loud $pitch whistle} blows $times, $tempo_adv",
            "{$count $tempo_adj, $pitch whistle blast|blasts}",
            "a referee blows {a $trill whistle} $times",
            "someone whistles {$count $tempo_adj $pitch blast|blasts}",
            "{a $loud $trill $pitch whistle}, {$count blast|blasts} $tempo_adv",
        ),
    ),
    Recipe(
        label="an engine hum",
        slug="engine_hum",
        summary="low-passed 28-90 Hz sawtooth with firing AM and rumble, idling or revving",
        draws=(
            Coin("register", "low", "high"),
            Coin("state", "idle", "revving"),
            Uniform("engine_hz", {"low": (28, 40), "high": (60, 90)}, by="register"),
            Uniform("cutoff_hz", {"low": (900, 1400), "high": (1500, 2500)}, by="register"),
            Uniform("rev_depth", {"revving": (0.6, 1.0), "idle": 0.0}, by="state"),
        ),
        sound=_engine,
        fade=(0.15, 0.15),
        words={
            "pitch": _pitch(("higher-pitched", "buzzing", "whiny"), ("deep", "low", "rumbling")),
            "verb": Words(
                "state",
                {
                    "idle": ("idles steadily", "hums evenly", "runs at a steady idle"),
                    "revving": ("revs up and back down", "revs up and then settles", "speeds up and slows again"),
                },
                once=True,
            ),
            "state_adj": Words(
                "state", {"idle": ("idling", "steady"), "revving": ("revving", "accelerating")}, once=True
            ),
        },
        captions=(
            "{a $loud $pitch engine} $verb",
            "the $pitch hum of {a $state_adj engine}",
            "{a $loud $pitch motor} drones and $verb",
            "{a $state_adj engine} with {a $pitch rumble}",
            "{a $state_adj $pitch car engine} running",
        ),
    ),
    Recipe(
        label="footsteps",
        slug="footsteps",
        summary="3-8 heel-toe clicks on a hard floor or granular crunches on gravel",
        draws=(
            Coin("pace", "walking", "running"),
            Coin("surface", "hard", "gravel"),
            Count({"walking": (3, 7), "running": (4, 9)}, by="pace"),
            Uniform("period", {"walking": (0.45, 0.55), "running": (0.25, 0.3)}, by="pace"),
        ),
        jitter=0.05,
        sound=_steps,
        words={
            "surface": Words(
                "surface",
                {
                    "gravel": ("gravel", "a gravel path", "crunchy gravel"),
                    "hard": ("a hard floor", "a tiled floor", "concrete"),
                },
            ),
            "verb": Words(
                "pace", {"running": ("runs", "hurries", "jogs"), "walking": ("walks", "strolls", "paces")}, once=True
            ),
            "pace_adj": Words(
                "pace",
                {"running": ("running", "fast", "hurried"), "walking": ("walking", "slow", "unhurried")},
                once=True,
            ),
        },
        captions=(
            "{$count $loud footstep|footsteps} on $surface",
            "someone $verb across $surface, taking {$count step|steps}",
            "{$pace_adj footsteps}, {$count step|steps} on $surface",
            "a person $verb {$count $loud step|steps} over $surface",
            "the sound of {$count $pace_adj step|steps} on $surface",
        ),
    ),
    Recipe(
        label="a church bell",
        slug="church_bell",
        summary="1-4 tolls of inharmonic bell partials with 0.3-2.5 s decays",
        draws=(
            Coin("register", "high", "low"),
            Coin("tempo", "fast", "slow"),
            Count((1, 5)),
            Uniform("period", {"fast": (0.55, 0.7), "slow": (0.95, 1.2)}, by="tempo"),
            Uniform("bell_hz", {"high": (500, 800), "low": (220, 330)}, by="register"),
        ),
        sound=_bell,
        words={"pitch": _pitch(("high", "bright", "small"), ("deep", "low", "large"))},
        captions=(
            "{a $loud church bell} tolls $times",
            "{$count [$tempo_adj] stroke|strokes} of {a $pitch church bell}",
            "{a $loud $pitch bell} rings out $times[, $tempo_adv]",
            "the $pitch toll of a church bell, struck $times",
            "{a $pitch bell} in a church tower chimes $times",
        ),
    ),
)

#: The class labels, in the stable order used for class indices and seeds. Each reads naturally in the prompt.
DEMO_CLASSES: tuple[str, ...] = tuple(r.label for r in RECIPES)
