"""One evaluation of one model on one labelled eval set: zero-shot, retrieval, linear probe, and the HTML report.

The workflow's evaluate task calls :func:`evaluate_suite` per model it reports on and logs the returned
directory (:func:`m2d2.eval.reports.log_report`); the flat metrics go to MLflow and to the registry gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from m2d2.eval.clap import ClapEvalSet, TextEmbedder, embed_text, eval_mode
from m2d2.eval.metrics import (
    RETRIEVAL_KS,
    confusion_matrix,
    retrieval_metrics,
    zero_shot_predictions,
)
from m2d2.eval.probe import LinearProbeConfig, linear_probe_folds, stratified_folds
from m2d2.eval.prompts import PromptRule, class_prompts
from m2d2.eval.reports import build_report, projector_attention

__all__ = ["SuiteResult", "evaluate_suite"]


@dataclass
class SuiteResult:
    """Flat metrics (fractions in [0, 1]) and the directory holding ``report.html`` + PNGs."""

    metrics: dict[str, float]
    report_dir: Path


def _attention_clips(labels: Sequence[int], count: int) -> list[int]:
    """First clip of each class in turn, up to ``count`` clips: one map per class before any class gets two."""
    firsts: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        firsts.setdefault(label, []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count and any(depth < len(v) for v in firsts.values()):
        chosen += [v[depth] for v in firsts.values() if depth < len(v)][: count - len(chosen)]
        depth += 1
    return chosen


def evaluate_suite(
    model: nn.Module,
    data: ClapEvalSet,
    out_dir: str | Path,
    *,
    task: str | PromptRule | None = None,
    folds: Sequence[int] | np.ndarray | None = None,
    text_embedder: TextEmbedder | None = None,
    probe_config: LinearProbeConfig | None = None,
    probe_folds: int = 5,
    attention_clips: int = 4,
    title: str = "M2D2 evaluation",
    seed: int = 0,
) -> SuiteResult:
    """Evaluate ``model`` (an :class:`~m2d2.models.M2D2`) on ``data`` and write the report to ``out_dir``.

    - zero-shot (``zs_acc``): one caption per class by the Table VI rule of ``task`` (None: ``data``'s
      ``prompt_template``), cosine similarity, confusion matrix;
    - retrieval (``a2t_*``/``t2a_*``: R@1/5/10/50, mAP@10) when clips have captions;
    - linear probe (``probe_acc``, ``probe_acc_std``) on the 3840-d (F x D) clip features, leave-one-fold-out
      over ``folds`` (per-clip fold ids) or, without them, over ``probe_folds`` stratified folds (fewer when a
      class has fewer clips; skipped below 2);
    - report: metric tables, confusion matrix, t-SNE of the clip features, projector attention of
      ``attention_clips`` clips (one per class first).

    Clips are encoded one at a time (see :mod:`m2d2.inference`), so the numbers do not depend on batching. The
    model's train/eval flags are restored afterwards. ``text_embedder`` as in :func:`m2d2.eval.clap.evaluate_clap`.
    """
    from m2d2.inference import Embedder

    metrics: dict[str, float] = {}
    tables: dict[str, dict[str, object]] = {}
    report_kwargs: dict = {}
    labels = data.label_indices().numpy() if data.class_names else None
    with eval_mode(model):
        embedder = Embedder(model)
        clip_feats, audio = embedder.clip_and_clap_audio_lms(data.lms)
        if labels is not None:
            rule = PromptRule(data.prompt_template) if task is None else task
            prompts = class_prompts(rule, data.class_names)
            class_emb = embed_text(model, prompts, text_embedder)
            predictions = zero_shot_predictions(audio, class_emb).numpy()
            metrics["zs_acc"] = float((predictions == labels).mean())
            metrics["zs_chance"] = float(np.bincount(labels).max() / labels.size)
            tables["Zero-shot classification"] = {"accuracy": metrics["zs_acc"],
                                                  "majority-class rate": metrics["zs_chance"],
                                                  "classes": float(len(data.class_names)),
                                                  "clips": float(labels.size)}
            tables["Zero-shot captions"] = dict(zip(data.class_names, prompts))
            report_kwargs.update(confusion=confusion_matrix(labels, predictions, len(data.class_names)),
                                 class_names=data.class_names, clip_features=clip_feats, clip_labels=labels)
        texts, text_to_audio = data.caption_pairs()
        if texts:
            text_emb = embed_text(model, texts, text_embedder)
            retrieval = retrieval_metrics(audio, text_emb, text_to_audio, RETRIEVAL_KS)
            metrics.update(retrieval)
            tables[f"Retrieval ({len(texts)} captions, {len(data.lms)} clips)"] = retrieval
        if labels is not None:
            probe = _probe(clip_feats, labels, folds, probe_folds, probe_config, seed)
            if probe:
                metrics.update(probe)
                tables["Linear probe (clip features, leave-one-fold-out)"] = probe
        maps = []
        if labels is not None and attention_clips > 0:
            for i in _attention_clips(labels.tolist(), attention_clips):
                maps.append(projector_attention(model, data.lms[i],
                                                f"clip {i}: {data.labels[i]}"))
    report_dir = build_report(out_dir, title, tables, attention=maps, seed=seed, **report_kwargs,
                              notes=[f"{len(data.lms)} clips; clip features {clip_feats.shape[1]}-d; "
                                     f"CLAP embeddings {audio.shape[1]}-d."])
    return SuiteResult(metrics, report_dir)


def _probe(features: torch.Tensor, labels: np.ndarray, folds: Sequence[int] | np.ndarray | None,
           probe_folds: int, config: LinearProbeConfig | None, seed: int) -> dict[str, float]:
    if folds is None:
        k = min(probe_folds, int(np.bincount(labels)[np.unique(labels)].min()))
        if k < 2:
            return {}
        folds = stratified_folds(labels, k, seed)
    return linear_probe_folds(features.numpy(), labels, folds, config).as_metrics("probe")
