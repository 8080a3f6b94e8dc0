"""Caption shards under an s3:// work directory (a real S3 API: moto server on loopback) merge into the same local
cache as the one-process driver; the batch-sensitive toy encoder and captions of tests/unit/test_text_cache.py."""

from __future__ import annotations

import pytest

from m2d2.models import OfflineTextConfig
from m2d2.text.cache import embed_captions
from m2d2.text.shards import VECTORS, embed_shard, merge_shards, plan_shards, plan_workdir, read_plan, remove_workdir
from tests.unit.test_text_cache import CALLS, _files, captions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def toy(tmp_path) -> OfflineTextConfig:
    """The encoder kind ``test-batch-sensitive``, registered by tests.unit.test_text_cache (imported above)."""
    (tmp_path / "toy-model").mkdir()
    CALLS.update(n=0, fail_at=None)
    return OfflineTextConfig(kind="test-batch-sensitive", path=str(tmp_path / "toy-model"), dim=24)


def test_caption_shards_on_s3_merge_into_the_same_local_cache(toy, tmp_path, s3):
    """Plan and shards under an s3:// work directory (a killed shard redone there); the merged cache is local."""
    texts = captions()
    reference = tmp_path / "ref" / "captions.parquet"
    embed_captions(texts, toy, reference, batch_size=8, bucket=True)
    work = f"s3://m2d2-data/captions/{tmp_path.name}"
    uri = plan_shards(texts, 3, toy, batch_size=8).save(work)
    assert uri == f"{work}/plan.parquet" and plan_workdir(uri) == work
    plan = read_plan(uri)
    for shard in range(plan.n_shards):
        assert not embed_shard(plan, shard, work).skipped
    assert embed_shard(plan, 1, work).skipped and s3.exists(plan.shard(work, 2).uri(VECTORS))
    s3.rm(plan.shard(work, 2).marker_uri)  # killed after its vectors were uploaded: redone
    CALLS["n"] = 0
    assert not embed_shard(plan, 2, work).skipped
    assert CALLS["n"] == plan.shard_batches[3] - plan.shard_batches[2]
    out = tmp_path / "out" / "captions.parquet"
    merge_shards(plan, work, out)
    assert _files(out) == _files(reference)
    remove_workdir(work)
    assert not s3.exists(work)
    # The one-process driver with an s3:// work directory: same bytes, the shards removed after the merge.
    again = tmp_path / "again" / "captions.parquet"
    embed_captions(texts, toy, again, batch_size=8, bucket=True, n_shards=2, workdir=f"{work}-2")
    assert _files(again) == _files(reference) and not s3.exists(f"{work}-2")
