"""The one registry of named settings: a preset name gives the model, every training stage and the pipeline.

- ``paper``: the published recipe (ViT-B, NV-Embed-v2 captions, BERT-base, GPU days);
- ``demo``: the same classes and code paths at CPU-minutes scale (the default of :class:`PipelineConfig`);
- ``smoke``: the demo cut to a few steps per stage, for tests.

::

    from m2d2 import presets
    presets.model_config("paper")                  # M2D2Config
    presets.stage_config("stage1.1", "demo")       # TrainStageConfig
    presets.pipeline_config("smoke", data_root="/tmp/runs")   # PipelineConfig
    presets.get("paper")                           # all three at once: Preset(name, model, stages, pipeline)

A stage names the model it builds by preset (``TrainStageConfig.model``); :func:`model_config` is the one place that
name is resolved. Comments here say why a number is what it is; the measurements behind each demo deviation from
``paper`` are in ``docs/presets.md``. This module sits above the configs it combines: :mod:`m2d2.models` and
:mod:`m2d2.train` never import it, and it imports :mod:`m2d2.pipeline` only when a pipeline config is asked for
(that package needs MLflow, which a bare training image may lack).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from m2d2.config import merge
from m2d2.models.config import M2D2Config
from m2d2.models.presets import model_config  # noqa: F401 (part of this registry's API)
from m2d2.train.config import (
    STAGES,
    AugmentConfig,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TopologyConfig,
    TrainStageConfig,
)

if TYPE_CHECKING:
    from m2d2.pipeline.config import PipelineConfig

PRESETS = ("paper", "demo", "smoke")


@dataclass
class Preset:
    """Everything one preset name sets (fresh copies: changing them changes no other caller's)."""

    name: str
    model: M2D2Config
    stages: dict[str, TrainStageConfig]  # stage name ("stage1", "stage1.1", ...) -> its config
    pipeline: PipelineConfig


def get(name: str) -> Preset:
    """The model, the stages and the pipeline of preset ``name``."""
    recipe = _recipe(name)
    return Preset(name, recipe.model(), recipe.stages(), pipeline_config(name))


def stage_config(stage: str, name: str) -> TrainStageConfig:
    """The settings of training stage ``stage`` under preset ``name``."""
    stages = _recipe(name).stages()
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return stages[stage]


def pipeline_config(name: str, **changes: Any) -> PipelineConfig:
    """The pipeline of preset ``name`` (its stages included), with ``changes`` applied as
    :func:`m2d2.config.merge` does (a mapping overlays a section: ``stages={"stage1": {"schedule": {"max_steps": 2}}}``)."""
    from m2d2.pipeline.config import PipelineConfig, default_stages

    cfg = merge(PipelineConfig(preset=name, stages=default_stages(name)), _recipe(name).pipeline())
    return merge(cfg, changes) if changes else cfg


# ------------------------------------------------------------------------------------------------ the presets
@dataclass(frozen=True)
class _Recipe:
    model: Callable[[], M2D2Config]
    stages: Callable[[], dict[str, TrainStageConfig]]
    pipeline: Callable[[], dict[str, Any]]  # PipelineConfig keys besides the stages, as a file would hold them


def _recipe(name: str) -> _Recipe:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def _stages(*configs: TrainStageConfig) -> dict[str, TrainStageConfig]:
    return dict(zip(STAGES, configs, strict=True))


# -- paper
def _paper_stages() -> dict[str, TrainStageConfig]:
    # 8 loader workers per rank: the task requests 10 CPUs per GPU, and 8 cores cut crops faster than a GPU steps
    # (docs/presets.md). 4 GPUs for stages 1, 2 and 2.1: the published run (4 x 512 = batch 2048).
    # Stage 1, paper section IV-A: 300 epochs (20 warm-up) at batch 2048, base lr 3e-4, AdamW (0.9, 0.95).
    # Views (paper section IV-A, m2d2.data.views): stage 1 = AudioSet + VGGSound + WavCaps without the recordings of
    # AudioCaps, Clotho, ESC-50 and US8K; stage 1.1 = AudioSet; stage 2 = stage 1's + AudioCaps and Clotho training
    # clips; stage 2.1 = WavCaps + AudioCaps + Clotho. The evaluation split is excluded from every view.
    held_out = ["audiocaps", "clotho", "esc50", "us8k"]
    stage1 = TrainStageConfig(stage="stage1", model="paper",
                              data=DataConfig(num_workers=8, sources=["audioset", "vggsound", "wavcaps"],
                                              exclude_overlap_with=held_out),
                              topology=TopologyConfig(nproc_per_node=4), optim=OptimConfig(base_lr=3e-4),
                              schedule=ScheduleConfig(epochs=300, warmup_epochs=20, global_batch=2048))
    # Stage 1.1 = the reference's AudioSet fine-tuning (nttcslab/m2d util/ft-as2m.sh): LARS lr 2.0 at batch 64
    # (timm Lars, wd 0, no gradient clipping), 70 epochs of 200 k class-balanced clips drawn without replacement,
    # 15 warm-up, cosine to 1e-7, mixup 0.5, SpecAugment 30/192, structured patch-out 0.5, 608 -> 1001 frames.
    stage1_1 = TrainStageConfig(
        stage="stage1.1", model="paper",
        data=DataConfig(crop_frames=1001, balanced_sampling=True, samples_per_epoch=200_000, num_workers=8,
                        sources=["audioset"]),
        optim=OptimConfig(name="lars", base_lr=2.0 * 256 / 64, min_lr=1e-7, weight_decay=0.0, momentum=0.9,
                          grad_clip=None),
        schedule=ScheduleConfig(epochs=70, warmup_epochs=15, global_batch=64),
        augment=AugmentConfig(mixup_alpha=0.5, freq_mask=30, time_mask=192, patch_out=0.5))
    # Stage 2: 30 epochs (5 warm-up) at batch 2048, base lr 3e-6, 10-s crops (1001 frames: the length stage 1.1
    # grew the encoder to); input masking is the model's clap.stage2_mask_ratio (0.3).
    stage2 = TrainStageConfig(stage="stage2", model="paper",
                              data=DataConfig(crop_frames=1001, num_workers=8, exclude_overlap_with=held_out,
                                              sources=["audioset", "vggsound", "wavcaps", "audiocaps", "clotho"]),
                              topology=TopologyConfig(nproc_per_node=4), optim=OptimConfig(base_lr=3e-6),
                              schedule=ScheduleConfig(epochs=30, warmup_epochs=5, global_batch=2048))
    # Stage 2.1: stage 2's recipe continued from its weights (a new optimiser and schedule, as the reference's
    # --finetune), no masking, on WavCaps + AudioCaps + Clotho (source names of the dataset adapters).
    stage2_1 = stage2.replace(stage="stage2.1", augment={"mask_ratio": 0.0},
                             data={"sources": ["wavcaps", "audiocaps", "clotho"]})
    return _stages(stage1, stage1_1, stage2, stage2_1)


def _paper_pipeline() -> dict[str, Any]:
    # 16 caption shards: ~2.5 M unique captions through a 7-B encoder, one GPU pod per shard; waveforms padded to
    # 6.1 s before the log-mel, as the reference's pre-processing does
    # The suite: the paper's downstream tasks (Table I; Tables II, V, VII, VIII) beside the held-out split, their
    # datasets under tasks_root in each task's published layout; fixed-split linear evaluation averaged over 3 seeds.
    from m2d2.eval.tasks import TASKS

    return {"caption_shards": 16, "min_clip_seconds": 6.1, "suite": ["corpus", *TASKS],
            "tasks_root": "/data/m2d2/tasks", "linear_runs": 3}


# -- demo
def _demo_stages() -> dict[str, TrainStageConfig]:
    # CPU minutes instead of GPU days: batch 32 and a few hundred steps, so larger learning rates than the linear
    # scaling of the paper's base lr would give (docs/presets.md has the lr measurements).
    # Stage 1: 10 epochs of the 480-clip demo corpus = 150 steps at lr 1.25e-3 (the paper's base lr 3e-4 would give
    # 3.75e-5 at batch 32), a 1-epoch warm-up.
    stage1 = TrainStageConfig(stage="stage1", model="demo", log_every=5, optim=OptimConfig(base_lr=1e-2),
                              schedule=ScheduleConfig(epochs=10, warmup_epochs=1, global_batch=32))
    # Stage 1.1: the paper's recipe (LARS, mixup, SpecAugment, patch-out, balanced sampling) for 4 epochs = 60
    # steps at lr 0.1. The 208-frame encoder grows to 256 frames, not by the paper's ratio (to 343): the demo's
    # shortest clips are 2.6 s, and longer crops would train on padding that evaluation never sees. The time mask
    # scales with the crop (192 x 256 / 1001 = 48).
    stage1_1 = TrainStageConfig(
        stage="stage1.1", model="demo", log_every=5,
        data=DataConfig(crop_frames=256, balanced_sampling=True),
        optim=OptimConfig(name="lars", base_lr=0.1 * 256 / 32, min_lr=1e-7, weight_decay=0.0, grad_clip=None),
        schedule=ScheduleConfig(epochs=4, warmup_epochs=1, global_batch=32),
        augment=AugmentConfig(mixup_alpha=0.5, freq_mask=30, time_mask=48, patch_out=0.5))
    # Stage 2: crops of the encoder's length after stage 1.1 (256 frames) on both lines, as the paper's 1001: stage
    # 1's 208-frame encoder (M2D2, M2D2⁺) takes them as chunks of 208 + 48 frames. 8 epochs = 120 steps at lr 3e-4
    # (the paper's base lr 3e-6 would give 3.75e-7 at batch 32).
    stage2 = TrainStageConfig(stage="stage2", model="demo", log_every=5, optim=OptimConfig(base_lr=2.4e-3),
                              data=DataConfig(crop_frames=256),
                              schedule=ScheduleConfig(epochs=8, warmup_epochs=0.5, global_batch=32))
    # Stage 2.1: the demo has one source, so its "curated" subset is the clips with 3 captions (as AudioCaps and
    # Clotho carry 5 human captions against WavCaps' one), about half the corpus; 3 epochs, no masking.
    stage2_1 = stage2.replace(stage="stage2.1", schedule={"epochs": 3, "warmup_epochs": 0.5},
                             augment={"mask_ratio": 0.0}, data={"min_captions": 3})
    return _stages(stage1, stage1_1, stage2, stage2_1)


def _demo_pipeline() -> dict[str, Any]:
    # No waveform padding (the reference pads to 6.1 s): the demo's clips are 2.6-6 s and its stage-1 crops 2.1 s, so
    # padding would fill up to half of them with silence; the figures in the README are measured without it.
    return {"min_clip_seconds": 0.0}


# -- smoke
def _smoke_stages() -> dict[str, TrainStageConfig]:
    # The demo's stages at 3 steps of batch 8; stage 1.1 grows the 64-frame encoder to 96 frames (6 patch columns)
    # with a time mask that fits the crop, and stages 2 and 2.1 crop 96 frames (stage 1's encoder: 64 + 32).
    smoke = {"model": "smoke", "log_every": 1,
             "schedule": {"epochs": 1, "warmup_epochs": 0.5, "global_batch": 8, "max_steps": 3}}
    extra = {"stage1.1": {"data": {"crop_frames": 96}, "augment": {"time_mask": 16}},
             "stage2": {"data": {"crop_frames": 96}}, "stage2.1": {"data": {"crop_frames": 96}}}
    return {stage: cfg.replace(**smoke, **extra.get(stage, {})) for stage, cfg in _demo_stages().items()}


def _smoke_pipeline() -> dict[str, Any]:
    # Small shards, so the feature and caption map tasks have several elements even on the smoke corpus.
    return {"baseline_inits": 2, "norm_samples": 200, "min_clip_seconds": 0.0, "feature_shard_mb": 4.0, "caption_shards": 2,
            "corpus": {"train_per_class": 2, "eval_per_class": 20}}


_REGISTRY = {
    "paper": _Recipe(lambda: model_config("paper"), _paper_stages, _paper_pipeline),
    "demo": _Recipe(lambda: model_config("demo"), _demo_stages, _demo_pipeline),
    "smoke": _Recipe(lambda: model_config("smoke"), _smoke_stages, _smoke_pipeline),
}
