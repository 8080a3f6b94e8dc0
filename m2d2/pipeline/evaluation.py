"""Evaluation step: every stage's CLAP metrics against random-initialisation baselines, and the final report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.eval.clap import ClapEvalSet, evaluate_clap
from m2d2.eval.metrics import mean_and_std
from m2d2.models import M2D2
from m2d2.pipeline.config import PROMPT_TEMPLATE, PipelineConfig
from m2d2.presets import model_config
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun


def eval_set(feature_dir: str | Path, prompt_template: str = PROMPT_TEMPLATE) -> ClapEvalSet:
    store = LogMelStore(feature_dir, "eval")
    labels = [lab[0] for lab in store.labels]
    return ClapEvalSet(lms=[torch.from_numpy(store[i]) for i in range(len(store))], labels=labels,
                       captions=store.captions, class_names=sorted(set(labels)), prompt_template=prompt_template)


def evaluate_stages(
    cfg: PipelineConfig,
    feature_dir: str | Path,
    caption_cache: str | Path,
    stage1_export: str | Path,
    stage11_export: str | Path,
    stage2_export: str | Path,
    stage21_export: str | Path,
    parent_run_id: str | None = None,
    stage11_metrics: dict[str, float] | None = None,
    report_dir: str | Path | None = None,
) -> tuple[dict[str, float], str | None]:
    """Zero-shot and retrieval of the CLAP models of stages 1, 2 and 2.1 against random-init baselines.

    Baselines keep the text side each stage starts from: stage 1 — random audio encoder, projector and text
    map with the same offline caption vectors; stage 2 (and 2.1, which continues it) — the frozen stage-1.1
    encoder with a fresh projector and the untouched pretrained text encoder. Each is averaged over
    ``baseline_inits`` seeds. Stage 1.1's tagging mAP (measured by the stage itself) is passed through.
    With ``report_dir``, the final model also gets the full suite (:func:`m2d2.eval.suite.evaluate_suite`:
    linear probe, R@50, confusion matrix, t-SNE, projector attention) and its HTML report, logged to MLflow.
    """
    data = eval_set(feature_dir, cfg.prompt_template)
    cache = CaptionEmbeddings(caption_cache)

    def offline_text(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(cache.lookup(texts).astype(np.float32))

    results: dict[str, float] = {}
    stage1 = M2D2.from_pretrained(str(stage1_export))
    cache.check_encoder(stage1.config.text.offline)
    _put(results, "stage1", evaluate_clap(stage1, data, text_embedder=offline_text))
    baselines = []
    for k in range(cfg.baseline_inits):
        torch.manual_seed(10_000 + k)
        random_model = M2D2(stage1.config, with_m2d=False)
        baselines.append(evaluate_clap(random_model, data, text_embedder=offline_text))
    _put(results, "stage1_baseline", mean_and_std(baselines))
    _put(results, "stage11", stage11_metrics or {})
    _put(results, "stage2", evaluate_clap(M2D2.from_pretrained(str(stage2_export)), data))
    final = M2D2.from_pretrained(str(stage21_export))
    _put(results, "stage21", evaluate_clap(final, data))
    # Stage-2 baselines differ only in the fresh projector: the frozen encoder and the untouched pretrained text
    # encoder are the same for every seed, so the text vectors are computed once and each seed re-draws the projector.
    fresh = M2D2.from_pretrained(str(stage11_export))
    fresh.start_stage2(model_config(cfg.stage2.model).text.encoder)
    texts = sorted({c for caps in data.captions for c in caps} | set(data.prompts()))
    with torch.inference_mode():
        raw = torch.cat([fresh.text_encoder(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    row = {t: i for i, t in enumerate(texts)}

    def pretrained_text(batch: list[str]) -> torch.Tensor:
        return raw[[row[t] for t in batch]]

    baselines = []
    for k in range(cfg.baseline_inits):
        torch.manual_seed(20_000 + k)
        fresh.audio_proj.reset_parameters()
        baselines.append(evaluate_clap(fresh, data, text_embedder=pretrained_text))
    _put(results, "stage2_baseline", mean_and_std(baselines))
    results["num_classes"] = float(len(data.class_names))
    results["num_eval_clips"] = float(len(data.labels))
    for stage, baseline in (("stage1", "stage1"), ("stage2", "stage2"), ("stage21", "stage2")):
        results[f"{stage}_zs_gain"] = results[f"{stage}/zs_acc"] - results[f"{baseline}_baseline/zs_acc"]
    suite = None
    if report_dir is not None:
        from m2d2.eval.suite import evaluate_suite

        suite = evaluate_suite(final, data, report_dir,
                               title="M2D2 final model (stage 2.1)")
        _put(results, "final", {k: v for k, v in suite.metrics.items() if k.startswith(("probe_", "a2t_R50",
                                                                                        "t2a_R50", "zs_"))})
    run_id = None
    if parent_run_id:
        with StageRun(parent_run_id, "evaluate", params={"baseline_inits": cfg.baseline_inits,
                                                         "prompt_template": cfg.prompt_template,
                                                         "stage1": str(stage1_export),
                                                         "stage1.1": str(stage11_export),
                                                         "stage2": str(stage2_export),
                                                         "stage2.1": str(stage21_export)}) as run:
            run.log_metrics(results, step=0)
            run.log_dict(results, "metrics.json")
            run_id = run.run_id
            if suite is not None and run_id is not None:
                from m2d2.eval.reports import log_report

                log_report(suite.report_dir, run_id, "report")
    return results, run_id


def _put(results: dict[str, float], prefix: str, metrics: dict[str, float]) -> None:
    """Prefix keys with the model; MLflow metric names cannot hold ``@`` (``a2t_R@1`` becomes ``a2t_R1``)."""
    results.update({f"{prefix}/{k.replace('@', '')}": float(v) for k, v in metrics.items()})
