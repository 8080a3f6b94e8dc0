"""The data path with worker processes: the rank-sharded loader resumed with DataLoader workers, and feature
extraction in spawned worker processes equal to the sequential store (the tone corpus of
tests/unit/test_data_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2d2.data.features import FeatureConfig, LogMelStore, extract_features
from m2d2.data.loader import CropDataset
from tests.unit.test_data_pipeline import make_corpus


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def test_crop_loader_shards_by_rank_resumes_exactly_and_ignores_worker_count(tmp_path):
    from m2d2.data.loader import CropLoader, rank_batches
    from m2d2.data.shards import FeatureConfig as Cfg
    from m2d2.data.shards import LogMelClip, import_logmels

    rng = np.random.default_rng(0)
    clips = [LogMelClip(f"c{i}", rng.normal(-7, 4, (80, 40 + 7 * i)).astype(np.float32), (f"caption {i % 3}",))
             for i in range(24)]
    import_logmels(str(tmp_path / "s"), {"train": clips}, Cfg(norm_crop_frames=32, norm_samples=50, shard_mb=0.1),
                   progress=False)
    data = CropDataset(LogMelStore(tmp_path / "s", "train"), 64, seed=5)
    full = CropLoader(data, global_batch=4, seed=5)
    full.set_epoch(1)
    reference = list(full)
    assert len(reference) == 6 and full.state_dict() == {"epoch": 2, "batch": 0}
    # Two ranks: rank r holds every other clip of each global batch; together they are the global batch.
    ranks = [rank_batches(full.order, 1, 4, rank, 2) for rank in (0, 1)]
    for b, batch in enumerate(rank_batches(full.order, 1, 4)):
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(batch)
    # Interrupted after 2 batches, resumed from its state_dict with worker processes: the same remaining batches.
    first = CropLoader(data, global_batch=4, seed=5)
    first.set_epoch(1)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 2:
            break
    state = first.state_dict()
    assert state == {"epoch": 1, "batch": 2}
    resumed = CropLoader(data, global_batch=4, seed=5, num_workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    for (x1, t1), (x2, t2) in zip(seen + rest, reference, strict=True):
        assert torch.equal(x1, x2) and t1 == t2


def test_extract_features_in_worker_processes_equals_the_sequential_store(corpus, tmp_path):
    cfg = FeatureConfig(norm_crop_frames=32, norm_samples=40, shard_mb=0.005)
    serial = extract_features(corpus / "manifest.parquet", corpus, tmp_path / "serial", cfg, progress=False)
    parallel = extract_features(corpus / "manifest.parquet", corpus, tmp_path / "parallel", cfg, progress=False,
                                workers=2)
    assert parallel == serial
    a, b = LogMelStore(tmp_path / "serial", "train"), LogMelStore(tmp_path / "parallel", "train")
    assert len(a.shard_ids()) > 1 and list(a.clip_ids) == list(b.clip_ids)
    assert all(np.array_equal(a[i], b[i]) for i in range(len(a)))
