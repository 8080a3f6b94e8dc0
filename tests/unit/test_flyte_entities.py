"""What the Flyte tasks rely on, without importing the workflow module: snapshot resolution, pass-through of
disabled stages and a data root every task sees. The workflow module itself, imported as `make demo` gets it and
serialised by `pyflyte package` for the cluster, is checked in tests/integration/test_flyte_entities.py (importing
flytekit and the workflow takes ~8 s on 2 cores).
"""

from __future__ import annotations

import pytest


def test_latest_snapshot_resolution(tmp_path):
    from m2d2.pipeline import resolve_corpus_source

    for name in ("2026-11-01", "2026-11-20", "2026-11-27"):
        (tmp_path / name).mkdir()
    for name in ("2026-11-01", "2026-11-20"):
        (tmp_path / name / "manifest.parquet").write_bytes(b"")
    # 2026-11-27 has no manifest yet (still being written): not a snapshot
    assert resolve_corpus_source(f"{tmp_path}/latest") == str(tmp_path / "2026-11-20")
    assert resolve_corpus_source(str(tmp_path / "2026-11-01")) == str(tmp_path / "2026-11-01")
    assert resolve_corpus_source("") == ""
    with pytest.raises(FileNotFoundError, match="no manifest.parquet"):
        resolve_corpus_source(str(tmp_path / "2026-11-27"))
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        resolve_corpus_source(f"{tmp_path / '2026-11-27'}/latest")


def test_a_stage_no_variant_needs_is_skipped_and_variants_select_the_stages():
    """Skipping is the library's (m2d2.pipeline.runner.run_stage), whichever driver calls it."""
    from m2d2.pipeline import PipelineConfig, step_settings
    from m2d2.pipeline.registry import needed_stages, stage
    from m2d2.pipeline.runner import StepOutput, run_stage

    cfg = PipelineConfig(variants=["m2d2-plus"])
    previous = StepOutput(path="/nothing/is/read/from/here")  # nothing is read from it, nothing is trained
    skipped = run_stage(stage("stage1.1"), cfg.stages["stage1.1"], "/x#id", "/f", previous, trains=False)
    assert skipped.skipped and skipped.path == previous.path
    with pytest.raises(ValueError, match="stage2-as trains on stage1.1, which was skipped"):
        run_stage(stage("stage2-as"), cfg.stages["stage2-as"], "/x#id", "/f", skipped)
    settings = step_settings(cfg)
    assert settings.trains == {"stage1": True, "stage1.1": False, "stage2": True, "stage2.1": True,
                               "stage2-as": False, "stage2.1-as": False}
    assert list(settings.views) == ["stage1", "stage2", "stage2.1"]  # only stages that train are checked
    assert [s.name for s in needed_stages(["m2d2-as-plus"])] == ["stage1", "stage1.1", "stage2-as", "stage2.1-as"]
    assert [s.name for s in needed_stages(["m2d2-minus"])] == ["stage1"]
    assert all(step_settings(PipelineConfig()).trains.values())  # the default makes all four models


def test_data_root_must_be_a_path_every_task_sees():
    from m2d2.presets import pipeline_config

    with pytest.raises(ValueError, match="shared volume the PodTemplates mount at /data"):
        pipeline_config("paper", data_root="s3://bucket/m2d2/runs")
    assert pipeline_config("paper", data_root="/data/m2d2/runs").caption_shards == 16
