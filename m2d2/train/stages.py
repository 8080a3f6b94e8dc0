"""Stage entry points: build the model and data for a stage, then run the one training loop.

These are what the Flyte tasks call (inside an Elastic launch, on every rank), and what a user calls from
plain Python. They take paths and configs and return a :class:`StageOutput`.

    stage 1    M2D + CLAP from scratch                          -> M2D2 export (608 frames in the paper): M2D2⁻
    stage 1.1  supervised fine-tuning of the stage-1 encoder    -> M2D2 export (1001 frames) + classifier/
    stage 2    frozen encoder (stage 1's or 1.1's), new         -> M2D2 export with a text encoder: M2D2 (on
               projector, BERT, CLAP                               stage 1), or the way to M2D2^AS+ (on 1.1)
    stage 2.1  stage 2 continued on a curated subset, no mask   -> M2D2⁺, or M2D2^AS+ (the released kind of model)

Stage 2 crops 10 s (1001 frames) whichever encoder it starts from; a 608-frame stage-1 encoder sees them as chunks
of its own length (:class:`m2d2.models.masking.ChunkMasks`), as the reference's runtime encodes long audio.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from m2d2.data.features import LogMelStore, load_norm_stats
from m2d2.data.loader import CropDataset, LabeledCropDataset, WeightedOrder
from m2d2.data.views import ViewRule, resolve_view
from m2d2.models import M2D2
from m2d2.models.presets import model_config
from m2d2.models.tagger import CLASSIFIER_DIR, FineTuneModel, expand_encoder_frames
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun
from m2d2.train.config import TrainStageConfig
from m2d2.train.engine import init_distributed, train
from m2d2.train.finetune import audioset_sample_weights
from m2d2.train.objectives import ClapObjective, FineTuneObjective, Objective

log = logging.getLogger(__name__)


@dataclass
class StageOutput:
    export_dir: str
    checkpoint_dir: str
    mlflow_run_id: str | None
    steps: int
    final: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # evaluation after training (stage 1.1: mAP)


def _expect(cfg: TrainStageConfig, stage: str) -> None:
    if cfg.stage != stage:
        raise ValueError(f"a {cfg.stage!r} config was given to {stage}; use m2d2.presets.stage_config('{stage}', ...)")


def _crop(cfg: TrainStageConfig, model: M2D2, chunked: bool = False) -> int:
    """The stage's crop length: ``data.crop_frames``, or the encoder's length. A CLAP stage on a frozen encoder
    (``chunked``) may take longer crops, encoded in chunks of the encoder's length (M2D2: 1001-frame crops through
    stage 1's 608-frame encoder); stage 1 trains the encoder on crops that fit its positional table."""
    longest = model.config.encoder.input_frames
    crop = longest if cfg.data.crop_frames is None else cfg.data.crop_frames
    if crop > longest and not chunked:
        raise ValueError(f"{cfg.stage}: crops of {crop} frames exceed the encoder's {longest} (its positional table); "
                         "lower data.crop_frames")
    return crop


def _subset(cfg: TrainStageConfig, store: LogMelStore, name: str | None) -> list[int]:
    """The stage's view of the store's training clips (:func:`m2d2.data.views.resolve_view`): its sources and
    caption count, minus recordings it must not see. The pipeline checked it before any stage started."""
    name = name or cfg.stage
    view = resolve_view(store.uri, name, ViewRule.of(cfg.data, cfg.data.min_clips), cfg.schedule.global_batch,
                        cfg.data.samples_per_epoch)
    log.info("%s: training view of %d / %d clips (%s; %d removed as overlapping)", name, len(view.clips),
             len(store), ViewRule.of(cfg.data).describe(), view.removed.num_rows)
    return view.clips


def run_stage1(cfg: TrainStageConfig, feature_dir: str, caption_cache: str, out_dir: str,
               parent_run_id: str | None = None, checkpoint_root: str | None = None,
               name: str | None = None) -> StageOutput:
    """Stage 1: M2D + CLAP from scratch against precomputed sentence vectors of the captions."""
    _expect(cfg, "stage1")
    init_distributed(cfg.topology.timeout_minutes)
    model_cfg = model_config(cfg.model)
    stats = load_norm_stats(feature_dir)
    model_cfg.norm_mean, model_cfg.norm_std = stats.mean, stats.std
    captions = CaptionEmbeddings(caption_cache)
    captions.check_encoder(model_cfg.text.offline)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = M2D2(model_cfg)
    model.set_stage("stage1")
    store = LogMelStore(feature_dir, "train")
    dataset = CropDataset(store, _crop(cfg, model), captions, seed=cfg.seed, subset=_subset(cfg, store, name))
    return _run(cfg, ClapObjective(model), dataset, out_dir, parent_run_id, checkpoint_root,
                inputs={"features": feature_dir, "captions": caption_cache}, name=name)


def run_stage1_1(cfg: TrainStageConfig, feature_dir: str, stage1_export: str, out_dir: str,
                parent_run_id: str | None = None, checkpoint_root: str | None = None,
               name: str | None = None) -> StageOutput:
    """Stage 1.1: supervised multi-label fine-tuning of the stage-1 encoder at ``cfg.data.crop_frames`` (608 -> 1001).

    The classes are the labels of the training split (sorted). Afterwards rank 0 scores the ``eval`` split
    (mAP), logged to the stage's MLflow run and returned in ``StageOutput.metrics``.
    """
    _expect(cfg, "stage1.1")
    init_distributed(cfg.topology.timeout_minutes)
    torch.manual_seed(cfg.seed)
    base = M2D2.from_pretrained(stage1_export)
    if cfg.data.crop_frames is not None:
        expand_encoder_frames(base.encoder, cfg.data.crop_frames)
    store = LogMelStore(feature_dir, "train")
    subset = _subset(cfg, store, name)
    classes = sorted({label for i in (subset or range(len(store))) for label in store.labels[i]})
    if not classes:
        raise ValueError(f"{feature_dir}: the training clips carry no labels; stage 1.1 needs labelled clips")
    model = FineTuneModel(base.encoder, base.norm_stats, len(classes), freq_mask=cfg.augment.freq_mask,
                          time_mask=cfg.augment.time_mask)
    model.requires_grad_(True)
    dataset = LabeledCropDataset(store, base.config.encoder.input_frames, classes, seed=cfg.seed, subset=subset)
    order = None
    if cfg.data.balanced_sampling:
        samples = len(dataset) if cfg.data.samples_per_epoch is None else cfg.data.samples_per_epoch
        order = WeightedOrder(audioset_sample_weights(dataset.label_lists()), samples, seed=cfg.seed)
    objective = FineTuneObjective(model, base, classes, mixup_alpha=cfg.augment.mixup_alpha,
                                  patch_out=cfg.augment.patch_out)

    def evaluate(run: StageRun | None) -> dict[str, float]:
        from m2d2.eval.tagging import evaluate_tagging
        from m2d2.tracking import is_main_process

        if not is_main_process():
            return {}
        try:
            eval_store = LogMelStore(feature_dir, "eval")
        except FileNotFoundError:
            log.warning("%s: no eval split in %s: no mAP", cfg.stage, feature_dir)
            return {}
        metrics = evaluate_tagging(model, eval_store, classes)
        log.info("stage1.1: eval mAP %.4f (chance %.4f) over %d clips", metrics["mAP"], metrics["mAP_chance"],
                 metrics["eval_clips"])
        if run is not None:
            run.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        return metrics

    return _run(cfg, objective, dataset, out_dir, parent_run_id, checkpoint_root,
                inputs={"features": feature_dir, "stage1": stage1_export}, order=order, after=evaluate,
                params={"classes": classes}, name=name)


def run_stage2(cfg: TrainStageConfig, feature_dir: str, encoder_export: str, out_dir: str,
               parent_run_id: str | None = None, checkpoint_root: str | None = None,
               name: str | None = None) -> StageOutput:
    """Stage 2: frozen encoder (stage 1's or stage 1.1's export), fresh projector, trainable transformers text
    encoder, CLAP only. ``cfg.train_audio_encoder`` trains the encoder too (the paper's M2D2^TA ablation)."""
    _expect(cfg, "stage2")
    init_distributed(cfg.topology.timeout_minutes)
    torch.manual_seed(cfg.seed)
    model = M2D2.from_pretrained(encoder_export)
    model.start_stage2(model_config(cfg.model).text.encoder)
    if cfg.train_audio_encoder:
        model.encoder.requires_grad_(True)
    return _run_clap(cfg, model, feature_dir, out_dir, parent_run_id, checkpoint_root,
                     inputs={"features": feature_dir, "encoder": encoder_export}, name=name)


def run_stage2_1(cfg: TrainStageConfig, feature_dir: str, stage2_export: str, out_dir: str,
                parent_run_id: str | None = None, checkpoint_root: str | None = None,
               name: str | None = None) -> StageOutput:
    """Stage 2.1: stage 2's weights (projector, text encoder, logit scale) trained on with ``cfg.augment.mask_ratio``
    (0.0) on the curated subset; a new optimiser and schedule, as the reference's ``--finetune``."""
    _expect(cfg, "stage2.1")
    init_distributed(cfg.topology.timeout_minutes)
    torch.manual_seed(cfg.seed)
    model = M2D2.from_pretrained(stage2_export)
    if model.text_encoder is None:
        raise ValueError(f"{stage2_export} has no text encoder: stage 2.1 continues a stage-2 model")
    model.set_stage("stage2")  # the same trainable parts as stage 2: projector, text encoder, logit scale
    return _run_clap(cfg, model, feature_dir, out_dir, parent_run_id, checkpoint_root,
                     inputs={"features": feature_dir, "stage2": stage2_export}, name=name)


#: The entry point of each stage, by stage name.
STAGE_RUNNERS = {"stage1": run_stage1, "stage1.1": run_stage1_1, "stage2": run_stage2, "stage2.1": run_stage2_1}


def _run_clap(cfg: TrainStageConfig, model: M2D2, feature_dir: str, out_dir: str, parent_run_id: str | None,
              checkpoint_root: str | None, inputs: dict[str, str], name: str | None) -> StageOutput:
    store = LogMelStore(feature_dir, "train")
    dataset = CropDataset(store, _crop(cfg, model, chunked=True), captions=None, seed=cfg.seed,
                          subset=_subset(cfg, store, name))
    objective = ClapObjective(model, mask_ratio=cfg.augment.mask_ratio)  # None: the model's stage2_mask_ratio
    return _run(cfg, objective, dataset, out_dir, parent_run_id, checkpoint_root, inputs=inputs, name=name)


def _run(cfg: TrainStageConfig, objective: Objective, dataset, out_dir: str, parent_run_id: str | None,
         checkpoint_root: str | None, inputs: dict[str, str], order=None, after=None,
         params: dict | None = None, name: str | None = None) -> StageOutput:
    name = name or cfg.stage  # the pipeline stage: its MLflow run, logs and progress bar (stage2-as runs stage2)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model_config = objective.module.config if isinstance(objective.module, M2D2) else objective.base.config
    run = StageRun(parent_run_id, name, tags={f"m2d2.input.{k}": v for k, v in inputs.items()}) \
        if parent_run_id else None
    if run is None:
        result = train(cfg, objective, dataset, out_dir, checkpoint_root=checkpoint_root, order=order, name=name)
        metrics = after(None) if after else {}
        return StageOutput(result.export_dir, result.checkpoint_dir, None, result.steps, result.final, metrics)
    with run:
        run.log_params({"model": model_config.to_dict(), **(params or {})})
        result = train(cfg, objective, dataset, out_dir, run=run, checkpoint_root=checkpoint_root, order=order,
                       name=name)
        metrics = after(run) if after else {}
        run.log_dict({"train": asdict(cfg), "model": model_config.to_dict(), **(params or {})}, "config.json")
        if run.run_id is not None:
            run.log_artifacts(result.export_dir, artifact_path="model")
            classifier = Path(result.export_dir).parent / CLASSIFIER_DIR
            if classifier.is_dir():
                run.log_artifacts(str(classifier), artifact_path=CLASSIFIER_DIR)
            run.set_tags({"m2d2.export_dir": str(Path(result.export_dir).resolve())})
    return StageOutput(result.export_dir, result.checkpoint_dir, run.run_id, result.steps, result.final, metrics)
