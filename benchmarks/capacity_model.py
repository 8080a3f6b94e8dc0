"""Capacity model of the paper run: step time, interconnect, loader, object store, checkpoints, preemption, totals.

A small script, so the numbers can be recomputed: every input is a named assumption in :class:`Assumptions` (value,
unit, why), the FLOPs and parameter counts come from the project's own model configs and mask functions, and
measured figures replace assumptions where a JSON written on a GPU is given (``benchmarks/device_stages.py`` or
``benchmarks/stage1_throughput.py``; a JSON measured on CPU is reported but never used as a GPU rate). Prints the
markdown tables of ``docs/scaling.md``.

    python benchmarks/capacity_model.py                                    # assumptions only
    python benchmarks/capacity_model.py --device-json device_stages.json   # measured GPU figures where present
    python benchmarks/capacity_model.py --stage1-json stage1_throughput.json --set mfu_stage1=0.4

Model, per stage and GPU count ``n`` (data parallel, the global batch fixed as in the paper):
``step = accum x micro / rate(micro) + all-reduce + optimiser``, where ``rate`` is the per-GPU samples/s (from an
assumed model-FLOPs utilisation, or measured), the all-reduce is not overlapped with compute (DeepSpeed's defaults,
which the engine keeps: ZeRO-0 reduces after the backward pass, ``overlap_comm`` is off for ZeRO-1/2), and the
optimiser step is memory-bound. Wall time = steps x step + one launch per stage; GPU-hours = wall x n.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPU_COUNTS = (1, 4, 8, 32)
STAGES = ("stage1", "stage1.1", "stage2", "stage2.1")
# The paper's text models as transformers configs: stage 2's BERT-base (paper IV-A) and the decoder NV-Embed-v2 is
# built on (Mistral-7B: its 32 layers, 4096 wide, grouped-query attention with 8 key/value heads).
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512}
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
              "max_position_embeddings": 32768}


@dataclass
class Assumptions:
    """Every input of the model that is not computed from the project's configs. ``NOTES`` says why each holds."""

    peak_bf16_tflops: float = 989.0
    hbm_tbs: float = 3.35
    gpus_per_node: int = 8
    nvlink_busbw_gbs: float = 350.0
    internode_busbw_gbs: float = 40.0
    mfu_stage1: float = 0.35
    mfu_stage1_1: float = 0.25
    mfu_stage2: float = 0.30
    mfu_stage2_1: float = 0.30
    mfu_captions: float = 0.40
    half_efficiency_micro: int = 16
    grad_comm_bytes: int = 2
    optimizer_bytes_per_param: int = 30
    stage2_caption_tokens: int = 64
    caption_tokens: float = 24.0
    caption_padding: float = 0.10
    unique_captions: int = 2_500_000
    caption_shards: int = 16
    short_clip_s: float = 10.0
    audioset_clips: int = 1_900_000
    wavcaps_clips: int = 294_733
    wavcaps_capped_mean_s: float = 25.0
    subset21_mean_s: float = 20.0
    store_bytes_per_audio_s: int = 16_000
    loader_crops_per_core_608: float = 7061.0
    loader_workers_per_gpu: int = 8
    store_fetch_gbs_per_node: float = 1.0
    checkpoint_write_gbs_per_node: float = 1.0
    node_mtbf_h: float = 24.0
    restart_s: float = 600.0
    stage_launch_s: float = 300.0
    caption_model_gb: float = 15.7
    ingest_realtime_per_core: float = 314.0
    ingest_cores: int = 64
    eval_gpu_h: float = 0.5


NOTES: dict[str, tuple[str, str]] = {
    "peak_bf16_tflops": ("TFLOP/s", "dense bf16 peak of an H100/H200 SXM (vendor datasheet)"),
    "hbm_tbs": ("TB/s", "H100 SXM HBM3 bandwidth (H200: 4.8); sets the memory-bound optimiser step"),
    "gpus_per_node": ("GPUs", "an 8-GPU HGX node"),
    "nvlink_busbw_gbs": ("GB/s", "NCCL all-reduce bus bandwidth inside a node over NVLink 4 (nccl-tests order)"),
    "internode_busbw_gbs": ("GB/s per GPU", "across nodes: 8 x 400 Gb/s NICs per node at ~80 % (ring all-reduce)"),
    "mfu_stage1": ("of peak", "stage 1 at micro 512, compiled blocks; issue 9's bar (>= 50 % of a measured bf16 GEMM "
                   "ceiling) is about this"),
    "mfu_stage1_1": ("of peak", "stage 1.1: batch 64 on one GPU, LARS in DeepSpeed's unfused wrapper, mixup and "
                    "SpecAugment eager"),
    "mfu_stage2": ("of peak", "stage 2: frozen encoder forward + projector + BERT (eager, not compiled)"),
    "mfu_stage2_1": ("of peak", "stage 2.1: as stage 2 without masking"),
    "mfu_captions": ("of peak", "7-B decoder forward in bf16 over length-bucketed batches"),
    "half_efficiency_micro": ("samples", "micro-batch at which a GPU reaches half its large-batch efficiency: "
                              "rate(m) ~ m / (m + this)"),
    "grad_comm_bytes": ("B/element", "DeepSpeed's communication_data_type under bf16 is bf16"),
    "optimizer_bytes_per_param": ("B", "fused AdamW over fp32 masters: read grad, master, m, v; write master, m, v "
                                  "(4 B each) and the bf16 weight (2 B)"),
    "stage2_caption_tokens": ("tokens", "BERT pads each batch of 512 captions to its longest caption"),
    "caption_tokens": ("tokens", "mean tokens of a caption for the 7-B decoder (Auto-ACD / WavCaps sentences)"),
    "caption_padding": ("fraction", "padding left by length bucketing (the cpu-smoke run measures ~15 %)"),
    "unique_captions": ("captions", "~ one unique caption per stage-1 clip (paper IV-A: 2,532,215 clips)"),
    "caption_shards": ("shards", "m2d2.presets.pipeline_config('paper').caption_shards (a test keeps them equal)"),
    "short_clip_s": ("s", "AudioSet, VGGSound, AudioCaps clips are 10-s segments"),
    "audioset_clips": ("clips", "AudioSet-2M clips still downloadable, which stage 1.1's balanced sampler draws from"),
    "wavcaps_clips": ("clips", "WavCaps outside AudioSet (FreeSound, BBC, SoundBible) in the stage-1 set"),
    "wavcaps_capped_mean_s": ("s", "their mean length after ingestion caps audio at 30 s"),
    "subset21_mean_s": ("s", "mean length of the stage-2.1 subset (WavCaps + AudioCaps + Clotho)"),
    "store_bytes_per_audio_s": ("B", "float16 x 80 mel x 100 frames/s (the shard store's layout)"),
    "loader_crops_per_core_608": ("crops/s", "MEASURED ON CPU: benchmarks/bench_loader.py, warm local store, one "
                                  "core, 608-frame crops (1001 frames assumed slower by 1001/608)"),
    "loader_workers_per_gpu": ("processes", "num_workers of the paper stage presets (10 CPUs requested per GPU)"),
    "store_fetch_gbs_per_node": ("GB/s", "object store -> node shard cache (ranged GETs, 8 concurrent)"),
    "checkpoint_write_gbs_per_node": ("GB/s", "checkpoint upload from one node to the object store"),
    "node_mtbf_h": ("h", "mean time between preemptions or failures of one node on interruptible capacity; "
                    "replace with the cluster's history"),
    "restart_s": ("s", "after a preemption: reschedule, process start, DeepSpeed init, compile, checkpoint load"),
    "stage_launch_s": ("s", "once per stage: pod start, image, DeepSpeed init, compile of the blocks"),
    "caption_model_gb": ("GB", "NV-Embed-v2 weights in bf16, loaded by every caption shard"),
    "ingest_realtime_per_core": ("x real time", "MEASURED ON CPU: bench_loader.py ingestion per core"),
    "ingest_cores": ("cores", "CPU cores given to the feature map task"),
    "eval_gpu_h": ("GPU-h", "evaluation suite after stage 2.1 (not modelled; an allowance)"),
}


# ---------------------------------------------------------------------------------------------------- model facts
def block_params(dim: int, mlp_ratio: float) -> int:
    """timm ``Block`` with qkv bias: qkv, proj, two LayerNorms, two-layer MLP."""
    hidden = int(dim * mlp_ratio)
    return 4 * dim * dim + 4 * dim + 4 * dim + 2 * dim * hidden + hidden + dim


def block_flops(tokens: float, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one block on ``tokens`` tokens: the matrix products (2 per multiply-add) and attention."""
    return 2 * tokens * (4 + 2 * mlp_ratio) * dim * dim + 4 * tokens * tokens * dim


def bert_layer(hidden: int, intermediate: int) -> int:
    return 4 * hidden * hidden + 4 * hidden + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden


def model_facts(cfg=None, bert: dict | None = None, decoder: dict | None = None,
                caption_tokens: int = Assumptions.stage2_caption_tokens) -> dict[str, Any]:
    """Parameter counts, visible tokens and training FLOPs per sample of every stage, from the paper configs.

    Visible tokens come from the project's mask functions (structured masks draw their row/column counts at random,
    so they are averaged over draws); training = forward + backward = 3x the forward of what trains, 1x of what is
    frozen (stage 2's encoder runs without gradient).
    """
    import torch

    from m2d2.models.masking import random_structured_mask, random_unstructured_mask
    from m2d2.presets import model_config, stage_config

    cfg = cfg or model_config("paper")
    bert, decoder = bert or BERT_BASE, decoder or MISTRAL_7B
    e, pr, pj = cfg.encoder, cfg.predictor, cfg.projector
    d, patch = e.embed_dim, e.patch_size[0] * e.patch_size[1]
    grid608 = e.grid
    late = stage_config("stage1.1", "paper").data.crop_frames
    grid_late = (grid608[0], late // e.patch_size[1])
    n608, n_late = grid608[0] * grid608[1], grid_late[0] * grid_late[1]
    gen = torch.Generator().manual_seed(0)
    visible1 = random_unstructured_mask(1, n608, cfg.m2d.mask_ratio, gen).ids_keep.shape[1]

    def structured(ratio: float) -> float:
        return sum(random_structured_mask(1, grid_late, ratio, gen).ids_keep.shape[1] for _ in range(400)) / 400

    visible11 = structured(stage_config("stage1.1", "paper").augment.patch_out)
    visible2 = structured(cfg.clap.stage2_mask_ratio)
    enc_blocks = e.depth * block_params(d, e.mlp_ratio)
    encoder = enc_blocks + 2 * d + patch * d + d + d  # + final norm, patch conv (+ bias), cls
    predictor = (d * pr.embed_dim + pr.embed_dim + pr.embed_dim + pr.depth * block_params(pr.embed_dim, pr.mlp_ratio)
                 + 2 * pr.embed_dim + pr.embed_dim * d + d)
    projector = d + block_params(d, pj.mlp_ratio) + 2 * d
    text_map = 0 if cfg.text.offline.dim == d else cfg.text.offline.dim * d + d  # an identity when the widths agree
    target = enc_blocks + 2 * d
    h, inter = bert["hidden_size"], bert["intermediate_size"]
    bert_params = (bert["num_hidden_layers"] * bert_layer(h, inter)
                   + (bert["vocab_size"] + bert["max_position_embeddings"] + 2) * h + 2 * h)
    enc = {n: e.depth * block_flops(n, d, e.mlp_ratio) for n in (1 + visible1, 1 + visible11, 1 + visible2,
                                                                  1 + n_late)}
    proj = {n: block_flops(n, d, pj.mlp_ratio) for n in (1 + visible1, 1 + visible2, 1 + n_late)}
    length = caption_tokens
    bert_fwd = bert["num_hidden_layers"] * (2 * length * (4 * h * h + 2 * h * inter) + 4 * length * length * h)
    patch_fwd = 2 * patch * d
    flops = {
        "stage1": (3 * enc[1 + visible1] + e.depth * block_flops(1 + n608 - visible1, d, e.mlp_ratio)
                   + 3 * pr.depth * block_flops(1 + n608, pr.embed_dim, pr.mlp_ratio)
                   + 3 * 2 * ((1 + visible1) * d * pr.embed_dim + (1 + n608) * pr.embed_dim * d)
                   + 3 * proj[1 + visible1] + 2 * n608 * patch_fwd
                   + (3 * 2 * cfg.text.offline.dim * d if text_map else 0)),
        "stage1.1": 3 * enc[1 + visible11] + 2 * n_late * patch_fwd,
        "stage2": enc[1 + visible2] + n_late * patch_fwd + 3 * proj[1 + visible2] + 3 * bert_fwd,
        "stage2.1": enc[1 + n_late] + n_late * patch_fwd + 3 * proj[1 + n_late] + 3 * bert_fwd,
    }
    dh, layers = decoder["hidden_size"], decoder["num_hidden_layers"]
    kv = dh // decoder["num_attention_heads"] * decoder["num_key_value_heads"]
    decoder_layer = 2 * dh * dh + 2 * dh * kv + 3 * dh * decoder["intermediate_size"] + 2 * dh
    decoder_params = layers * decoder_layer + decoder["vocab_size"] * dh + dh
    return {
        "visible_tokens": {"stage1": visible1, "stage1.1": visible11, "stage2": visible2, "stage2.1": n_late},
        "params": {"encoder": encoder, "predictor": predictor, "projector": projector, "text_map": text_map,
                   "target": target, "bert": bert_params, "decoder": decoder_params},
        "trainable": {"stage1": encoder + predictor + projector + text_map + 1, "stage1.1": encoder + d * 527 + 527,
                      "stage2": projector + bert_params + 1, "stage2.1": projector + bert_params + 1},
        "frozen": {"stage1": target, "stage1.1": 0, "stage2": encoder, "stage2.1": encoder},
        "gflop_per_sample": {k: v / 1e9 for k, v in flops.items()},
        "decoder_gflop_per_token": 2 * (decoder_params - decoder["vocab_size"] * dh) / 1e9,
    }


@dataclass
class StageRecipe:
    """How much a stage trains (paper settings; clip counts from the paper and the public reference repository)."""

    name: str
    clips_per_epoch: int
    epochs: int
    global_batch: int
    paper_gpus: int
    max_micro: int
    frames: int
    mfu: float
    store_s: float = 0.0  # audio seconds of the clips it reads (object store bytes)


def _shape(cfg) -> tuple[int, int, int]:
    """(epochs, global batch, GPUs) of a stage config."""
    return cfg.schedule.epochs, cfg.schedule.global_batch, cfg.topology.nnodes * cfg.topology.nproc_per_node


def recipes(a: Assumptions) -> dict[str, StageRecipe]:
    from m2d2.presets import stage_config

    s1, s11, s2, s21 = (stage_config(s, "paper") for s in STAGES)
    short = 2_532_215 - a.wavcaps_clips
    stage1_s = short * a.short_clip_s + a.wavcaps_clips * a.wavcaps_capped_mean_s
    # Stage 2's list adds AudioCaps train and Clotho dev to stage 1's; stage 2.1's is WavCaps + AudioCaps + Clotho
    # (file lists of the public reference repository, github.com/nttcslab/m2d, clap/README).
    stage2_clips = 2_585_227
    return {
        "stage1": StageRecipe("stage1", 2_532_215, *_shape(s1), 512, 608, a.mfu_stage1, stage1_s),
        "stage1.1": StageRecipe("stage1.1", s11.data.samples_per_epoch, *_shape(s11), 64, s11.data.crop_frames,
                                a.mfu_stage1_1, a.audioset_clips * a.short_clip_s),
        "stage2": StageRecipe("stage2", stage2_clips, *_shape(s2), 512, s2.data.crop_frames, a.mfu_stage2,
                              stage1_s + (stage2_clips - 2_532_215) * a.short_clip_s),
        "stage2.1": StageRecipe("stage2.1", 439_743, *_shape(s21), 512, s21.data.crop_frames, a.mfu_stage2_1,
                                439_743 * a.subset21_mean_s),
    }


# ---------------------------------------------------------------------------------------------------- measured
@dataclass
class Measured:
    """GPU figures read from JSON files; ``cpu`` lists what was given but measured on CPU (reported, not used)."""

    rate: dict[str, tuple[float, int, str]] = field(default_factory=dict)  # stage -> (samples/s, micro, source)
    max_micro: dict[str, int] = field(default_factory=dict)
    checkpoint: dict[str, tuple[int, float]] = field(default_factory=dict)  # stage -> (bytes, write s)
    captions_per_s: tuple[float, str] | None = None
    cpu: list[str] = field(default_factory=list)


def _where(path: str, data: dict[str, Any]) -> str:
    return f"{Path(path).name}, {data.get('versions', {}).get('gpu', data.get('device'))}, {data.get('date')}"


def read_measured(device_json: str | None, stage1_json: str | None) -> Measured:
    out = Measured()
    if stage1_json:
        data = json.loads(Path(stage1_json).read_text())
        project = next((r for r in data.get("results", []) if r.get("variant") == "project"), None)
        where = _where(stage1_json, data)
        if str(data.get("device", "")).startswith("cuda") and project:
            out.rate["stage1"] = (project["samples_per_s"], data["batch"], f"measured ({where})")
        elif project:
            out.cpu.append(f"stage 1: {project['samples_per_s']:.1f} samples/s at batch {data.get('batch')} ({where})")
    if device_json:
        data = json.loads(Path(device_json).read_text())
        gpu = str(data.get("device", "")).startswith("cuda")
        where = _where(device_json, data)
        for stage in STAGES:
            r = data.get("sections", {}).get(stage, {})
            if r.get("status") != "ok":
                continue
            if not gpu:
                out.cpu.append(f"{stage}: {r['samples_per_s']:.1f} samples/s at micro {r['micro_batch']} ({where})")
                continue
            out.rate[stage] = (r["samples_per_s"], r["micro_batch"], f"measured ({where})")
            out.max_micro[stage] = r["micro_batch"]
            out.checkpoint[stage] = (r["checkpoint_bytes"], r["checkpoint_write_s"])
        captions = data.get("sections", {}).get("captions", {})
        if captions.get("status") == "ok":
            if gpu and captions.get("parameters", 0) > 1e9:
                out.captions_per_s = (captions["best_captions_per_s"], f"measured ({where})")
            else:
                out.cpu.append(f"captions: {captions['best_captions_per_s']:.0f} captions/s with a "
                               f"{captions.get('parameters', 0) / 1e6:.1f} M decoder ({where})")
    return out


# ---------------------------------------------------------------------------------------------------- the model
def efficiency(micro: float, a: Assumptions) -> float:
    return micro / (micro + a.half_efficiency_micro)


def per_gpu_rate(stage: str, micro: float, a: Assumptions, facts: dict, m: Measured) -> tuple[float, str]:
    """Samples/s of one GPU at ``micro``: measured at some micro and moved along the efficiency curve, or from MFU."""
    r = recipes(a)[stage]
    if stage in m.rate:
        rate, at, source = m.rate[stage]
        return rate * efficiency(micro, a) / efficiency(at, a), source
    at = min(r.max_micro, r.global_batch)
    rate = r.mfu * a.peak_bf16_tflops * 1e12 / (facts["gflop_per_sample"][stage] * 1e9)
    return rate * efficiency(micro, a) / efficiency(at, a), f"assumed (MFU {r.mfu:.0%} at micro {at})"


def allreduce_s(n: int, nbytes: float, a: Assumptions) -> float:
    """Ring all-reduce time: each GPU sends and receives 2 (n-1)/n of the buffer at the slowest link's bus rate."""
    if n == 1:
        return 0.0
    bandwidth = a.nvlink_busbw_gbs if n <= a.gpus_per_node else a.internode_busbw_gbs
    return 2 * (n - 1) / n * nbytes / (bandwidth * 1e9)


def stage_row(stage: str, n: int, a: Assumptions, facts: dict, m: Measured, zero: int = 0) -> dict[str, Any]:
    r = recipes(a)[stage]
    per_gpu = r.global_batch / n
    max_micro = m.max_micro.get(stage, r.max_micro)
    accum = max(1, math.ceil(per_gpu / max_micro))
    micro = per_gpu / accum
    rate, source = per_gpu_rate(stage, micro, a, facts, m)
    compute = accum * micro / rate
    trainable = facts["trainable"][stage]
    comm_bytes = trainable * a.grad_comm_bytes
    comm = allreduce_s(n, comm_bytes, a)
    optimizer_bytes = trainable * a.optimizer_bytes_per_param / (n if zero else 1)
    if stage == "stage1":
        optimizer_bytes += facts["params"]["target"] * 10  # EMA: read and write the fp32 target, read bf16 online
    optimizer = optimizer_bytes / (0.7 * a.hbm_tbs * 1e12)
    step = compute + comm + optimizer
    steps = r.clips_per_epoch // r.global_batch * r.epochs
    wall_h = (steps * step + a.stage_launch_s) / 3600
    return {"stage": stage, "gpus": n, "micro": micro, "accum": accum, "rate_source": source,
            "step_ms": 1e3 * step, "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm,
            "optimizer_ms": 1e3 * optimizer, "samples_per_s": r.global_batch / step, "steps": steps,
            "comm_mb_per_gpu": 2 * (n - 1) / n * comm_bytes / 1e6 if n > 1 else 0.0,
            "wall_h": wall_h, "gpu_h": wall_h * n, "samples_per_s_per_gpu": r.global_batch / step / n}


def zero_memory_gb(stage: str, n: int, facts: dict, zero: int) -> float:
    """Model states per GPU (ZeRO paper accounting, mixed-precision Adam): bf16 weights 2 B + bf16 grads 2 B + fp32
    master, m, v 12 B per trainable parameter, sharded by ZeRO-1 (optimiser states) and ZeRO-2 (+ gradients);
    frozen parameters 2 B (stage 1's fp32 EMA target 4 B)."""
    p = facts["trainable"][stage]
    frozen = facts["frozen"][stage] * (4 if stage == "stage1" else 2)
    per_param = {0: 16, 1: 4 + 12 / n, 2: 2 + 14 / n}[zero]
    return (p * per_param + frozen) / 1e9


def checkpoint_gb(stage: str, n: int, facts: dict, zero: int) -> tuple[float, float]:
    """(model file, all optimiser files) in GB. Every rank saves its optimiser state; under ZeRO-0 that is the whole
    state on each rank (12 B per trainable parameter, measured 12.0 on CPU), under ZeRO-1/2 a 1/n partition."""
    p = facts["trainable"][stage]
    model = (p * 2 + facts["frozen"][stage] * (4 if stage == "stage1" else 2)) / 1e9
    optimizer = p * 12 * (n if zero == 0 else 1) / 1e9
    return model, optimizer


def checkpoint_write_s(stage: str, n: int, facts: dict, a: Assumptions, zero: int) -> float:
    """Nodes write in parallel; the busiest node writes its ranks' optimiser files (and rank 0's model file)."""
    model, optimizer = checkpoint_gb(stage, n, facts, zero)
    ranks_on_node = min(n, a.gpus_per_node)
    return (model + optimizer / n * ranks_on_node) / a.checkpoint_write_gbs_per_node


def expected_time_s(work_s: float, interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Expected wall time of ``work_s`` of work checkpointed every ``interval_s`` under exponential failures: each
    segment (work + write) is retried until it survives, each failure costing the restart."""
    segments = work_s / interval_s
    return segments * (mtbf_s + restart_s) * math.expm1((interval_s + write_s) / mtbf_s)


def preemption(stage: str, n: int, a: Assumptions, facts: dict, m: Measured) -> dict[str, Any]:
    from m2d2.presets import stage_config

    row = stage_row(stage, n, a, facts, m)
    work = row["steps"] * row["step_ms"] / 1e3
    write = checkpoint_write_s(stage, n, facts, a, 0)
    nodes = math.ceil(n / a.gpus_per_node)
    mtbf = a.node_mtbf_h * 3600 / nodes
    every = stage_config(stage, "paper").checkpoint.every
    chosen = every * row["step_ms"] / 1e3 if every else work
    young = math.sqrt(2 * write * mtbf)
    best = min(young, work)
    return {"stage": stage, "gpus": n, "work_h": work / 3600, "write_s": write, "job_mtbf_h": mtbf / 3600,
            "preset_interval_steps": every,
            "preset_expected_loss_h": (expected_time_s(work, chosen, write, a.restart_s, mtbf) - work) / 3600,
            "young_interval_steps": max(1, round(best / (row["step_ms"] / 1e3))), "young_interval_min": best / 60,
            "young_expected_loss_h": (expected_time_s(work, best, write, a.restart_s, mtbf) - work) / 3600}


def caption_row(n: int, a: Assumptions, facts: dict, m: Measured) -> dict[str, Any]:
    """The caption map task: the paper preset's shards, ``min(shards, n)`` at a time, one GPU each."""
    shards = a.caption_shards
    if m.captions_per_s:
        rate, source = m.captions_per_s
    else:
        per_caption = facts["decoder_gflop_per_token"] * 1e9 * a.caption_tokens * (1 + a.caption_padding)
        rate, source = a.mfu_captions * a.peak_bf16_tflops * 1e12 / per_caption, f"assumed (MFU {a.mfu_captions:.0%})"
    per_shard_s = a.unique_captions / shards / rate + a.caption_model_gb / a.store_fetch_gbs_per_node + a.stage_launch_s
    waves = math.ceil(shards / min(n, shards))
    return {"gpus": n, "captions_per_s_per_gpu": rate, "source": source, "shards": shards,
            "wall_h": waves * per_shard_s / 3600, "gpu_h": shards * per_shard_s / 3600,
            "embed_gpu_h": a.unique_captions / rate / 3600}


def loader_row(stage: str, n: int, a: Assumptions, facts: dict, m: Measured) -> dict[str, Any]:
    r = recipes(a)[stage]
    row = stage_row(stage, n, a, facts, m)
    per_core = a.loader_crops_per_core_608 * (608 / r.frames)
    gpus_on_node = min(n, a.gpus_per_node)
    needed = row["samples_per_s_per_gpu"] * gpus_on_node
    return {"stage": stage, "gpus": n, "crops_per_s_per_node": needed, "per_core": per_core,
            "cores_needed_per_node": needed / per_core,
            "workers_per_node": a.loader_workers_per_gpu * gpus_on_node,
            "headroom": a.loader_workers_per_gpu * gpus_on_node * per_core / needed}


def store_row(stage: str, n: int, a: Assumptions) -> dict[str, Any]:
    r = recipes(a)[stage]
    store_gb = r.store_s * a.store_bytes_per_audio_s / 1e9
    nodes = math.ceil(n / a.gpus_per_node)
    return {"stage": stage, "gpus": n, "store_gb": store_gb, "first_epoch_gb": store_gb * nodes,
            "later_epoch_gb": 0.0, "cache_gb_per_node": store_gb,
            "fetch_min": store_gb / a.store_fetch_gbs_per_node / 60,
            "epoch_read_gb": r.clips_per_epoch * r.frames * 80 * 2 / 1e9}


def execution(n: int, a: Assumptions, facts: dict, m: Measured) -> dict[str, Any]:
    """The whole ``paper`` execution with ``n`` GPUs for stages 1, 2, 2.1 (stage 1.1 stays on one GPU: its BatchNorm
    head normalises over each rank's batch, so more ranks would change its statistics)."""
    rows = {s: stage_row(s, 1 if s == "stage1.1" else n, a, facts, m) for s in STAGES}
    captions = caption_row(n, a, facts, m)
    audio_s = recipes(a)["stage2"].store_s
    features_h = audio_s / a.ingest_realtime_per_core / a.ingest_cores / 3600
    wall = max(features_h, captions["wall_h"]) + sum(r["wall_h"] for r in rows.values()) + a.eval_gpu_h
    gpu_h = captions["gpu_h"] + sum(r["gpu_h"] for r in rows.values()) + a.eval_gpu_h
    return {"gpus": n, "wall_h": wall, "gpu_h": gpu_h, "features_h": features_h, "captions_h": captions["wall_h"],
            **{f"{s}_h": rows[s]["wall_h"] for s in STAGES}}


# ---------------------------------------------------------------------------------------------------- markdown
def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(a: Assumptions, m: Measured) -> str:
    facts = model_facts(caption_tokens=a.stage2_caption_tokens)
    out = []
    p, g = facts["params"], facts["gflop_per_sample"]
    out.append("### Model facts (computed from the paper configs)\n")
    out.append(_table(["stage", "trainable params", "frozen params", "visible tokens", "GFLOP/sample (train)"], [
        [s, f"{facts['trainable'][s] / 1e6:.1f} M", f"{facts['frozen'][s] / 1e6:.1f} M",
         f"{facts['visible_tokens'][s]:.1f}", f"{g[s]:.1f}"] for s in STAGES]))
    out.append(f"\nEncoder {p['encoder'] / 1e6:.2f} M, predictor {p['predictor'] / 1e6:.2f} M, projector "
               f"{p['projector'] / 1e6:.2f} M, text map {p['text_map'] / 1e6:.2f} M, "
               f"BERT-base {p['bert'] / 1e6:.1f} M, caption decoder {p['decoder'] / 1e9:.2f} B "
               f"({facts['decoder_gflop_per_token']:.1f} GFLOP/token).")
    out.append("\n### Step time and throughput (ZeRO-0, the engine's default)\n")
    rows = []
    for s in STAGES:
        for n in GPU_COUNTS:
            r = stage_row(s, n, a, facts, m)
            rows.append([s, n, f"{r['micro']:.0f} x {r['accum']}", f"{r['step_ms']:.0f}", f"{r['compute_ms']:.0f}",
                         f"{r['comm_ms']:.1f}", f"{r['optimizer_ms']:.1f}", f"{r['samples_per_s']:,.0f}",
                         f"{r['steps']:,}", f"{r['wall_h']:.1f}", f"{r['gpu_h']:.0f}", r["rate_source"]])
    out.append(_table(["stage", "GPUs", "micro x accum", "step ms", "compute ms", "all-reduce ms", "optimiser ms",
                       "samples/s", "steps", "wall h", "GPU-h", "rate"], rows))
    out.append("\n### Gradient all-reduce against the interconnect, and ZeRO\n")
    rows = []
    for s in STAGES:
        for n in GPU_COUNTS[1:]:
            r = stage_row(s, n, a, facts, m)
            mem = [f"{zero_memory_gb(s, n, facts, z):.2f}" for z in (0, 1, 2)]
            ck = [checkpoint_gb(s, n, facts, z) for z in (0, 1)]
            rows.append([s, n, f"{r['comm_mb_per_gpu']:.0f}",
                         "NVLink" if n <= a.gpus_per_node else "inter-node", f"{r['comm_ms']:.1f}",
                         f"{r['comm_ms'] / r['step_ms']:.0%}", " / ".join(mem),
                         f"{sum(ck[0]):.1f} / {sum(ck[1]):.1f}"])
    out.append(_table(["stage", "GPUs", "MB sent per GPU per step", "link", "ms", "of step",
                       "model states GB/GPU (ZeRO 0 / 1 / 2)", "checkpoint GB (ZeRO 0 / 1-2)"], rows))
    out.append("\n### Loader: crops/s needed per node against crops/s per core\n")
    rows = []
    for s in STAGES:
        for n in (1, 8):
            r = loader_row(s, n, a, facts, m)
            rows.append([s, n, f"{r['crops_per_s_per_node']:,.0f}", f"{r['per_core']:,.0f}",
                         f"{r['cores_needed_per_node']:.1f}", r["workers_per_node"], f"{r['headroom']:.0f}x"])
    out.append(_table(["stage", "GPUs on the node", "crops/s needed", "crops/s per core", "cores needed",
                       "loader workers", "headroom"], rows))
    out.append("\n### Object store and shard cache\n")
    rows = []
    for s in STAGES:
        for n in (4, 32):
            r = store_row(s, n, a)
            rows.append([s, n, f"{r['store_gb']:.0f}", f"{r['first_epoch_gb']:.0f}", f"{r['later_epoch_gb']:.0f}",
                         f"{r['cache_gb_per_node']:.0f}", f"{r['fetch_min']:.0f}", f"{r['epoch_read_gb']:.0f}"])
    out.append(_table(["stage", "GPUs", "clips' store GB", "object-store GB, epoch 1", "GB, later epochs",
                       "shard cache GB per node", "fetch min per node", "crop bytes read per epoch GB"], rows))
    out.append("\n### Checkpoints and preemption (ZeRO-0)\n")
    rows = []
    for s in STAGES:
        for n in ((1,) if s == "stage1.1" else (4, 32)):
            mdl, opt = checkpoint_gb(s, n, facts, 0)
            pr = preemption(s, n, a, facts, m)
            rows.append([s, n, f"{mdl:.2f} + {opt:.1f}", f"{pr['write_s']:.0f}", f"{pr['work_h']:.1f}",
                         f"{pr['job_mtbf_h']:.0f}", pr["preset_interval_steps"] or "final only",
                         f"{pr['preset_expected_loss_h']:.1f}",
                         f"{pr['young_interval_steps']:,} ({pr['young_interval_min']:.0f} min)",
                         f"{pr['young_expected_loss_h']:.2f}"])
    out.append(_table(["stage", "GPUs", "checkpoint GB (model + optimiser)", "write s", "work h", "job MTBF h",
                       "preset interval", "expected loss h", "Young interval steps", "expected loss h"], rows))
    out.append("\n### Caption embedding (16 shards, one GPU each)\n")
    rows = []
    for n in GPU_COUNTS:
        r = caption_row(n, a, facts, m)
        rows.append([n, f"{r['captions_per_s_per_gpu']:,.0f}", f"{r['embed_gpu_h']:.2f}", f"{r['wall_h']:.2f}",
                     f"{r['gpu_h']:.1f}", r["source"]])
    out.append(_table(["GPUs", "captions/s per GPU", "embedding GPU-h", "wall h (with model load, pod start)",
                       "GPU-h held", "rate"], rows))
    out.append("\n### The whole `paper` execution\n")
    rows = []
    for n in GPU_COUNTS:
        e = execution(n, a, facts, m)
        rows.append([n, f"{e['features_h']:.1f}", f"{e['captions_h']:.2f}"] + [f"{e[f'{s}_h']:.1f}" for s in STAGES]
                    + [f"{e['wall_h']:.1f}", f"{e['wall_h'] / 24:.1f}", f"{e['gpu_h']:.0f}"])
    out.append(_table(["GPUs (stages 1, 2, 2.1)", "features h (CPU)", "captions h", "stage 1 h", "stage 1.1 h (1 GPU)",
                       "stage 2 h", "stage 2.1 h", "wall h", "days", "GPU-h"], rows))
    for stage, (nbytes, seconds) in m.checkpoint.items():
        out.append(f"\nMeasured on one GPU ({stage}): a checkpoint of {nbytes / 1e9:.2f} GB written to local disk in "
                   f"{seconds:.1f} s.")
    if m.cpu:
        out.append("\nGiven but measured on CPU (not used as GPU rates): " + "; ".join(m.cpu) + ".")
    return "\n".join(out)


def assumptions_table(a: Assumptions) -> str:
    rows = [[f.name, getattr(a, f.name), *NOTES[f.name]] for f in dataclasses.fields(a)]
    return _table(["assumption", "value", "unit", "why"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-json", help="JSON of benchmarks/device_stages.py (used when measured on a GPU)")
    parser.add_argument("--stage1-json", help="JSON of benchmarks/stage1_throughput.py (used when measured on a GPU)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override an assumption")
    parser.add_argument("--assumptions", action="store_true", help="also print the assumptions table")
    args = parser.parse_args(argv)
    a = Assumptions()
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in NOTES:
            parser.error(f"unknown assumption {name!r}; choose from {sorted(NOTES)}")
        setattr(a, name, type(getattr(a, name))(float(value)) if isinstance(getattr(a, name), int) else float(value))
    text = report(a, read_measured(args.device_json, args.stage1_json))
    if args.assumptions:
        text = "### Assumptions\n\n" + assumptions_table(a) + "\n\n" + text
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
