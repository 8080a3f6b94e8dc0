"""The shard primitive both sharded jobs run on: idempotent builds committed by a marker written last, a killed
build redone, a stale marker never trusted, outputs whole or absent; on a local root (the same tests on ``s3://``,
moto on loopback, and a Flyte map over ShardRefs are in tests/integration/test_shard_primitive.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pytest

from m2d2 import io
from m2d2.shards import (
    MARKER,
    Shard,
    ShardRef,
    build,
    is_committed,
    npy_header,
    plan_of,
    read_marker,
    shard_refs,
)

DATA = np.arange(12, dtype=np.float16).reshape(3, 4)
NPY = npy_header(DATA.shape) + DATA.tobytes()


@pytest.fixture(params=["local"])
def root(request, tmp_path) -> str:
    """A local job root; tests/integration/test_shard_primitive.py runs the tests that take ``root`` on s3://."""
    return str(tmp_path / "job")


@dataclass
class Job:
    """A shard job that counts its builds and can die after writing its outputs, before the marker."""

    calls: int = 0
    die: bool = False

    def __call__(self, out) -> dict:
        self.calls += 1
        out.put("npy", NPY)
        with out.open("index.json") as sink:
            for part in (b'{"rows": ', b"3}"):
                sink.write(part)
        if self.die:
            raise KeyboardInterrupt("killed after the outputs, before the marker")
        return {"rows": 3}


def test_build_is_idempotent_and_the_marker_records_every_output(root):
    shard, job = Shard(root, "shard-00000", "fp-a"), Job()
    assert not is_committed(shard)
    first = build(shard, job)
    assert first.built and first.info == {"rows": 3} and job.calls == 1 and is_committed(shard)
    assert first.marker["files"] == {
        "npy": {"sha256": hashlib.sha256(NPY).hexdigest(), "bytes": len(NPY)},
        "index.json": {"sha256": hashlib.sha256(b'{"rows": 3}').hexdigest(), "bytes": 11},
    }
    assert io.read_bytes(shard.uri("npy")) == NPY and io.read_bytes(shard.uri("index.json")) == b'{"rows": 3}'
    assert shard.marker_uri == io.join(root, f"shard-00000.{MARKER}")
    again = build(shard, job)
    assert not again.built and job.calls == 1 and again.marker == first.marker  # committed: nothing rebuilt
    if io.is_local(root):
        assert sorted(p.name for p in io.local_path(root).iterdir()) == [
            "shard-00000.done.json", "shard-00000.index.json", "shard-00000.npy"]  # no temporary file left


def test_a_killed_build_is_rebuilt(root):
    shard, job = Shard(root, "rows-0000000000-0000000003", "fp-a"), Job(die=True)
    with pytest.raises(KeyboardInterrupt):
        build(shard, job)
    assert io.exists(shard.uri("npy")) and not io.exists(shard.marker_uri)  # outputs written, marker missing
    assert not is_committed(shard)
    job.die = False
    assert build(shard, job).built and job.calls == 2 and is_committed(shard)


def test_a_stale_marker_is_not_trusted_and_goes_before_the_rebuild(root):
    old, new = Shard(root, "shard-00001", "fp-old"), Shard(root, "shard-00001", "fp-new")
    build(old, Job())
    assert is_committed(old) and not is_committed(new)  # same files, another plan's fingerprint
    seen = []

    def rebuild(out) -> dict:
        seen.append(io.exists(new.marker_uri))
        return Job()(out)

    assert build(new, rebuild).built and seen == [False]  # the stale marker was deleted before any write
    assert is_committed(new) and not is_committed(old)
    assert json.loads(io.read_bytes(new.marker_uri))["fingerprint"] == "fp-new"


def test_a_marker_whose_outputs_changed_or_vanished_is_not_trusted(root):
    shard = Shard(root, "shard-00002", "fp")
    build(shard, Job())
    io.atomic_write_bytes(shard.uri("npy"), NPY[:-2])  # cut short
    assert read_marker(shard) is None and read_marker(shard, check_files=False) is not None
    build(shard, Job())
    io.remove(shard.uri("index.json"))
    assert not is_committed(shard)
    build(shard, Job())
    io.atomic_write_bytes(shard.marker_uri, b"{not json")
    assert not is_committed(shard)
    assert build(shard, Job()).built


def test_a_streamed_output_appears_whole_or_not_at_all(root):
    shard = Shard(root, "shard-00003", "fp")

    def dies_mid_stream(out) -> dict:
        with out.open("npy") as sink:
            sink.write(NPY[:40])
            raise ConnectionError("lost the connection mid-stream")

    with pytest.raises(ConnectionError):
        build(shard, dies_mid_stream)
    assert not io.exists(shard.uri("npy")) and not io.exists(shard.marker_uri)
    if io.is_local(root):
        assert not list(io.local_path(root).glob(".*.tmp"))


def test_a_killed_local_build_leaves_no_temporary_file_behind(tmp_path):
    shard = Shard(str(tmp_path), "shard-00004", "fp")
    (tmp_path / ".shard-00004.npy.12345.tmp").write_bytes(b"partial")  # what a SIGKILL leaves
    (tmp_path / ".shard-000040.npy.12345.tmp").write_bytes(b"another shard's")
    build(shard, Job())
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".shard-000040.npy.12345.tmp"]


def test_one_npy_header_writer_for_both_jobs(tmp_path):
    from m2d2.data import shards as logmel
    from m2d2.text import index

    np.save(tmp_path / "x.npy", DATA)
    assert (tmp_path / "x.npy").read_bytes() == NPY
    assert logmel.npy_header is index.npy_header is npy_header


def test_shard_refs_name_one_plan():
    refs = shard_refs("s3://bucket/store/plan.json", 3, workspace="/data#abc")
    assert refs[2] == ShardRef("s3://bucket/store/plan.json", 2, "/data#abc") and plan_of(refs) == refs[0].plan
    with pytest.raises(ValueError, match="one plan"):
        plan_of([*refs, ShardRef("other/plan.json", 0)])
    with pytest.raises(ValueError, match="one plan"):
        plan_of([])
