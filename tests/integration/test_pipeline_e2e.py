"""End-to-end: the real `pyflyte run workflows/full.py full` on the `smoke` preset, three times, checked in MLflow.

Same tasks, classes and code paths as `make demo`; only the preset's numbers are smaller (a few steps per stage).
The first execution makes the four M2D2 models; the second changes stage 2.1's settings (only it and what follows
may run again); the third makes M2D2⁻ alone after the data root was moved away (Flyte's cache must not point at
outputs that no longer exist, and the stages no listed model needs are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from m2d2.presets import pipeline_config
from tests.helpers import REPO_ROOT as ROOT
from tests.helpers import subprocess_env

PYFLYTE = Path(sys.executable).with_name("pyflyte")


def _run_pipeline(cfg_file: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(PYFLYTE), "run", str(ROOT / "workflows" / "full.py"), "full", "--cfg", str(cfg_file)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
def test_smoke_pipeline_runs_twice_and_tracks_everything(tmp_path):
    cfg = pipeline_config("smoke", data_root=str(tmp_path / "data"), experiment="m2d2-smoke")
    cfg_file = tmp_path / "smoke.json"
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    db = tmp_path / "mlflow.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", FLYTE_LOCAL_CACHE_ENABLED="true")

    first = _run_pipeline(cfg_file, env, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    changed = dataclasses.replace(cfg, stages={**cfg.stages, "stage2.1": cfg.stages["stage2.1"].replace(seed=1)})
    changed_file = tmp_path / "smoke-changed.json"
    changed_file.write_text(json.dumps(dataclasses.asdict(changed)))
    second = _run_pipeline(changed_file, env, tmp_path)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("m2d2-smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=100, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("m2d2.kind") == "pipeline"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    first_parent, second_parent = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    stages = {r.data.tags["m2d2.stage"] for r in children}
    assert {"features", "embed", "stage1", "stage1.1", "stage2", "stage2.1", "stage2-as", "stage2.1-as",
            "evaluate", "m2d2-minus", "m2d2", "m2d2-plus", "m2d2-as-plus"} <= stages
    for stage in ("stage1", "stage1.1", "stage2", "stage2.1", "stage2-as", "stage2.1-as"):
        run = next(r for r in children if r.data.tags["m2d2.stage"] == stage)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len(history) >= 3 and all(h.value == h.value for h in history)  # one point per step, finite
        assert client.get_metric_history(run.info.run_id, "lr")
        assert client.get_metric_history(run.info.run_id, "samples_per_s")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "model"} <= artifacts
    s1 = next(r for r in children if r.data.tags["m2d2.stage"] == "stage1")
    assert client.get_metric_history(s1.info.run_id, "ema_decay")
    assert client.get_metric_history(s1.info.run_id, "loss_m2d")
    s11 = next(r for r in children if r.data.tags["m2d2.stage"] == "stage1.1")
    assert 0.0 < s11.data.metrics["eval/mAP"] <= 1.0 and "classifier" in {a.path for a in
                                                                            client.list_artifacts(s11.info.run_id)}
    metrics = first_parent.data.metrics
    for key in ("stage1/zs_acc", "stage2/zs_acc", "stage2.1/zs_acc", "stage2.1-as/zs_acc", "stage1_baseline/zs_acc",
                "stage2-as_baseline/zs_acc", "stage2/t2a_R1", "stage1/a2t_mAP10", "stage1.1/mAP",
                "m2d2-plus/probe_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert first_parent.data.tags["m2d2.stage1.cache_hit"] == "false"
    # Second execution, stage 2.1's settings changed: everything before it is a cache hit and links the run that
    # produced it; stage 2.1 and the evaluation run again.
    second_parent = client.get_run(second_parent.info.run_id)
    for stage in ("features", "embed", "stage1", "stage1.1", "stage2", "stage2-as", "stage2.1-as"):
        assert second_parent.data.tags[f"m2d2.{stage}.cache_hit"] == "true", stage
        source = client.get_run(second_parent.data.tags[f"m2d2.{stage}.source_run"])
        assert source.data.tags["mlflow.parentRunId"] == first_parent.info.run_id
    for stage in ("stage2.1", "evaluate"):
        assert second_parent.data.tags[f"m2d2.{stage}.cache_hit"] == "false", stage
    rerun = {r.data.tags["m2d2.stage"] for r in client.search_runs([experiment.experiment_id], max_results=100)
             if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id}
    assert rerun == {"stage2.1", "evaluate", "m2d2-plus"}  # M2D2⁺'s new version has a run of its own
    exported = list((tmp_path / "data" / "stage2").glob("*/model/config.json"))
    assert len(exported) == 1  # stage 2 was reused, not trained again
    assert len(list((tmp_path / "data" / "stage2.1").glob("*/model/config.json"))) == 2
    # Evaluation reports and eval-gated registration, one registered model per variant: each first version is its
    # champion; the changed stage 2.1 is a new M2D2⁺ and so a new version of m2d2-plus, and of no other model.
    evaluate_run = next(r for r in children if r.data.tags["m2d2.stage"] == "evaluate")
    report = {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "report/m2d2-as-plus")}
    assert "report/m2d2-as-plus/report.html" in report and any(p.endswith(".png") for p in report)
    for name in ("m2d2-minus", "m2d2", "m2d2-as-plus"):
        assert len(client.search_model_versions(f"name='{name}'")) == 1, name
        assert first_parent.data.tags[f"m2d2.champion.{name}"] == "true"
    versions = sorted(client.search_model_versions("name='m2d2-plus'"), key=lambda v: int(v.version))
    assert len(versions) == 2 and versions[0].tags["m2d2.variant"] == "m2d2-plus"
    variant_run = client.get_run(versions[0].run_id)  # the version points at the variant's own run
    assert variant_run.data.tags["m2d2.stage"] == "m2d2-plus" and "zs_acc" in variant_run.data.metrics
    champion = client.get_model_version_by_alias("m2d2-plus", "champion").version
    assert champion == versions[1 if second_parent.data.tags["m2d2.champion.m2d2-plus"] == "true" else 0].version

    # Third execution after the data root was moved away: no cached task may point at the missing outputs. It makes
    # M2D2⁻ alone: the tasks of the other stages return at once.
    (tmp_path / "data").rename(tmp_path / "moved-away")
    alone_file = tmp_path / "smoke-alone.json"
    alone_file.write_text(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, variants=["m2d2-minus"]))))
    third = _run_pipeline(alone_file, env, tmp_path)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert list((tmp_path / "data" / "features").glob("*/stats.json"))
    runs = client.search_runs([experiment.experiment_id], max_results=200, order_by=["attributes.start_time ASC"])
    third_parent = [r for r in runs if r.data.tags.get("m2d2.kind") == "pipeline"][-1]
    assert third_parent.info.status == "FINISHED"
    assert third_parent.data.tags["m2d2.cache_hits"] == "none"
    assert third_parent.data.tags["m2d2.variants"] == "m2d2-minus"
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("stage")] == ["stage1"]
