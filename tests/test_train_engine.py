"""The training engine: schedule, parameter groups, DeepSpeed config, a real single-process run, and the
2-process Flyte Elastic + DeepSpeed (gloo) path of stage 1."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from m2d2.config import from_dict, to_dict
from m2d2.models import M2D2
from m2d2.presets import model_config, stage_config
from m2d2.train.config import TrainStageConfig
from m2d2.train.engine import deepspeed_config, lr_at
from m2d2.train.objectives import decay_groups

ROOT = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert lr_at(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    mid = lr_at(40, 100, 10, 2.0, 0.0)
    assert mid == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_parameter_groups_decay_only_matrices(tiny):
    model = M2D2(tiny)
    model.set_stage("stage1")
    decay, no_decay = decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert any(p is model.encoder.cls_token for p in decay["params"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_deepspeed_config_validates_offline():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = stage_config("stage1", "paper")
    ds = deepspeed_config(cfg, world=4, device=torch.device("cuda"))
    assert ds["train_micro_batch_size_per_gpu"] == 512 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == 3.0
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * 4
    # Offline validation sees world size 1 (no process group): check the single-process variant.
    DeepSpeedConfig(deepspeed_config(cfg, world=1, device=torch.device("cuda")))
    assert not deepspeed_config(cfg, world=4, device=torch.device("cpu"))["bf16"]["enabled"]
    with pytest.raises(ValueError, match="not divisible"):
        deepspeed_config(cfg, world=3, device=torch.device("cpu"))


def test_paper_stage_presets_match_the_paper():
    s1, s2 = stage_config("stage1", "paper"), stage_config("stage2", "paper")
    assert (s1.schedule.epochs, s1.schedule.warmup_epochs, s1.schedule.global_batch) == (300, 20, 2048)
    assert s1.lr == pytest.approx(3e-4 * 2048 / 256)
    assert (s1.optim.beta1, s1.optim.beta2, s1.optim.weight_decay) == (0.9, 0.95, 0.05)
    assert (s2.schedule.epochs, s2.schedule.warmup_epochs, s2.schedule.global_batch, s2.data.crop_frames) == (
        30, 5, 2048, 1001)
    assert s2.lr == pytest.approx(3e-6 * 2048 / 256) and s1.optim.grad_clip == s2.optim.grad_clip == 3.0
    model = model_config("paper")
    assert (model.m2d.mask_ratio, model.m2d.ema_decay_start, model.m2d.ema_decay_end) == (0.7, 0.99995, 0.99999)
    assert (model.clap.lambda_m2d, model.clap.lambda_clap, model.clap.stage2_mask_ratio) == (1.0, 0.01, 0.3)
    assert model.clap.stage2_logit_scale_init == pytest.approx(math.log(100))


@pytest.mark.slow
def test_single_process_stage1_learns_and_exports(tmp_path, smoke_data):
    from m2d2.train.stages import run_stage1

    cfg, features, captions = smoke_data
    stage = cfg.stages["stage1"].replace(schedule={"max_steps": 12, "global_batch": 4, "warmup_epochs": 0.0},
                               optim={"base_lr": 2e-3}, log_every=1)
    out = run_stage1(stage, str(features), str(captions), str(tmp_path / "s1"))
    assert out.steps == 12 and out.final["ema_decay"] > 0.99
    model = M2D2.from_pretrained(out.export_dir)
    assert model.norm_stats.tolist() != [-7.1, 4.2]  # stats from the data, not the placeholder
    ckpt = Path(out.checkpoint_dir)
    assert ckpt.name == "step-000000012" and (ckpt / "COMPLETE").exists()
    assert json.loads((ckpt / "meta.json").read_text())["train_state"]["step"] == 12
    rank_state = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    assert rank_state["optimizer"]["state"]  # AdamW moments are there
    from safetensors.torch import load_file

    full = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("target.") for k in full) and any(k.startswith("predictor.") for k in full)


@pytest.mark.slow
def test_two_process_elastic_deepspeed_stage1(tmp_path, smoke_data):
    """The Flyte Elastic task of stage 1 with nproc_per_node=2: two gloo ranks under DeepSpeed."""
    cfg, features, captions = smoke_data
    cfg = dataclasses.replace(cfg, data_root=str(tmp_path / "data"),
                              stages={**cfg.stages, "stage1": cfg.stages["stage1"].replace(
                                  schedule={"global_batch": 4, "max_steps": 2})})
    script = f"""
import json, sys
from m2d2.config import from_dict
from m2d2.pipeline import PipelineConfig
from workflows.full import Artifact, stage1, _out
from m2d2.pipeline import workspace_token
from m2d2.tracking import start_pipeline_run
raw = json.loads(sys.argv[1])
cfg = from_dict(PipelineConfig, raw)
parent = start_pipeline_run("elastic-test")
result = stage1(section=cfg.stages["stage1"], workspace=workspace_token(cfg.data_root),
                features=Artifact(path=_out({str(features)!r}), mlflow_run_id=""),
                source=Artifact(path=_out({str(captions.parent)!r}), mlflow_run_id=""), run_key="", parent_run_id=parent)
print("RESULT", json.dumps({{"steps": result.steps, "model": str(result.path.path), "run": result.mlflow_run_id}}))
"""
    env = subprocess_env(M2D2_NPROC_PER_NODE="2", OMP_NUM_THREADS="1",
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(dataclasses.asdict(cfg))], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["steps"] == 2
    assert M2D2.from_pretrained(result["model"]).config.encoder.depth == 1
    from mlflow import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run"])
    assert run.data.params["derived.world_size"] == "2"
    assert run.data.params["derived.steps_per_epoch"] == str(20 // 4)


def test_stage_config_is_a_plain_dataclass():
    """Sections of scalars, None and lists of strings only: what a Flyte input and a JSON/YAML file hold."""
    cfg = TrainStageConfig()

    def leaves(data):
        for value in data.values():
            yield from leaves(value) if isinstance(value, dict) else [value]

    assert all(isinstance(v, int | float | str | None) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
               for v in leaves(to_dict(cfg)))
    sections = [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    assert sections == ["data", "optim", "schedule", "augment", "topology", "checkpoint"]
    assert from_dict(TrainStageConfig, to_dict(cfg)) == cfg


class _PoisonedCrops(torch.utils.data.Dataset):
    """Crops of the smoke store where the clips in ``poisoned`` carry a NaN (a corrupt feature file)."""

    def __init__(self, base, poisoned: set[int]):
        self.base, self.poisoned = base, poisoned

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        lms, text = self.base[index]
        if index in self.poisoned:
            lms = lms.clone()
            lms[0, 0] = float("nan")
        return lms, text


def _nan_run(tmp_path, smoke_data, poisoned, max_nonfinite):
    from m2d2.data.features import LogMelStore
    from m2d2.data.loader import CropDataset
    from m2d2.text.cache import CaptionEmbeddings
    from m2d2.train.engine import train
    from m2d2.train.objectives import ClapObjective

    _, features, captions = smoke_data
    torch.manual_seed(0)
    model = M2D2(model_config("smoke"))
    model.set_stage("stage1")
    base = CropDataset(LogMelStore(features, "train"), 64, CaptionEmbeddings(captions))
    cfg = stage_config("stage1", "smoke").replace(schedule={"max_steps": 6, "global_batch": 4},
                                                  checkpoint={"max_nonfinite": max_nonfinite})
    return model, train(cfg, ClapObjective(model), _PoisonedCrops(base, poisoned), tmp_path / "out")


def test_non_finite_steps_are_skipped_and_counted(tmp_path, smoke_data):
    model, result = _nan_run(tmp_path, smoke_data, poisoned={3}, max_nonfinite=5)
    assert result.steps == 6
    assert 1 <= result.final["skipped_steps"] < 6  # clip 3 lands in one batch per epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_non_finite_losses_abort_clearly(tmp_path, smoke_data):
    from m2d2.train.engine import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match="3 consecutive non-finite"):
        _nan_run(tmp_path, smoke_data, poisoned=set(range(20)), max_nonfinite=3)


def test_bf16_training_keeps_the_ema_target_fp32_and_lets_deepspeed_skip_non_finite_steps():
    """DeepSpeed's bf16 mode casts every parameter; the EMA target must stay fp32 (a bf16 target never moves) and a
    non-finite gradient is skipped by DeepSpeed's optimiser wrapper without a loss check of ours."""
    from m2d2.train.engine import Trainer, master_weights
    from m2d2.train.objectives import ClapObjective

    torch.manual_seed(0)
    model_cfg = model_config("smoke")
    model_cfg.m2d.ema_decay_start, model_cfg.m2d.ema_decay_end = 0.99995, 0.99999  # the paper's
    model = M2D2(model_cfg)
    model.set_stage("stage1")
    cfg = stage_config("stage1", "smoke").replace(schedule={"global_batch": 4}, topology={"precision": "bf16"})
    trainer = Trainer(cfg, ClapObjective(model), total_steps=4, warmup_steps=0)
    assert not trainer.check_loss  # DeepSpeed's low-precision wrapper checks the gradients itself
    assert model.encoder.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.target.parameters())
    gen = torch.Generator().manual_seed(0)
    lms = torch.randn(4, 80, 64, generator=gen) * 3 - 5
    text = torch.randn(4, model.config.text.offline.dim, generator=gen)

    before = [p.detach().clone() for p in model.target.parameters()]
    out = trainer.step(0, lms, text)
    assert out is not None and torch.isfinite(out["loss"]) and out["logit_scale"].device == model.logit_scale.device
    online = [p.detach() for p in [*model.encoder.blocks.parameters(), *model.encoder.norm.parameters()]]
    weight = 1.0 - out["ema_decay"]
    moved = moved_in_bf16 = matrix_elements = 0
    for old, new, src in zip(before, model.target.parameters(), online, strict=True):
        torch.testing.assert_close(new, torch.lerp(old, src.float(), weight), atol=1e-9, rtol=0)
        if old.ndim >= 2:
            matrix_elements += old.numel()
            moved += int((new != old).sum())
            # the same update applied to a bf16 target
            moved_in_bf16 += int((torch.lerp(old.bfloat16(), src, weight) != old.bfloat16()).sum())
    assert moved > 0.9 * matrix_elements
    assert moved_in_bf16 < 0.01 * matrix_elements

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    poisoned = lms.clone()
    poisoned[0, 0, 0] = float("nan")
    assert trainer.step(1, poisoned, text) is None and not trainer.engine.was_step_applied()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert trainer.step(2, lms, text) is not None  # and training goes on

    masters = {id(p): hp.clone() for p, hp in master_weights(trainer.optimizer, model)}
    assert trainer.load_master_weights() == len(masters) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p, masters[id(p)]) for p in model.parameters() if id(p) in masters)


def test_regional_compile_policy_and_state_dict_keys():
    """Each transformer block compiles on its own (lazily); keys stay those of the reference layout. The compiled
    step itself is measured against eager by ``benchmarks/stage1_throughput.py --compile on`` (minutes on CPU)."""
    from m2d2.train.engine import compile_blocks, use_compile

    cfg = stage_config("stage1", "smoke")
    assert use_compile(cfg, torch.device("cuda")) and not use_compile(cfg, torch.device("cpu"))
    assert use_compile(cfg.replace(topology={"compile": "on"}), torch.device("cpu"))
    assert not use_compile(cfg.replace(topology={"compile": "off"}), torch.device("cuda"))
    with pytest.raises(ValueError, match="topology.compile: 'yes' is not one of 'auto', 'on', 'off'"):
        cfg.replace(topology={"compile": "yes"})
    cfg.topology.compile = "yes"  # set after validation: the engine still refuses it
    with pytest.raises(ValueError, match="compile="):
        use_compile(cfg, torch.device("cpu"))
    model = M2D2(model_config("smoke"))
    keys = list(model.state_dict())
    c = model.config
    assert compile_blocks(model) == c.encoder.depth * 2 + c.predictor.depth + c.projector.depth
    assert list(model.state_dict()) == keys


def test_bf16_export_keeps_frozen_parameters_unrounded():
    """A frozen part (stage 2's encoder) has no fp32 master; DeepSpeed's bf16 cast must not reach the export."""
    from m2d2.train.engine import Trainer
    from m2d2.train.objectives import ClapObjective

    torch.manual_seed(0)
    model = M2D2(model_config("smoke"))
    model.set_stage("stage1")
    model.audio_proj.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.audio_proj.named_parameters()}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in frozen.values())
    trainer = Trainer(stage_config("stage1", "smoke").replace(schedule={"global_batch": 4},
                                                              topology={"precision": "bf16"}),
                      ClapObjective(model), total_steps=1, warmup_steps=0)
    assert model.audio_proj.norm.weight.dtype == torch.bfloat16
    trainer.step(0, torch.randn(4, 80, 64) * 3 - 5, torch.randn(4, model.config.text.offline.dim))
    trainer.load_master_weights()
    assert all(torch.equal(p, frozen[n]) for n, p in model.audio_proj.named_parameters())
