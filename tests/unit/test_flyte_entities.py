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


def test_optional_stages_pass_their_input_through_when_disabled():
    """Pass-through is the library's (m2d2.pipeline.runner.run_stage), whichever driver calls it."""
    from m2d2.pipeline import PipelineConfig
    from m2d2.pipeline.registry import stage
    from m2d2.pipeline.runner import StepOutput, run_stage

    cfg = PipelineConfig()
    previous = StepOutput(path="/nothing/is/read/from/here")  # nothing is read from it, nothing is trained
    assert run_stage(stage("stage1.1"), cfg.stages["stage1.1"].replace(enabled=False), "/x#id", "/f", previous) is previous
    assert run_stage(stage("stage2.1"), cfg.stages["stage2.1"].replace(enabled=False), "/x#id", "/f", previous) is previous
    with pytest.raises(ValueError, match="stage2 cannot be disabled"):  # refused by the config already
        cfg.stages["stage2"].replace(enabled=False)


def test_data_root_must_be_a_path_every_task_sees():
    from m2d2.presets import pipeline_config

    with pytest.raises(ValueError, match="shared volume the PodTemplates mount at /data"):
        pipeline_config("paper", data_root="s3://bucket/m2d2/runs")
    assert pipeline_config("paper", data_root="/data/m2d2/runs").caption_shards == 16
