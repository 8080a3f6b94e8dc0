"""The stage-1.1 tagger: a pre-trained M2D encoder with a classifier head, and what builds it for long crops.

The reference ran stage 1.1 with EVAR's ``finetune.py`` (``util/ft-as2m.sh``): the encoder's 80x608 positions
resampled to 80x1001, a ``BatchNorm1d(affine=False)`` + ``Linear`` head on the mean of the visible patch tokens,
SpecAugment (30/192) and structured patch-out 0.5 inside the model. The model lives here, below training and
evaluation, because both use it: :mod:`m2d2.train.finetune` adds mixup and the sampler, :mod:`m2d2.eval.tagging`
scores it.

All randomness comes from an explicit ``torch.Generator`` (or torch's default one) so that a step is
reproducible from its seed; nothing reads NumPy's or torchaudio's global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from m2d2.models.encoder import AudioEncoder
from m2d2.models.masking import random_structured_mask
from m2d2.models.pos_embed import truncate_time

# A stage-1.1 export: the M2D2 model directory and, beside it, the classifier head and its class names.
CLASSIFIER_DIR = "classifier"
CLASSES_FILE = "classes.json"  # {"classes": [...], "activation": "sigmoid"}; written last, the head's marker
HEAD_FILE = "head.safetensors"  # ClassifierHead state (Linear + BatchNorm running statistics)

def generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random draws must be made on the generator's device; without one, on the data's device."""
    return generator.device if generator is not None else fallback


# ----------------------------------------------------------------------------- SpecAugment
def _band_mask(
    batch: int, size: int, param: int, iid: bool, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``[B, size]`` bool band per sample, drawn as torchaudio's ``mask_along_axis`` draws it.

    ``value = U * param``, ``start = trunc(U' * (size - value))``, band ``[start, start + trunc(value))``.
    """
    n = batch if iid else 1
    gen_device = generator_device(generator, device)
    value = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) * param
    min_value = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) * (size - value)
    start = min_value.long()  # trunc toward zero, as torchaudio's ``.long()``
    end = start + value.long()
    idx = torch.arange(size, device=gen_device)
    mask = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])
    return mask.expand(batch, size).to(device)


def spec_augment(
    lms_norm: torch.Tensor,
    freq_mask: int = 30,
    time_mask: int = 192,
    generator: torch.Generator | None = None,
    iid_masks: bool = True,
) -> torch.Tensor:
    """One frequency band and one time band set to 0 (the mean of normalised log-mel) per sample of ``[B, F, T]``.

    Widths and starts follow torchaudio's ``FrequencyMasking`` / ``TimeMasking``: ``v = U * param``, width
    ``trunc(v)``, start ``trunc(U' * (size - v))`` (unfloored ``v``, as there); a parameter below 1 disables that
    mask. The uniforms come from ``generator``, never torchaudio's global RNG. ``iid_masks=True`` draws a band
    per sample; ``False`` one band for the whole batch, which is what the reference got (torchaudio's default
    ``iid_masks=False`` on a batch). Returns a new tensor.
    """
    if lms_norm.ndim != 3:
        raise ValueError(f"spec_augment expects [B, F, T], got {tuple(lms_norm.shape)}")
    b, n_freq, n_time = lms_norm.shape
    mask = torch.zeros(b, n_freq, n_time, dtype=torch.bool, device=lms_norm.device)
    if freq_mask >= 1:
        mask |= _band_mask(b, n_freq, freq_mask, iid_masks, generator, lms_norm.device)[:, :, None]
    if time_mask >= 1:
        mask |= _band_mask(b, n_time, time_mask, iid_masks, generator, lms_norm.device)[:, None, :]
    return lms_norm.masked_fill(mask, 0.0)


# ----------------------------------------------------------------------------- positions for longer crops
def resample_pos_embed(
    table: torch.Tensor,
    grid_f: int,
    old_t: int,
    new_t: int,
    mode: Literal["bicubic", "trim"] = "bicubic",
) -> torch.Tensor:
    """``[1, 1 + F*old_t, D]`` (CLS row first) -> ``[1, 1 + F*new_t, D]`` along time only.

    ``bicubic`` is timm's ``resample_abs_pos_embed`` (antialias off, as the reference patched it): the table is
    *stretched*, so the result is not the sin-cos formula evaluated on ``new_t`` columns. Checkpoints fine-tuned
    at 1001 frames store this stretched table, which is why it must be loaded, never recomputed.
    ``trim`` (only for ``new_t <= old_t``) keeps the first ``new_t`` columns, what the reference does for
    shorter crops. The CLS row is kept unchanged.
    """
    d = table.shape[-1]
    if table.ndim != 3 or table.shape[:2] != (1, 1 + grid_f * old_t):
        raise ValueError(f"expected a [1, 1 + {grid_f}*{old_t}, D] table, got {tuple(table.shape)}")
    if new_t < 1:
        raise ValueError(f"new_t must be >= 1, got {new_t}")
    if mode == "trim":
        if new_t > old_t:
            raise ValueError(f"cannot trim {old_t} columns to {new_t}; use mode='bicubic' to grow the table")
        return torch.cat([table[:, :1], truncate_time(table[:, 1:], grid_f, old_t, new_t)], dim=1)
    if mode != "bicubic":
        raise ValueError(f"unknown resampling mode {mode!r}; choose 'bicubic' or 'trim'")
    out = resample_abs_pos_embed(
        table,
        new_size=[grid_f, new_t],
        old_size=[grid_f, old_t],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )
    assert out.shape == (1, 1 + grid_f * new_t, d)
    return out


def expand_encoder_frames(encoder: AudioEncoder, new_frames: int) -> None:
    """Let ``encoder`` take crops of up to ``new_frames`` frames by resampling its positional table in place.

    The grid becomes ``(F, new_frames // patch_t)``: 608 -> 1001 frames is 38 -> 62 columns, since
    1001 = 62 whole patches + 9 frames (those 9 are never encoded). Growing uses bicubic resampling, shrinking
    trims (as the reference). ``encoder.config.input_frames`` is updated in place, so a config object shared with
    a parent model (e.g. ``M2D2Config.encoder``) records the new length too.
    """
    grid_f, old_t = encoder.grid
    new_t = new_frames // encoder.patch_frames
    if new_t < 1:
        raise ValueError(f"{new_frames} frames is less than one patch ({encoder.patch_frames} frames)")
    mode = "bicubic" if new_t >= old_t else "trim"
    table = resample_pos_embed(encoder.pos_embed, grid_f, old_t, new_t, mode=mode)
    encoder.pos_embed = table.to(encoder.pos_embed).contiguous()  # assignment to a registered buffer
    encoder.config.input_frames = new_frames
    encoder.grid = encoder.config.grid
    assert encoder.grid == (grid_f, new_t)


# ----------------------------------------------------------------------------- model
class ClassifierHead(nn.Module):
    """EVAR's task head: ``BatchNorm1d(affine=False)`` then ``Linear`` with weights ~ N(0, 0.01), bias 0.

    The parameter-free BatchNorm standardises features whose scale the pre-trained encoder sets, so one
    learning rate suits any encoder.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # BatchNorm statistics in fp32 whatever the training dtype (a trainer may cast the Linear to bf16).
        return self.linear(self.norm(features.float()).to(self.linear.weight.dtype))


class FineTuneModel(nn.Module):
    """Encoder + normalisation stats + :class:`ClassifierHead` for multi-label fine-tuning (BCE).

    ``forward`` takes **raw** log-mel ``[B, F, T]``; mixup (:func:`m2d2.train.finetune.mixup_batch`) is the
    caller's job, before ``forward``, because it mixes raw log-power and mixes the targets too. Training-time augmentation:
    SpecAugment on the normalised log-mel (``freq_mask`` / ``time_mask``; 0 disables) and structured patch-out.
    Features are the mean of the visible patch tokens (CLS excluded), one encoder-width vector per clip, as the
    reference's ``training_mask`` path (flat features) does.
    """

    def __init__(
        self,
        encoder: AudioEncoder,
        norm_stats: torch.Tensor | Sequence[float],
        num_classes: int,
        *,
        freq_mask: int = 30,
        time_mask: int = 192,
    ):
        super().__init__()
        stats = torch.as_tensor(norm_stats, dtype=torch.float32).flatten()
        if stats.shape != (2,) or not stats[1] > 0:
            raise ValueError(f"norm_stats must be (mean, std > 0), got {stats.tolist()}")
        self.encoder = encoder
        self.register_buffer("norm_stats", stats.clone(), persistent=True)
        self.head = ClassifierHead(encoder.config.embed_dim, num_classes)
        self.freq_mask = freq_mask
        self.time_mask = time_mask

    @property
    def max_frames(self) -> int:
        """Longest input accepted: the encoder's configured crop length (1001 after expansion)."""
        return self.encoder.config.input_frames

    def normalize(self, lms_raw: torch.Tensor) -> torch.Tensor:
        return (lms_raw - self.norm_stats[0]) / self.norm_stats[1]

    def features(
        self,
        lms_raw: torch.Tensor,
        *,
        patch_out: float = 0.0,
        augment: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``[B, D]`` mean of the visible patch tokens; augmentation and patch-out only when ``augment``."""
        if lms_raw.ndim != 3:
            raise ValueError(f"expected raw log-mel [B, F, T], got {tuple(lms_raw.shape)}")
        frames = lms_raw.shape[-1]
        if frames > self.max_frames:
            raise ValueError(
                f"input of {frames} frames exceeds the encoder's {self.max_frames}; crop it, or expand the encoder "
                "with expand_encoder_frames()"
            )
        x = self.normalize(lms_raw)
        if augment and (self.freq_mask > 0 or self.time_mask > 0):
            x = spec_augment(x, self.freq_mask, self.time_mask, generator=generator)
        ids_keep = None
        if augment and patch_out > 0:
            grid = (self.encoder.grid[0], frames // self.encoder.patch_frames)
            ids_keep = random_structured_mask(x.shape[0], grid, patch_out, generator, device=x.device).ids_keep
        return self._pooled(x, ids_keep)

    def _pooled(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.encoder(x.to(self.encoder.patch_embed.proj.weight.dtype), ids_keep)
        return tokens[:, 1:].mean(dim=1)

    def forward(
        self,
        lms_raw: torch.Tensor,
        targets: torch.Tensor,
        *,
        patch_out: float = 0.5,
        generator: torch.Generator | None = None,
        training: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (BCE with logits, mean over B*C) and ``logits`` ``[B, C]``.

        ``training`` switches the augmentations (SpecAugment, patch-out); it defaults to ``self.training``.
        BatchNorm follows the module mode (``.train()`` / ``.eval()``) as usual.
        """
        augment = self.training if training is None else training
        feats = self.features(lms_raw, patch_out=patch_out, augment=augment, generator=generator)
        logits = self.head(feats)
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        return {"loss": loss, "logits": logits}

    @torch.no_grad()
    def predict(self, lms_raw: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` without augmentation or patch-out; call ``.eval()`` first for BatchNorm's running stats.

        Inputs must fit the encoder (``T <= max_frames``); longer clips are the caller's to crop or chunk.
        """
        return self.head(self.features(lms_raw, augment=False))

    @torch.no_grad()
    def predict_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of **normalised** log-mel ``[B, F, T]``: the chunks of a long clip, cut after
        :meth:`normalize` by :func:`m2d2.models.chunks.split_chunks` so that padding is the mean, as in inference."""
        if x.ndim != 3:
            raise ValueError(f"expected normalised log-mel [B, F, T], got {tuple(x.shape)}")
        return self.head(self._pooled(x))
