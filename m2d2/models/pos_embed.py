"""Fixed 2-D sin-cos positional embeddings (MAE layout) and their truncation for short chunks."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/2))``; returns ``[len(p), dim]``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_f: int, grid_t: int, cls_token: bool = True) -> torch.Tensor:
    """Table ``[1, (1 +) F*T, dim]`` for frequency-major tokens (index ``f*T + t``).

    As in MAE's meshgrid, the first half of the dims encodes the time (column) index and the second half
    the frequency (row) index. The CLS row, when present, is all zeros.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    t_idx = torch.arange(grid_t).repeat(grid_f)  # f-major: t varies fastest
    f_idx = torch.arange(grid_f).repeat_interleave(grid_t)
    table = torch.cat([sincos_1d(dim // 2, t_idx), sincos_1d(dim // 2, f_idx)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def truncate_time(patch_table: torch.Tensor, grid_f: int, grid_t: int, t: int) -> torch.Tensor:
    """First ``t`` time columns of each frequency row of a ``[1, F*T, D]`` table (no CLS row).

    Used for a chunk shorter than the trained length: positions keep their trained values rather than
    being interpolated, as the reference runtime does (``adjust_short``).
    """
    if t > grid_t:
        raise ValueError(f"chunk of {t} patch columns exceeds the positional table's {grid_t}")
    d = patch_table.shape[-1]
    return patch_table.reshape(1, grid_f, grid_t, d)[:, :, :t].reshape(1, grid_f * t, d)
