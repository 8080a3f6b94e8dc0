"""The training stages of the pipeline, each declared once.

A :class:`Stage` says what a stage is called, which config section holds its settings, what it trains on (the
caption vectors or an earlier stage's export), which function runs it, whether it may be switched off, and how
its model is evaluated. Everything that walks the pipeline reads this table: the in-process driver
(:func:`m2d2.pipeline.runner.run`), the Flyte workflow (``workflows/full.py``), evaluation and tracking.

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
    runner: str  # "package.module:function", called as runner(cfg, feature_dir, source, out_dir, parent, ckpt_root)
    optional: bool = False  # may be switched off (section.enabled = False): its input then passes through
    evaluation: Literal["clap", "tagging"] = "clap"  # CLAP zero-shot/retrieval, or the tagging mAP it reports
    baseline: str = ""  # the stage whose random-initialisation baseline a CLAP stage is compared with
    title: str = ""  # for people: "stage 1.1"
    # The training recipe its settings hold (TrainStageConfig.stage: what the runner does): its own name, unless
    # the stage repeats another's recipe (a second stage-2.1 round on other data would say "stage2.1").
    recipe: str = ""

    def __post_init__(self) -> None:
        if not self.recipe:
            object.__setattr__(self, "recipe", self.name)

    def load_runner(self) -> Callable:
        module, _, function = self.runner.partition(":")
        return getattr(importlib.import_module(module), function)


STAGES: tuple[Stage, ...] = (
    Stage("stage1", CAPTIONS, "m2d2.train.stages:run_stage1", baseline="stage1", title="stage 1"),
    Stage("stage1.1", "stage1", "m2d2.train.stages:run_stage1_1", optional=True, evaluation="tagging",
          title="stage 1.1"),
    Stage("stage2", "stage1.1", "m2d2.train.stages:run_stage2", baseline="stage2", title="stage 2"),
    Stage("stage2.1", "stage2", "m2d2.train.stages:run_stage2_1", optional=True, baseline="stage2",
          title="stage 2.1"),
)


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


def stage(name: str, stages: tuple[Stage, ...] = STAGES) -> Stage:
    for s in stages:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; the pipeline has {[s.name for s in stages]}")


def identifier(name: str) -> str:
    """The stage's name where a Python identifier is needed (a Flyte task, a runner function): ``stage1_1``. Every
    other place — config keys, directories, MLflow runs and metric keys (``stage2.1/zs_acc``) — spells it ``name``."""
    return name.replace(".", "_")


check_stages(STAGES)
