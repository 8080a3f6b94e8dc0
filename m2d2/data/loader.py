"""Training datasets over a log-mel store, the per-epoch clip orders, and a rank-sharded, resumable loader.

Randomness is a pure function of ``(seed, epoch, index)``, not of worker assignment or call order, so a
resumed run or a different number of DataLoader workers draws exactly the same crops, captions and orders.

Padding: a clip shorter than the crop is right-padded with ``pad_value`` in the *raw* log-mel domain, default
0.0 as in the reference's training code (0 is not silence: after normalisation it sits about +1.7 sigma above
the mean, a flat loud band). We keep 0 for parity with the reference and its released weights, and because the
normalisation statistics are measured with the same padding; ``pad_value=log(eps) = -15.94`` instead reproduces
zero-padding the waveform (true silence), which the reference's offline pre-processing did up to 6.1 s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.text.cache import CaptionEmbeddings
from m2d2.text.choice import choose_caption

log = logging.getLogger(__name__)


class _Crops(torch.utils.data.Dataset):
    """Random crops of the clips ``subset`` (default: all) of a store; ``item(i)`` adds what a stage needs."""

    def __init__(self, store: LogMelStore, crop_frames: int, seed: int = 0, subset: Sequence[int] | None = None,
                 pad_value: float = 0.0):
        self.store = store
        self.crop_frames = crop_frames
        self.seed = seed
        self.epoch = 0
        self.pad_value = pad_value
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
        return self.store.crop_tensor(clip, start, self.crop_frames, self.pad_value), clip, rng


class CropDataset(_Crops):
    """``(raw log-mel crop [n_mels, crop_frames], text)`` per clip.

    ``text`` is a precomputed sentence vector when ``captions`` (a :class:`CaptionEmbeddings`) is given
    (stage 1), else the caption string (stage 2). One of the clip's captions is chosen uniformly, so a clip
    with five captions is not drawn five times as often (the reference pooled all captions of all sources).
    Crops start uniformly in ``[0, T - crop]`` (608 frames in stage 1, 1001 in stage 2); shorter clips are
    right-padded with ``pad_value`` (see the module docstring).

    The caption-embedding join is checked up front: every caption of every selected clip must be in
    ``captions``, so a stale cache fails at construction, naming captions, not hours into training.
    """

    def __init__(self, store: LogMelStore, crop_frames: int, captions: CaptionEmbeddings | None = None,
                 seed: int = 0, subset: Sequence[int] | None = None, pad_value: float = 0.0):
        super().__init__(store, crop_frames, seed, subset, pad_value)
        all_captions = list(store.captions)  # one bulk read of the index column (millions of clips at scale)
        missing = [store.clip_ids[i] for i in self.clips if not all_captions[i]]
        if missing:
            raise ValueError(f"{len(missing)} training clips have no caption, e.g. {missing[:3]}")
        if captions is not None:
            absent = captions.missing(c for i in self.clips for c in all_captions[i])
            if absent:
                raise KeyError(f"{len(absent)} captions of the training clips are not in the embedding cache, e.g. "
                               f"{absent[:3]}; re-run the embedding step for this store")
        self.captions = captions

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | str]:
        lms, clip, rng = self._crop(index)
        options = self.store.captions[clip]
        caption = options[choose_caption(len(options), rng)]
        if self.captions is None:
            return lms, caption
        return lms, torch.from_numpy(self.captions.lookup([caption])[0].astype(np.float32))


class LabeledCropDataset(_Crops):
    """``(raw log-mel crop, multi-hot target [num_classes])`` per clip, for supervised fine-tuning (stage 1.1).

    ``classes`` fixes the target order (the classifier's output order). Labels outside it are an error.
    """

    def __init__(self, store: LogMelStore, crop_frames: int, classes: Sequence[str], seed: int = 0,
                 subset: Sequence[int] | None = None, pad_value: float = 0.0):
        super().__init__(store, crop_frames, seed, subset, pad_value)
        self.classes = list(classes)
        self._column = {name: k for k, name in enumerate(self.classes)}
        all_labels = list(store.labels)
        unknown = sorted({lab for i in self.clips for lab in all_labels[i]} - set(self._column))
        if unknown:
            raise ValueError(f"{len(unknown)} labels are not among the {len(self.classes)} classes, e.g. {unknown[:5]}")

    def target(self, clip: int) -> torch.Tensor:
        out = torch.zeros(len(self.classes))
        for label in self.store.labels[clip]:
            out[self._column[label]] = 1.0
        return out

    def label_lists(self) -> list[list[str]]:
        all_labels = list(self.store.labels)
        return [all_labels[i] for i in self.clips]

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


# ----------------------------------------------------------------------------------------------- rank-sharded loader
class EpochOrder(Protocol):
    def __len__(self) -> int: ...

    def indices(self, epoch: int) -> list[int]: ...


def rank_batches(order: EpochOrder, epoch: int, global_batch: int, rank: int = 0, world: int = 1,
                 first_batch: int = 0) -> list[list[int]]:
    """Rank ``rank``'s local batches of ``epoch`` from global batch ``first_batch`` on.

    The cut the training engine uses: the epoch order's first ``steps * global_batch`` items, rank ``r`` takes
    every ``world``-th one, so global batch ``b`` holds the same clips whatever the world size; an incomplete last
    global batch is dropped (every rank must step together).
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split into {world} ranks")
    local = global_batch // world
    steps = len(order) // global_batch
    mine = order.indices(epoch)[rank : steps * global_batch : world]
    return [mine[b * local : (b + 1) * local] for b in range(first_batch, steps)]


class CropLoader:
    """A DataLoader over ``dataset`` for one rank, resumable at batch granularity (``state_dict``).

    The position counts batches *delivered* to the caller, not batches the worker processes have prefetched,
    so a checkpoint taken between steps resumes exactly at the next unseen batch. Worker processes
    (``num_workers``) change nothing in the data: every crop is a function of ``(seed, epoch, index)``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, global_batch: int, order: EpochOrder | None = None,
                 rank: int = 0, world: int = 1, num_workers: int = 0, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.dataset = dataset
        self.prefetch_factor = prefetch_factor
        self.order = order or ShuffledOrder(len(dataset), seed)
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.collate_fn = collate_fn or collate
        self.epoch, self.batch = 0, 0
        if len(self.order) // global_batch == 0:
            raise ValueError(f"{len(self.order)} clips per epoch cannot fill one global batch of {global_batch}")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.order) // self.global_batch

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.steps_per_epoch - self.batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def __iter__(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        batches = rank_batches(self.order, self.epoch, self.global_batch, self.rank, self.world, self.batch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.num_workers else None,
            generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        for item in loader:
            self.batch += 1
            yield item
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
