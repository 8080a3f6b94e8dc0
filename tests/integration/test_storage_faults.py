"""Storage fault drill: a proxy in front of a real S3 API (moto server on loopback) fails every N-th request with a
500, a 503 SlowDown or a reset connection. Shard builds, shard fetches and checkpoint saves retry and end with the
same bytes as a run without faults; a store that never answers gives a recoverable error naming the object.

The SDK's own retries are switched off here (botocore ``total_max_attempts=1``, s3fs ``retries=1``), so every injected
fault reaches m2d2's retry layer and is counted there: the harshest setting. In production the SDK retries each
request first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from m2d2 import io
from m2d2.data.features import LogMelStore, fetch_shards
from m2d2.data.shards import FeatureConfig, build_shard, finish_store, plan_store
from m2d2.io import StorageError
from m2d2.train.checkpoint import CheckpointManager, CheckpointWriteError
from m2d2.train.engine import RecoverableTrainingError
from m2d2.train.stages import run_stage1
from tests.helpers import FaultyProxy, moto_s3
from tests.unit.test_shards import CFG, _corpus

BUCKET = "m2d2-faults"
EVERY = 9  # longer than any one operation's requests, so a retried operation gets through


@pytest.fixture(scope="module")
def faulty_s3(tmp_path_factory):
    """(proxy, direct): the library's ``s3://`` I/O goes through the proxy; ``direct`` reads the store without it."""
    import fsspec
    import s3fs

    with moto_s3(BUCKET) as endpoint:
        proxy = FaultyProxy(endpoint)
        patch = pytest.MonkeyPatch()
        for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                           ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", proxy.url),
                           ("M2D2_STORAGE_BACKOFF_S", "0.002"), ("M2D2_STORAGE_BACKOFF_CAP_S", "0.02"),
                           ("M2D2_CACHE_DIR", str(tmp_path_factory.mktemp("shard-cache")))):
            patch.setenv(key, value)
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": proxy.url},
                                    "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        # s3fs's own retry loop: one attempt, in every thread's instance (fsspec caches one per thread)
        patch.setattr(s3fs.S3FileSystem, "retries", 1)
        fsspec.filesystem("s3").invalidate_cache()
        direct = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
        try:
            yield proxy, direct
        finally:
            fsspec.config.conf.pop("s3", None)
            patch.undo()
            proxy.stop()


def _digests(direct, prefix: str) -> dict[str, str]:
    """sha256 of every object under ``bucket/prefix``, by key relative to it."""
    root = f"{BUCKET}/{prefix}"
    return {key[len(root) + 1:]: hashlib.sha256(direct.cat_file(key)).hexdigest() for key in direct.find(root)}


def _build_store(store: str, corpus: str) -> None:
    config = FeatureConfig(**{**CFG.__dict__, "shard_mb": 0.25})  # a few clips per shard
    plan = plan_store(f"{corpus}/manifest.parquet", store, None, config, ("train", "eval"))
    for k in range(len(plan)):
        build_shard(plan, k, progress=False)
    finish_store(plan)


def test_every_ninth_request_failing_changes_no_byte(faulty_s3, smoke_data, tmp_path):
    proxy, direct = faulty_s3
    corpus = _corpus(tmp_path / "corpus").parent
    for path in sorted(corpus.rglob("*")):
        if path.is_file():
            direct.put_file(str(path), f"{BUCKET}/corpus/{path.relative_to(corpus)}")
    store, audio = f"s3://{BUCKET}/store", f"s3://{BUCKET}/corpus"
    report = []

    def drill(name: str, run, every: int) -> None:
        proxy.every = every
        injected, before, requests = dict(proxy.injected), io.retry_counts(), proxy.requests
        run()
        proxy.every = 0
        kinds = {kind: proxy.injected[kind] - injected.get(kind, 0) for kind in proxy.KINDS}
        unretried = proxy.unretried(requests)
        retried = io.retry_counts()["retried"] - before["retried"]
        report.append(f"{name}: {proxy.requests - requests} requests, {sum(kinds.values())} faults injected "
                      f"({kinds['500']} 500, {kinds['503']} 503 SlowDown, {kinds['reset']} reset), "
                      f"{sum(kinds.values()) - len(unretried)} retried ({retried} by m2d2's retry layer)")
        if every:
            assert sum(kinds.values()) > 0 and not unretried, (report[-1], unretried)
            # every error answer reached m2d2's layer; a reset is re-sent by aiohttp itself when the connection
            # was a reused keep-alive one (all of them here), else it reaches m2d2's layer too
            assert kinds["500"] + kinds["503"] <= retried <= sum(kinds.values()), report[-1]
            assert io.retry_counts()["failed"] == before["failed"]

    # 1. Shard build (audio and manifest read from the bucket, every output written to it), then finish.
    drill("shard build (clean)", lambda: _build_store(store, audio), 0)
    clean = _digests(direct, "store")
    direct.rm(f"{BUCKET}/store", recursive=True)
    direct.invalidate_cache()
    drill("shard build (faults)", lambda: _build_store(store, audio), EVERY)
    faulty = _digests(direct, "store")
    assert faulty.keys() == clean.keys()
    # Markers record the build's wall time; every other file, quarantine table included, is byte for byte the same.
    timed = {key for key in clean if key.endswith(".done.json")}
    assert {k: v for k, v in faulty.items() if k not in timed} == {k: v for k, v in clean.items() if k not in timed}
    compared = sum(direct.size(f"{BUCKET}/store/{key}") for key in clean if key not in timed)

    # 2. Shard fetch: ranged GETs into an empty cache, verified, the same arrays.
    caches = {}
    for name, every in (("clean", 0), ("faults", 3)):  # one request per ranged GET: every third fails
        cache = tmp_path / f"cache-{name}"
        holder: dict[str, LogMelStore] = {}
        drill(f"shard fetch ({name})", lambda cache=cache, holder=holder: holder.setdefault(
            "store", LogMelStore(store, "train", cache_dir=cache, progress=False)), every)
        caches[name] = (cache, holder["store"])
    files = {name: {p.name: p.read_bytes() for p in cache.glob("*.npy")} for name, (cache, _) in caches.items()}
    assert files["clean"] and files["faults"] == files["clean"]
    compared += sum(len(data) for data in files["clean"].values())
    a, b = caches["clean"][1], caches["faults"][1]
    assert len(a) == len(b) > 0 and all(np.array_equal(a[i], b[i]) for i in range(len(a)))

    # 3. Checkpoint saves (a smoke stage-1 run, a checkpoint after every step, keeping 2) and the export.
    cfg, features, captions = smoke_data
    stage = cfg.stages["stage1"].replace(schedule={"max_steps": 5, "global_batch": 4}, checkpoint={"every": 1, "keep": 2})
    outputs = {}
    for name, every in (("clean", 0), ("faults", EVERY)):
        root = f"s3://{BUCKET}/checkpoints-{name}"
        drill(f"checkpoints ({name})", lambda name=name, root=root: outputs.setdefault(
            name, run_stage1(stage, str(features), str(captions), str(tmp_path / name), checkpoint_root=root)), every)
    manager = {name: CheckpointManager(f"s3://{BUCKET}/checkpoints-{name}") for name in outputs}
    assert manager["clean"].complete_steps() == manager["faults"].complete_steps() == [4, 5]
    for name in outputs:
        assert not [p for p in direct.find(f"{BUCKET}/checkpoints-{name}") if "/step-" in p
                    and not direct.exists(p.rsplit("/", 1)[0] + "/COMPLETE")], "files of an incomplete checkpoint"
    for step in (4, 5):
        for file in ("model.safetensors", "rank-00000.pt"):
            blobs = [io.read_bytes(io.join(manager[name].step_uri(step), file)) for name in ("clean", "faults")]
            assert blobs[0] == blobs[1], f"step {step} {file}"
            compared += len(blobs[0])
    exports = [(Path(outputs[name].export_dir) / "model.safetensors").read_bytes() for name in ("clean", "faults")]
    assert exports[0] == exports[1]
    compared += len(exports[0])
    print("\n".join([*report, f"bytes compared: {compared}"]))  # pytest -s shows the drill's figures


def test_a_store_that_never_answers_gives_a_recoverable_error_naming_the_object(faulty_s3, smoke_data, tmp_path,
                                                                                monkeypatch):
    proxy, _ = faulty_s3
    monkeypatch.setenv("M2D2_STORAGE_ATTEMPTS", "3")
    proxy.every = 1  # every request fails
    try:
        uri = f"s3://{BUCKET}/dead/file.bin"
        with pytest.raises(StorageError, match=rf"{uri}: write failed 3 times") as caught:
            io.atomic_write_bytes(uri, b"bytes")
        assert caught.value.uri == uri and isinstance(caught.value, OSError)
        # A checkpoint save: a clear error naming the object, from the store's error.
        manager = CheckpointManager(f"s3://{BUCKET}/dead/checkpoints")
        with pytest.raises(CheckpointWriteError, match=r"dead/checkpoints/step-000000001/rank-00000\.pt") as caught:
            manager.save(1, {"w": torch.zeros(2)}, {"x": torch.ones(1)}, {})
        assert isinstance(caught.value.__cause__, StorageError)
        # A shard fetch.
        sha = "0" * 64
        with pytest.raises(StorageError, match=rf"s3://{BUCKET}/dead/shard\.npy: read bytes"):
            fetch_shards([(f"s3://{BUCKET}/dead/shard.npy", sha, 10)], tmp_path / "cache")
        assert not list((tmp_path / "cache").glob("*.tmp")), "a partial download was left behind"
        # A training stage whose checkpoint store is down fails as recoverable (the Flyte task retries it).
        cfg, features, captions = smoke_data
        stage = cfg.stages["stage1"].replace(schedule={"max_steps": 2, "global_batch": 4},
                                             checkpoint={"every": 1, "keep": 2})
        with pytest.raises(RecoverableTrainingError, match=rf"s3://{BUCKET}/dead/run"):
            run_stage1(stage, str(features), str(captions), str(tmp_path / "run"),
                       checkpoint_root=f"s3://{BUCKET}/dead/run")
    finally:
        proxy.every = 0
