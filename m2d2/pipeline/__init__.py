"""The pipeline as typed plain Python: what each Flyte task of ``workflows/full.py`` calls.

- :mod:`m2d2.pipeline.config`: :class:`PipelineConfig` (its presets: :mod:`m2d2.presets`);
- :mod:`m2d2.pipeline.workspace`: the data root, its workspace id and content-keyed step directories;
- :mod:`m2d2.pipeline.data`: corpus, log-mel store and caption vectors (plan -> shards -> finish);
- :mod:`m2d2.pipeline.evaluation`: CLAP metrics of every stage against baselines, and the report;
- :mod:`m2d2.pipeline.registry`: the training stages, each declared once;
- :mod:`m2d2.pipeline.runner`: :func:`run`, the whole DAG in one process, and the steps the Flyte tasks share.
"""

from m2d2.pipeline.config import (
    CAPTION_BATCH,
    CAPTION_TOKENS_PER_ROW,
    PROMPT_TEMPLATE,
    CaptionSettings,
    CorpusSettings,
    EvaluationSettings,
    FeatureSettings,
    PipelineConfig,
    RegistrationSettings,
    StepSettings,
    ViewSettings,
    default_stages,
    step_settings,
)
from m2d2.pipeline.data import (
    build_caption_cache,
    build_corpus,
    build_feature_shard,
    build_features,
    embed_caption_shard,
    finish_captions,
    finish_features,
    plan_captions,
    plan_features,
)
from m2d2.pipeline.evaluation import eval_set, evaluate_stages
from m2d2.pipeline.registry import STAGES, Stage
from m2d2.pipeline.runner import PipelineResult, StepOutput, run, run_stage
from m2d2.pipeline.workspace import (
    LATEST,
    WORKSPACE_FILE,
    resolve_corpus_source,
    root_of,
    rooted,
    step_dir,
    step_key,
    workspace_token,
)

__all__ = [
    "CAPTION_BATCH", "CAPTION_TOKENS_PER_ROW", "LATEST", "PROMPT_TEMPLATE", "STAGES", "WORKSPACE_FILE",
    "CaptionSettings", "CorpusSettings", "EvaluationSettings", "FeatureSettings", "PipelineConfig", "PipelineResult",
    "RegistrationSettings", "Stage", "StepOutput", "StepSettings", "ViewSettings", "build_caption_cache", "build_corpus",
    "build_feature_shard", "build_features", "default_stages", "embed_caption_shard", "eval_set", "evaluate_stages",
    "finish_captions", "finish_features", "plan_captions", "plan_features", "resolve_corpus_source", "root_of",
    "rooted", "run", "run_stage", "step_dir", "step_key", "step_settings", "workspace_token",
]
