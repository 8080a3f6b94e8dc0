"""Typed training-stage configuration with named presets (``paper``, ``demo``, ``smoke``).

Fields are plain scalars so the same dataclass is a Flyte workflow input. The model itself comes from the
named :class:`~m2d2.models.M2D2Config` preset (``model_preset``); model-level settings (EMA schedule, loss
weights, mask ratios) live there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STAGES = ("stage1", "stage1.1", "stage2", "stage2.1")


@dataclass
class TrainStageConfig:
    """One training stage: ``stage1`` (M2D + CLAP), ``stage1.1`` (supervised fine-tuning of the encoder),
    ``stage2`` (CLAP with a trainable text encoder, frozen audio encoder) or ``stage2.1`` (stage 2 continued on a
    curated subset without masking)."""

    stage: str = "stage1"
    enabled: bool = True  # stages 1.1 and 2.1 are optional: disabled, the pipeline passes the input through
    model_preset: str = "demo"
    epochs: int = 300
    warmup_epochs: float = 20.0
    global_batch: int = 2048
    base_lr: float = 3e-4  # lr = base_lr * global_batch / 256 (MAE convention)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | lars (timm's, as the reference's AudioSet fine-tuning) | sgd
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95
    momentum: float = 0.9  # LARS / SGD
    grad_clip: float = 3.0
    accum_steps: int = 1  # micro-batches per step; contrastive negatives still span the whole global batch
    max_steps: int = 0  # > 0 caps the schedule (smoke tests); 0 = epochs x steps per epoch
    crop_frames: int = 0  # 0 = the model's input_frames
    mask_ratio: float = -1.0  # stage 2 only; < 0 = the model's stage2_mask_ratio (0.3), 0.0 for stage 2.1
    # training subset: clips of these sources (comma-separated; empty = all) with at least this many captions
    subset_sources: str = ""
    subset_min_captions: int = 0
    # stage 1.1 (supervised fine-tuning) only
    mixup_alpha: float = 0.0
    freq_mask: int = 30
    time_mask: int = 192
    patch_out: float = 0.5  # structured patch-out ratio in the encoder
    balanced_sampling: bool = False  # AudioSet-style class-balanced weights, drawn without replacement
    samples_per_epoch: int = 0  # 0 = every clip once per epoch
    seed: int = 0
    log_every: int = 10
    num_workers: int = 0  # loader processes per rank (crops are cut and collated there)
    prefetch_factor: int = 4  # batches each worker keeps ready (with num_workers > 0); pinned on GPU
    compile: str = "auto"  # torch.compile of each transformer block: auto (GPU only) | on | off
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0 = only the final one
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # consecutive NaN/inf losses (each step skipped) before aborting
    # distribution (read by the Flyte Elastic task and the DeepSpeed engine)
    nnodes: int = 1
    nproc_per_node: int = 1
    zero_stage: int = 0
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {STAGES}")

    @property
    def sources(self) -> list[str]:
        return [s.strip() for s in self.subset_sources.split(",") if s.strip()]

    @property
    def lr(self) -> float:
        return self.base_lr * self.global_batch / 256

    def replace(self, **changes) -> TrainStageConfig:
        return dataclasses.replace(self, **changes)


def stage_preset(stage: str, name: str) -> TrainStageConfig:
    """Settings of ``stage`` under preset ``name``; every deviation of ``demo`` from ``paper`` is explained."""
    try:
        return _STAGE_PRESETS[(stage, name)]()
    except KeyError:
        known = sorted({f"{s}/{n}" for s, n in _STAGE_PRESETS})
        raise ValueError(f"unknown stage preset {stage}/{name}; choose one of {known}") from None


def _stage1_paper() -> TrainStageConfig:
    # Paper section IV-A / fact sheet 4.2: 300 epochs, 20 warm-up, batch 2048 (4 GPUs x 512), blr 3e-4.
    # 8 loader workers per rank: the task requests 10 CPUs per GPU, and one core cuts ~7 k crops/s from a warm
    # local store (benchmarks/bench_loader.py) against the ~3-5 k samples/s a GPU steps (stage1_throughput.py).
    return TrainStageConfig(stage="stage1", model_preset="paper", epochs=300, warmup_epochs=20, global_batch=2048,
                            base_lr=3e-4, nproc_per_node=4, num_workers=8)


def _stage2_paper() -> TrainStageConfig:
    # Stage 2: 30 epochs, 5 warm-up, batch 2048, blr 3e-6, 10-s crops (1001 frames, after stage 1.1's 608->1001).
    return TrainStageConfig(stage="stage2", model_preset="paper", epochs=30, warmup_epochs=5, global_batch=2048,
                            base_lr=3e-6, crop_frames=1001, nproc_per_node=4, num_workers=8)


def _stage1_demo() -> TrainStageConfig:
    # CPU minutes instead of GPU days: 10 epochs of the 480-clip demo corpus = 150 steps of batch 32 (~2.5 min
    # on 2 cores), so a 33x larger base lr (lr 1.25e-3; the paper's 3e-4 would give 3.75e-5 at batch 32) and a
    # 1-epoch warm-up.
    return TrainStageConfig(stage="stage1", model_preset="demo", epochs=10, warmup_epochs=1, global_batch=32,
                            base_lr=1e-2, log_every=5)


def _stage2_demo() -> TrainStageConfig:
    # Stage 2 on CPU: crops at the encoder's length after stage 1.1 (256 frames), 8 epochs = 120 steps, lr 3e-4
    # (the paper's 3e-6 base would give 3.75e-7 at batch 32). Measured on the demo: lr 1e-4 / 6 epochs reached
    # 0.23 zero-shot, 3e-4 / 6 epochs 0.30, 6e-4 / 6 epochs 0.30 with an early loss spike, 3e-4 / 8 epochs 0.33.
    return TrainStageConfig(stage="stage2", model_preset="demo", epochs=8, warmup_epochs=0.5, global_batch=32,
                            base_lr=2.4e-3, log_every=5)


def _stage11_paper() -> TrainStageConfig:
    # Stage 1.1 = EVAR ``util/ft-as2m.sh`` (fact sheet 4.4): LARS lr 2.0 (timm Lars, wd 0), batch 64, 70 epochs of
    # 200 k class-balanced clips drawn without replacement, 15 warm-up, cosine to 1e-7, mixup 0.5, SpecAugment
    # 30/192, structured patch-out 0.5, BCE, 608 -> 1001 frames. No gradient clipping in EVAR.
    return TrainStageConfig(stage="stage1.1", model_preset="paper", epochs=70, warmup_epochs=15, global_batch=64,
                            base_lr=2.0 * 256 / 64, min_lr=1e-7, optimizer="lars", weight_decay=0.0, momentum=0.9,
                            grad_clip=0.0, crop_frames=1001, mixup_alpha=0.5, freq_mask=30, time_mask=192,
                            patch_out=0.5, balanced_sampling=True, samples_per_epoch=200_000, num_workers=8)


def _stage21_paper() -> TrainStageConfig:
    # Stage 2.1: stage 2's recipe continued from its weights (new optimiser and schedule, as ``--finetune``), no
    # masking, on WavCaps + AudioCaps + Clotho (the 439,743-clip subset; source names of the dataset adapters).
    return _stage2_paper().replace(stage="stage2.1", mask_ratio=0.0, subset_sources="wavcaps,audiocaps,clotho")


def _stage11_demo() -> TrainStageConfig:
    # 4 epochs of the 480-clip corpus (60 steps of 32). The 208-frame demo encoder grows to 256 frames (13 -> 16
    # patch columns), not by the paper's 608 -> 1001 ratio (343 frames): the demo's shortest clips are 2.6 s, and
    # longer crops would train on raw-log zero padding (+1.7 sigma after normalisation) that evaluation never sees.
    # Time mask scaled with the crop (192 * 256 / 1001 = 48). LARS as the paper at lr 0.1. Measured (eval mAP, chance
    # 0.10): crop 256 / lr 0.1 0.44; crop 256 / lr 0.5 0.39; crop 343 at lr 0.02 / 0.1 / 0.5 / 2.0: 0.37 / 0.32 /
    # 0.25 / 0.14. 60 steps are far from converged (a logistic-regression probe on the same encoder reaches 0.79
    # accuracy); the paper runs 70 epochs of 200 k clips.
    return TrainStageConfig(stage="stage1.1", model_preset="demo", epochs=4, warmup_epochs=1, global_batch=32,
                            base_lr=0.1 * 256 / 32, min_lr=1e-7, optimizer="lars", weight_decay=0.0, grad_clip=0.0,
                            crop_frames=256, mixup_alpha=0.5, freq_mask=30, time_mask=48, patch_out=0.5,
                            balanced_sampling=True, log_every=5)


def _stage21_demo() -> TrainStageConfig:
    # The demo has one source; its "curated" subset is the clips with 3 captions (as AudioCaps / Clotho carry
    # 5 human captions against WavCaps' one), about half the corpus. 3 epochs, no masking.
    return _stage2_demo().replace(stage="stage2.1", epochs=3, warmup_epochs=0.5, mask_ratio=0.0,
                                  subset_min_captions=3)


def _smoke(stage: str) -> TrainStageConfig:
    base = {"stage1": _stage1_demo, "stage1.1": _stage11_demo, "stage2": _stage2_demo, "stage2.1": _stage21_demo}
    changes = {"crop_frames": 96, "time_mask": 16} if stage == "stage1.1" else {}
    return base[stage]().replace(model_preset="smoke", epochs=1, warmup_epochs=0.5, global_batch=8, max_steps=3,
                                 log_every=1, **changes)


_STAGE_PRESETS = {
    ("stage1", "paper"): _stage1_paper,
    ("stage2", "paper"): _stage2_paper,
    ("stage1", "demo"): _stage1_demo,
    ("stage2", "demo"): _stage2_demo,
    ("stage1.1", "paper"): _stage11_paper,
    ("stage1.1", "demo"): _stage11_demo,
    ("stage2.1", "paper"): _stage21_paper,
    ("stage2.1", "demo"): _stage21_demo,
    **{(stage, "smoke"): (lambda stage=stage: _smoke(stage)) for stage in STAGES},
}
