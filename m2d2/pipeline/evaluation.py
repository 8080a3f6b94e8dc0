"""Evaluation step: every trained stage's CLAP metrics against random-initialisation baselines, and each model
variant's suite and report."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.eval.clap import ClapEvalSet, evaluate_clap
from m2d2.eval.metrics import mean_and_std
from m2d2.models import M2D2
from m2d2.pipeline import registry
from m2d2.pipeline.config import PROMPT_TEMPLATE, EvaluationSettings
from m2d2.presets import model_config
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun


def eval_set(feature_dir: str | Path, prompt_template: str = PROMPT_TEMPLATE) -> ClapEvalSet:
    store = LogMelStore(feature_dir, "eval")
    labels = [lab[0] for lab in store.labels]
    return ClapEvalSet(lms=[torch.from_numpy(store[i]) for i in range(len(store))], labels=labels,
                       captions=store.captions, class_names=sorted(set(labels)), prompt_template=prompt_template)


def evaluate_stages(
    settings: EvaluationSettings,
    feature_dir: str | Path,
    caption_cache: str | Path,
    exports: dict[str, str],
    parent_run_id: str | None = None,
    stage_metrics: dict[str, dict[str, float]] | None = None,
    report_dir: str | Path | None = None,
) -> tuple[dict[str, float], str | None]:
    """Every trained stage's model scored as the registry says: CLAP stages by zero-shot and retrieval against
    their random-initialisation baseline, tagging stages by the metrics they measured themselves (``stage_metrics``).

    ``exports`` maps each trained stage's name to its export. Baselines keep the text side their stage starts from:
    a stage trained on the caption vectors is compared with a random audio encoder, projector and text map over the
    same vectors; a stage that starts from another stage's export (stage 2 on stage 1's or stage 1.1's encoder)
    with that frozen encoder, a fresh projector and the untouched pretrained text encoder. Each is averaged over
    ``settings.baseline_inits`` seeds. With ``report_dir``, each variant's model (``settings.variants``) also gets
    the full suite (:func:`m2d2.eval.suite.evaluate_suite`: linear probe, R@50, confusion matrix, t-SNE, projector
    attention) under ``<variant>/`` keys and its HTML report in ``report_dir/<variant>``, logged to MLflow.
    """
    stages = tuple(s for s in registry.STAGES if s.name in exports)
    data = eval_set(feature_dir, settings.prompt_template)
    cache = CaptionEmbeddings(caption_cache)

    def offline_text(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(cache.lookup(texts).astype(np.float32))

    results: dict[str, float] = {}
    models: dict[str, M2D2] = {}
    for stage in stages:
        prefix = stage.name
        if stage.evaluation == "tagging":
            _put(results, prefix, (stage_metrics or {}).get(stage.name, {}))
            continue
        model = models[stage.name] = M2D2.from_pretrained(str(exports[stage.name]))
        if stage.trains_on == registry.CAPTIONS:
            cache.check_encoder(model.config.text.offline)
            _put(results, prefix, evaluate_clap(model, data, text_embedder=offline_text))
        else:
            _put(results, prefix, evaluate_clap(model, data))
    for name in dict.fromkeys(s.baseline for s in stages if s.evaluation == "clap" and s.baseline):
        _put(results, f"{name}_baseline",
             _baseline(settings, registry.stage(name), models[name], exports, data, offline_text))
    results["num_classes"] = float(len(data.class_names))
    results["num_eval_clips"] = float(len(data.labels))
    for stage in stages:
        if stage.evaluation == "clap" and stage.baseline:
            results[f"{stage.name}_zs_gain"] = (results[f"{stage.name}/zs_acc"]
                                                 - results[f"{stage.baseline}_baseline/zs_acc"])
    suites = []
    if report_dir is not None:
        from m2d2.eval.suite import evaluate_suite

        for name in settings.variants:
            variant = registry.variant(name)
            final = registry.stage(variant.final)
            embedder = offline_text if final.trains_on == registry.CAPTIONS else None
            suite = evaluate_suite(models[final.name], data, Path(report_dir) / name, text_embedder=embedder,
                                   title=f"{variant.title} ({name}): {final.title or final.name}")
            _put(results, name, {k: v for k, v in suite.metrics.items()
                                 if k.startswith(("probe_", "a2t_R50", "t2a_R50", "zs_"))})
            suites.append((name, suite))
    run_id = None
    if parent_run_id:
        params = {"baseline_inits": settings.baseline_inits, "prompt_template": settings.prompt_template,
                  "variants": ",".join(settings.variants), **{s.name: str(exports[s.name]) for s in stages}}
        with StageRun(parent_run_id, "evaluate", params=params) as run:
            run.log_metrics(results, step=0)
            run.log_dict(results, "metrics.json")
            run_id = run.run_id
            if run_id is not None:
                from m2d2.eval.reports import log_report

                for name, suite in suites:
                    log_report(suite.report_dir, run_id, f"report/{name}")
    return results, run_id


def _baseline(settings: EvaluationSettings, stage: registry.Stage, trained: M2D2, exports: dict[str, str], data: ClapEvalSet,
              offline_text) -> dict[str, float]:
    """Mean and std over ``settings.baseline_inits`` seeds of the random-initialisation baseline of ``stage``."""
    baselines = []
    if stage.trains_on == registry.CAPTIONS:
        for k in range(settings.baseline_inits):
            torch.manual_seed(10_000 + k)
            baselines.append(evaluate_clap(M2D2(trained.config, with_m2d=False), data, text_embedder=offline_text))
        return mean_and_std(baselines)
    # Only the fresh projector differs between seeds: the frozen encoder and the untouched pretrained text encoder
    # are the same for every seed, so the text vectors are computed once and each seed re-draws the projector.
    fresh = M2D2.from_pretrained(str(exports[stage.trains_on]))
    fresh.start_stage2(model_config(settings.models[stage.name]).text.encoder)
    _encode_each_input_once(fresh)
    texts = sorted({c for caps in data.captions for c in caps} | set(data.prompts()))
    with torch.inference_mode():
        raw = torch.cat([fresh.text_encoder(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    row = {t: i for i, t in enumerate(texts)}

    def pretrained_text(batch: list[str]) -> torch.Tensor:
        return raw[[row[t] for t in batch]]

    for k in range(settings.baseline_inits):
        torch.manual_seed(20_000 + k)
        fresh.audio_proj.reset_parameters()
        baselines.append(evaluate_clap(fresh, data, text_embedder=pretrained_text))
    return mean_and_std(baselines)


def _encode_each_input_once(model: M2D2) -> None:
    """Let ``model``'s frozen encoder encode each distinct input once: the baseline's seeds differ only in the
    projector, so every seed would otherwise re-encode the whole evaluation set (the same tokens, recomputed)."""
    encode, done = model.encoder.encode_chunks, {}

    def encode_once(x: torch.Tensor) -> list[torch.Tensor]:
        key = (tuple(x.shape), hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).digest())
        if key not in done:
            done[key] = encode(x)
        return done[key]

    model.encoder.encode_chunks = encode_once


def _put(results: dict[str, float], prefix: str, metrics: dict[str, float]) -> None:
    """Prefix keys with the model; MLflow metric names cannot hold ``@`` (``a2t_R@1`` becomes ``a2t_R1``)."""
    results.update({f"{prefix}/{k.replace('@', '')}": float(v) for k, v in metrics.items()})
