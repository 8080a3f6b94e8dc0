"""CLAP evaluation: pure metrics on embeddings (zero-shot, retrieval) and their model-facing drivers."""

from m2d2.eval.clap import ClapEvalSet, TextEmbedder, embed_audio, embed_text, eval_mode, evaluate_clap
from m2d2.eval.metrics import (
    cosine_similarity_matrix,
    mean_and_std,
    retrieval_metrics,
    retrieval_metrics_from_scores,
    zero_shot_accuracy,
    zero_shot_predictions,
)

__all__ = [
    "ClapEvalSet",
    "TextEmbedder",
    "cosine_similarity_matrix",
    "embed_audio",
    "embed_text",
    "eval_mode",
    "evaluate_clap",
    "mean_and_std",
    "retrieval_metrics",
    "retrieval_metrics_from_scores",
    "zero_shot_accuracy",
    "zero_shot_predictions",
]
