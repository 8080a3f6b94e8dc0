"""The one training loop: DeepSpeed around an :class:`~m2d2.models.M2D2`, the same code on CPU and GPU.

Every stage plugs in a model (already switched to its stage) and a dataset; the loop does the schedule,
the step, the post-step hooks (EMA, logit-scale clamp), logging on rank 0, and the exports.
"""

from __future__ import annotations

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

from m2d2.data.loader import CropDataset, collate
from m2d2.models import M2D2, PatchMask
from m2d2.train.checkpoint import CheckpointManager
from m2d2.train.config import TrainStageConfig

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 75
EXPORT_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


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
        "train_micro_batch_size_per_gpu": cfg.global_batch // world // cfg.accum_steps,
        "gradient_accumulation_steps": cfg.accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite losses: retrying would not help."""


class RecoverableTrainingError(RuntimeError):
    """A failure worth retrying from the last checkpoint (lost rank, collective timeout, storage hiccup).

    The Flyte task turns it into ``FlyteRecoverableException`` (the library never imports flytekit).
    """


@dataclass
class TrainState:
    """Where a run is; stored in every checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Masks of a step depend on (seed, step, rank) only: re-forwards, micro-batch splits and resumed runs agree."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return gen


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _micro_batches(lms: torch.Tensor, text, mask: PatchMask, accum: int):
    size = lms.shape[0] // accum
    for k in range(accum):
        part = slice(k * size, (k + 1) * size)
        yield lms[part], text[part], PatchMask(mask.ids_keep[part], mask.ids_masked[part])


def _all_finite(loss: torch.Tensor) -> bool:
    """Agree across ranks, so that every rank skips (or takes) the same steps."""
    flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0], device=loss.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(engine, model: M2D2, lms: torch.Tensor, text, mask: PatchMask,
               accum: int) -> dict[str, torch.Tensor] | None:
    """One optimiser step over the local batch in ``accum`` micro-batches; None if the loss was not finite.

    With ``accum > 1`` the CLAP negatives still span the whole batch (open_clip's scheme): features of every
    micro-batch are first computed without gradient, then each micro-batch is re-forwarded with gradient and
    its loss taken against all cached features. Its M2D term is weighted 1/accum and the logit scale gets its
    gradient from one micro-batch only, so the summed gradient equals the unaccumulated step's.
    """
    if accum == 1:
        parts = model.forward_features(lms, text, mask)
        out = model.losses(parts, parts["audio"], parts["text"])
        if not _all_finite(out["loss"]):
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
    if not _all_finite(full["loss"]):
        return None
    for k, batch in enumerate(micro):
        live = model.forward_features(*batch)
        all_audio = torch.cat([live["audio"] if j == k else a for j, a in enumerate(audio)])
        all_text = torch.cat([live["text"] if j == k else t for j, t in enumerate(texts)])
        out = model.losses(live, all_audio, all_text, m2d_weight=1.0 / accum, logit_scale_grad=k == 0)
        engine.backward(out["loss"], scale_wrt_gas=False)
        engine.step()
    return full


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(
    cfg: TrainStageConfig,
    model: M2D2,
    dataset: CropDataset,
    out_dir: str | Path,
    run=None,
    checkpoint_root: str | None = None,
) -> TrainResult:
    """Run ``cfg`` on every rank, resuming from the newest complete checkpoint under ``checkpoint_root``.

    Rank 0 exports ``<out_dir>/model`` (safetensors + config). ``run`` is an :class:`m2d2.tracking.StageRun`
    (a no-op off rank 0) or None. Collective and storage failures surface as :class:`RecoverableTrainingError`.
    """
    try:
        return _train(cfg, model, dataset, Path(out_dir), run, checkpoint_root)
    except (TrainingDivergedError, ValueError, KeyError, TypeError, FileNotFoundError):  # retrying cannot help
        raise
    except (dist.DistError, OSError, TimeoutError) as exc:
        raise RecoverableTrainingError(f"{cfg.stage}: {type(exc).__name__}: {exc}") from exc


def _train(cfg: TrainStageConfig, model: M2D2, dataset: CropDataset, out_dir: Path, run,
           checkpoint_root: str | None) -> TrainResult:
    import deepspeed
    from tqdm import tqdm

    rank, world = init_distributed(cfg.timeout_minutes)
    device = device_for_rank()
    local_batch = cfg.global_batch // world
    if cfg.global_batch % world or local_batch % cfg.accum_steps:
        raise ValueError(f"global batch {cfg.global_batch} must split into {world} ranks x {cfg.accum_steps} "
                         "equal micro-batches")
    sampler = torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training clips cannot fill one global batch of {cfg.global_batch}")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, config=deepspeed_config(cfg, world, device)
    )
    manager = CheckpointManager(checkpoint_root or str(out_dir / CHECKPOINT_DIR), keep_last=cfg.keep_checkpoints)
    state = TrainState()
    if (latest := manager.latest()) is not None:
        ckpt = manager.load(latest, rank=rank, world_size=world)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.rank_state["optimizer"])
        _set_rng_state(ckpt.rank_state["rng"], device)
        state = TrainState(**ckpt.meta["train_state"])
        log.info("%s: resumed from %s at step %d", cfg.stage, manager.step_uri(latest), state.step)
    if run is not None:
        run.log_params({"train": asdict(cfg), "derived": {"lr": cfg.lr, "total_steps": total, "world_size": world,
                                                          "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
                                                          "micro_batch": local_batch // cfg.accum_steps}})
        if state.step:
            run.set_tags({"m2d2.resumed_from_step": state.step})
    log.info("%s: %d steps (%d per epoch), world %d, lr %.3g", cfg.stage, total, steps_per_epoch, world, cfg.lr)

    def save(step: int) -> None:
        meta = {"train_state": asdict(state), "train_config": asdict(cfg), "model_config": model.config.to_dict()}
        rank_state = {"optimizer": optimizer.state_dict(), "rng": _rng_state(device)}
        manager.save(step, model.state_dict() if rank == 0 else None, rank_state, meta, rank, world)

    # Fault injection for resume tests and drills: the process dies right after finishing this step.
    fault_at = int(os.environ["M2D2_FAULT_AT_STEP"]) if os.environ.get("M2D2_FAULT_AT_STEP") else None
    engine.train()
    progress = tqdm(total=total, initial=state.step, desc=cfg.stage, unit="step", disable=rank != 0, leave=False)
    last: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    kwargs = {"mask_ratio": cfg.mask_ratio} if cfg.mask_ratio >= 0 else {}
    while state.step < total:
        epoch, first_batch = divmod(state.step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[b * local_batch:(b + 1) * local_batch] for b in range(first_batch, steps_per_epoch)]
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would make
        # a resumed run's dropout masks (stage 2's text encoder) differ from an uninterrupted run's.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        for lms, text in loader:
            if state.step >= total:
                break
            lr = lr_at(state.step, total, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lms = lms.to(device, non_blocking=True)
            if isinstance(text, torch.Tensor):
                text = text.to(device, non_blocking=True)
            gen = step_generator(cfg.seed, state.step, rank, device)
            mask = model.make_mask(lms.shape[0], lms.shape[-1], generator=gen, **kwargs)
            out = train_step(engine, model, lms, text, mask, cfg.accum_steps)
            if out is None:
                state.skipped_steps += 1
                state.consecutive_nonfinite += 1
                log.warning("%s: non-finite loss at step %d, step skipped (%d in a row)", cfg.stage, state.step,
                            state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= cfg.max_nonfinite:
                    raise TrainingDivergedError(f"{cfg.stage}: {state.consecutive_nonfinite} consecutive non-finite "
                                                f"losses up to step {state.step}; lower the lr or check the data")
            else:
                state.consecutive_nonfinite = 0
            hooks = model.after_optimizer_step(state.step, total) if out is not None else {}
            state.step += 1
            window_samples += cfg.global_batch
            progress.update(1)
            if out is not None and (state.step % cfg.log_every == 0 or state.step == total):
                elapsed = time.perf_counter() - window_start
                last = {k: float(v.detach()) for k, v in out.items()}
                last.update(hooks)
                last.update({"lr": lr, "epoch": epoch, "samples_per_s": window_samples / max(elapsed, 1e-9),
                             "skipped_steps": state.skipped_steps, "memory_mb": _memory_mb(device)})
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if run is not None:
                    run.log_metrics(last, step=state.step)
                progress.set_postfix(loss=f"{last['loss']:.4f}")
                window_start, window_samples = time.perf_counter(), 0
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < total:
                save(state.step)
            if fault_at is not None and state.step == fault_at:
                log.error("%s: M2D2_FAULT_AT_STEP=%d: simulating a crash", cfg.stage, fault_at)
                os._exit(FAULT_EXIT_CODE)  # no cleanup, no flush: what a killed pod looks like
    progress.close()
    if manager.latest() != state.step:
        save(state.step)
    export_dir = out_dir / EXPORT_DIR
    if rank == 0:
        model.save_pretrained(str(export_dir))
    dist.barrier()
    return TrainResult(steps=state.step, export_dir=str(export_dir), checkpoint_dir=manager.step_uri(state.step),
                       final=last)
