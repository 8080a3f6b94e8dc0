"""Evaluation: pure metrics on embeddings (zero-shot, retrieval, mAP), the linear probe, zero-shot caption rules,
model-facing drivers (CLAP eval, the full suite) and HTML/MLflow reports.

Only the light modules are imported here; ``suite`` and ``reports`` (matplotlib, scikit-learn) load on first use.
"""

from m2d2.eval.clap import ClapEvalSet, TextEmbedder, embed_audio, embed_text, eval_mode, evaluate_clap
from m2d2.eval.metrics import (
    RETRIEVAL_KS,
    confusion_matrix,
    cosine_similarity_matrix,
    mean_and_std,
    mean_average_precision,
    retrieval_metrics,
    retrieval_metrics_from_scores,
    zero_shot_accuracy,
    zero_shot_map,
    zero_shot_predictions,
)
from m2d2.eval.probe import (
    LinearProbe,
    LinearProbeConfig,
    ProbeResult,
    fit_linear_probe,
    linear_probe,
    linear_probe_folds,
    stratified_folds,
)
from m2d2.eval.prompts import PROMPT_RULES, PromptRule, class_prompts, prompt_rule

__all__ = [
    "PROMPT_RULES",
    "RETRIEVAL_KS",
    "ClapEvalSet",
    "LinearProbe",
    "LinearProbeConfig",
    "ProbeResult",
    "PromptRule",
    "TextEmbedder",
    "class_prompts",
    "confusion_matrix",
    "cosine_similarity_matrix",
    "embed_audio",
    "embed_text",
    "eval_mode",
    "evaluate_clap",
    "fit_linear_probe",
    "linear_probe",
    "linear_probe_folds",
    "mean_and_std",
    "mean_average_precision",
    "prompt_rule",
    "retrieval_metrics",
    "retrieval_metrics_from_scores",
    "stratified_folds",
    "zero_shot_accuracy",
    "zero_shot_map",
    "zero_shot_predictions",
]
