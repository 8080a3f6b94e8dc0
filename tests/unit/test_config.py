"""Configs: the strict loader (m2d2.config), the typed stage sections, the one preset registry and the Flyte paths a
PipelineConfig takes (type engine, `pyflyte run --cfg FILE`). `m2d2 config show` and the import layering, in child
processes, are in tests/integration/test_config.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from m2d2 import presets
from m2d2.config import ConfigError, dumps, from_dict, load, loads, merge
from m2d2.models import M2D2Config
from m2d2.pipeline import PipelineConfig, registry
from m2d2.train.config import STAGES, DataConfig, OptimConfig, ScheduleConfig, TrainStageConfig


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", presets.PRESETS)
def test_every_preset_round_trips_through_yaml_json_and_asdict(name):
    cfg = presets.pipeline_config(name)
    assert loads(dumps(cfg, "yaml"), PipelineConfig) == cfg
    assert loads(dumps(cfg, "json"), PipelineConfig, fmt="json") == cfg
    assert PipelineConfig.from_json(json.dumps(dataclasses.asdict(cfg))) == cfg  # what a test or a user writes
    for stage, section in cfg.stages.items():  # any section on its own
        assert section.stage == registry.stage(stage).recipe and loads(dumps(section), TrainStageConfig) == section
        assert loads(dumps(section.optim), OptimConfig) == section.optim
    model = presets.model_config(name)
    assert M2D2Config.from_dict(model.to_dict()) == model


def test_files_load_by_suffix(tmp_path):
    cfg = presets.pipeline_config("smoke", data_root=str(tmp_path))
    for suffix, fmt in ((".json", "json"), (".yaml", "yaml"), (".yml", "yaml")):
        path = tmp_path / f"cfg{suffix}"
        path.write_text(dumps(cfg, fmt))
        assert load(path, PipelineConfig) == cfg
    (tmp_path / "cfg.toml").write_text("")
    with pytest.raises(ConfigError, match="must end in .json, .yaml or .yml"):
        load(tmp_path / "cfg.toml", PipelineConfig)


# ----------------------------------------------------------------------------------------------- strictness
@pytest.mark.parametrize(("data", "message"), [
    ({"stages": {"stage2": {"optim": {"lrr": 1e-4}}}},
     "stages.stage2.optim.lrr: unknown key; known: name, base_lr, min_lr, beta1, beta2, momentum, weight_decay, grad_clip"),
    ({"experimnet": "x"}, "experimnet: unknown key; known: preset, data_root,"),
    ({"stages": {"stage1": {"schedule": {"epochs": "ten"}}}}, "stages.stage1.schedule.epochs: expected an integer, got 'ten'"),
    ({"stages": {"stage1": {"schedule": {"epochs": 10.5}}}}, "stages.stage1.schedule.epochs: expected an integer, got 10.5"),
    ({"stages": {"stage2": {"train_audio_encoder": "yes"}}},
     "stages.stage2.train_audio_encoder: expected true or false, got 'yes'"),
    ({"stages": {"stage1": {"enabled": False}}}, "stages.stage1.enabled: unknown key"),
    ({"variants": ["m2d2", "m2d2-ta"]}, "variants: unknown model 'm2d2-ta'; choose from m2d2-minus, m2d2, m2d2-plus, "
                                        "m2d2-as-plus"),
    ({"variants": []}, "variants: list at least one model"),
    ({"variants": ["m2d2", "m2d2"]}, "names a model twice"),
    ({"primary_metric": "stage2.1/zs_acc"}, "primary_metric='stage2.1/zs_acc': name a metric of each model"),
    ({"stages": {"stage2.1": {"data": {"sources": "wavcaps,clotho"}}}},
     "stages.stage2.1.data.sources: expected a list, got 'wavcaps,clotho'"),
    ({"stages": {"stage2.1": {"data": {"sources": ["wavcaps", 3]}}}},
     r"stages.stage2.1.data.sources\[1\]: expected a string, got 3"),
    ({"stages": {"stage1.1": {"optim": {"name": "adam"}}}},
     "stages.stage1.1.optim.name: 'adam' is not one of 'adamw', 'lars', 'sgd'"),
    ({"stages": {"stage3": {"stage": "stage2"}}}, "stages.stage3: unknown stage; the pipeline's stages are stage1, "
                                                   "stage1.1, stage2, stage2.1, stage2-as, stage2.1-as"),
    ({"stages": {"stage2.1": {"stage": "stage2"}}}, "stages.stage2.1 holds a 'stage2' config; it must be 'stage2.1'"),
    ({"stages": {"stage1": {"topology": {"zero_stage": 3}}}}, "stages.stage1.topology.zero_stage: 3 is not one of 0, 1, 2"),
    ({"stages": {"stage1": {"topology": {"zero_stage": True}}}}, "stages.stage1.topology.zero_stage: True is not one of 0, 1, 2"),
    ({"stages": {"stage1": {"topology": {"precision": "fp16"}}}}, "stages.stage1.topology.precision: 'fp16' is not one of"),
    ({"stages": {"stage1": {"optim": {"grad_clip": "none"}}}}, "stages.stage1.optim.grad_clip: expected a number, got 'none'"),
    ({"stages": {"stage1": {"schedule": 3}}}, "stages.stage1.schedule: expected a mapping of ScheduleConfig keys, got int"),
    ({"stages": {"stage1": {"schedule": {"global_batch": 0}}}}, "stages.stage1.schedule: global_batch=0: must be >= 1"),
    ({"stages": {"stage2": {"augment": {"mask_ratio": 1.5}}}}, r"stages.stage2.augment: mask_ratio=1.5: must be in \[0, 1\)"),
    ({"stages": {"stage1": {"model": "huge"}}}, "stages.stage1.model='huge': choose one of paper, demo, smoke"),
    ({"stages": {"stage2": {"stage": "stage1"}}}, "stages.stage2 holds a 'stage1' config; it must be 'stage2'"),
    ({"stages": {"stage2.1-as": {"stage": "stage2"}}},
     "stages.stage2.1-as holds a 'stage2' config; it must be 'stage2.1'"),
])
def test_a_bad_key_or_value_is_named_by_its_dotted_path(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(PipelineConfig, data)


def test_stage_validation_messages():
    with pytest.raises(ValueError, match="train_audio_encoder is a stage-2 setting"):
        TrainStageConfig(stage="stage2.1", train_audio_encoder=True)
    with pytest.raises(ValueError, match="augment.mask_ratio is for stage2, stage2.1"):
        presets.stage_config("stage1", "demo").replace(augment={"mask_ratio": 0.5})
    with pytest.raises(ValueError, match="does not split into accum_steps=3"):
        ScheduleConfig(global_batch=32, accum_steps=3)
    with pytest.raises(ValueError, match="one source name per list item"):
        DataConfig(sources=["wavcaps,clotho"])
    with pytest.raises(ValueError, match="grad_clip=0.0: must be > 0, or unset"):
        OptimConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="name='adam': choose one of 'adamw', 'lars', 'sgd'"):
        OptimConfig(name="adam")  # built in Python: held to what a file is


def test_a_partial_mapping_overlays_the_default_and_merge_copies():
    cfg = from_dict(PipelineConfig, {"stages": {"stage1": {"schedule": {"max_steps": 2}}}})
    demo = presets.stage_config("stage1", "demo")
    assert cfg.stages["stage1"] == demo.replace(schedule={"max_steps": 2})
    assert cfg.stages["stage1"].schedule.global_batch == 32
    assert list(cfg.stages) == [s.name for s in registry.STAGES]
    assert cfg.stages["stage2.1"] == cfg.stages["stage2.1-as"] == presets.stage_config("stage2.1", "demo")
    changed = merge(demo, {"optim": {"base_lr": 1e-3}})
    assert changed.optim.base_lr == 1e-3 and changed.optim.beta2 == demo.optim.beta2
    assert changed.schedule == demo.schedule and changed.schedule is not demo.schedule  # no shared section
    assert demo.replace(optim=OptimConfig(name="sgd")).optim == OptimConfig(name="sgd")  # an instance replaces


def test_no_sentinels_none_means_unset():
    demo = presets.stage_config("stage1", "demo")
    assert demo.data.crop_frames is None and demo.schedule.max_steps is None
    assert demo.data.samples_per_epoch is None and demo.checkpoint.every is None
    assert presets.stage_config("stage2", "demo").augment.mask_ratio is None  # the model's 0.3
    assert presets.stage_config("stage1.1", "paper").optim.grad_clip is None  # EVAR clips nothing
    assert presets.stage_config("stage2.1", "smoke").schedule.max_steps == 3


# ----------------------------------------------------------------------------------------------- the registry
def test_one_registry_gives_model_stages_and_pipeline():
    assert presets.pipeline_config("demo") == PipelineConfig()  # the workflow's default input is the demo preset
    for name in presets.PRESETS:
        preset = presets.get(name)
        assert preset.model == presets.model_config(name)
        assert list(preset.stages) == list(STAGES)
        pipe = preset.pipeline
        assert pipe.preset == name and {k: pipe.stages[k] for k in STAGES} == preset.stages
        assert pipe.stages["stage2-as"] == preset.stages["stage2"]  # a stage repeating a recipe takes its settings
        assert pipe.variants == ["m2d2-minus", "m2d2", "m2d2-plus", "m2d2-as-plus"]  # both presets make all four
        assert {s.model for s in preset.stages.values()} == {name}
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of paper, demo, smoke"):
        presets.get("huge")
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        presets.stage_config("stage3", "demo")
    a, b = presets.model_config("demo"), presets.model_config("demo")
    a.encoder.depth = 99
    assert b.encoder.depth == 4  # fresh copies


def test_smoke_and_paper_differ_from_demo_where_they_say():
    demo, smoke = presets.get("demo"), presets.get("smoke")
    for stage in STAGES:
        d, s = demo.stages[stage], smoke.stages[stage]
        assert s.schedule == ScheduleConfig(epochs=1, warmup_epochs=0.5, global_batch=8, max_steps=3)
        assert (s.model, s.log_every) == ("smoke", 1) and s.optim == d.optim
    assert smoke.stages["stage1.1"].data.crop_frames == 96 and smoke.stages["stage1.1"].augment.time_mask == 16
    assert smoke.pipeline.caption_shards == 2 and smoke.pipeline.corpus.train_per_class == 2
    paper = presets.get("paper")
    assert [paper.stages[s].topology.nproc_per_node for s in STAGES] == [4, 1, 4, 4]
    assert paper.stages["stage2.1"] == paper.stages["stage2"].replace(
        stage="stage2.1", augment={"mask_ratio": 0.0}, data={"sources": ["wavcaps", "audiocaps", "clotho"]})


# ----------------------------------------------------------------------------------------------- Flyte
@pytest.mark.parametrize("name", presets.PRESETS)
def test_pipeline_config_is_a_flyte_input(name):
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    cfg = presets.pipeline_config(name)
    ctx = FlyteContextManager.current_context()
    literal_type = TypeEngine.to_literal_type(PipelineConfig)
    literal = TypeEngine.to_literal(ctx, cfg, PipelineConfig, literal_type)
    assert TypeEngine.to_python_value(ctx, literal, PipelineConfig) == cfg


def test_pyflyte_cfg_file_is_loaded_strictly(tmp_path):
    """`pyflyte run ... --cfg FILE` parses FILE with PipelineConfig.from_json: an asdict dump loads, a typo fails."""
    from flytekit.interaction.click_types import JsonParamType

    cfg = presets.pipeline_config("smoke", data_root=str(tmp_path))
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert JsonParamType(PipelineConfig).convert(str(good), None, None) == cfg
    bad.write_text(json.dumps({"stages": {"stage2": {"optim": {"lrr": 1.0}}}}))
    with pytest.raises(ConfigError, match="stages.stage2.optim.lrr: unknown key"):
        JsonParamType(PipelineConfig).convert(str(bad), None, None)
