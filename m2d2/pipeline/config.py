"""The pipeline's configuration: one execution's corpus, stages, storage and evaluation settings.

Named settings (``demo``, the default; ``smoke``; ``paper``): :func:`m2d2.presets.pipeline_config`. Files:
:func:`m2d2.config.load` / :func:`m2d2.config.dumps` (strict JSON/YAML; also what ``pyflyte run --cfg`` uses).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from m2d2 import io
from m2d2.config import from_dict
from m2d2.pipeline import registry
from m2d2.presets import PRESETS, model_config, stage_config
from m2d2.text.prompt import PROMPT_TEMPLATE
from m2d2.train.config import TrainStageConfig

CAPTION_BATCH = 64  # captions per embedding batch (plan_shards' default)
CAPTION_TOKENS_PER_ROW = 512  # padded tokens per caption that a batch may average: the embedding batch's budget


@dataclass
class CorpusSettings:
    """Size and seed of the generated demo corpus (see :class:`m2d2.data.demo.DemoCorpusConfig`)."""

    seed: int = 0
    train_per_class: int = 48
    eval_per_class: int = 24


@dataclass
class PipelineConfig:
    """One pipeline execution: corpus, training stages, where data goes, evaluation settings (a Flyte workflow
    input: dataclasses, scalars, ``Literal``, lists and ``X | None`` only)."""

    preset: str = "demo"  # the preset these settings started from (a tag on the MLflow run)
    data_root: str = "runs"
    # "" = generate the demo corpus; else a directory (local or s3://) holding manifest.parquet with audio paths
    # relative to it, or "<prefix>/latest": the newest snapshot directory under <prefix> (names sort by date).
    corpus_source: str = ""
    run_key: str = ""  # stable key of the training checkpoints; a relaunch with the same key resumes
    experiment: str = "m2d2"
    baseline_inits: int = 5  # random initialisations averaged for each baseline
    # The models of the M2D2 family this execution makes (m2d2.pipeline.registry.VARIANTS): m2d2-minus (stage 1),
    # m2d2 (1 -> 2), m2d2-plus (1 -> 2 -> 2.1), m2d2-as-plus (1 -> 1.1 -> 2 -> 2.1). A stage trains when a listed
    # model needs it; stage 1 and the data steps are shared.
    variants: list[str] = field(default_factory=lambda: list(registry.VARIANT_NAMES))
    # Prefix of the MLflow registered models, one per variant: the variant's name with "m2d2" replaced by it
    # (m2d2-minus, m2d2, m2d2-plus, m2d2-as-plus for the default).
    registered_model: str = "m2d2"
    # A model's "champion" alias moves only when this metric of it beats the incumbent's (evaluated on the same
    # suite): "zs_acc" (zero-shot on this execution's eval split), "suite_mean" (the mean of every suite task's
    # headline figure), or any "<task>/<metric>" of the suite table, e.g. "esc50/probe_acc".
    primary_metric: str = "zs_acc"
    # The evaluation suite: "corpus" (this execution's evaluation split: zero-shot, retrieval and linear evaluation
    # against the random-initialisation baselines, with each model's HTML report) and downstream tasks of
    # m2d2.eval.tasks.TASKS (esc50, us8k, ..., read from <tasks_root>/<task>), or NAME=FOLDER for any folder with
    # a labels.csv (docs/evaluation.md).
    suite: list[str] = field(default_factory=lambda: ["corpus"])
    tasks_root: str = ""  # where the downstream tasks' datasets are (local or s3://); needed when suite lists one
    linear_runs: int = 1  # linear-evaluation seeds averaged on tasks with a fixed train/valid/test split
    prompt_template: str = PROMPT_TEMPLATE
    norm_samples: int = 5000
    # Waveforms shorter than this are zero-padded (silence) before the log-mel, for training crops and the
    # normalisation statistics alike, as the reference's pre-processing pads to 6.1 s (the paper preset); 0 keeps
    # every clip as it is (the demo: docs/presets.md).
    min_clip_seconds: float = 0.0
    feature_shard_mb: float = 256.0  # log-mel shard size: the unit of the feature map task and of S3 fetches
    caption_shards: int = 1  # caption-embedding shards: the elements of the embedding map task (one GPU each)
    # Absolute audio_uri values of the corpus must lie under the corpus directory or under one of these roots
    # (local paths or s3:// prefixes); see m2d2.data.manifest.AudioAccess.
    audio_roots: list[str] = field(default_factory=list)
    # Run the caption encoder's own Python code (NV-Embed-v2 ships its model as remote code). Off unless the user
    # sets it; then the code files must match remote_code_sha256 (see m2d2.text.encoders.RemoteCodePolicy).
    trust_remote_code: bool = False
    remote_code_sha256: str = ""
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    # Every training stage's settings under the stage's name in m2d2.pipeline.registry.STAGES ("stage1",
    # "stage1.1", ...), in pipeline order. A file may give only the stages (and keys) it changes.
    stages: dict[str, TrainStageConfig] = field(default_factory=lambda: default_stages("demo"))

    def __post_init__(self) -> None:
        if not io.is_local(self.data_root):
            # Steps address their outputs as paths under data_root (content-keyed directories, memory-mapped caption
            # vectors, reports); an object-store root would be mangled into a local path.
            raise ValueError(f"data_root={self.data_root!r}: it must be a filesystem path that every task can read "
                             "and write (on a cluster, the shared volume the PodTemplates mount at /data, e.g. "
                             "/data/m2d2/runs; see k8s/README.md). Object-store URIs work for corpus_source, not "
                             "yet for data_root.")
        if self.run_key:  # it names a directory under data_root; checkpoints there are pruned
            io.check_token(self.run_key, "run_key")
        if not 0.0 <= self.min_clip_seconds <= 30.0:  # the store decodes at most 30 s of a clip
            raise ValueError(f"min_clip_seconds={self.min_clip_seconds}: must be in [0, 30] (0: no padding)")
        if self.feature_shard_mb <= 0 or self.caption_shards < 1:
            raise ValueError(f"need feature_shard_mb > 0 and caption_shards >= 1, got {self.feature_shard_mb}, "
                             f"{self.caption_shards}")
        if not self.variants:
            raise ValueError("variants: list at least one model to make; choose from "
                             f"{', '.join(registry.VARIANT_NAMES)}")
        for name in self.variants:
            if name not in registry.VARIANT_NAMES:
                raise ValueError(f"variants: unknown model {name!r}; choose from {', '.join(registry.VARIANT_NAMES)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: {self.variants} names a model twice")
        self.variants = [name for name in registry.VARIANT_NAMES if name in self.variants]  # family order
        if self.primary_metric.count("/") > 1 or self.primary_metric.startswith("stage"):
            raise ValueError(f"primary_metric={self.primary_metric!r}: name a metric of each model (e.g. 'zs_acc', "
                             "'suite_mean' or 'esc50/probe_acc'), not of a stage; every variant is compared with "
                             "its own champion")
        from m2d2.eval.benchmark import check_suite

        check_suite(self.suite, self.tasks_root)
        if self.linear_runs < 1:
            raise ValueError(f"linear_runs={self.linear_runs}: must be >= 1")
        names = [s.name for s in registry.STAGES]
        for name in self.stages:
            if name not in names:
                raise ValueError(f"stages.{name}: unknown stage; the pipeline's stages are {', '.join(names)}")
        missing = [name for name in names if name not in self.stages]
        if missing:
            raise ValueError(f"stages: no settings for {', '.join(missing)}")
        self.stages = {name: self.stages[name] for name in names}  # pipeline order
        for stage in registry.STAGES:
            section = self.stages[stage.name]
            if section.stage != stage.recipe:
                raise ValueError(f"stages.{stage.name} holds a {section.stage!r} config; it must be {stage.recipe!r}")
            if section.model not in PRESETS:  # caught here, not when the stage starts hours later
                raise ValueError(f"stages.{stage.name}.model={section.model!r}: choose one of {', '.join(PRESETS)}")

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """Strict JSON loading (:func:`m2d2.config.from_dict`). ``pyflyte run ... --cfg FILE`` builds the workflow
        input with a dataclass's own ``from_json`` when it has one, so a typo in FILE fails there with its key."""
        return from_dict(cls, json.loads(text))


# -------------------------------------------------------------------------------- what each step reads
# The non-training steps get only the settings they read, so a Flyte task's cache key (its inputs) changes only
# when something it depends on changes: a new stage-2.1 learning rate re-runs neither the corpus, the features nor
# the caption vectors. ``step_settings`` is the one place that decides what each step reads.
@dataclass
class FeatureSettings:
    """The log-mel step: normalisation statistics over crops of stage 1's length, shard size, allowed audio roots."""

    norm_crop_frames: int
    norm_samples: int
    seed: int
    shard_mb: float
    audio_roots: list[str] = field(default_factory=list)
    min_seconds: float = 0.0  # zero-pad shorter waveforms to this length before the log-mel


@dataclass
class CaptionSettings:
    """The caption-embedding step: the model preset whose offline text encoder (stage 1's) embeds every caption and
    zero-shot prompt, the prompt, how many shards, and the remote-code choice for that encoder."""

    model: str
    prompt_template: str
    shards: int = 1
    trust_remote_code: bool = False
    remote_code_sha256: str = ""


@dataclass
class EvaluationSettings:
    """The evaluation step: baseline seeds, the zero-shot prompt, the models to score, and each stage's model preset
    (a CLAP stage's baseline keeps that preset's pretrained text encoder)."""

    baseline_inits: int
    prompt_template: str
    models: dict[str, str] = field(default_factory=dict)
    variants: list[str] = field(default_factory=lambda: list(registry.VARIANT_NAMES))
    suite: list[str] = field(default_factory=lambda: ["corpus"])
    tasks_root: str = ""
    linear_runs: int = 1


@dataclass
class RegistrationSettings:
    """The registration step: the registered-model prefix, the metric that decides each champion, the models."""

    registered_model: str
    primary_metric: str
    variants: list[str] = field(default_factory=lambda: list(registry.VARIANT_NAMES))


@dataclass
class ViewSettings:
    """One stage's view of the corpus (its ``data`` selection settings, see :mod:`m2d2.data.views`) and the batch it
    must fill: what the view check reads."""

    sources: list[str] = field(default_factory=list)
    exclude_overlap_with: list[str] = field(default_factory=list)
    min_captions: int = 0
    min_clips: int = 1
    global_batch: int = 1
    samples_per_epoch: int | None = None


@dataclass
class StepSettings:
    """What every non-training step reads, derived from one :class:`PipelineConfig` by :func:`step_settings`."""

    corpus: CorpusSettings
    features: FeatureSettings
    captions: CaptionSettings
    evaluation: EvaluationSettings
    registration: RegistrationSettings
    views: dict[str, ViewSettings] = field(default_factory=dict)  # every training stage's, by stage name
    # Every registered stage: whether it trains in this execution (a listed variant needs it). A Flyte workflow's
    # shape is fixed at registration, so the tasks of the others still run, and return at once (skipped).
    trains: dict[str, bool] = field(default_factory=dict)


def step_settings(cfg: PipelineConfig) -> StepSettings:
    first = cfg.stages[registry.STAGES[0].name]  # the stage the features' statistics and the caption vectors serve
    training = {s.name for s in registry.needed_stages(cfg.variants)}
    return StepSettings(
        corpus=dataclasses.replace(cfg.corpus),
        features=FeatureSettings(
            norm_crop_frames=first.data.crop_frames or model_config(first.model).encoder.input_frames,
            norm_samples=cfg.norm_samples, seed=cfg.corpus.seed, shard_mb=cfg.feature_shard_mb,
            audio_roots=list(cfg.audio_roots), min_seconds=cfg.min_clip_seconds),
        captions=CaptionSettings(model=first.model, prompt_template=cfg.prompt_template, shards=cfg.caption_shards,
                                 trust_remote_code=cfg.trust_remote_code,
                                 remote_code_sha256=cfg.remote_code_sha256.strip().lower()),
        evaluation=EvaluationSettings(baseline_inits=cfg.baseline_inits, prompt_template=cfg.prompt_template,
                                      models={name: section.model for name, section in cfg.stages.items()
                                              if name in training},
                                      variants=list(cfg.variants), suite=list(cfg.suite), tasks_root=cfg.tasks_root,
                                      linear_runs=cfg.linear_runs),
        registration=RegistrationSettings(registered_model=cfg.registered_model, primary_metric=cfg.primary_metric,
                                          variants=list(cfg.variants)),
        views={name: ViewSettings(sources=list(section.data.sources),
                                  exclude_overlap_with=list(section.data.exclude_overlap_with),
                                  min_captions=section.data.min_captions, min_clips=section.data.min_clips,
                                  global_batch=section.schedule.global_batch,
                                  samples_per_epoch=section.data.samples_per_epoch)
               for name, section in cfg.stages.items() if name in training},
        trains={s.name: s.name in training for s in registry.STAGES})


def default_stages(preset: str) -> dict[str, TrainStageConfig]:
    """Each registered stage's settings under ``preset`` (a stage added to the registry with a recipe of its own
    takes that recipe's settings)."""
    return {stage.name: stage_config(stage.recipe, preset) for stage in registry.STAGES}
