"""Synthetic demo corpus: ten NumPy-synthesised sound classes with instance captions and a Parquet manifest.

Why synthetic: ``make demo`` must train and evaluate M2D2 end to end on CPU, offline, in minutes. Real data sets
are large and licence-bound; these clips are small and deterministic, yet hard enough for learning to be
measurable. Every class has its own spectro-temporal recipe, and every instance draws its pitch register, number
of events, tempo, loudness, duration and background noise, which its captions then describe, so a model has to
learn both what a class sounds like and how the words relate to the sound. The files deliberately mix sample
rates (16-48 kHz), mono and stereo, WAV and FLAC, so the decode path (resample, downmix) does real work.

Modules: :mod:`~m2d2.data.demo.recipes` (the ten classes as one table), :mod:`~m2d2.data.demo.dsp` (signal
building blocks), :mod:`~m2d2.data.demo.language` (caption grammar), :mod:`~m2d2.data.demo.corpus` (config,
planning, rendering, files and manifest). This package re-exports what the rest of the project uses.
"""

# ruff: noqa: E402
from __future__ import annotations

#: Smallest allowed ``eval_per_class``: fewer eval clips make zero-shot accuracy too noisy to compare runs.
#: The config looks it up here at validation time, so tests can lower it with ``monkeypatch`` on this package.
MIN_EVAL_PER_CLASS: int = 20

# The imports follow MIN_EVAL_PER_CLASS because the corpus module builds (and validates) default configs on import.
from m2d2.data.demo.corpus import (
    DEMO_MANIFEST_SCHEMA,
    TRAINING_CROP_S,
    DemoClip,
    DemoCorpusConfig,
    generate_demo_corpus,
    plan_demo_corpus,
)
from m2d2.data.demo.language import _BACKGROUND as _BACKGROUND  # caption checks compare against these lists
from m2d2.data.demo.language import _NUMBER_WORDS as _NUMBER_WORDS
from m2d2.data.demo.language import COUNT_WORD_RE, zero_shot_prompt
from m2d2.data.demo.recipes import DEMO_CLASSES

__all__ = [
    "COUNT_WORD_RE",
    "DEMO_CLASSES",
    "DEMO_MANIFEST_SCHEMA",
    "MIN_EVAL_PER_CLASS",
    "TRAINING_CROP_S",
    "DemoClip",
    "DemoCorpusConfig",
    "generate_demo_corpus",
    "plan_demo_corpus",
    "zero_shot_prompt",
]
