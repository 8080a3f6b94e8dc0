"""Checkpoint manager through s3:// (a real S3 API: moto server on loopback): the round trip of
tests/unit/test_checkpoint.py against it."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from m2d2.train.checkpoint import COMPLETE, CheckpointManager
from tests.helpers import moto_s3
from tests.unit.test_checkpoint import _round_trip


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
        # the marker lists every file with its sha256 and size: loading checks them
        assert marker["world_size"] == 1 and set(marker["files"]) == {"model.safetensors", "meta.json",
                                                                       "rank-00000.pt"}
        data = fs.cat("m2d2-ckpt/runs/run-key-1/stage1/step-000000030/model.safetensors")
        assert marker["files"]["model.safetensors"] == {"sha256": hashlib.sha256(data).hexdigest(),
                                                        "bytes": len(data)}
        assert not fs.exists("m2d2-ckpt/runs/run-key-1/stage1/step-000000010")
    finally:
        fsspec.config.conf.pop("s3", None)


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    """A 1-MiB tmpfs (mounted here: root only) holds one small checkpoint; the next, bigger save runs out of space."""
    import subprocess

    from m2d2.train.checkpoint import CheckpointWriteError

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full drill runs where it can")
    try:
        manager = CheckpointManager(str(mount / "ckpt"), keep_last=3)
        small = {"w": torch.zeros(16)}
        manager.save(1, small, {"rng": torch.zeros(4)}, {"train_state": {"step": 1}})
        big = {"w": torch.zeros(400_000)}  # 1.6 MB
        with pytest.raises(CheckpointWriteError, match="step 2 could not be written.*previous checkpoint \\(step 1\\)"):
            manager.save(2, big, {"rng": torch.zeros(4)}, {"train_state": {"step": 2}})
        assert manager.complete_steps() == [1] and not (mount / "ckpt" / "step-000000002").exists()
        assert torch.equal(manager.load().model["w"], small["w"])
    finally:
        subprocess.run(["umount", str(mount)], check=False)
