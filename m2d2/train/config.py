"""Typed configuration of one training stage, in sections (data, optimiser, schedule, augmentation, topology,
checkpoints).

Only dataclasses, scalars, ``Literal`` choices, lists and ``X | None`` appear here, so the config is a Flyte workflow
input as it is (inside :class:`~m2d2.pipeline.PipelineConfig`) and round-trips through JSON/YAML with
:mod:`m2d2.config`. ``None`` means "not set: use the model's value" (or "no limit"); there are no sentinel numbers.
The model a stage builds is named by ``model`` (a preset name, resolved by :func:`m2d2.presets.model_config`);
model-level settings (EMA schedule, loss weights, mask ratios) live in that model config. Named settings of every
stage: :mod:`m2d2.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from m2d2.config import check_choices, merge

Stage = Literal["stage1", "stage1.1", "stage2", "stage2.1"]
STAGES: tuple[str, ...] = get_args(Stage)
CLAP_STAGES = ("stage2", "stage2.1")  # the stages whose input masking augment.mask_ratio sets


def _at_least(section: Any, minimum: float, *names: str) -> None:
    """Each named field is unset (None) or at least ``minimum``."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name}={value}: must be >= {minimum:g}")


@dataclass
class DataConfig:
    """Which clips a stage trains on, how long its crops are, and how the loader delivers them."""

    crop_frames: int | None = None  # None: the model's encoder.input_frames
    # The stage's view of the corpus (m2d2.data.views): clips of these sources (empty: all) ...
    sources: list[str] = field(default_factory=list)
    min_captions: int = 0  # ... with at least this many captions ...
    # ... minus every clip that is the same recording (clip id, origin, content hash) as a clip of these sources
    # (never for overlapping its own source); the evaluation split is always excluded the same way.
    exclude_overlap_with: list[str] = field(default_factory=list)
    min_clips: int = 1  # a smaller view fails when the execution starts (so does one with less than one batch)
    balanced_sampling: bool = False  # AudioSet-style class-balanced weights, drawn without replacement
    samples_per_epoch: int | None = None  # clips drawn per epoch; None: every clip once
    num_workers: int = 0  # loader processes per rank (crops are cut and collated there)
    prefetch_factor: int = 4  # batches each worker keeps ready (with num_workers > 0); pinned on GPU

    def __post_init__(self) -> None:
        _at_least(self, 1, "crop_frames", "samples_per_epoch", "prefetch_factor")
        _at_least(self, 0, "min_captions", "num_workers")
        _at_least(self, 1, "min_clips")
        for name in ("sources", "exclude_overlap_with"):
            names = getattr(self, name)
            if any(not s or s != s.strip() or "," in s for s in names):
                raise ValueError(f"{name}={names!r}: one source name per list item (no commas, no blank names)")


@dataclass
class OptimConfig:
    """The optimiser; its peak lr is ``base_lr * global_batch / 256`` (MAE's linear scaling convention)."""

    name: Literal["adamw", "lars", "sgd"] = "adamw"  # lars: timm's, as the reference's AudioSet fine-tuning
    base_lr: float = 3e-4
    min_lr: float = 0.0  # where the cosine ends
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95
    momentum: float = 0.9  # LARS / SGD
    weight_decay: float = 0.05  # matrices only (see m2d2.train.objectives.decay_groups)
    grad_clip: float | None = 3.0  # max global gradient norm; None: no clipping

    def __post_init__(self) -> None:
        check_choices(self)
        if self.base_lr <= 0:
            raise ValueError(f"base_lr={self.base_lr}: must be > 0")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(f"beta1={self.beta1}, beta2={self.beta2}: each must be in [0, 1)")
        _at_least(self, 0, "min_lr", "momentum", "weight_decay")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip}: must be > 0, or unset (null) for no clipping")


@dataclass
class ScheduleConfig:
    """How long a stage trains: linear warm-up, then a half-cycle cosine, set every step."""

    epochs: int = 300
    warmup_epochs: float = 20.0
    global_batch: int = 2048  # clips per optimiser step over all ranks
    accum_steps: int = 1  # micro-batches per step; contrastive negatives still span the whole global batch
    max_steps: int | None = None  # caps the schedule (smoke tests); None: epochs x steps per epoch

    def __post_init__(self) -> None:
        _at_least(self, 1, "epochs", "global_batch", "accum_steps", "max_steps")
        _at_least(self, 0, "warmup_epochs")
        if self.global_batch % self.accum_steps:
            raise ValueError(f"global_batch={self.global_batch} does not split into accum_steps={self.accum_steps} "
                             "equal micro-batches")


@dataclass
class AugmentConfig:
    """Input masking of stages 2 / 2.1 and the augmentations of stage 1.1's supervised fine-tuning."""

    mask_ratio: float | None = None  # stages 2, 2.1 only; None: the model's clap.stage2_mask_ratio
    mixup_alpha: float = 0.0  # stage 1.1: Beta(alpha, alpha) mixing in the power domain; 0: no mixup
    freq_mask: int = 30  # stage 1.1: SpecAugment widths (frequency bins, frames)
    time_mask: int = 192
    patch_out: float = 0.5  # stage 1.1: structured patch-out ratio in the encoder

    def __post_init__(self) -> None:
        if self.mask_ratio is not None and not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in [0, 1), or unset for the model's value")
        if not 0 <= self.patch_out < 1:
            raise ValueError(f"patch_out={self.patch_out}: must be in [0, 1)")
        _at_least(self, 0, "mixup_alpha", "freq_mask", "time_mask")


@dataclass
class TopologyConfig:
    """Processes and numerics. ``nnodes`` / ``nproc_per_node`` set the Flyte Elastic task at registration
    (``workflows/full.py``, through :mod:`m2d2.presets`); the engine itself runs on whatever world it is given."""

    nnodes: int = 1
    nproc_per_node: int = 1
    zero_stage: Literal[0, 1, 2] = 0  # ZeRO 3 shards the weights, which checkpoints and exports assume whole
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of each transformer block; auto: GPU only
    timeout_minutes: int = 30  # collective timeout

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, 1, "nnodes", "nproc_per_node", "timeout_minutes")


@dataclass
class CheckpointConfig:
    """Resumable checkpoints and the non-finite-loss guard."""

    every: int | None = None  # steps between resumable checkpoints; None: only the final one
    keep: int = 3  # newest complete checkpoints kept
    max_nonfinite: int = 10  # consecutive NaN/inf losses (each step skipped) before aborting

    def __post_init__(self) -> None:
        _at_least(self, 1, "every", "keep", "max_nonfinite")


@dataclass
class TrainStageConfig:
    """One training stage: ``stage1`` (M2D + CLAP), ``stage1.1`` (supervised fine-tuning of the encoder),
    ``stage2`` (CLAP with a trainable text encoder, frozen audio encoder) or ``stage2.1`` (stage 2 continued on a
    curated subset without masking)."""

    stage: Stage = "stage1"
    model: str = "demo"  # the preset whose model config this stage builds (m2d2.presets.model_config)
    seed: int = 0
    log_every: int = 10  # steps between metric read-backs (the only device syncs of the loop)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Stage 2 only: train the audio encoder too, instead of freezing it (the paper's M2D2^TA ablation, section
    # IV-D3a; the paper halved the batch to 1024 for it, which schedule.global_batch sets).
    train_audio_encoder: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.train_audio_encoder and self.stage != "stage2":
            raise ValueError(f"train_audio_encoder is a stage-2 setting (M2D2^TA); {self.stage} cannot use it")
        if self.augment.mask_ratio is not None and self.stage not in CLAP_STAGES:
            raise ValueError(f"augment.mask_ratio is for {', '.join(CLAP_STAGES)}; {self.stage}'s masking is the "
                             "model's (m2d.mask_ratio, or augment.patch_out in stage 1.1)")
        if not self.model:
            raise ValueError("model: name the preset whose model this stage builds (e.g. 'demo')")
        _at_least(self, 1, "log_every")

    @property
    def lr(self) -> float:
        """Peak learning rate: ``optim.base_lr * schedule.global_batch / 256``."""
        return self.optim.base_lr * self.schedule.global_batch / 256

    def replace(self, **changes: Any) -> TrainStageConfig:
        """A checked copy with ``changes``; a mapping overlays its section: ``replace(schedule={"max_steps": 3})``."""
        return merge(self, changes)
