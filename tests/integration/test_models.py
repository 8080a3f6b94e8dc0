"""The paper-size M2D2 model on 10 s of audio (a ViT-B forward pass on 1001 frames: several seconds on 2 cores,
so it runs with the integration tier; the rest of the model core is in tests/unit/test_models.py)."""

from __future__ import annotations

import pytest
import torch

from m2d2.models import M2D2
from m2d2.presets import model_config


@pytest.fixture(scope="module")
def paper_model() -> M2D2:
    torch.manual_seed(0)
    return M2D2(model_config("paper")).eval()


def test_paper_ten_seconds_gives_63_frames(paper_model):
    wave = 0.1 * torch.randn(1, 160_000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        frames = paper_model.encode_frames(wave)
        clip = paper_model.encode_clip(wave)
        clap = paper_model.encode_clap_audio(wave)
    assert frames.shape == (1, 63, 3840)  # 1001 frames -> 1008 -> 608 + 400 -> 38 + 25 patch columns
    assert clip.shape == (1, 3840) and torch.allclose(clip, frames.mean(1))
    assert clap.shape == (1, 768)
