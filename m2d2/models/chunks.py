"""The one rule for cutting a clip of any length into encoder chunks (inference, reports and tagging share it).

As the reference runtime does, a clip is encoded as non-overlapping chunks of the encoder's trained length
(``input_frames``: 608, or 1001 of which 62 whole patches = 992 frames are encoded), never interpolated. The
tail rule: the clip is first right-padded to a whole number of patches with the normalised mean (0 after
normalisation); the last chunk is kept when it holds at least one patch and dropped otherwise (only possible when
``input_frames`` is not a multiple of the patch, e.g. 1001 + 5 frames: 7 padded frames after the first chunk).
Each chunk encodes its whole patches, so a chunk's frames past its last whole patch are never seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def chunk_spans(num_frames: int, chunk_frames: int, patch_frames: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk of a clip of ``num_frames`` log-mel frames, over the patch-padded clip."""
    if num_frames < 1:
        raise ValueError(f"need at least one log-mel frame, got {num_frames}")
    padded = -(-num_frames // patch_frames) * patch_frames
    spans = [(start, min(start + chunk_frames, padded)) for start in range(0, padded, chunk_frames)]
    return [(start, stop) for start, stop in spans if stop - start >= patch_frames]


def split_chunks(x: torch.Tensor, chunk_frames: int, patch_frames: int) -> list[torch.Tensor]:
    """The chunks of **normalised** log-mel ``x`` ``[..., T]`` (views of one zero-padded copy), per :func:`chunk_spans`."""
    spans = chunk_spans(x.shape[-1], chunk_frames, patch_frames)
    padded = -(-x.shape[-1] // patch_frames) * patch_frames
    x = F.pad(x, (0, padded - x.shape[-1]))
    return [x[..., start:stop] for start, stop in spans]


def frame_starts(num_frames: int, chunk_frames: int, patch_frames: int) -> np.ndarray:
    """First log-mel frame of every feature frame (patch column) the chunked encoder yields for ``num_frames``."""
    return np.concatenate([start + patch_frames * np.arange((stop - start) // patch_frames)
                           for start, stop in chunk_spans(num_frames, chunk_frames, patch_frames)])
