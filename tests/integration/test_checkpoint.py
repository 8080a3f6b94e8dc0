"""Checkpoint manager through s3:// (a real S3 API: moto server on loopback): the round trip of
tests/unit/test_checkpoint.py against it."""

from __future__ import annotations

import hashlib
import json

import pytest

from m2d2.train.checkpoint import COMPLETE
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
