"""ViT audio encoder over log-mel patches (frequency-major tokens, fixed 2-D sin-cos positions)."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from m2d2.models.chunks import split_chunks
from m2d2.models.config import EncoderConfig
from m2d2.models.pos_embed import sincos_2d, truncate_time


def init_vit_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear weights with zero bias, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, norm_eps: float) -> nn.ModuleList:
    """Pre-norm timm blocks with qkv bias: the key layout (``norm1``, ``attn.qkv`` ...) of the reference."""
    norm = partial(nn.LayerNorm, eps=norm_eps)
    return nn.ModuleList(
        Block(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
    )


class PatchEmbed(nn.Module):
    """Conv patchify of ``[B, 1, F, T]`` into frequency-major tokens ``[B, (F/pf)*(T/pt), D]``."""

    def __init__(self, patch_size: tuple[int, int], embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(embed_dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AudioEncoder(nn.Module):
    """The M2D ViT encoder; its state-dict keys match the reference encoder (``blocks.N.attn.qkv`` ...).

    Inputs are *normalised* log-mel ``[B, n_mels, T]``; normalisation lives in :class:`M2D2`.
    The CLS token is kept in the sequence (as in the reference) but features come from patch tokens.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.grid = config.grid
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        # Fixed table, persistent so that a checkpoint's (possibly resampled) table is what gets used.
        self.register_buffer("pos_embed", sincos_2d(config.embed_dim, *self.grid), persistent=True)
        self.blocks = make_blocks(config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.norm_eps)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.blocks.apply(init_vit_weights)
        self.norm.apply(init_vit_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def patch_frames(self) -> int:
        return self.config.patch_size[1]

    @property
    def chunk_frames(self) -> int:
        """Frames one inference chunk spans: the trained crop length (608, or 1001 of which 992 are encoded)."""
        return self.config.input_frames

    def embed(self, lms: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions added, ``[B, F*t, D]``; ``t`` = whole patch columns in ``lms``.

        Inputs shorter than the trained length use the first ``t`` columns of the positional table.
        """
        if lms.ndim != 3 or lms.shape[1] != self.config.n_mels:
            raise ValueError(f"expected log-mel [B, {self.config.n_mels}, T], got {tuple(lms.shape)}")
        t = lms.shape[-1] // self.patch_frames
        if t == 0 or t > self.grid[1]:
            raise ValueError(f"log-mel of {lms.shape[-1]} frames: the encoder takes {self.patch_frames} to "
                             f"{self.chunk_frames}")
        x = self.patch_embed(lms[:, None, :, : t * self.patch_frames])
        # Positions in the activations' dtype: a trainer may keep buffers fp32 while parameters are bf16.
        return x + truncate_time(self.pos_embed[:, 1:], self.grid[0], self.grid[1], t).to(x.dtype)

    def cls(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1].to(self.cls_token.dtype)).expand(batch, -1, -1)

    def forward_tokens(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer over CLS + the kept tokens; returns ``[B, 1 + N_keep, D]`` after the final norm."""
        if ids_keep is not None:
            tokens = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([self.cls(tokens.shape[0]), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, lms: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_tokens(self.embed(lms), ids_keep)

    def encode_chunks(self, lms: torch.Tensor) -> list[torch.Tensor]:
        """Encode any length by non-overlapping chunks of the trained length (no interpolation), as the reference.

        The chunks are those of :mod:`m2d2.models.chunks` (patch-padded with 0, the normalised mean); each chunk
        encodes its whole patches (a 1001-frame chunk: 62 columns, its last 9 frames unused, so 10 s gives 62
        frames) and the last, shorter chunk uses truncated positions.
        Returns patch tokens ``[B, F*t_i, D]`` per chunk, CLS dropped.
        """
        return [self.forward(chunk)[:, 1:] for chunk in split_chunks(lms, self.chunk_frames, self.patch_frames)]

    def tokens_to_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, F*t, D]`` frequency-major tokens -> ``[B, t, F*D]`` frame features (paper eq. 2)."""
        b, n, d = tokens.shape
        f = self.grid[0]
        return tokens.reshape(b, f, n // f, d).permute(0, 2, 1, 3).reshape(b, n // f, f * d)
