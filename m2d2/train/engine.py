"""The one training loop: DeepSpeed around a stage's module, the same code on CPU and GPU, for every stage.

Every stage plugs in an :class:`~m2d2.train.objectives.Objective` (module, optimiser, step, hooks, export), a
dataset and an epoch order; the loop does the schedule, batching by rank, NaN handling, checkpoints and
resume, logging on rank 0, and the export.
"""

from __future__ import annotations

import inspect
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
from torch import nn

from m2d2.data.loader import CropLoader, EpochOrder
from m2d2.train.checkpoint import CheckpointManager
from m2d2.train.config import TrainStageConfig
from m2d2.train.objectives import EXPORT_DIR, Objective

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 75
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


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up from 0, then a half-cycle cosine to ``floor`` (set every step, as MAE does)."""
    if step < warmup_steps:
        return peak * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def deepspeed_config(cfg: TrainStageConfig, world: int, device: torch.device) -> dict[str, Any]:
    schedule, topology = cfg.schedule, cfg.topology
    if schedule.global_batch % world:
        raise ValueError(f"global batch {schedule.global_batch} is not divisible by the world size {world}")
    bf16 = topology.precision == "bf16" or (topology.precision == "auto" and device.type == "cuda")
    return {
        "train_batch_size": schedule.global_batch,
        "train_micro_batch_size_per_gpu": schedule.global_batch // world // schedule.accum_steps,
        "gradient_accumulation_steps": schedule.accum_steps,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,  # DeepSpeed: 0 = no clipping
        "zero_optimization": {"stage": topology.zero_stage},
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


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def use_compile(cfg: TrainStageConfig, device: torch.device) -> bool:
    """``topology.compile``: ``auto`` compiles on GPU only (on CPU, inductor's C++ build costs more than it saves)."""
    mode = cfg.topology.compile
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile={mode!r}: choose 'auto', 'on' or 'off'")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_blocks(module: nn.Module) -> int:
    """Compile every transformer block on its own (torchtitan's regional compilation); returns how many.

    Blocks are where the time goes and they fuse well (LayerNorm, GELU, residual adds, bias); compiling them one
    by one keeps the model's Python (masking, gathers, the loss) eager, compiles in seconds instead of minutes, and
    leaves state-dict keys unchanged. Instances of one class share a compiled graph per input shape.
    """
    from timm.models.vision_transformer import Block

    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        # Static shapes: stage 1 calls blocks at 4 sizes (encoder, target, predictor, projector), each compiled once;
        # automatic dynamic shapes would turn the second size into one slower symbolic-shape graph for all.
        block.compile(dynamic=False)
    return len(blocks)


def skips_nonfinite_steps(optimizer) -> bool:
    """Whether DeepSpeed's optimiser wrapper checks the gradients for inf/NaN and skips such a step by itself (its
    low-precision wrappers do, with one host sync); then the loss need not be checked too (a second sync).
    ZeRO's wrapper checks only in some configurations, and a plain torch optimiser never does."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(optimizer, (BF16_Optimizer, FP16_Optimizer, FP16_UnfusedOptimizer))


def master_weights(optimizer, module: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, its fp32 master)`` for every trainable parameter DeepSpeed trains in lower precision; empty when
    the parameters are the masters (fp32 training). A collective under ZeRO: call it on every rank."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param
    from torch._utils import _unflatten_dense_tensors

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        return [pair for lp, hp in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
                for pair in zip(lp, hp, strict=True)]
    if isinstance(optimizer, FP16_Optimizer):
        return [pair for lp, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat, strict=True)
                for pair in zip(lp, _unflatten_dense_tensors(flat, lp), strict=True)]
    pairs = []
    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            master = safe_get_full_fp32_param(param)  # ZeRO 1/2 and DeepSpeed's bf16 optimiser
            if master is None:
                raise RuntimeError(f"no fp32 master for a {param.dtype} parameter under {type(optimizer).__name__}")
            pairs.append((param, master))
    return pairs


class Trainer:
    """DeepSpeed around an objective's module on this rank's device: what one optimiser step is.

    The training loop (:func:`train`) and the throughput benchmark (``benchmarks/stage1_throughput.py``) both step
    through :meth:`step`, so the benchmark measures the engine as configured.
    """

    def __init__(self, cfg: TrainStageConfig, objective: Objective, total_steps: int, warmup_steps: int):
        import deepspeed

        self.cfg, self.objective = cfg, objective
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.rank, self.world = init_distributed(cfg.topology.timeout_minutes)
        self.device = device_for_rank()
        batch, accum = cfg.schedule.global_batch, cfg.schedule.accum_steps
        if batch % self.world or (batch // self.world) % accum:
            raise ValueError(f"global batch {batch} must split into {self.world} ranks x {accum} equal micro-batches")
        if cfg.topology.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage {cfg.topology.zero_stage} is not supported (0, 1 or 2: stage 3 shards the "
                             "weights, which the checkpoints and exports here assume whole)")
        self.local_batch = batch // self.world
        self.model = objective.module.to(self.device)
        self.compiled_blocks = compile_blocks(self.model) if use_compile(cfg, self.device) else 0
        optimizer = objective.build_optimizer(cfg, self.device)
        ds_config = deepspeed_config(cfg, self.world, self.device)
        # DeepSpeed casts frozen parameters to bf16 too, and they have no fp32 master: keep their values (e.g. stage
        # 2's frozen encoder) so that load_master_weights can export them unrounded.
        self._frozen = {id(p): p.detach().to("cpu", copy=True) for p in self.model.parameters()
                        if not p.requires_grad and p.dtype == torch.float32} if ds_config["bf16"]["enabled"] else {}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=ds_config)
        objective.on_engine_ready(self.engine)
        self.check_loss = not skips_nonfinite_steps(self.optimizer)
        self.engine.train()

    def step(self, step: int, lms: torch.Tensor, target: Any) -> dict[str, Any] | None:
        """Optimiser step number ``step`` on this rank's batch; its outputs (device tensors, so nothing waits for
        the device) and hook values, or None when the step was skipped for a non-finite loss or gradient."""
        lr = lr_at(step, self.total_steps, self.warmup_steps, self.cfg.lr, self.cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lms = lms.to(self.device, non_blocking=True)
        if isinstance(target, torch.Tensor):
            target = target.to(self.device, non_blocking=True)
        gen = step_generator(self.cfg.seed, step, self.rank, self.device)
        out = self.objective.train_step(self.engine, (lms, target), gen, self.cfg.schedule.accum_steps,
                                        check_finite=self.check_loss)
        if out is None or not self.engine.was_step_applied():
            return None
        return {**out, **self.objective.after_step(step, self.total_steps), "lr": lr}

    @torch.no_grad()
    def load_master_weights(self) -> int:
        """Make the module fp32 and give every trained parameter its fp32 master value: what a stage exports (and
        the next stage starts from) is the optimiser's full-precision model, not its bf16 rounding. Call on every
        rank, after the last step; returns how many parameters took a master value."""
        pairs = master_weights(self.optimizer, self.model)
        rounded = [p for p in self.model.parameters() if id(p) in self._frozen and p.dtype != torch.float32]
        if pairs or any(p.dtype != torch.float32 for p in self.model.parameters()):
            self.model.float()
        for param, master in pairs:
            param.copy_(master.view_as(param))
        for param in rounded:  # frozen, never updated: their values from before the cast
            param.copy_(self._frozen[id(param)])
        return len(pairs)


def train(
    cfg: TrainStageConfig,
    objective: Objective,
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    run=None,
    checkpoint_root: str | None = None,
    order: EpochOrder | None = None,
    name: str | None = None,
) -> TrainResult:
    """Run ``cfg`` on every rank, resuming from the newest complete checkpoint under ``checkpoint_root``.

    ``name`` is the pipeline stage this is, for logs and the progress bar (``stage2-as``); default ``cfg.stage``.

    ``order`` gives each epoch's global clip order (default: every clip once, shuffled); the loop cuts it into
    global batches and gives rank ``r`` every ``world``-th clip, so a global batch is the same clips whatever
    the world size. Rank 0 exports through ``objective.export``. ``run`` is an :class:`m2d2.tracking.StageRun`
    (a no-op off rank 0) or None. Collective and storage failures surface as :class:`RecoverableTrainingError`.
    """
    name = name or cfg.stage
    try:
        return _train(cfg, objective, dataset, Path(out_dir), run, checkpoint_root, order, name)
    except (TrainingDivergedError, ValueError, KeyError, TypeError, FileNotFoundError):  # retrying cannot help
        raise
    except (dist.DistError, OSError, TimeoutError) as exc:
        raise RecoverableTrainingError(f"{name}: {type(exc).__name__}: {exc}") from exc


def _train(cfg: TrainStageConfig, objective: Objective, dataset, out_dir: Path, run, checkpoint_root: str | None,
           order: EpochOrder | None, name: str) -> TrainResult:
    from tqdm import tqdm

    schedule, topology = cfg.schedule, cfg.topology
    rank, world = init_distributed(topology.timeout_minutes)
    loader = CropLoader(dataset, schedule.global_batch, order, rank, world,
                        num_workers=cfg.data.num_workers, seed=cfg.seed, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=cfg.data.prefetch_factor)
    steps_per_epoch = loader.steps_per_epoch
    total = schedule.epochs * steps_per_epoch if schedule.max_steps is None else schedule.max_steps
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    trainer = Trainer(cfg, objective, total, warmup)
    model, optimizer, engine, device = trainer.model, trainer.optimizer, trainer.engine, trainer.device
    manager = CheckpointManager(checkpoint_root or str(out_dir / CHECKPOINT_DIR), keep_last=cfg.checkpoint.keep,
                                safe_globals=optimizer_safe_globals())
    state = TrainState()
    if rank == 0:
        manager.sweep()  # incomplete directories a killed save or prune left behind
    if (latest := manager.latest_verified()) is not None:
        ckpt = manager.load(latest, rank=rank, world_size=world)
        model.load_state_dict(ckpt.model)
        _load_optimizer(optimizer, ckpt.rank_state["optimizer"], manager, latest, rank, world)
        _set_rng_state(ckpt.rank_state["rng"], device)
        state = TrainState(**ckpt.meta["train_state"])
        log.info("%s: resumed from %s at step %d", name, manager.step_uri(latest), state.step)
    if run is not None:
        run.log_params({"train": asdict(cfg), "derived": {"lr": cfg.lr, "total_steps": total, "world_size": world,
                                                          "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup,
                                                          "micro_batch": trainer.local_batch // schedule.accum_steps,
                                                          "clips_per_epoch": len(loader.order),
                                                          "compiled_blocks": trainer.compiled_blocks}})
        if state.step:
            run.set_tags({"m2d2.resumed_from_step": state.step})
    requested = topology.nnodes * topology.nproc_per_node
    if requested != world:
        log.warning("%s: the config asks for %d x %d processes but %d are running; the global batch (%d) and the "
                    "schedule are unchanged", name, topology.nnodes, topology.nproc_per_node, world,
                    schedule.global_batch)
    log.info("%s: %d steps (%d per epoch), world %d, lr %.3g, %d blocks compiled", name, total, steps_per_epoch,
             world, cfg.lr, trainer.compiled_blocks)

    def save(step: int) -> None:
        meta = {"train_state": asdict(state), "train_config": asdict(cfg)}
        if hasattr(objective.module, "config") and hasattr(objective.module.config, "to_dict"):
            meta["model_config"] = objective.module.config.to_dict()
        rank_state = {"optimizer": optimizer.state_dict(), "rng": _rng_state(device)}
        manager.save(step, model.state_dict() if rank == 0 else None, rank_state, meta, rank, world)

    # Fault injection for resume tests and drills: the process dies right after finishing this step.
    fault_at = int(os.environ["M2D2_FAULT_AT_STEP"]) if os.environ.get("M2D2_FAULT_AT_STEP") else None
    progress = tqdm(total=total, initial=state.step, desc=name, unit="step", disable=rank != 0, leave=False)
    last: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    loader.load_state_dict(dict(zip(("epoch", "batch"), divmod(state.step, steps_per_epoch), strict=True)))
    while state.step < total:
        for lms, target in loader:  # one epoch from the loader's position; the next pass starts the next epoch
            if state.step >= total:
                break
            epoch = state.step // steps_per_epoch
            out = trainer.step(state.step, lms, target)
            if out is None:
                state.skipped_steps += 1
                state.consecutive_nonfinite += 1
                log.warning("%s: non-finite loss or gradient at step %d, step skipped (%d in a row)", name,
                            state.step, state.consecutive_nonfinite)
                if state.consecutive_nonfinite >= cfg.checkpoint.max_nonfinite:
                    raise TrainingDivergedError(f"{name}: {state.consecutive_nonfinite} consecutive non-finite "
                                                f"losses up to step {state.step}; lower the lr or check the data")
            else:
                state.consecutive_nonfinite = 0
            state.step += 1
            window_samples += schedule.global_batch
            progress.update(1)
            if out is not None and (state.step % cfg.log_every == 0 or state.step == total):
                # The only place step outputs are read back from the device.
                elapsed = time.perf_counter() - window_start
                last = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in out.items()}
                last.update({"epoch": epoch, "samples_per_s": window_samples / max(elapsed, 1e-9),
                             "skipped_steps": state.skipped_steps, "memory_mb": _memory_mb(device)})
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    last["grad_norm"] = float(grad_norm)
                if run is not None:
                    run.log_metrics(last, step=state.step)
                progress.set_postfix(loss=f"{last['loss']:.4f}")
                window_start, window_samples = time.perf_counter(), 0
            every = cfg.checkpoint.every
            if every is not None and state.step % every == 0 and state.step < total:
                save(state.step)
            if fault_at is not None and state.step == fault_at:
                log.error("%s: M2D2_FAULT_AT_STEP=%d: simulating a crash", name, fault_at)
                os._exit(FAULT_EXIT_CODE)  # no cleanup, no flush: what a killed pod looks like
    progress.close()
    if manager.latest() != state.step:
        save(state.step)
    trainer.load_master_weights()
    export_dir = str(out_dir / EXPORT_DIR)
    if rank == 0:
        export_dir = objective.export(out_dir)
    dist.barrier()
    return TrainResult(steps=state.step, export_dir=export_dir, checkpoint_dir=manager.step_uri(state.step),
                       final=last)


def _load_optimizer(optimizer, own: dict[str, Any], manager: CheckpointManager, step: int, rank: int,
                    world: int) -> None:
    """A plain torch optimizer takes its own state; DeepSpeed's wrappers (ZeRO 1/2, bf16) take every rank's
    list and rebuild their fp32 master partitions from the saved fp32 copies, not from the bf16 weights."""
    if "state_dict_list" not in inspect.signature(optimizer.load_state_dict).parameters:
        optimizer.load_state_dict(own)
        return
    states = [own if r == rank else manager.load_rank_state(step, r)["optimizer"] for r in range(world)]
    optimizer.load_state_dict(states, load_from_fp32_weights=True)


def optimizer_safe_globals() -> list:
    """Plain classes a DeepSpeed ZeRO optimizer state holds besides tensors, allow-listed for ``weights_only``."""
    allowed: list = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # another DeepSpeed layout: loading reports any class it meets
        pass
    return allowed
