"""Stages 1.1 and 2.1 through the one training loop: what each consumes, trains, freezes and exports (the smoke
chain 1 -> 1.1 -> 2 -> 2.1 trained in this process on the session's smoke data: about a minute on 2 cores, so it
runs with the integration tier; the paper presets are checked in tests/unit/test_stages.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m2d2.data.features import LogMelStore, load_norm_stats
from m2d2.data.views import ViewError, ViewRule, resolve_view
from m2d2.models import M2D2
from m2d2.models.tagger import resample_pos_embed
from m2d2.presets import model_config, stage_config
from m2d2.train.config import TrainStageConfig


@pytest.fixture(scope="module")
def chain(smoke_data, tmp_path_factory):
    """stage-1 export (random init) -> stage 1.1 -> stage 2 -> stage 2.1, all smoke presets."""
    from m2d2.train.stages import run_stage1_1, run_stage2, run_stage2_1

    _, features, captions = smoke_data
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    stage1 = M2D2(model_config("smoke"), with_m2d=False)
    stats = load_norm_stats(features)
    stage1.set_norm_stats(stats.mean, stats.std)
    stage1.save_pretrained(str(root / "s1"))
    s11 = run_stage1_1(stage_config("stage1.1", "smoke"), str(features), str(root / "s1"), str(root / "s11"))
    s2 = run_stage2(stage_config("stage2", "smoke"), str(features), s11.export_dir, str(root / "s2"))
    s21 = run_stage2_1(stage_config("stage2.1", "smoke"), str(features), s2.export_dir, str(root / "s21"))
    return {"root": root, "s1": str(root / "s1"), "s11": s11, "s2": s2, "s21": s21, "features": features,
            "captions": str(captions)}


def _weights(export: str) -> dict[str, torch.Tensor]:
    return load_file(f"{export}/model.safetensors")


def test_stage11_grows_the_encoder_fine_tunes_it_and_exports_a_tagger(chain):
    s1, s11 = _weights(chain["s1"]), _weights(chain["s11"].export_dir)
    cfg = stage_config("stage1.1", "smoke")
    model = M2D2.from_pretrained(chain["s11"].export_dir)
    assert model.config.encoder.input_frames == cfg.data.crop_frames == 96
    grid_f, old_t = M2D2(model_config("smoke"), with_m2d=False).encoder.grid
    # The positional table is resampled (bicubic, not recomputed) and never trained.
    expected = resample_pos_embed(s1["encoder.pos_embed"], grid_f, old_t, 96 // 16)
    assert torch.equal(s11["encoder.pos_embed"], expected)
    changed = [k for k in s1 if k.startswith("encoder.blocks") and not torch.equal(s1[k], s11[k])]
    assert changed, "stage 1.1 left the encoder untouched"
    assert all(torch.equal(s1[k], s11[k]) for k in s1 if k.startswith("audio_proj."))  # only the encoder trains
    classifier = Path(chain["s11"].export_dir).parent / "classifier"
    classes = json.loads((classifier / "classes.json").read_text())["classes"]
    assert classes == sorted({lab for labs in LogMelStore(chain["features"], "train").labels for lab in labs})
    head = load_file(f"{classifier}/head.safetensors")
    assert head["linear.weight"].shape == (len(classes), model.config.encoder.embed_dim)
    assert "norm.running_mean" in head  # BatchNorm statistics travel with the head
    metrics = chain["s11"].metrics
    assert 0.0 < metrics["mAP"] <= 1.0 and metrics["eval_clips"] == len(LogMelStore(chain["features"], "eval"))
    assert metrics["mAP_chance"] == pytest.approx(1 / len(classes), abs=1e-6)
    assert chain["s11"].final["loss"] > 0 and 0.0 <= chain["s11"].final["mixup_lam"] <= 1.0


def test_stage2_uses_the_stage11_encoder_frozen_and_stage21_continues_stage2(chain):
    s11, s2, s21 = (_weights(chain[k].export_dir) for k in ("s11", "s2", "s21"))
    encoder = [k for k in s11 if k.startswith("encoder.")]
    assert encoder and all(torch.equal(s11[k], s2[k]) and torch.equal(s2[k], s21[k]) for k in encoder)
    assert any(not torch.equal(s2[k], s21[k]) for k in s2 if k.startswith("audio_proj."))
    assert any(not torch.equal(s2[k], s21[k]) for k in s2 if k.startswith("text_encoder."))
    model = M2D2.from_pretrained(chain["s21"].export_dir)
    assert model.config.encoder.input_frames == 96 and model.text_encoder is not None


def test_stage21_trains_on_the_curated_subset_only(chain, caplog):
    store = LogMelStore(chain["features"], "train")
    chosen = resolve_view(chain["features"], "stage2.1", ViewRule(min_captions=3)).clips
    assert 0 < len(chosen) < len(store) and all(len(store.captions[i]) >= 3 for i in chosen)
    assert resolve_view(chain["features"], "x", ViewRule(sources=("demo",))).clips == list(range(len(store)))
    with pytest.raises(ViewError, match=r"x: its training view has 0 clips, it needs at least 1 \(rule: "
                                        r"sources=\['audiocaps'\]; 0 clips match.*Change data.sources"):
        resolve_view(chain["features"], "x", ViewRule(sources=("audiocaps",)))
    assert stage_config("stage2.1", "paper").data.sources == ["wavcaps", "audiocaps", "clotho"]
    assert stage_config("stage2.1", "paper").augment.mask_ratio == 0.0


def test_a_config_of_another_stage_is_refused(chain):
    from m2d2.train.stages import run_stage1_1

    with pytest.raises(ValueError, match="'stage2' config was given to stage1.1"):
        run_stage1_1(stage_config("stage2", "smoke"), str(chain["features"]), chain["s1"], str(chain["root"] / "x"))
    with pytest.raises(ValueError, match="stage: 'stage3' is not one of 'stage1', 'stage1.1'"):
        stage_config("stage1", "smoke").replace(stage="stage3")
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        TrainStageConfig(stage="stage3")


def test_stage2_on_the_stage1_encoder_takes_longer_crops_in_chunks(chain):
    """M2D2: stage 2 straight on stage 1's 64-frame encoder with 96-frame crops (the smoke preset's), as the paper's
    stage 2 takes 1001-frame crops through a 608-frame encoder; the encoder stays frozen and stage 1's."""
    from m2d2.train.stages import run_stage1, run_stage2

    cfg = stage_config("stage2", "smoke")
    assert cfg.data.crop_frames == 96
    out = run_stage2(cfg, str(chain["features"]), chain["s1"], str(chain["root"] / "on-s1"), name="stage2")
    s1, s2 = _weights(chain["s1"]), _weights(out.export_dir)
    assert M2D2.from_pretrained(out.export_dir).config.encoder.input_frames == 64
    for key, value in s1.items():
        if key.startswith("encoder."):
            assert torch.equal(s2[key], value), key
    assert out.steps == 3 and out.final["loss"] > 0
    # stage 1 trains the encoder itself: its crops must fit its positional table
    with pytest.raises(ValueError, match="exceed the encoder's 64"):
        run_stage1(stage_config("stage1", "smoke").replace(data={"crop_frames": 96}), str(chain["features"]),
                   chain["captions"], str(chain["root"] / "too-long"))
