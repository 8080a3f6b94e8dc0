"""The training stages of the pipeline and the models they make, each declared once.

A :class:`Stage` says what a stage is called, what it trains on (the caption vectors or an earlier stage's export),
which function runs it, which training recipe its settings hold, and how its model is evaluated. A
:class:`Variant` is one of the paper's models (section IV): the export of one stage, reached by a line of stages
from stage 1. Together they form a tree — stage 1 feeds stage 1.1 and stage 2; stage 1.1 feeds a second stage 2
(``stage2-as``) — so one execution makes all four M2D2 models, sharing the data steps and stage 1:

    M2D2⁻     stage1
    M2D2      stage1 -> stage2
    M2D2⁺     stage1 -> stage2 -> stage2.1
    M2D2^AS+  stage1 -> stage1.1 -> stage2-as -> stage2.1-as

``PipelineConfig.variants`` lists the models to make; a stage trains when a listed model needs it. Everything that
walks the pipeline reads these tables: the in-process driver (:func:`m2d2.pipeline.runner.run`), the Flyte workflow
(``workflows/full.py``), evaluation, registration and tracking.

Adding a stage is one :class:`Stage` entry here plus its runner (a function with the signature of
:func:`m2d2.train.stages.run_stage1`) and its settings under its name in each preset (``PipelineConfig.stages``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

CAPTIONS = "captions"  # what stage 1 trains on: the offline caption vectors, not a model


@dataclass(frozen=True)
class Stage:
    """One training stage.

    ``runner`` is an import path (``module:function``), so reading the table imports no training code: the Flyte
    workflow is compiled from it at registration, where only the wiring is needed.
    """

    name: str  # the stage's one spelling: its PipelineConfig.stages key, directories, MLflow runs and metrics, logs
    trains_on: str  # CAPTIONS, or the name of the stage whose export it starts from
    # "package.module:function", called as runner(cfg, feature_dir, source, out_dir, parent, ckpt_root, name=name)
    runner: str
    evaluation: Literal["clap", "tagging"] = "clap"  # CLAP zero-shot/retrieval, or the tagging mAP it reports
    baseline: str = ""  # the stage whose random-initialisation baseline a CLAP stage is compared with
    title: str = ""  # for people: "stage 1.1"
    # The training recipe its settings hold (TrainStageConfig.stage: what the runner does): its own name, unless
    # the stage repeats another's recipe (stage2-as is stage 2's recipe on stage 1.1's encoder).
    recipe: str = ""

    def __post_init__(self) -> None:
        if not self.recipe:
            object.__setattr__(self, "recipe", self.name)

    def load_runner(self) -> Callable:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


STAGES: tuple[Stage, ...] = (
    Stage("stage1", CAPTIONS, "m2d2.train.stages:run_stage1", baseline="stage1", title="stage 1"),
    Stage("stage1.1", "stage1", "m2d2.train.stages:run_stage1_1", evaluation="tagging", title="stage 1.1"),
    Stage("stage2", "stage1", "m2d2.train.stages:run_stage2", baseline="stage2", title="stage 2"),
    Stage("stage2.1", "stage2", "m2d2.train.stages:run_stage2_1", baseline="stage2", title="stage 2.1"),
    Stage("stage2-as", "stage1.1", "m2d2.train.stages:run_stage2", baseline="stage2-as",
          title="stage 2 on stage 1.1's encoder", recipe="stage2"),
    Stage("stage2.1-as", "stage2-as", "m2d2.train.stages:run_stage2_1", baseline="stage2-as",
          title="stage 2.1 on stage 1.1's encoder", recipe="stage2.1"),
)


@dataclass(frozen=True)
class Variant:
    """One model of the M2D2 family: the export of stage ``final`` (paper section IV names four)."""

    name: str  # its spelling in PipelineConfig.variants, MLflow runs, metric keys and registered-model names
    title: str  # the paper's name, for people: "M2D2⁺"
    final: str  # the stage whose export it is
    description: str = ""


VARIANTS: tuple[Variant, ...] = (
    Variant("m2d2-minus", "M2D2⁻", "stage1",
            "stage 1: M2D + CLAP against the offline LLM sentence vectors"),
    Variant("m2d2", "M2D2", "stage2",
            "stage 1's encoder (frozen) with stage 2's projector and text encoder"),
    Variant("m2d2-plus", "M2D2⁺", "stage2.1",
            "M2D2 continued on the curated captions (stage 2.1)"),
    Variant("m2d2-as-plus", "M2D2^AS+", "stage2.1-as",
            "the AudioSet-fine-tuned encoder (stage 1.1) with stages 2 and 2.1 trained on it"),
)
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)


def check_stages(stages: tuple[Stage, ...]) -> None:
    """Names unique, every stage trains on captions or on a stage declared before it."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        if stage.trains_on != CAPTIONS and stage.trains_on not in seen:
            raise ValueError(f"stage {stage.name!r} trains on {stage.trains_on!r}, which is not declared before it")
        if stage.evaluation == "clap" and stage.baseline and stage.baseline not in seen | {stage.name}:
            raise ValueError(f"stage {stage.name!r}: baseline {stage.baseline!r} is not a declared stage")
        seen.add(stage.name)


def stage(name: str, stages: tuple[Stage, ...] | None = None) -> Stage:
    stages = STAGES if stages is None else stages  # read when called: a test may extend the table
    for s in stages:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; the pipeline has {[s.name for s in stages]}")


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"unknown model variant {name!r}; choose from {', '.join(VARIANT_NAMES)}")


def line(final: str, stages: tuple[Stage, ...] | None = None) -> tuple[Stage, ...]:
    """The stages that make ``final``'s export, first to last (stage 1 ... ``final``)."""
    chain = [stage(final, stages)]
    while chain[-1].trains_on != CAPTIONS:
        chain.append(stage(chain[-1].trains_on, stages))
    return tuple(reversed(chain))


def needed_stages(variants: list[str] | tuple[str, ...], stages: tuple[Stage, ...] | None = None) -> tuple[Stage, ...]:
    """The stages that train when ``variants`` are made, in pipeline order (each once, however many models share it)."""
    stages = STAGES if stages is None else stages
    needed = {s.name for name in variants for s in line(variant(name).final, stages)}
    return tuple(s for s in stages if s.name in needed)


def registered_name(prefix: str, variant_name: str) -> str:
    """The MLflow registered model of a variant: its name with ``m2d2`` replaced by ``prefix`` (``registered_model``):
    ``m2d2-minus``, ``m2d2``, ``m2d2-plus``, ``m2d2-as-plus``; with prefix ``acme``, ``acme-plus`` and so on."""
    variant(variant_name)
    return prefix + variant_name.removeprefix("m2d2")


def identifier(name: str) -> str:
    """The stage's name where a Python identifier is needed (a Flyte task, a runner function): ``stage1_1``,
    ``stage2_1_as``. Every other place — config keys, directories, MLflow runs and metric keys
    (``stage2.1/zs_acc``) — spells it ``name``."""
    return name.replace(".", "_").replace("-", "_")


def check_variants(variants: tuple[Variant, ...], stages: tuple[Stage, ...]) -> None:
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"model variants declared twice: {names}")
    for v in variants:
        stage(v.final, stages)


check_stages(STAGES)
check_variants(VARIANTS, STAGES)
