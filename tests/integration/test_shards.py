"""Sharded log-mel store on s3:// (a real S3 API: moto server on loopback): the path survives a crash in the
middle of a shard write, and the local shard cache is verified and shared (also with DataLoader worker processes).
The corpus and the local store are built as in tests/unit/test_shards.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from m2d2 import shards as shards_module
from m2d2.data.features import LogMelStore, extract_features
from m2d2.data.shards import IncompleteStoreError, build_shard, finish_store, plan_store
from tests.unit.test_shards import CFG, _corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_store(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "features"
    stats = extract_features(corpus, corpus.parent, out, CFG, progress=False)
    return out, stats


def test_s3_crash_mid_shard_then_rerun_loses_nothing(s3, corpus, local_store, tmp_path, monkeypatch):
    out, stats = local_store
    # Corpus and store both on S3: the manifest, the audio and every store file go through s3fs.
    for path in sorted(corpus.parent.rglob("*")):
        if path.is_file():
            s3.put_file(str(path), f"m2d2-data/corpus/{path.relative_to(corpus.parent)}")
    store = "s3://m2d2-data/features/run-1"
    plan = plan_store("s3://m2d2-data/corpus/manifest.parquet", store, None, CFG, ("train", "eval"))
    assert plan.audio_root == "s3://m2d2-data/corpus"
    original = shards_module._put

    def crash_in_shard_1(uri: str, data: bytes) -> None:
        if "shard-00001.index" in uri:
            raise ConnectionError("simulated crash after the shard's .npy was uploaded")
        original(uri, data)

    monkeypatch.setattr(shards_module, "_put", crash_in_shard_1)
    with pytest.raises(ConnectionError):
        for k in range(len(plan)):
            build_shard(plan, k, progress=False)
    monkeypatch.setattr(shards_module, "_put", original)
    # The partial shard is invisible: its bytes are there, its commit marker is not, the store is not complete.
    assert s3.exists("m2d2-data/features/run-1/shards/shard-00001.npy")
    assert not s3.exists("m2d2-data/features/run-1/shards/shard-00001.done.json")
    with pytest.raises(IncompleteStoreError, match=r"\[1, 2"):
        finish_store(plan)
    with pytest.raises(FileNotFoundError, match="not a complete feature store"):
        LogMelStore(store, "train", cache_dir=tmp_path / "cache")
    statuses = [build_shard(plan, k, progress=False).status for k in range(len(plan))]
    assert statuses[0] == "skipped" and statuses[1:] == ["built"] * (len(plan) - 1)
    # Orphans a crash can leave in a bucket: an object no marker lists, and a multipart upload never completed.
    s3.pipe("m2d2-data/features/run-1/shards/shard-00099.npy", b"a shard of an earlier, larger plan")
    s3.call_s3("create_multipart_upload", Bucket="m2d2-data", Key="features/run-1/shards/shard-00001.npy")
    report = finish_store(plan)
    assert not s3.exists("m2d2-data/features/run-1/shards/shard-00099.npy")
    assert not s3.call_s3("list_multipart_uploads", Bucket="m2d2-data", Prefix="features/").get("Uploads")
    assert s3.exists("m2d2-data/features/run-1/shards/shard-00001.npy")  # committed files stay
    assert report.norm_stats.mean == pytest.approx(stats.mean, rel=1e-12)  # same numbers as the local store
    remote, local = LogMelStore(store, "train", cache_dir=tmp_path / "cache"), LogMelStore(out, "train")
    assert list(remote.clip_ids) == list(local.clip_ids)
    assert all(np.array_equal(remote[i], local[i]) for i in range(len(local)))
    quarantine = pq.read_table(s3.open("m2d2-data/features/run-1/quarantine.parquet")).to_pylist()
    assert len(quarantine) == report.quarantined == 13
    assert all(q["reason"] for q in quarantine)
    assert json.loads(s3.cat("m2d2-data/features/run-1/stats.json"))["counts"] == {"train": 6, "eval": 2}


def test_s3_shard_cache_is_verified_and_shared(s3, local_store, tmp_path):
    out, _ = local_store
    store = "s3://m2d2-data/features/copy"
    for path in sorted(out.rglob("*")):
        if path.is_file():
            s3.put_file(str(path), f"m2d2-data/features/copy/{path.relative_to(out)}")
    cache = tmp_path / "cache"
    first = LogMelStore(store, "eval", cache_dir=cache, progress=False)
    files = sorted(cache.glob("*.npy"))
    assert len(files) == len(first.shard_ids()) and all(len(f.stem) == 64 for f in files)
    stamp = [f.stat().st_mtime_ns for f in files]
    again = LogMelStore(store, "eval", cache_dir=cache, progress=False)  # served from the cache
    assert [f.stat().st_mtime_ns for f in files] == stamp
    assert np.array_equal(again[0], LogMelStore(out, "eval")[0])
    # A DataLoader with worker processes reads the same crops (the store pickles without its memory maps).
    from m2d2.data.loader import CropDataset, collate

    data = CropDataset(again, 48, seed=1)
    batches = [b[0] for b in torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)]
    assert torch.equal(batches[0], collate([data[0], data[1]])[0])
    # A truncated cache file is fetched again; bytes that do not match the store's marker are refused.
    files[0].unlink()  # (a new inode: the maps of the stores above keep the old one, as a re-fetch's rename does)
    files[0].write_bytes(b"partial")
    assert np.array_equal(LogMelStore(store, "eval", cache_dir=cache, progress=False)[0], again[0])
    # A cached copy damaged in place (same size, other bytes) is re-hashed by the next process, fetched again.
    good = files[0].read_bytes()
    files[0].unlink()
    files[0].write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    assert np.array_equal(LogMelStore(store, "eval", cache_dir=cache, progress=False)[0], again[0])
    assert files[0].read_bytes() == good
    last_shard = json.loads(s3.cat("m2d2-data/features/copy/_COMPLETE.json"))["shards"][-1]
    last = last_shard["file"]
    original = s3.cat(f"m2d2-data/features/copy/{last}")
    s3.pipe(f"m2d2-data/features/copy/{last}", original[:-4] + b"\x00\x01\x02\x03")  # same size, other bytes
    with pytest.raises(OSError, match="does not match"):
        LogMelStore(store, "eval", cache_dir=tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh" / f"{last_shard['sha256']}.npy").exists()  # the other shards verified fine
    assert not list((tmp_path / "fresh").glob(".*.tmp"))
    s3.pipe(f"m2d2-data/features/copy/{last}", b"short")
    with pytest.raises(OSError, match="does not match"):
        LogMelStore(store, "eval", cache_dir=tmp_path / "fresh", progress=False)
