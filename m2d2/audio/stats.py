"""Global log-mel normalisation statistics: one scalar mean and std, as M2D uses (``(lms - mean) / std``).

The reference recomputes these at the start of every run (so they drift between runs); here they are computed
once, deterministically from a seed, and stored with the dataset / checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["NormStats", "compute_norm_stats"]

_EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class NormStats:
    """Scalar mean and std of raw log-mel values; models store them as a (2,) ``norm_stats`` tensor."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"need a finite mean and a finite std > 0, got mean={self.mean}, std={self.std}")

    def as_tensor(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``tensor([mean, std])``, the layout of the ``norm_stats`` checkpoint entry."""
        return torch.tensor([self.mean, self.std], dtype=dtype)

    @classmethod
    def from_tensor(cls, t: torch.Tensor | Sequence[float]) -> NormStats:
        """Inverse of :meth:`as_tensor`: accepts a (2,) tensor, array or sequence ``[mean, std]``."""
        values = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
        if values.numel() != 2:
            raise ValueError(f"expected 2 values [mean, std], got shape {tuple(torch.as_tensor(t).shape)}")
        return cls(mean=float(values[0]), std=float(values[1]))


def _as_numpy(clip: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(clip, torch.Tensor):
        return clip.detach().cpu().numpy()
    return np.asarray(clip)


def compute_norm_stats(
    log_mels: Sequence[np.ndarray | torch.Tensor],
    crop_frames: int,
    num_samples: int = 5000,
    seed: int = 0,
) -> NormStats:
    """Mean and std of ``num_samples`` random training crops, the way M2D pre-training sees the data.

    Each draw picks a clip uniformly (with replacement), then a uniform crop start in ``[0, T - crop_frames]``
    along the last (time) axis. A clip shorter than ``crop_frames`` is right-padded with 0 in the *raw log*
    domain, exactly as the training crop does, so those zeros count towards the statistics.

    Args:
        log_mels: raw (unnormalised) log-mel clips, each [n_mels, T] (leading singleton axes are fine).
            Only one clip is touched at a time, so a lazy sequence (e.g. memory-mapped ``.npy`` files) works.
        crop_frames: training crop length in frames (608 for 6.08 s pre-training, 1001 for 10 s).
        num_samples: number of random crops (the reference uses 5000).
        seed: seed of the private ``numpy.random.Generator``; the global RNG is never touched.

    Returns:
        Population mean and std (plus float32 eps, as in the reference) over every value of every crop,
        accumulated in float64 with Chan's parallel update, so memory stays O(one crop).
    """
    if len(log_mels) == 0:
        raise ValueError("compute_norm_stats needs at least one log-mel clip, got an empty sequence")
    if crop_frames < 1 or num_samples < 1:
        raise ValueError(f"crop_frames and num_samples must be >= 1, got {crop_frames} and {num_samples}")
    rng = np.random.default_rng(seed)
    count, mean, m2 = 0, 0.0, 0.0
    for _ in range(num_samples):
        index = int(rng.integers(0, len(log_mels)))
        clip = _as_numpy(log_mels[index])
        if clip.ndim < 1 or clip.shape[-1] == 0 or clip.size == 0:
            raise ValueError(f"log-mel clip {index} is empty (shape {clip.shape})")
        num_frames = clip.shape[-1]
        if num_frames >= crop_frames:
            start = int(rng.integers(0, num_frames - crop_frames + 1))
            crop = clip[..., start : start + crop_frames].astype(np.float64)
        else:
            pad = [(0, 0)] * (clip.ndim - 1) + [(0, crop_frames - num_frames)]
            crop = np.pad(clip.astype(np.float64), pad, mode="constant", constant_values=0.0)
        n_b = crop.size
        mean_b = float(crop.mean())
        if not np.isfinite(mean_b):
            raise ValueError(f"log-mel clip {index} contains NaN or infinite values")
        centred = (crop - mean_b).reshape(-1)
        m2_b = float(centred @ centred)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    std = float(np.sqrt(m2 / count))
    return NormStats(mean=mean, std=std + _EPS32)
