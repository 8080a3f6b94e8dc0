"""Stage-1 training-step throughput: the project's engine vs a plain PyTorch reference step, same GPU, same run.

Two steps train the same model (M2D + CLAP, stage 1) from the same initial weights on the same batches and masks:

- **reference**: written out in this file in plain PyTorch — timm ``Block`` (fused SDPA), bf16 autocast over fp32
  weights, ``clip_grad_norm_``, fused AdamW, foreach EMA of the target, eager, no DeepSpeed;
- **project**: :class:`m2d2.train.engine.Trainer` as the stage-1 preset configures it — DeepSpeed (bf16 weights
  with fp32 masters), regional ``torch.compile`` of the transformer blocks, fp32 EMA target, masks drawn on the
  device, nothing read back from the device inside the step except DeepSpeed's own overflow check.

Printed and written to ``--out`` (JSON): samples/s, ms/step, GFLOP/sample (``torch.utils.flop_counter`` on the
reference step: forward + backward), achieved TFLOP/s, the fraction of a dense GEMM ceiling measured in this run
(bf16 8192^3 on GPU), peak memory, host syncs per step (GPU), the speed-up of project over reference, and the
two loss trajectories over ``--check-steps`` steps with their largest relative difference.

    python benchmarks/stage1_throughput.py                       # GPU: ViT-B 80x608, mask 0.7, batch 512
    python benchmarks/stage1_throughput.py --preset cpu-smoke    # tiny model on CPU (what CI runs)

Options: ``--batch``, ``--steps`` (timed), ``--warmup``, ``--check-steps``, ``--compile auto|on|off``,
``--zero-stage``, ``--gemm``, ``--out``. Nothing here is asserted: the figures are the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not os.environ.get("DS_ACCELERATOR"):
    import torch as _torch

    os.environ["DS_ACCELERATOR"] = "cuda" if _torch.cuda.is_available() else "cpu"

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from m2d2 import presets
from m2d2.models import M2D2, M2D2Config
from m2d2.models.masking import random_unstructured_mask
from m2d2.train.engine import Trainer, lr_at, step_generator
from m2d2.train.objectives import ClapObjective


@dataclass
class Preset:
    model: str
    batch: int
    steps: int
    warmup: int
    check_steps: int
    gemm: int
    precision: str  # of the project's step; the reference autocasts to bf16 on GPU and runs fp32 on CPU


PRESETS = {
    "gpu": Preset(model="paper", batch=512, steps=30, warmup=8, check_steps=20, gemm=8192, precision="bf16"),
    "cpu-smoke": Preset(model="smoke", batch=8, steps=3, warmup=1, check_steps=20, gemm=512, precision="fp32"),
}


# ------------------------------------------------------------------------------------------------- reference
def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, eps: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=eps)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class _ReferenceScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ReferenceM2D2(nn.Module):
    """Stage 1 written out plainly, with the project's parameter names so its initial weights load strictly."""

    def __init__(self, cfg: M2D2Config):
        super().__init__()
        e, p, pr = cfg.encoder, cfg.predictor, cfg.projector
        self.cfg = cfg
        self.grid = e.grid
        self.register_buffer("norm_stats", torch.zeros(2))
        self.encoder = nn.Module()
        self.encoder.patch_embed = nn.Module()
        self.encoder.patch_embed.proj = nn.Conv2d(1, e.embed_dim, e.patch_size, e.patch_size)
        self.encoder.cls_token = nn.Parameter(torch.zeros(1, 1, e.embed_dim))
        self.encoder.register_buffer("pos_embed", torch.zeros(1, 1 + e.grid[0] * e.grid[1], e.embed_dim))
        self.encoder.blocks = _blocks(e.embed_dim, e.depth, e.num_heads, e.mlp_ratio, e.norm_eps)
        self.encoder.norm = nn.LayerNorm(e.embed_dim, eps=e.norm_eps)
        self.predictor = nn.Module()
        self.predictor.embed = nn.Linear(e.embed_dim, p.embed_dim)
        self.predictor.mask_token = nn.Parameter(torch.zeros(1, 1, p.embed_dim))
        self.predictor.register_buffer("pos_embed", torch.zeros(1, 1 + e.grid[0] * e.grid[1], p.embed_dim))
        self.predictor.blocks = _blocks(p.embed_dim, p.depth, p.num_heads, p.mlp_ratio, p.norm_eps)
        self.predictor.norm = nn.LayerNorm(p.embed_dim, eps=p.norm_eps)
        self.predictor.pred = nn.Linear(p.embed_dim, e.embed_dim)
        self.target = nn.Module()
        self.target.blocks = _blocks(e.embed_dim, e.depth, e.num_heads, e.mlp_ratio, e.norm_eps)
        self.target.norm = nn.LayerNorm(e.embed_dim, eps=e.norm_eps)
        self.target.requires_grad_(False)
        self.audio_proj = nn.Module()
        self.audio_proj.sem_token = nn.Parameter(torch.zeros(1, 1, cfg.clap_dim))
        self.audio_proj.sem_blocks = _blocks(cfg.clap_dim, pr.depth, pr.num_heads, pr.mlp_ratio, pr.norm_eps)
        self.audio_proj.norm = nn.LayerNorm(cfg.clap_dim, eps=pr.norm_eps)
        text_dim = cfg.text.offline.dim
        self.text_proj = nn.Identity() if text_dim == cfg.clap_dim else nn.Linear(text_dim, cfg.clap_dim)
        self.logit_scale = nn.Parameter(torch.zeros(1))

    def forward(self, lms: torch.Tensor, text: torch.Tensor, ids_keep: torch.Tensor,
                ids_masked: torch.Tensor) -> torch.Tensor:
        cfg, enc, pred = self.cfg, self.encoder, self.predictor
        x = (lms - self.norm_stats[0]) / self.norm_stats[1]
        tokens = enc.patch_embed.proj(x[:, None]).flatten(2).transpose(1, 2) + enc.pos_embed[:, 1:]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        h = torch.cat([cls, _gather(tokens, ids_keep)], dim=1)
        for block in enc.blocks:
            h = block(h)
        visible = enc.norm(h)
        # M2D: predict the target features of the masked patches
        y = pred.embed(visible)
        patches = torch.cat([y[:, 1:], pred.mask_token.expand(y.shape[0], ids_masked.shape[1], -1)], dim=1)
        restore = torch.argsort(torch.cat([ids_keep, ids_masked], dim=1), dim=1)
        y = torch.cat([y[:, :1], _gather(patches, restore)], dim=1) + pred.pos_embed
        for block in pred.blocks:
            y = block(y)
        prediction = _gather(pred.pred(pred.norm(y))[:, 1:], ids_masked)
        with torch.no_grad():
            t = torch.cat([cls, _gather(tokens, ids_masked)], dim=1)
            for block in self.target.blocks:
                t = block(t)
            target = self.target.norm(t)[:, 1:].float()
        target = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, keepdim=True)
                                                                         + cfg.m2d.target_norm_eps)
        loss_m2d = (2 - 2 * (F.normalize(prediction.float(), dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()
        # CLAP against the precomputed sentence vectors
        a = torch.cat([self.audio_proj.sem_token.expand(x.shape[0], -1, -1), visible[:, 1:]], dim=1)
        for block in self.audio_proj.sem_blocks:
            a = block(a)
        audio = self.audio_proj.norm(a[:, 0])
        text = self.text_proj(text)
        c = cfg.clap.feature_grad_scale
        audio = F.normalize(_ReferenceScaleGrad.apply(audio, c).float(), dim=-1)
        text = F.normalize(_ReferenceScaleGrad.apply(text, c).float(), dim=-1)
        logits = self.logit_scale.float().exp() * audio @ text.T
        labels = torch.arange(x.shape[0], device=x.device)
        loss_clap = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return cfg.clap.lambda_m2d * loss_m2d + cfg.clap.lambda_clap * loss_clap


class ReferenceStep:
    """Autocast (GPU) forward, backward, clip, fused AdamW, foreach EMA, logit-scale clamp: eager PyTorch."""

    def __init__(self, model: ReferenceM2D2, train_cfg, total: int, warmup: int, device: torch.device):
        self.model, self.cfg, self.total, self.warmup, self.device = model, train_cfg, total, warmup, device
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": train_cfg.optim.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        self.params = params
        self.opt = torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(train_cfg.optim.beta1, train_cfg.optim.beta2),
                                     fused=device.type == "cuda")
        self.online = [*model.encoder.blocks.parameters(), *model.encoder.norm.parameters()]
        self.ema = [*model.target.blocks.parameters(), *model.target.norm.parameters()]
        self.autocast = device.type == "cuda"

    def step(self, step: int, lms: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        m2d = self.model.cfg.m2d
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.total, self.warmup, self.cfg.lr, self.cfg.optim.min_lr)
        gen = step_generator(self.cfg.seed, step, 0, self.device)
        mask = random_unstructured_mask(lms.shape[0], self.model.grid[0] * self.model.grid[1], m2d.mask_ratio, gen,
                                        self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(lms, text, mask.ids_keep, mask.ids_masked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        decay = m2d.ema_decay_start + (m2d.ema_decay_end - m2d.ema_decay_start) * min(step, self.total - 1) / max(
            1, self.total - 1)
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.online], 1.0 - decay)
            self.model.logit_scale.clamp_(0.0, self.model.cfg.clap.logit_scale_max)
        return loss.detach()


# ------------------------------------------------------------------------------------------------- harness
def gemm_ceiling(device: torch.device, n: int) -> tuple[float, str]:
    """Dense-GEMM TFLOP/s measured now: bf16 on GPU, fp32 on CPU (where bf16 is not the fast path)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (Linux: KiB)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_batches(cfg: M2D2Config, batch: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """``count`` distinct batches of raw log-mel crops and sentence vectors, on the device (no loader in the timing)."""
    gen = torch.Generator(device=device).manual_seed(1234)
    out = []
    for _ in range(count):
        lms = torch.randn(batch, cfg.encoder.n_mels, cfg.encoder.input_frames, device=device, generator=gen) * 4 - 7
        text = torch.randn(batch, cfg.text.offline.dim, device=device, generator=gen)
        out.append((lms, text))
    return out


def count_flops(ref: ReferenceStep, lms: torch.Tensor, text: torch.Tensor) -> float:
    """FLOPs of one reference forward + backward (the optimiser and EMA are memory-bound and not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = step_generator(0, 0, 0, lms.device)
    grid = ref.model.grid
    mask = random_unstructured_mask(lms.shape[0], grid[0] * grid[1], ref.model.cfg.m2d.mask_ratio, gen, lms.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(lms.device.type, dtype=torch.bfloat16, enabled=ref.autocast):
            loss = ref.model(lms, text, mask.ids_keep, mask.ids_masked)
        loss.backward()
    ref.opt.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_variant(name: str, step_fn, batches, check_steps: int, warmup: int, steps: int,
                device: torch.device) -> dict:
    """Loss trajectory over ``check_steps`` steps, then ``warmup`` untimed and ``steps`` timed steps."""
    _reset_peak(device)
    losses = [step_fn(s, *batches[s % len(batches)]) for s in range(check_steps)]
    trajectory = [float(v) for v in losses]  # read back only now
    first = check_steps
    for s in range(first, first + warmup):
        step_fn(s, *batches[s % len(batches)])
    _sync(device)
    syncs = count_host_syncs(step_fn, first + warmup, batches, device)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(first + warmup + 1, first + warmup + 1 + steps):
        step_fn(s, *batches[s % len(batches)])
    _sync(device)
    elapsed = time.perf_counter() - t0
    batch = batches[0][0].shape[0]
    return {"variant": name, "samples_per_s": batch * steps / elapsed, "ms_per_step": 1e3 * elapsed / steps,
            "peak_memory_gib": _peak_memory_gib(device), "host_syncs_per_step": syncs, "losses": trajectory}


def count_host_syncs(step_fn, step: int, batches, device: torch.device) -> int | None:
    """Synchronising CUDA calls in one step (``torch.cuda.set_sync_debug_mode``); None on CPU."""
    if device.type != "cuda":
        step_fn(step, *batches[step % len(batches)])
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step_fn(step, *batches[step % len(batches)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def versions() -> dict[str, str]:
    import deepspeed
    import timm

    out = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "timm": timm.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cudnn"] = str(torch.backends.cudnn.version())
    else:
        out["cpu"] = platform.processor() or platform.machine()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--check-steps", type=int)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--zero-stage", type=int)
    parser.add_argument("--gemm", type=int, help="size of the square GEMM that sets the ceiling (preset: 8192 on GPU)")
    parser.add_argument("--out", default="stage1_throughput.json")
    args = parser.parse_args(argv)
    name = args.preset if args.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu-smoke")
    p = PRESETS[name]
    batch, steps = args.batch or p.batch, args.steps or p.steps
    warmup = p.warmup if args.warmup is None else args.warmup
    check = p.check_steps if args.check_steps is None else args.check_steps
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    total = check + warmup + 1 + steps
    topology = {"nproc_per_node": 1, "precision": p.precision, "compile": args.compile,
                **({} if args.zero_stage is None else {"zero_stage": args.zero_stage})}
    train_cfg = presets.stage_config("stage1", "paper").replace(model=p.model, schedule={"global_batch": batch},
                                                                topology=topology)
    model_cfg = presets.model_config(p.model)
    model_cfg.norm_mean, model_cfg.norm_std = -7.0, 4.0
    versions_now = versions()
    print(f"stage-1 step on {device} ({versions_now.get('gpu', versions_now.get('cpu'))}), preset {name}: model "
          f"{p.model} {model_cfg.encoder.n_mels}x{model_cfg.encoder.input_frames}, mask {model_cfg.m2d.mask_ratio}, "
          f"batch {batch}, {check} trajectory + {warmup} warm-up + {steps} timed steps", flush=True)

    ceiling, ceiling_kind = gemm_ceiling(device, args.gemm or p.gemm)
    print(f"GEMM ceiling ({ceiling_kind}): {ceiling:.1f} TFLOP/s", flush=True)
    batches = make_batches(model_cfg, batch, min(check, 8) or 1, device)

    torch.manual_seed(train_cfg.seed)
    project_model = M2D2(model_cfg)
    project_model.set_stage("stage1")
    initial = {k: v.clone() for k, v in project_model.state_dict().items()}

    reference = ReferenceM2D2(model_cfg)
    missing, unexpected = reference.load_state_dict(initial, strict=False)
    if missing or any(not k.startswith("frontend.") for k in unexpected):
        raise RuntimeError(f"reference and project models differ: missing {missing}, unexpected {unexpected}")
    reference.to(device)
    ref_step = ReferenceStep(reference, train_cfg, total, 2, device)
    flops = count_flops(ref_step, *batches[0]) / batch
    print(f"FLOPs (reference forward + backward): {flops / 1e9:.2f} GFLOP/sample", flush=True)
    results = [run_variant("reference", ref_step.step, batches, check, warmup, steps, device)]
    del ref_step, reference
    gc.collect()

    trainer = Trainer(train_cfg, ClapObjective(project_model), total, 2)

    def project_step(step, lms, text):
        out = trainer.step(step, lms, text)
        return out["loss"].detach() if out is not None else torch.tensor(math.nan)

    results.append(run_variant("project", project_step, batches, check, warmup, steps, device))
    for r in results:
        r["tflops"] = r["samples_per_s"] * flops / 1e12
        r["fraction_of_ceiling"] = r["tflops"] / ceiling
    ref, proj = results
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(proj["losses"], ref["losses"], strict=True)]
    report = {
        "date": time.strftime("%Y-%m-%d"), "preset": name, "device": str(device), "versions": versions_now,
        "batch": batch, "model": p.model, "frames": model_cfg.encoder.input_frames,
        "mask_ratio": model_cfg.m2d.mask_ratio, "project_precision": p.precision, "compile": args.compile,
        "compiled_blocks": trainer.compiled_blocks, "zero_stage": train_cfg.topology.zero_stage,
        "deepspeed_optimizer": type(trainer.optimizer).__name__,
        "gemm_ceiling_tflops": ceiling, "gemm_ceiling_kind": ceiling_kind, "gflop_per_sample": flops / 1e9,
        "speedup": proj["samples_per_s"] / ref["samples_per_s"], "max_rel_loss_diff": max(rel),
        "results": results,
    }
    print(f"\n{'':10s} {'samples/s':>10s} {'ms/step':>9s} {'TFLOP/s':>9s} {'ceiling':>8s} {'peak GiB':>9s} "
          f"{'syncs':>6s}")
    for r in results:
        syncs = "-" if r["host_syncs_per_step"] is None else str(r["host_syncs_per_step"])
        print(f"{r['variant']:10s} {r['samples_per_s']:10.1f} {r['ms_per_step']:9.2f} {r['tflops']:9.3f} "
              f"{r['fraction_of_ceiling']:8.1%} {r['peak_memory_gib']:9.2f} {syncs:>6s}")
    print(f"\nproject / reference: {report['speedup']:.2f}x samples/s; project at {proj['fraction_of_ceiling']:.1%} of "
          f"the {ceiling_kind} GEMM ceiling")
    print(f"loss trajectory over {check} steps: max relative difference {report['max_rel_loss_diff']:.2e} "
          f"(reference {ref['losses'][0]:.4f} -> {ref['losses'][-1]:.4f}, "
          f"project {proj['losses'][0]:.4f} -> {proj['losses'][-1]:.4f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
