"""The paper's stage presets (the stages trained on the smoke data are in tests/integration/test_stages.py)."""

from __future__ import annotations

import pytest

from m2d2.presets import model_config, stage_config


def test_paper_presets_match_the_paper():
    s1, s11, s2 = (stage_config(s, "paper") for s in ("stage1", "stage1.1", "stage2"))
    assert (s1.schedule.epochs, s1.schedule.warmup_epochs, s1.schedule.global_batch, s1.lr) == (
        300, 20, 2048, pytest.approx(3e-4 * 8))
    assert (s11.optim.name, s11.lr, s11.schedule.global_batch, s11.augment.mixup_alpha) == ("lars", 2.0, 64, 0.5)
    assert (s11.augment.freq_mask, s11.augment.time_mask, s11.augment.patch_out, s11.data.crop_frames) == (
        30, 192, 0.5, 1001)
    assert s11.data.balanced_sampling and s11.data.samples_per_epoch == 200_000
    assert (s2.schedule.epochs, s2.schedule.warmup_epochs, s2.lr, s2.data.crop_frames) == (
        30, 5, pytest.approx(3e-6 * 8), 1001)
    paper = model_config("paper")
    assert paper.clap.stage2_mask_ratio == 0.3 and paper.m2d.ema_decay_start == 0.99995
    assert (paper.clap.lambda_m2d, paper.clap.lambda_clap) == (1.0, 0.01)
