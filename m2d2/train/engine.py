"""The one training loop: DeepSpeed around an :class:`~m2d2.models.M2D2`, the same code on CPU and GPU.

Every stage plugs in a model (already switched to its stage) and a dataset; the loop does the schedule,
the step, the post-step hooks (EMA, logit-scale clamp), logging on rank 0, and the exports.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from m2d2.data.loader import CropDataset, collate
from m2d2.io import atomic_write_bytes
from m2d2.models import M2D2
from m2d2.train.config import TrainStageConfig

log = logging.getLogger(__name__)

EXPORT_DIR = "model"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainResult:
    """What a stage hands to the next one (all paths local to the rank-0 process)."""

    steps: int
    export_dir: str
    checkpoint_dir: str
    final: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Join (or, for a plain single process, create) the process group; returns ``(rank, world_size)``.

    Under torchrun / a Flyte Elastic task the launcher has set RANK, WORLD_SIZE, MASTER_ADDR... A plain
    ``python`` call gets single-process defaults, since DeepSpeed would otherwise try MPI discovery.
    """
    if not dist.is_initialized():
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for key, value in defaults.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo" and os.environ.get("M2D2_DS_SHM_COMM", "0") != "1":
            # DeepSpeed would JIT-compile its shared-memory all-reduce with g++ on the first CPU run (30 s idle,
            # minutes on a loaded 2-core box); gloo's all-reduce is what the CPU path needs. Opt in with
            # M2D2_DS_SHM_COMM=1. DeepSpeed keeps this probe dict in its module precisely so it can be edited.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return dist.get_rank(), dist.get_world_size()


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def parameter_groups(model: M2D2, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and conv kernels; not biases, norms, tokens' 1-D params or the 0-dim logit scale.

    This is the modern timm grouping (ndim <= 1 excluded). The reference's pinned timm 0.4.5 also decayed the
    0-dim ``logit_scale`` and kept ``cls_token``/``mask_token`` decayed; here tokens (3-D) are decayed as there,
    and the logit scale is not, which the clamp at ln 100 makes immaterial in practice.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to ``floor`` (set every step, as MAE does)."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: TrainStageConfig, world: int, device: torch.device) -> dict[str, Any]:
    if cfg.global_batch % world:
        raise ValueError(f"global batch {cfg.global_batch} is not divisible by the world size {world}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.global_batch // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def train(
    cfg: TrainStageConfig,
    model: M2D2,
    dataset: CropDataset,
    out_dir: str | Path,
    run=None,
) -> TrainResult:
    """Run ``cfg`` on every rank; rank 0 exports ``<out_dir>/model`` and ``<out_dir>/checkpoint``.

    ``run`` is an :class:`m2d2.tracking.StageRun` (a no-op off rank 0) or None.
    """
    import deepspeed

    rank, world = init_distributed(cfg.timeout_minutes)
    device = device_for_rank()
    out_dir = Path(out_dir)
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    micro = cfg.global_batch // world
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=sampler, drop_last=True,
                                         collate_fn=collate, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training clips cannot fill one global batch of {cfg.global_batch}")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, config=deepspeed_config(cfg, world, device)
    )
    if run is not None:
        run.log_params({"train": asdict(cfg), "derived": {"lr": cfg.lr, "total_steps": total, "world_size": world,
                                                          "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup}})
    log.info("%s: %d steps (%d per epoch), world %d, lr %.3g", cfg.stage, total, steps_per_epoch, world, cfg.lr)
    step, window_start, window_samples, last = 0, time.perf_counter(), 0, {}
    engine.train()
    from tqdm import tqdm

    progress = tqdm(total=total, desc=cfg.stage, unit="step", disable=rank != 0, leave=False)
    epoch = 0
    while step < total:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for lms, text in loader:
            if step >= total:
                break
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lms = lms.to(device, non_blocking=True)
            if isinstance(text, torch.Tensor):
                text = text.to(device, non_blocking=True)
            kwargs = {"mask_ratio": cfg.mask_ratio} if cfg.stage == "stage2" and cfg.mask_ratio >= 0 else {}
            out = engine(lms, text, **kwargs)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{cfg.stage}: non-finite loss {loss.item()} at step {step}")
            engine.backward(loss)
            engine.step()
            hooks = model.after_optimizer_step(step, total)
            step += 1
            window_samples += cfg.global_batch
            progress.update(1)
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                last = {k: float(v.detach()) for k, v in out.items()}
                last.update(hooks)
                grad_norm = engine.get_global_grad_norm()
                last.update({"lr": lr, "epoch": epoch, "samples_per_s": window_samples / max(elapsed, 1e-9)})
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if run is not None:
                    run.log_metrics(last, step=step)
                progress.set_postfix(loss=f"{last['loss']:.4f}")
                window_start, window_samples = time.perf_counter(), 0
        epoch += 1
    progress.close()
    export_dir, checkpoint_dir = out_dir / EXPORT_DIR, out_dir / CHECKPOINT_DIR
    if rank == 0:
        model.save_pretrained(str(export_dir))
        save_training_checkpoint(model, optimizer, checkpoint_dir, step=step, epoch=epoch, config=asdict(cfg))
    dist.barrier()
    return TrainResult(steps=step, export_dir=str(export_dir), checkpoint_dir=str(checkpoint_dir), final=last)


def save_training_checkpoint(model: M2D2, optimizer, directory: Path, step: int, epoch: int,
                             config: dict[str, Any]) -> None:
    """Full model state (target and predictor included) + optimizer + position; ``state.json`` written last.

    Loadable without unpickling code objects: weights are safetensors, the optimizer state is a tensor-only
    dict read back with ``torch.load(weights_only=True)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    tmp = directory / ".optimizer.pt.tmp"
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, directory / "optimizer.pt")
    meta = {"step": step, "epoch": epoch, "train_config": config, "model_config": model.config.to_dict(),
            "rng": {"torch": torch.get_rng_state().tolist()}}
    atomic_write_bytes(directory / "state.json", json.dumps(meta).encode())
