"""The one rule for cutting a clip of any length into encoder chunks (inference, reports, tagging and stage-2
training share it).

As the reference runtime does (``m2d/runtime_audio.py``, ``encode_lms``), a clip is encoded as non-overlapping
chunks of the encoder's trained length (``input_frames``: 608, or 1001 of which 62 whole patches = 992 frames are
encoded), never interpolated. The tail rule is the reference's: the clip is right-padded with the normalised mean
(0 after normalisation) so that the frames past the last full chunk (``T mod input_frames``) become a whole number
of patches; that last, shorter chunk is encoded with the first columns of the positional table. Each chunk encodes
its whole patches, so a full 1001-frame chunk's last 9 frames are never seen (the reference drops them too), while
a tail of even one frame is kept as one padded patch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def chunk_spans(num_frames: int, chunk_frames: int, patch_frames: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk of a clip of ``num_frames`` log-mel frames, over the patch-padded clip."""
    if num_frames < 1:
        raise ValueError(f"need at least one log-mel frame, got {num_frames}")
    padded = _padded(num_frames, chunk_frames, patch_frames)
    return [(start, min(start + chunk_frames, padded)) for start in range(0, padded, chunk_frames)]


def _padded(num_frames: int, chunk_frames: int, patch_frames: int) -> int:
    """Frames after padding the tail past the last full chunk to whole patches. A tail whose padding would outgrow
    a chunk (only when ``chunk_frames`` is not a multiple of the patch) is a full chunk: padded to its length."""
    tail = num_frames % chunk_frames
    return num_frames - tail + min(-(-tail // patch_frames) * patch_frames, chunk_frames)


def split_chunks(x: torch.Tensor, chunk_frames: int, patch_frames: int) -> list[torch.Tensor]:
    """The chunks of **normalised** log-mel ``x`` ``[..., T]`` (views of one zero-padded copy), per :func:`chunk_spans`."""
    spans = chunk_spans(x.shape[-1], chunk_frames, patch_frames)
    x = F.pad(x, (0, _padded(x.shape[-1], chunk_frames, patch_frames) - x.shape[-1]))
    return [x[..., start:stop] for start, stop in spans]


def frame_starts(num_frames: int, chunk_frames: int, patch_frames: int) -> np.ndarray:
    """First log-mel frame of every feature frame (patch column) the chunked encoder yields for ``num_frames``."""
    return np.concatenate([start + patch_frames * np.arange((stop - start) // patch_frames)
                           for start, stop in chunk_spans(num_frames, chunk_frames, patch_frames)])
