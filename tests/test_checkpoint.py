"""Checkpoint manager on a local path and through s3:// (a real S3 API: moto server on loopback), and the
non-finite-loss policy of the training loop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import moto_s3

from m2d2.train.checkpoint import COMPLETE, CheckpointManager


def _state(seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    opt = torch.optim.AdamW([torch.nn.Parameter(model["w"].clone())])
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 4)
    opt.step()
    return model, {"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def _round_trip(root: str) -> None:
    manager = CheckpointManager(root, keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        model, rank_state = _state(step)
        manager.save(step, model, rank_state, {"train_state": {"step": step}})
    assert manager.complete_steps() == [20, 30]  # keep-last-2 pruned step 10
    ckpt = manager.load()
    model, rank_state = _state(30)
    assert ckpt.step == 30 and ckpt.meta["train_state"]["step"] == 30
    assert all(torch.equal(ckpt.model[k], model[k]) for k in model)
    assert torch.equal(ckpt.rank_state["optimizer"]["state"][0]["exp_avg"], rank_state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(ckpt.rank_state["rng"]["torch"], rank_state["rng"]["torch"])
    with pytest.raises(ValueError, match="same world size"):
        manager.load(world_size=2)


def test_local_round_trip_keep_last_and_incomplete_steps(tmp_path):
    _round_trip(str(tmp_path / "ckpt"))
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    # A crash mid-save leaves a step without its marker: it is invisible to resume.
    (tmp_path / "ckpt" / "step-000000040").mkdir()
    (tmp_path / "ckpt" / "step-000000040" / "rank-00000.pt").write_bytes(b"partial")
    assert manager.latest() == 30
    with pytest.raises(FileNotFoundError):
        CheckpointManager(str(tmp_path / "empty")).load()


@pytest.fixture(scope="module")
def s3_bucket():
    with moto_s3("m2d2-ckpt") as endpoint:
        yield endpoint


def test_s3_round_trip_against_a_real_s3_api(s3_bucket, monkeypatch):
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket)
    fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": s3_bucket}}
    try:
        fsspec.filesystem("s3").invalidate_cache()
        _round_trip("s3://m2d2-ckpt/runs/run-key-1/stage1")
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        marker = json.loads(fs.cat(f"m2d2-ckpt/runs/run-key-1/stage1/step-000000030/{COMPLETE}"))
        assert marker == {"world_size": 1}
        assert not fs.exists("m2d2-ckpt/runs/run-key-1/stage1/step-000000010")
    finally:
        fsspec.config.conf.pop("s3", None)
