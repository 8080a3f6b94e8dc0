"""What a stage trains, as seen by the one training loop (:func:`m2d2.train.engine.train`).

The loop owns everything stage-independent: DeepSpeed, the schedule, batching by rank, NaN handling,
checkpoints, logging. An objective owns the rest: which module DeepSpeed wraps, its optimiser, how one step's
loss is made from a batch (including gradient accumulation), the per-step hooks and the export.

- :class:`ClapObjective` — stages 1, 2 and 2.1 on an :class:`~m2d2.models.M2D2`.
- :class:`FineTuneObjective` — stage 1.1, supervised multi-label fine-tuning of the encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from m2d2 import io
from m2d2.models import M2D2, ChunkMasks, PatchMask
from m2d2.models.tagger import CLASSES_FILE, CLASSIFIER_DIR, HEAD_FILE, FineTuneModel
from m2d2.train.config import TrainStageConfig
from m2d2.train.finetune import mixup_batch

EXPORT_DIR = "model"

Batch = tuple[torch.Tensor, Any]
StepOutput = dict[str, torch.Tensor]


class Objective(Protocol):
    module: nn.Module  # what DeepSpeed wraps and the checkpoints hold

    def build_optimizer(self, cfg: TrainStageConfig, device: torch.device) -> torch.optim.Optimizer: ...

    def train_step(self, engine, batch: Batch, generator: torch.Generator, accum: int,
                   check_finite: bool = True) -> StepOutput | None:
        """One optimiser step (``accum`` micro-batches); None, with nothing stepped, when the loss is not finite.

        ``check_finite=False`` when the engine's optimiser skips non-finite gradients itself (DeepSpeed's bf16
        optimiser): the loss check is a host sync, and the engine then reads the skip from ``was_step_applied``.
        """

    def on_engine_ready(self, engine) -> None:
        """Called once after ``deepspeed.initialize`` (which casts every parameter to the training dtype)."""

    def after_step(self, step: int, total_steps: int) -> dict[str, float]: ...

    def export(self, out_dir: Path) -> str:
        """Write the stage's deliverable under ``out_dir`` (rank 0 only); returns the model export's path."""


def all_finite(loss: torch.Tensor, check: bool = True) -> bool:
    """Agree across ranks, so that every rank skips (or takes) the same steps. A host sync: ``check=False``
    answers True without one (the optimiser then decides)."""
    if not check:
        return True
    flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0], device=loss.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; not biases, norms or the logit scale (timm's ``ndim <= 1`` rule).

    The reference's pinned timm 0.4.5 also decayed the 0-dim ``logit_scale``; the clamp at ln 100 makes that
    immaterial. Tokens (3-D) are decayed, as there.
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainStageConfig, module: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """``adamw`` (torch's fused kernel on GPU: nothing for DeepSpeed to compile), ``lars`` or ``sgd``.

    ``lars`` is timm's ``Lars``, the optimiser behind the reference's ``--optim lars``; with ``weight_decay=0``
    (the reference's AudioSet recipe) it applies no trust ratio and equals SGD with momentum.
    """
    optim = cfg.optim
    groups = decay_groups(module, optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(optim.beta1, optim.beta2), fused=device.type == "cuda")
    if optim.name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=cfg.lr, momentum=optim.momentum)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=optim.momentum)
    raise ValueError(f"unknown optimizer {optim.name!r}; choose 'adamw', 'lars' or 'sgd'")


# ----------------------------------------------------------------------------------------------------- CLAP
def _micro_batches(lms: torch.Tensor, text, mask: PatchMask | ChunkMasks, accum: int):
    size = lms.shape[0] // accum
    for k in range(accum):
        part = slice(k * size, (k + 1) * size)
        yield lms[part], text[part], mask.select(part)


def clap_step(engine, model: M2D2, lms: torch.Tensor, text, mask: PatchMask | ChunkMasks, accum: int,
              check_finite: bool = True) -> StepOutput | None:
    """One optimiser step of M2D + CLAP (stage 1) or CLAP alone (stages 2, 2.1) over the local batch.

    With ``accum > 1`` the CLAP negatives still span the whole batch (open_clip's scheme): features of every
    micro-batch are first computed without gradient, then each micro-batch is re-forwarded with gradient and
    its loss taken against all cached features. Its M2D term is weighted 1/accum and the logit scale gets its
    gradient from one micro-batch only, so the summed gradient equals the unaccumulated step's.
    """
    if accum == 1:
        parts = model.forward_features(lms, text, mask)
        out = model.losses(parts, parts["audio"], parts["text"])
        if not all_finite(out["loss"], check_finite):
            return None
        engine.backward(out["loss"], scale_wrt_gas=False)
        engine.step()
        return out
    micro = list(_micro_batches(lms, text, mask, accum))
    with torch.no_grad():
        cached = [model.forward_features(*m) for m in micro]
        audio, texts = [c["audio"] for c in cached], [c["text"] for c in cached]
        summary = {"loss_m2d": torch.stack([c["loss_m2d"] for c in cached]).mean()} if "loss_m2d" in cached[0] else {}
        full = model.losses(summary, torch.cat(audio), torch.cat(texts))
    if not all_finite(full["loss"], check_finite):
        return None
    for k, batch in enumerate(micro):
        live = model.forward_features(*batch)
        all_audio = torch.cat([live["audio"] if j == k else a for j, a in enumerate(audio)])
        all_text = torch.cat([live["text"] if j == k else t for j, t in enumerate(texts)])
        out = model.losses(live, all_audio, all_text, m2d_weight=1.0 / accum, logit_scale_grad=k == 0)
        engine.backward(out["loss"], scale_wrt_gas=False)
        engine.step()
    return full


class ClapObjective:
    """Stages 1, 2, 2.1: the model's own stage decides the losses; the mask comes from the step's generator."""

    def __init__(self, model: M2D2, mask_ratio: float | None = None):
        self.module = self.model = model
        self.mask_ratio = mask_ratio

    def build_optimizer(self, cfg: TrainStageConfig, device: torch.device) -> torch.optim.Optimizer:
        return build_optimizer(cfg, self.model, device)

    def train_step(self, engine, batch: Batch, generator: torch.Generator, accum: int,
                   check_finite: bool = True) -> StepOutput | None:
        lms, text = batch
        mask = self.model.make_mask(lms.shape[0], lms.shape[-1], mask_ratio=self.mask_ratio, generator=generator)
        return clap_step(engine, self.model, lms, text, mask, accum, check_finite)

    def on_engine_ready(self, engine) -> None:
        self.model.keep_ema_target_fp32()

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        return self.model.after_optimizer_step(step, total_steps)

    def export(self, out_dir: Path) -> str:
        path = str(out_dir / EXPORT_DIR)
        self.model.save_pretrained(path)
        return path


# ----------------------------------------------------------------------------------------------------- stage 1.1
class FineTuneObjective:
    """Stage 1.1: BCE on mixup'd, SpecAugment'ed, patched-out crops; the encoder is written back into ``base``.

    ``base`` is the stage-1 :class:`M2D2` whose encoder ``model`` shares (same module object), so the export is
    a complete M2D2 model with the fine-tuned encoder at the new crop length, plus ``classifier/`` (head weights
    and class names) for tagging. Mixup, SpecAugment and patch-out all draw from the step's generator.
    """

    def __init__(self, model: FineTuneModel, base: M2D2, classes: list[str], *, mixup_alpha: float,
                 patch_out: float):
        if model.encoder is not base.encoder:
            raise ValueError("the fine-tuned encoder must be the base model's encoder (it is exported through it)")
        self.module = self.model = model
        self.base = base
        self.classes = list(classes)
        self.mixup_alpha = mixup_alpha
        self.patch_out = patch_out

    def build_optimizer(self, cfg: TrainStageConfig, device: torch.device) -> torch.optim.Optimizer:
        return build_optimizer(cfg, self.model, device)

    def train_step(self, engine, batch: Batch, generator: torch.Generator, accum: int,
                   check_finite: bool = True) -> StepOutput | None:
        if accum != 1:
            # A step must be skippable as a whole when a loss is not finite, and the BatchNorm head would see
            # micro-batch statistics: the paper's batch of 64 needs no accumulation on any current GPU.
            raise ValueError("stage 1.1 does not accumulate gradients (accum_steps must be 1); "
                             "lower global_batch or add ranks")
        lms, targets = batch
        lms, targets, lam = mixup_batch(lms, targets, self.mixup_alpha, generator=generator)
        out = self.model(lms, targets, patch_out=self.patch_out, generator=generator)
        if not all_finite(out["loss"], check_finite):
            return None
        engine.backward(out["loss"], scale_wrt_gas=False)
        engine.step()
        return {"loss": out["loss"].detach(), "mixup_lam": torch.tensor(lam)}

    def on_engine_ready(self, engine) -> None:
        pass

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def export(self, out_dir: Path) -> str:
        path = str(out_dir / EXPORT_DIR)
        self.base.save_pretrained(path)
        save_classifier(self.model, self.classes, str(out_dir / CLASSIFIER_DIR))
        return path


def save_classifier(model: FineTuneModel, classes: list[str], uri: str) -> None:
    """``head.safetensors`` (Linear + BatchNorm running stats) and ``classes.json`` (written last: the marker)."""
    import tempfile

    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(state, str(Path(tmp) / HEAD_FILE), metadata={"format": "pt"})
        (Path(tmp) / CLASSES_FILE).write_text(json.dumps({"classes": classes, "activation": "sigmoid"}, indent=2))
        io.upload_dir(tmp, uri, last=CLASSES_FILE)
