"""Patch masking for M2D pre-training (unstructured) and CLAP stage 2 / fine-tuning (structured).

Masks are index sets over frequency-major patch positions. All randomness comes from an explicit
``torch.Generator`` (or torch's default one), never from global NumPy state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PatchMask:
    """Which patch positions an encoder sees (``ids_keep``) and which it must predict (``ids_masked``).

    Every sample keeps the same number of tokens so that a batch stays rectangular. ``ids_restore``
    maps the concatenation ``[keep, masked]`` back to the original order.
    """

    ids_keep: torch.Tensor  # [B, N_keep] long
    ids_masked: torch.Tensor  # [B, N_masked] long

    @property
    def ids_restore(self) -> torch.Tensor:
        return torch.argsort(torch.cat([self.ids_keep, self.ids_masked], dim=1), dim=1)

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    def select(self, rows: slice) -> PatchMask:
        """The mask of samples ``rows`` (a micro-batch of the step's batch)."""
        return PatchMask(self.ids_keep[rows], self.ids_masked[rows])


@dataclass
class ChunkMasks:
    """One mask per encoder chunk of a crop longer than the encoder (:mod:`m2d2.models.chunks`).

    Stage 2 on stage 1's encoder (M2D2, M2D2⁺) takes the paper's 10-s crops (1001 frames) through a 608-frame
    encoder as chunks of 608 and 393 (padded to 400) frames, as the reference's runtime encodes long audio; each
    chunk is masked on its own patch grid, as the runtime masks every chunk it encodes.
    """

    chunks: tuple[PatchMask, ...]

    def select(self, rows: slice) -> ChunkMasks:
        return ChunkMasks(tuple(mask.select(rows) for mask in self.chunks))


def no_mask(batch: int, num_patches: int, device: torch.device | None = None) -> PatchMask:
    ids = torch.arange(num_patches, device=device).expand(batch, -1)
    return PatchMask(ids_keep=ids, ids_masked=ids[:, :0])


def random_unstructured_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> PatchMask:
    """MAE-style: per sample, keep the ``int(L * (1 - ratio))`` positions with the smallest uniform noise.

    At 80x608 (190 patches) and ratio 0.7 that is 57 visible and 133 masked.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    len_keep = int(num_patches * (1 - ratio))
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device if generator is not None else device)
    ids_shuffle = torch.argsort(noise, dim=1).to(device)
    return PatchMask(ids_keep=ids_shuffle[:, :len_keep], ids_masked=ids_shuffle[:, len_keep:])


def random_structured_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> PatchMask:
    """Mask whole frequency rows and time columns ("structured patch-out"), by the reference's rule.

    The numbers of masked rows ``nf`` and columns ``nt`` are drawn once per batch (every sample must keep the same
    number of tokens); which rows and columns, per sample. As in the reference (``random_structured_mask`` of
    nttcslab/m2d): ``nf = int(F * (ratio + 1/F) * u)`` for a uniform ``u`` (at most ``F - 1``), then
    ``nt = int(T * max(ratio + 0.5/T - nf/F, 0))``. The masked fraction ``1 - (1 - nf/F)(1 - nt/T)`` therefore varies
    per batch and averages about the nominal ratio: at 5x38 and 0.3, ``nf`` is 0, 1 or 2 (p = 0.4, 0.4, 0.2) and
    masks 0.29, 0.28 or 0.40, 0.31 on average; at 0.5 it averages 0.48.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    grid_f, grid_t = grid
    gen_device = generator.device if generator is not None else device
    if ratio == 0.0:
        return no_mask(batch, grid_f * grid_t, device)
    u = float(torch.rand(1, generator=generator, device=gen_device).item())
    nf = min(grid_f - 1, int(grid_f * (ratio + 1.0 / grid_f) * u))
    nt = min(grid_t - 1, int(grid_t * max(ratio + 0.5 / grid_t - nf / grid_f, 0.0)))  # keep at least one column
    rows = torch.argsort(torch.rand(batch, grid_f, generator=generator, device=gen_device), dim=1)
    cols = torch.argsort(torch.rand(batch, grid_t, generator=generator, device=gen_device), dim=1)
    keep_rows = rows[:, nf:].sort(dim=1).values  # [B, F - nf]
    keep_cols = cols[:, nt:].sort(dim=1).values  # [B, T - nt]
    keep = (keep_rows[:, :, None] * grid_t + keep_cols[:, None, :]).reshape(batch, -1)
    is_kept = torch.zeros(batch, grid_f * grid_t, dtype=torch.bool, device=gen_device)
    is_kept.scatter_(1, keep, True)
    masked = torch.nonzero(~is_kept)[:, 1].reshape(batch, -1)
    return PatchMask(ids_keep=keep.to(device), ids_masked=masked.to(device))
