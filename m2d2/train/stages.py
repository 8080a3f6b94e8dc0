"""Stage entry points: build the model and data for a stage, then run the one training loop.

These are what the Flyte tasks call (inside an Elastic launch, on every rank), and what a user calls from
plain Python. They take paths and configs and return a :class:`StageOutput`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from m2d2.data.features import LogMelStore, load_norm_stats
from m2d2.data.loader import CropDataset
from m2d2.models import M2D2, M2D2Config
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun
from m2d2.train.config import TrainStageConfig
from m2d2.train.engine import init_distributed, train

log = logging.getLogger(__name__)


@dataclass
class StageOutput:
    export_dir: str
    checkpoint_dir: str
    mlflow_run_id: str | None
    steps: int
    final: dict[str, float] = field(default_factory=dict)


def _crop(cfg: TrainStageConfig, model: M2D2) -> int:
    return cfg.crop_frames or model.config.encoder.input_frames


def run_stage1(cfg: TrainStageConfig, feature_dir: str, caption_cache: str, out_dir: str,
               parent_run_id: str | None = None, checkpoint_root: str | None = None) -> StageOutput:
    """Stage 1: M2D + CLAP from scratch against precomputed sentence vectors of the captions."""
    init_distributed(cfg.timeout_minutes)
    model_cfg = M2D2Config.preset(cfg.model_preset)
    stats = load_norm_stats(feature_dir)
    model_cfg.norm_mean, model_cfg.norm_std = stats.mean, stats.std
    captions = CaptionEmbeddings(caption_cache)
    captions.check_encoder(model_cfg.text.offline)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank
    model = M2D2(model_cfg)
    model.set_stage("stage1")
    dataset = CropDataset(LogMelStore(feature_dir, "train"), _crop(cfg, model), captions, seed=cfg.seed)
    return _run(cfg, model, dataset, out_dir, parent_run_id, checkpoint_root,
                inputs={"features": feature_dir, "captions": caption_cache})


def run_stage2(cfg: TrainStageConfig, feature_dir: str, stage1_export: str, out_dir: str,
               parent_run_id: str | None = None, checkpoint_root: str | None = None) -> StageOutput:
    """Stage 2: frozen stage-1 encoder, fresh projector, trainable transformers text encoder, CLAP only."""
    init_distributed(cfg.timeout_minutes)
    torch.manual_seed(cfg.seed)
    model = M2D2.from_pretrained(stage1_export)
    model.start_stage2(M2D2Config.preset(cfg.model_preset).text.encoder)
    dataset = CropDataset(LogMelStore(feature_dir, "train"), _crop(cfg, model), captions=None, seed=cfg.seed)
    return _run(cfg, model, dataset, out_dir, parent_run_id, checkpoint_root,
                inputs={"features": feature_dir, "stage1": stage1_export})


def _run(cfg: TrainStageConfig, model: M2D2, dataset: CropDataset, out_dir: str, parent_run_id: str | None,
         checkpoint_root: str | None, inputs: dict[str, str]) -> StageOutput:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    run = StageRun(parent_run_id, cfg.stage, tags={f"m2d2.input.{k}": v for k, v in inputs.items()}) \
        if parent_run_id else None
    if run is None:
        result = train(cfg, model, dataset, out_dir, checkpoint_root=checkpoint_root)
        return StageOutput(result.export_dir, result.checkpoint_dir, None, result.steps, result.final)
    with run:
        run.log_params({"model": model.config.to_dict()})
        result = train(cfg, model, dataset, out_dir, run=run, checkpoint_root=checkpoint_root)
        run.log_dict({"train": asdict(cfg), "model": model.config.to_dict()}, "config.json")
        if run.run_id is not None:
            run.log_artifacts(result.export_dir, artifact_path="model")
            run.set_tags({"m2d2.export_dir": str(Path(result.export_dir).resolve())})
    return StageOutput(result.export_dir, result.checkpoint_dir, run.run_id, result.steps, result.final)
