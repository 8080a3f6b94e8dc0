"""CLAP branch: transformer audio projector and the distributed symmetric InfoNCE loss."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from m2d2.models.config import ProjectorConfig
from m2d2.models.encoder import init_vit_weights, make_blocks


class AudioProjector(nn.Module):
    """Summarises the visible patch tokens into one CLAP vector through a zero-initialised semantic token.

    One block, one head, mlp-ratio 1, LayerNorm eps 1e-5, no positional embedding (token order is
    irrelevant, so tokens from several chunks can simply be concatenated). Keys: ``sem_token``,
    ``sem_blocks.0.*``, ``norm.*``, as in the reference ``audio_proj``.
    """

    def __init__(self, dim: int, config: ProjectorConfig):
        super().__init__()
        self.config = config
        self.dim = dim
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = make_blocks(dim, config.depth, config.num_heads, config.mlp_ratio, config.norm_eps)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh initialisation; stage 2 discards the stage-1 projector this way."""
        self.apply(init_vit_weights)
        nn.init.zeros_(self.sem_token)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.sem_blocks:
            x = block(x)
        return self.norm(x[:, 0])


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass, gradient times ``scale`` in the backward pass."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the batch dim; the backward pass sums every rank's gradient into the local slice."""
    import torch.distributed._functional_collectives as fc

    # torch >= 2.12 names it all_gather_single_autograd; 2.11 (the GPU image) all_gather_tensor_autograd.
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x.contiguous(), 0, dist.group.WORLD)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Similarities and softmax in at least float32 (bf16/fp16 features are promoted)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, gathered **with** gradients (open_clip ``gather_with_grad``).

    With ``local_loss`` each rank builds only its ``B_local x B_global`` logits, and the mean over ranks of
    the per-rank loss is the global loss; with data-parallel gradient averaging the parameter gradients then
    equal the single-process gradients whatever the world size (times ``feature_grad_scale``, see
    :class:`~m2d2.models.config.ClapConfig`). The features are L2-normalised here.
    """

    def __init__(self, local_loss: bool = True, feature_grad_scale: float = 1.0):
        super().__init__()
        self.local_loss = local_loss
        self.feature_grad_scale = feature_grad_scale

    def forward(self, audio: torch.Tensor, text: torch.Tensor, log_logit_scale: torch.Tensor) -> torch.Tensor:
        if audio.shape != text.shape:
            raise ValueError(f"audio {tuple(audio.shape)} and text {tuple(text.shape)} features differ in shape")
        audio = F.normalize(_upcast(scale_grad(audio, self.feature_grad_scale)), dim=-1)
        text = F.normalize(_upcast(scale_grad(text, self.feature_grad_scale)), dim=-1)
        scale = _upcast(log_logit_scale).exp()
        rank, world = _distributed()
        if world == 1:
            logits_audio = scale * audio @ text.T
            logits_text = logits_audio.T
            labels = torch.arange(audio.shape[0], device=audio.device)
        else:
            all_audio, all_text = gather_with_grad(audio), gather_with_grad(text)
            if self.local_loss:
                logits_audio = scale * audio @ all_text.T
                logits_text = scale * text @ all_audio.T
                labels = torch.arange(audio.shape[0], device=audio.device) + rank * audio.shape[0]
            else:
                logits_audio = scale * all_audio @ all_text.T
                logits_text = logits_audio.T
                labels = torch.arange(all_audio.shape[0], device=audio.device)
        return (F.cross_entropy(logits_audio, labels) + F.cross_entropy(logits_text, labels)) / 2
