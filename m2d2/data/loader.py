"""Training dataset over a log-mel store: random crops plus one caption (or its vector) per clip.

Randomness is a pure function of ``(seed, epoch, index)``, not of worker assignment or call order, so a
resumed run or a different number of DataLoader workers draws exactly the same crops and captions.
"""

from __future__ import annotations

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.text.cache import CaptionEmbeddings


class CropDataset(torch.utils.data.Dataset):
    """``(raw log-mel crop [n_mels, crop_frames], text)`` per clip.

    ``text`` is a precomputed sentence vector when ``captions`` (a :class:`CaptionEmbeddings`) is given
    (stage 1), else the caption string (stage 2). One of the clip's captions is chosen uniformly, so a clip
    with five captions is not drawn five times as often (the reference pooled all captions of all sources).
    Crops start uniformly in ``[0, T - crop]``; shorter clips are right-padded with 0 in the raw log domain.
    """

    def __init__(self, store: LogMelStore, crop_frames: int, captions: CaptionEmbeddings | None = None,
                 seed: int = 0):
        missing = [store.clip_ids[i] for i in range(len(store)) if not store.captions[i]]
        if missing:
            raise ValueError(f"{len(missing)} training clips have no caption, e.g. {missing[:3]}")
        self.store = store
        self.crop_frames = crop_frames
        self.captions = captions
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | str]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        frames = self.store.frames(index)
        start = int(rng.integers(0, frames - self.crop_frames + 1)) if frames > self.crop_frames else 0
        lms = torch.from_numpy(self.store.crop(index, start, self.crop_frames))
        options = self.store.captions[index]
        caption = options[int(rng.integers(0, len(options)))]
        if self.captions is None:
            return lms, caption
        return lms, torch.from_numpy(self.captions.lookup([caption])[0].astype(np.float32))


def collate(batch: list[tuple[torch.Tensor, torch.Tensor | str]]) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
    lms = torch.stack([item[0] for item in batch])
    texts = [item[1] for item in batch]
    return lms, (torch.stack(texts) if isinstance(texts[0], torch.Tensor) else texts)
