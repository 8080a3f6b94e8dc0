"""Training datasets over a log-mel store, and the per-epoch clip orders the training loop shards by rank.

Randomness is a pure function of ``(seed, epoch, index)``, not of worker assignment or call order, so a
resumed run or a different number of DataLoader workers draws exactly the same crops, captions and orders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.text.cache import CaptionEmbeddings

log = logging.getLogger(__name__)


def select_clips(store: LogMelStore, sources: Sequence[str] = (), min_captions: int = 0) -> list[int]:
    """Indices of the clips of ``sources`` (all when empty) with at least ``min_captions`` captions.

    This is how a curated subset is named (stage 2.1 of the paper trains on WavCaps + AudioCaps + Clotho only).
    An empty selection is an error: training on nothing is never what was meant.
    """
    wanted = {s for s in sources if s}
    chosen = [i for i in range(len(store))
              if (not wanted or store.sources[i] in wanted) and len(store.captions[i]) >= min_captions]
    if not chosen:
        have = sorted(set(store.sources))
        raise ValueError(f"no '{store.split}' clip matches sources={sorted(wanted) or 'any'} with >= {min_captions} "
                         f"captions (the store has sources {have})")
    return chosen


class _Crops(torch.utils.data.Dataset):
    """Random crops of the clips ``subset`` (default: all) of a store; ``item(i)`` adds what a stage needs."""

    def __init__(self, store: LogMelStore, crop_frames: int, seed: int = 0, subset: Sequence[int] | None = None):
        self.store = store
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0
        self.clips = list(range(len(store))) if subset is None else list(subset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips)

    def _crop(self, index: int) -> tuple[torch.Tensor, int, np.random.Generator]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        clip = self.clips[index]
        frames = self.store.frames(clip)
        start = int(rng.integers(0, frames - self.crop_frames + 1)) if frames > self.crop_frames else 0
        return torch.from_numpy(self.store.crop(clip, start, self.crop_frames)), clip, rng


class CropDataset(_Crops):
    """``(raw log-mel crop [n_mels, crop_frames], text)`` per clip.

    ``text`` is a precomputed sentence vector when ``captions`` (a :class:`CaptionEmbeddings`) is given
    (stage 1), else the caption string (stage 2). One of the clip's captions is chosen uniformly, so a clip
    with five captions is not drawn five times as often (the reference pooled all captions of all sources).
    Crops start uniformly in ``[0, T - crop]``; shorter clips are right-padded with 0 in the raw log domain.
    """

    def __init__(self, store: LogMelStore, crop_frames: int, captions: CaptionEmbeddings | None = None,
                 seed: int = 0, subset: Sequence[int] | None = None):
        super().__init__(store, crop_frames, seed, subset)
        missing = [store.clip_ids[i] for i in self.clips if not store.captions[i]]
        if missing:
            raise ValueError(f"{len(missing)} training clips have no caption, e.g. {missing[:3]}")
        self.captions = captions

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | str]:
        lms, clip, rng = self._crop(index)
        options = self.store.captions[clip]
        caption = options[int(rng.integers(0, len(options)))]
        if self.captions is None:
            return lms, caption
        return lms, torch.from_numpy(self.captions.lookup([caption])[0].astype(np.float32))


class LabeledCropDataset(_Crops):
    """``(raw log-mel crop, multi-hot target [num_classes])`` per clip, for supervised fine-tuning (stage 1.1).

    ``classes`` fixes the target order (the classifier's output order). Labels outside it are an error.
    """

    def __init__(self, store: LogMelStore, crop_frames: int, classes: Sequence[str], seed: int = 0,
                 subset: Sequence[int] | None = None):
        super().__init__(store, crop_frames, seed, subset)
        self.classes = list(classes)
        self._column = {name: k for k, name in enumerate(self.classes)}
        unknown = sorted({lab for i in self.clips for lab in store.labels[i]} - set(self._column))
        if unknown:
            raise ValueError(f"{len(unknown)} labels are not among the {len(self.classes)} classes, e.g. {unknown[:5]}")

    def target(self, clip: int) -> torch.Tensor:
        out = torch.zeros(len(self.classes))
        for label in self.store.labels[clip]:
            out[self._column[label]] = 1.0
        return out

    def label_lists(self) -> list[list[str]]:
        return [self.store.labels[i] for i in self.clips]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        lms, clip, _ = self._crop(index)
        return lms, self.target(clip)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor | str]]) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
    lms = torch.stack([item[0] for item in batch])
    texts = [item[1] for item in batch]
    return lms, (torch.stack(texts) if isinstance(texts[0], torch.Tensor) else texts)


# ----------------------------------------------------------------------------------------------- epoch orders
class ShuffledOrder:
    """Every dataset item once per epoch in a seeded random order (``DistributedSampler``'s permutation)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=gen).tolist()


class WeightedOrder:
    """``num_samples`` distinct items per epoch drawn by weight without replacement (the reference's AudioSet
    sampler: ``WeightedRandomSampler(weights, 200000, replacement=False)``), seeded by ``(seed, epoch)``.

    Items with weight 0 are never drawn; ``num_samples`` is clamped to the number of non-zero weights.
    """

    def __init__(self, weights: Sequence[float] | np.ndarray, num_samples: int, seed: int = 0):
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("sampling weights must be a 1-D array of finite, non-negative values")
        available = int((w > 0).sum())
        if available == 0:
            raise ValueError("every sampling weight is 0: nothing to draw")
        if num_samples > available:
            log.warning("%d samples per epoch requested but only %d clips have a non-zero weight; drawing %d "
                        "(sampling is without replacement)", num_samples, available, available)
        if num_samples <= 0 or num_samples > available:
            num_samples = available
        self.weights = w
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.multinomial(self.weights, self.num_samples, replacement=False, generator=gen).tolist()
