"""The training engine's runs: on the smoke data (the session's ``smoke_data`` fixture: corpus, features, captions) a
real single-process run, the non-finite-loss policy and the 2-process Flyte Elastic + DeepSpeed (gloo) path of
stage 1 in a child process; DeepSpeed's bf16 mode on the smoke model in this process (the first DeepSpeed engine of
a session costs ~8 s on 2 cores)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2d2.models import M2D2
from m2d2.presets import model_config, stage_config
from tests.helpers import subprocess_env


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
result = stage1(section=cfg.stages["stage1"], trains=True, workspace=workspace_token(cfg.data_root),
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
