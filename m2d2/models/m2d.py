"""M2D masked-modelling branch: predictor, EMA target network and the norm-MSE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m2d2.models.config import EncoderConfig, PredictorConfig
from m2d2.models.encoder import init_vit_weights, make_blocks
from m2d2.models.masking import PatchMask
from m2d2.models.pos_embed import sincos_2d, truncate_time


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class Predictor(nn.Module):
    """Predicts the target features of the masked patches from CLS + visible encoder outputs.

    Mask tokens fill the masked slots, tokens are put back in patch order, a fixed sin-cos table of the
    predictor's width is added, and the outputs at the masked positions are returned in ``ids_masked`` order.
    """

    def __init__(self, encoder: EncoderConfig, config: PredictorConfig):
        super().__init__()
        self.grid = grid = encoder.grid
        self.embed = nn.Linear(encoder.embed_dim, config.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.register_buffer("pos_embed", sincos_2d(config.embed_dim, *grid), persistent=True)
        self.blocks = make_blocks(config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.norm_eps)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.pred = nn.Linear(config.embed_dim, encoder.embed_dim)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, mask: PatchMask) -> torch.Tensor:
        x = self.embed(visible)
        b, n_masked = x.shape[0], mask.ids_masked.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n_masked, -1)], dim=1)
        patches = _gather_tokens(patches, mask.ids_restore)
        t = patches.shape[1] // self.grid[0]
        pos = torch.cat([self.pos_embed[:, :1], truncate_time(self.pos_embed[:, 1:], *self.grid, t)], dim=1)
        x = torch.cat([x[:, :1], patches], dim=1) + pos.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.pred(self.norm(x))
        return _gather_tokens(x[:, 1:], mask.ids_masked)


class TargetEncoder(nn.Module):
    """EMA copy of the encoder's transformer blocks and final norm only.

    Patch embedding, CLS and positions are shared with the online encoder; the target is initialised
    independently (not a copy) and never receives gradients.
    """

    def __init__(self, encoder: EncoderConfig):
        super().__init__()
        self.blocks = make_blocks(encoder.embed_dim, encoder.depth, encoder.num_heads, encoder.mlp_ratio, encoder.norm_eps)
        self.norm = nn.LayerNorm(encoder.embed_dim, eps=encoder.norm_eps)
        self.apply(init_vit_weights)
        self.requires_grad_(False)

    def forward(self, tokens_with_cls: torch.Tensor) -> torch.Tensor:
        """Computes in the input's dtype; an fp32 target under bf16 training runs under autocast."""
        x = tokens_with_cls
        weight_dtype = self.norm.weight.dtype
        with torch.autocast(x.device.type, dtype=x.dtype, enabled=x.dtype != weight_dtype):
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    @torch.no_grad()
    def ema_update(self, online_blocks: nn.ModuleList, online_norm: nn.LayerNorm, decay: float) -> None:
        """``theta_t <- decay * theta_t + (1 - decay) * theta_o`` over parameters (the blocks hold no buffers).

        Keep the target in fp32 (:meth:`M2D2.keep_ema_target_fp32`): with ``1 - decay`` of 5e-5 to 1e-5 the update
        is far below bf16's resolution (2^-8 relative), so a bf16 target would never move.
        """
        online = [*online_blocks.parameters(), *online_norm.parameters()]
        target = [*self.blocks.parameters(), *self.norm.parameters()]
        online = [p.detach().to(t.dtype) for p, t in zip(online, target, strict=True)]  # no copy when dtypes agree
        torch._foreach_lerp_(target, online, 1.0 - decay)


def ema_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Linear schedule over global optimiser steps: ``start`` at step 0, ``end`` at step ``total_steps - 1``."""
    if total_steps <= 1:
        return end
    frac = min(max(step, 0), total_steps - 1) / (total_steps - 1)
    return start + (end - start) * frac


def norm_mse_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over all masked tokens of ``2 - 2 cos(pred, standardised target)``.

    The target is standardised per token with the unbiased variance; the prediction is only L2-normalised.
    """
    target = (target - target.mean(dim=-1, keepdim=True)) / torch.sqrt(target.var(dim=-1, keepdim=True) + eps)
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)
    return (2 - 2 * cos).mean()
