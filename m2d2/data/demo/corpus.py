"""Demo corpus assembly: the config, clip planning, backgrounds and stereo, and writing the files and manifest.

Everything here is shared by all classes (the recipes only say how one class sounds and is described), so this
is where the corpus's guarantees live. Determinism: each clip draws from its own
``SeedSequence(seed, spawn_key=(split, class, index))``, split into independent streams for attributes,
captions and audio. The same config therefore gives byte-identical files and manifest, and changing one split's
size (or the caption templates) never changes another clip's audio.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from numpy.typing import NDArray
from tqdm import tqdm

from m2d2.data.demo import dsp
from m2d2.data.demo.dsp import MAX_CONTENT_HZ, Array, Rng
from m2d2.data.demo.language import choose_captions
from m2d2.data.demo.recipes import DEMO_CLASSES, RECIPES
from m2d2.data.manifest import REQUIRED_SCHEMA
from m2d2.io import atomic_write_bytes

log = logging.getLogger(__name__)

#: Length of the training crop (80 x 208 log-mel frames at 100 frames/s); no clip may be shorter.
TRAINING_CROP_S: float = 2.08
#: Bump when the recipes, synthesis or caption grammar change: it is part of ``corpus.json``, so old corpora
#: regenerate.
GENERATOR_VERSION: int = 1

SPLITS: tuple[str, ...] = ("train", "eval")
BACKGROUNDS: tuple[str, ...] = ("none", "hiss", "hum")
MANIFEST_FILE = "manifest.parquet"
CORPUS_FILE = "corpus.json"
_EXTENSIONS = {"WAV": "wav", "FLAC": "flac"}

#: The demo writes the project's manifest schema (its required columns), like every source adapter.
DEMO_MANIFEST_SCHEMA = REQUIRED_SCHEMA


def _min_eval_per_class() -> int:
    """``m2d2.data.demo.MIN_EVAL_PER_CLASS``, read at validation time so tests can lower it with ``monkeypatch``."""
    from m2d2.data import demo

    return demo.MIN_EVAL_PER_CLASS


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
        min_eval = _min_eval_per_class()
        if self.eval_per_class < min_eval:
            raise ValueError(f"eval_per_class must be >= {min_eval}, got {self.eval_per_class}")
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
# Planning (attributes and captions) and rendering (samples)
# ----------------------------------------------------------------------------------------------------------------


def _clip_seeds(seed: int, split: str, class_index: int, index: int) -> list[np.random.SeedSequence]:
    """Independent attribute / caption / audio streams of one clip, keyed by its position, not by list order."""
    return np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), class_index, index)).spawn(3)


def _level(peak_dbfs: float) -> str:
    return "quiet" if peak_dbfs < -22.0 else "loud" if peak_dbfs > -13.0 else "moderate"


def _plan_clip(cfg: DemoCorpusConfig, split: str, class_index: int, index: int) -> DemoClip:
    recipe = RECIPES[class_index]
    attr_seed, caption_seed, _ = _clip_seeds(cfg.seed, split, class_index, index)
    rng = np.random.default_rng(attr_seed)
    rate, channels, container = cfg.formats[(class_index + index) % len(cfg.formats)]
    peak_dbfs = round(float(rng.uniform(*cfg.peak_dbfs_range)), 2)
    weights = np.asarray(cfg.background_weights, dtype=np.float64)
    background = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=weights / weights.sum()))]
    snr_db = round(float(rng.uniform(*cfg.snr_db_range)), 2)
    pan = float(rng.uniform(-cfg.max_pan, cfg.max_pan))
    shadow_hz = float(rng.uniform(*cfg.shadow_cutoff_hz_range))
    attributes = recipe.draw(rng, cfg.min_duration_s, cfg.max_duration_s)
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
        captions=choose_captions(recipe.caption_candidates(attributes, crng), background, snr, k, crng),
    )


def plan_demo_corpus(config: DemoCorpusConfig = DemoCorpusConfig()) -> list[DemoClip]:  # noqa: B008
    """Every clip's attributes and captions, train then eval, class by class; cheap (no audio is synthesised)."""
    return [
        _plan_clip(config, split, class_index, index)
        for split in SPLITS
        for class_index in range(len(RECIPES))
        for index in range(config.per_class(split))
    ]


def _background(kind: str, n: int, sr: int, channels: int, rng: Rng) -> Array:
    """[channels, n] unit-RMS background: independent low-passed hiss per channel, or one mains hum for both."""
    if kind == "hiss":
        return np.stack([dsp.noise(rng, n, sr, 0, MAX_CONTENT_HZ, order=4) for _ in range(channels)])
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum = dsp.harmonics(dsp.cycles(mains, n, sr, rng.random()), mains, (1.0, 0.6, 0.5, 0.3, 0.25, 0.15), sr)
    hum = hum / (np.sqrt(np.mean(hum**2)) + 1e-12)
    return np.repeat(hum[None], channels, axis=0)


def render_clip(clip: DemoClip, seed: int) -> NDArray[np.float32]:
    """Synthesise ``clip`` as a [frames, channels] float32 array at its own rate, peak-normalised to its level."""
    recipe = RECIPES[clip.class_index]
    rng = np.random.default_rng(_clip_seeds(seed, clip.split, clip.class_index, clip.index)[2])
    sr, n, a = clip.sample_rate, clip.num_frames, clip.attributes
    source = recipe.synthesise(a, sr, n, rng)
    if clip.channels == 2:  # constant-power pan; the far channel is also low-passed (head shadow)
        angle = (a["pan"] + 1.0) * np.pi / 4
        shadowed = dsp.bandpass(source, sr, 0, a["shadow_hz"], order=1)
        left, right = (shadowed, source) if a["pan"] >= 0 else (source, shadowed)
        x = np.stack([np.cos(angle) * left, np.sin(angle) * right])
    else:
        x = source[None]
    rms = float(np.sqrt(np.mean(x**2))) + 1e-12
    if clip.background != "none":
        x = x + _background(clip.background, n, sr, clip.channels, rng) * rms * 10 ** (-(clip.snr_db or 0.0) / 20)
    x = dsp.fade(x, sr, 0.005, 0.02)  # no click at either end, whatever the recipe left there
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
