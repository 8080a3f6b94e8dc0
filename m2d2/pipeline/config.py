"""The pipeline's configuration: one execution's corpus, stages, storage and evaluation settings.

Named settings (``demo``, the default; ``smoke``; ``paper``): :func:`m2d2.presets.pipeline_config`. Files:
:func:`m2d2.config.load` / :func:`m2d2.config.dumps` (strict JSON/YAML; also what ``pyflyte run --cfg`` uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from m2d2 import io
from m2d2.config import from_dict
from m2d2.presets import PRESETS, stage_config
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
    registered_model: str = "m2d2"  # MLflow registered model of the final (stage 2.1) export
    primary_metric: str = "stage21/zs_acc"  # the "champion" alias moves only when this beats the incumbent
    prompt_template: str = PROMPT_TEMPLATE
    norm_samples: int = 5000
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
    stage1: TrainStageConfig = field(default_factory=lambda: stage_config("stage1", "demo"))
    stage11: TrainStageConfig = field(default_factory=lambda: stage_config("stage1.1", "demo"))
    stage2: TrainStageConfig = field(default_factory=lambda: stage_config("stage2", "demo"))
    stage21: TrainStageConfig = field(default_factory=lambda: stage_config("stage2.1", "demo"))

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
        if self.feature_shard_mb <= 0 or self.caption_shards < 1:
            raise ValueError(f"need feature_shard_mb > 0 and caption_shards >= 1, got {self.feature_shard_mb}, "
                             f"{self.caption_shards}")
        for name, stage in STAGE_FIELDS.items():
            stage_cfg = getattr(self, name)
            if stage_cfg.stage != stage:
                raise ValueError(f"{name} holds a {stage_cfg.stage!r} config; it must be {stage!r}")
            if stage_cfg.model not in PRESETS:  # caught here, not when the stage starts hours later
                raise ValueError(f"{name}.model={stage_cfg.model!r}: choose one of {', '.join(PRESETS)}")

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """Strict JSON loading (:func:`m2d2.config.from_dict`). ``pyflyte run ... --cfg FILE`` builds the workflow
        input with a dataclass's own ``from_json`` when it has one, so a typo in FILE fails there with its key."""
        return from_dict(cls, json.loads(text))


#: PipelineConfig field -> training stage, in pipeline order.
STAGE_FIELDS = {"stage1": "stage1", "stage11": "stage1.1", "stage2": "stage2", "stage21": "stage2.1"}
