"""Global log-mel normalisation statistics: one scalar mean and std, as M2D uses (``(lms - mean) / std``).

The reference recomputes these at the start of every run (so they drift between runs); here they are computed
once, deterministically from a seed, and stored with the dataset / checkpoint. This module holds the one
implementation: the feature store (:mod:`m2d2.data.shards`) measures its shards' crops with :func:`norm_draws`,
:func:`crop_generator`, :func:`crop_moments` and merges :class:`Moments`; :func:`compute_norm_stats` applies the
same rule to log-mels in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Moments", "NormStats", "compute_norm_stats", "crop_generator", "crop_moments", "norm_draws"]

_EPS32 = float(np.finfo(np.float32).eps)
_DRAW_STREAM = 0x5EED  # the clip draws' generator, apart from every clip's crop generator


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


class Moments:
    """Count, mean and sum of squared deviations, merged with Chan's parallel update (float64).

    Shards measure their crops independently and the store merges their moments, so memory stays O(one crop).
    """

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = count, mean, m2

    def add(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        mean_b = float(flat.mean())
        centred = flat - mean_b
        # square + sum, not a dot product: no BLAS threads (they crawl on a busy machine), same on every host
        self.merge(Moments(flat.size, mean_b, float(np.square(centred).sum())))

    def merge(self, other: Moments) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total

    def norm_stats(self) -> NormStats:
        """Population mean and std, plus float32 eps as the reference adds."""
        return NormStats(mean=self.mean, std=math.sqrt(self.m2 / self.count) + _EPS32)


def norm_draws(seed: int, num_clips: int, num_samples: int) -> np.ndarray:
    """The clip (``0 <= i < num_clips``) of each of ``num_samples`` crops: uniform draws with replacement, as the
    reference samples; a function of the seed and the number of clips only, not of how they are sharded."""
    return np.random.default_rng([seed, _DRAW_STREAM]).integers(0, num_clips, num_samples)


def crop_generator(seed: int, clip: int) -> np.random.Generator:
    """Where clip ``clip``'s crop starts come from: its own generator, so each shard measures its clips alone."""
    return np.random.default_rng([seed, 1, clip])


def crop_moments(lms: np.ndarray, count: int, crop: int, rng: np.random.Generator, moments: Moments) -> None:
    """``count`` uniform crops of ``crop`` frames from a [T, n_mels] clip; short clips right-padded with 0 in the
    raw log domain, exactly as the training crop pads."""
    frames = lms.shape[0]
    for _ in range(count):
        if frames >= crop:
            start = int(rng.integers(0, frames - crop + 1))
            moments.add(lms[start : start + crop])
        else:
            padded = np.zeros((crop, lms.shape[1]), dtype=np.float64)
            padded[:frames] = lms
            moments.add(padded)


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
    """Mean and std of ``num_samples`` random training crops, by the feature store's rule, of log-mels in memory.

    Crop ``k`` falls on clip ``norm_draws(...)[k]`` (uniform, with replacement); each clip's crops start uniformly
    in ``[0, T - crop_frames]`` (its own :func:`crop_generator`). A clip shorter than ``crop_frames`` is
    right-padded with 0 in the *raw log* domain, exactly as the training crop does, so those zeros count towards
    the statistics. A store written from the same clips (``m2d2.data.shards.import_logmels``, one shard) holds
    the same statistics, up to the float16 its shards store.

    Args:
        log_mels: raw (unnormalised) log-mel clips, each [n_mels, T] (leading singleton axes are fine).
            Only one clip is touched at a time, so a lazy sequence (e.g. memory-mapped ``.npy`` files) works.
        crop_frames: training crop length in frames (608 for 6.08 s pre-training, 1001 for 10 s).
        num_samples: number of random crops (the reference uses 5000).
        seed: seed of the private ``numpy.random.Generator`` objects; the global RNG is never touched.

    Returns:
        Population mean and std (plus float32 eps, as in the reference) over every value of every crop,
        accumulated in float64 with Chan's parallel update (:class:`Moments`).
    """
    if len(log_mels) == 0:
        raise ValueError("compute_norm_stats needs at least one log-mel clip, got an empty sequence")
    if crop_frames < 1 or num_samples < 1:
        raise ValueError(f"crop_frames and num_samples must be >= 1, got {crop_frames} and {num_samples}")
    counts = np.bincount(norm_draws(seed, len(log_mels), num_samples), minlength=len(log_mels))
    moments = Moments()
    for index in np.flatnonzero(counts):
        clip = _as_numpy(log_mels[index])
        if clip.ndim < 1 or clip.shape[-1] == 0 or clip.size == 0:
            raise ValueError(f"log-mel clip {index} is empty (shape {clip.shape})")
        if not np.isfinite(clip).all():
            raise ValueError(f"log-mel clip {index} contains NaN or infinite values")
        time_major = clip.reshape(-1, clip.shape[-1]).T  # [T, n_mels], the store's layout
        crop_moments(time_major, int(counts[index]), crop_frames, crop_generator(seed, int(index)), moments)
    return moments.norm_stats()
