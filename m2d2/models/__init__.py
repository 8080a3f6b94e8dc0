"""M2D2 model core: ViT audio encoder, M2D heads (predictor, EMA target), CLAP branch, configs; the chunking rule
(:mod:`m2d2.models.chunks`) and the stage-1.1 tagger (:mod:`m2d2.models.tagger`) live beside it. Imports no
text, training or evaluation module: a stage-1 model gets caption vectors from its caller (:data:`TextEmbedder`)."""

from m2d2.models.clap import AudioProjector, ClipLoss, scale_grad
from m2d2.models.config import (
    ClapConfig,
    EncoderConfig,
    M2D2Config,
    M2DConfig,
    OfflineTextConfig,
    PredictorConfig,
    ProjectorConfig,
    TextConfig,
    TransformersTextConfig,
)
from m2d2.models.encoder import AudioEncoder
from m2d2.models.m2d import Predictor, TargetEncoder, ema_decay, norm_mse_loss
from m2d2.models.masking import ChunkMasks, PatchMask, no_mask, random_structured_mask, random_unstructured_mask
from m2d2.models.model import M2D2, TRAINABLE, TextEmbedder

__all__ = [
    "TRAINABLE",
    "AudioEncoder",
    "AudioProjector",
    "ClapConfig",
    "ClipLoss",
    "EncoderConfig",
    "M2D2",
    "M2D2Config",
    "M2DConfig",
    "OfflineTextConfig",
    "ChunkMasks",
    "PatchMask",
    "Predictor",
    "PredictorConfig",
    "ProjectorConfig",
    "TargetEncoder",
    "TextConfig",
    "TextEmbedder",
    "TransformersTextConfig",
    "ema_decay",
    "no_mask",
    "norm_mse_loss",
    "random_structured_mask",
    "random_unstructured_mask",
    "scale_grad",
]
