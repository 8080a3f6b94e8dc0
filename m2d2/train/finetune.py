"""Stage 1.1 building blocks: supervised AudioSet fine-tuning of a pre-trained M2D encoder.

The reference ran this stage with EVAR's ``finetune.py`` (``util/ft-as2m.sh``): the encoder's 80x608 positions
resampled to 80x1001, a ``BatchNorm1d(affine=False)`` + ``Linear`` head on the mean of the visible patch tokens,
SpecAugment (30/192), structured patch-out 0.5, mixup 0.5, BCE, and a class-balanced sampler of 200 k clips
per epoch. This module holds those pieces as small pure functions and modules; the loop lives elsewhere.

All randomness comes from an explicit ``torch.Generator`` (or torch's default one) so that a step is
reproducible from its seed; nothing reads NumPy's or torchaudio's global RNG.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from m2d2.models.encoder import AudioEncoder
from m2d2.models.masking import random_structured_mask
from m2d2.models.pos_embed import truncate_time

log = logging.getLogger(__name__)


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random draws must be made on the generator's device; without one, on the data's device."""
    return generator.device if generator is not None else fallback


# ----------------------------------------------------------------------------- mixup
def log_mixup_exp(lms_a: torch.Tensor, lms_b: torch.Tensor, lam: float) -> torch.Tensor:
    """``log(lam * exp(a) + (1 - lam) * exp(b))``: mixes two raw (natural-log) log-mels as power spectra.

    Computed as ``logaddexp(a + log(lam), b + log(1 - lam))``, so it never overflows and ``lam = 1`` returns
    ``a`` exactly (``lam = 0`` returns ``b``). Unlike BYOL-A's version no eps is added inside the log.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup weight must be in [0, 1], got {lam}")
    log_a = math.log(lam) if lam > 0 else -math.inf
    log_b = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(lms_a + log_a, lms_b + log_b)


def mixup_batch(
    lms: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup of a batch of **raw** log-mel ``[B, F, T]`` with a random permutation of itself.

    One ``lam ~ Beta(alpha, alpha)`` per batch; sample ``i`` is mixed with sample ``perm[i]``: the log-mels in
    the power domain (:func:`log_mixup_exp`), the targets linearly with the same ``lam``. Call it before
    :meth:`FineTuneModel.forward`, which normalises: mixing must happen on raw log-power values.

    Differences from the reference (EVAR ``Mixup``), by choice:

    - EVAR averages AudioSet log-mels linearly (``lam * a + (1 - lam) * b`` of log values). Averaging log
      values is a geometric mean of powers, not a mix of two sounds; we mix in the power domain as BYOL-A and
      M2D-X's background-noise mix do.
    - EVAR draws one ``lam`` per *sample*; we draw one per batch (the usual mixup formulation).

    ``lam`` is drawn with NumPy's Beta sampler from a seed taken from ``generator``, so the result is a
    deterministic function of the generator's state. ``alpha <= 0`` returns the inputs unchanged with ``lam = 1``
    and consumes no randomness.
    """
    if lms.shape[0] != targets.shape[0]:
        raise ValueError(f"batch sizes differ: lms {tuple(lms.shape)} vs targets {tuple(targets.shape)}")
    if alpha <= 0:
        return lms, targets, 1.0
    device = _gen_device(generator, lms.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(lms.shape[0], generator=generator, device=device).to(lms.device)
    mixed_lms = log_mixup_exp(lms, lms[perm], lam)
    mixed_targets = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_lms, mixed_targets, lam


# ----------------------------------------------------------------------------- SpecAugment
def _band_mask(
    batch: int, size: int, param: int, iid: bool, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``[B, size]`` bool band per sample, drawn as torchaudio's ``mask_along_axis`` draws it.

    ``value = U * param``, ``start = trunc(U' * (size - value))``, band ``[start, start + trunc(value))``.
    """
    n = batch if iid else 1
    gen_device = _gen_device(generator, device)
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
    mask. The uniforms come from ``generator``, never torchaudio's global RNG. ``iid_masks=True`` draws a band per sample; ``False`` one band for the whole batch,
    which is what the reference got (torchaudio's default ``iid_masks=False`` on a batch). Returns a new tensor.
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


# ----------------------------------------------------------------------------- class-balanced sampling
def audioset_sample_weights(label_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """AudioMAE / EVAR (``make_as_metadata.gen_weight``) sampling weights for multi-label clips.

    Per class ``w_c = 1000 / (count_c + 0.01)`` with ``count_c`` the number of clips carrying ``c``; per clip
    ``weight = (sum of w_c over its labels) ** (1 / 1.5)`` (the power softens the weights). A clip's labels are
    taken as a set (AudioSet has no repeated labels, so this equals the reference). Clips without labels get
    weight 0, so a sampler never draws them; their number is logged as a warning.
    """
    label_sets = [set(labels) for labels in label_lists]
    counts = Counter(label for labels in label_sets for label in labels)
    class_weight = {label: 1000.0 / (count + 0.01) for label, count in counts.items()}
    sums = np.array([sum(class_weight[label] for label in labels) for labels in label_sets], dtype=np.float64)
    unlabeled = sum(1 for labels in label_sets if not labels)
    if unlabeled:
        log.warning("%d of %d clips have no label: sampling weight 0 (never drawn)", unlabeled, len(label_sets))
    return np.power(sums, 1.0 / 1.5)


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

    ``forward`` takes **raw** log-mel ``[B, F, T]``; mixup (:func:`mixup_batch`) is the caller's job, before
    ``forward``, because it mixes raw log-power and mixes the targets too. Training-time augmentation:
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
