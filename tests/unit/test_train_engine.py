"""The training engine without running it: schedule, parameter groups, DeepSpeed config and the compile policy (the
engine's runs, under DeepSpeed in this process and in 2 Flyte Elastic processes, are in
tests/integration/test_train_engine.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from m2d2.config import from_dict, to_dict
from m2d2.models import M2D2
from m2d2.presets import model_config, stage_config
from m2d2.train.config import TrainStageConfig
from m2d2.train.engine import deepspeed_config, lr_at
from m2d2.train.objectives import decay_groups


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
