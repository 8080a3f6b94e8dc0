"""Fixtures shared by both tiers; the helpers they build on live in :mod:`tests.helpers`."""

from __future__ import annotations

import pytest

from m2d2.models import M2D2Config
from tests.helpers import tiny_bert, tiny_config


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-matrix tests: on a loaded 2-core machine, OpenMP workers
    spin-waiting for each other made a forward pass ~65x slower (0.94 s vs 0.014 s per clip). Restored after the
    module. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_stage2_export(tmp_path_factory) -> str:
    """A tiny stage-2 export (72-frame encoder, 1-layer BERT): the model the inference and CLI tests load."""
    import torch

    from m2d2.models import M2D2

    torch.manual_seed(0)
    model = M2D2(tiny_config(input_frames=72), with_m2d=False)
    model.start_stage2(tiny_bert(hidden=64))
    path = tmp_path_factory.mktemp("stage2-export") / "model"
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def tiny() -> M2D2Config:
    return tiny_config()


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The smoke preset's corpus, log-mel store and caption cache, built once per test session."""
    from m2d2.pipeline import build_caption_cache, build_corpus, build_features, step_settings
    from m2d2.presets import pipeline_config

    root = tmp_path_factory.mktemp("smoke-data")
    cfg = pipeline_config("smoke", data_root=str(root))
    settings = step_settings(cfg)
    corpus = build_corpus(settings.corpus, cfg.data_root)
    features, _ = build_features(settings.features, cfg.data_root, corpus)
    captions, _ = build_caption_cache(settings.captions, cfg.data_root, corpus)
    return cfg, features, captions
