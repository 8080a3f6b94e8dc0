"""m2d2.tracking against a real ``mlflow server`` (SQLite backend, local artefact root) on a free loopback port
(the ``server_process`` and ``server`` fixtures of tests/integration/conftest.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from m2d2 import tracking
from m2d2.tracking import StageRun
from tests.helpers import Server

# MLflow's own SQLAlchemy mappers trigger this on the local SQLite store; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture
def uri(server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    # MLflow itself writes run links to stdout on set_terminated and progress bars on download; keep tests quiet.
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("RANK", raising=False)
    return server


@pytest.fixture
def parent(uri: str, request: pytest.FixtureRequest) -> str:
    return tracking.start_pipeline_run(f"exec-{request.node.name}", experiment="test-m2d2")


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def _count_runs(uri: str) -> int:
    mlflow = _client(uri)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return len(mlflow.search_runs(experiments, max_results=10_000))


def test_default_uri_is_sqlite_in_cwd(server_process: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server needed; it runs first and requests ``server_process`` only to overlap the server's start-up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"
    parent = tracking.start_pipeline_run("local-exec")
    assert (tmp_path / "mlflow.db").is_file()
    assert tracking.start_pipeline_run("local-exec") == parent
    assert tracking.run_url(parent) is None


def test_pipeline_run_is_idempotent_per_execution(uri: str) -> None:
    first = tracking.start_pipeline_run("exec-a", experiment="test-idem", tags={"flyte.project": "m2d2"})
    again = tracking.start_pipeline_run("exec-a", experiment="test-idem")
    other = tracking.start_pipeline_run("exec-b", experiment="test-idem")
    assert first == again != other

    mlflow = _client(uri)
    experiment = mlflow.get_experiment_by_name("test-idem")
    runs = mlflow.search_runs([experiment.experiment_id], filter_string="tags.`flyte.execution_id` = 'exec-a'")
    assert [r.info.run_id for r in runs] == [first]
    run = runs[0]
    assert run.info.status == "RUNNING"
    assert run.info.run_name == "pipeline-exec-a"
    assert run.data.tags["m2d2.kind"] == "pipeline"
    assert run.data.tags["flyte.project"] == "m2d2"

    tracking.finish_pipeline_run(first, tags={"result": "ok"}, metrics={"final.loss": 0.5})
    done = mlflow.get_run(first)
    assert done.info.status == "FINISHED"
    assert done.data.tags["result"] == "ok"
    assert done.data.metrics["final.loss"] == 0.5


def test_stage_run_is_child_of_parent(uri: str, parent: str) -> None:
    with StageRun(parent, "stage1", tags={"deepspeed.zero": "2"}) as stage:
        run_id = stage.run_id
        stage.set_tags({"note": "hello"})
    assert run_id is not None

    run = _client(uri).get_run(run_id)
    assert run.info.experiment_id == _client(uri).get_run(parent).info.experiment_id
    assert run.info.run_name == "stage1"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["m2d2.stage"] == "stage1"
    assert run.data.tags["m2d2.kind"] == "stage"
    assert run.data.tags["deepspeed.zero"] == "2"
    assert run.data.tags["note"] == "hello"
    assert tracking.find_stage_run(parent, "stage1") == run_id
    assert tracking.find_stage_run(parent, "stage2") is None
    assert tracking.run_url(run_id) == (f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
                                        "?workflowType=machine_learning")


@dataclass
class Optim:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Train:
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    extra: dict = field(default_factory=lambda: {"warmup": {"steps": 5}, "tag": None})
    blob: str = "x" * 7000


def test_params_are_flattened_and_truncated(uri: str, parent: str) -> None:
    with StageRun(parent, "stage2", params=Train()) as stage:
        stage.log_params({f"k{i:03d}": i for i in range(150)})  # more than one batch of 100
        run_id = stage.run_id
    params = _client(uri).get_run(run_id).data.params
    assert params["steps"] == "10"
    assert params["optim.lr"] == "0.0003"
    assert params["optim.betas"] == "(0.9, 0.95)"
    assert params["extra.warmup.steps"] == "5"
    assert params["extra.tag"] == "None"
    assert len(params["blob"]) == tracking.MAX_PARAM_VALUE
    assert params["blob"].endswith(tracking.TRUNCATION_NOTE)
    assert params["k149"] == "149"
    assert len(params) == 6 + 150


def test_metric_history_round_trips(uri: str, parent: str) -> None:
    history = {step: {"loss": 1.0 / (step + 1), "lr": 1e-4 * step} for step in range(0, 50, 10)}
    with StageRun(parent, "stage1", flush_every=2) as stage:
        for step, values in history.items():
            stage.log_metrics(values, step=step)
        stage.log_metrics({"nan_metric": float("nan")}, step=0)
        run_id = stage.run_id

    mlflow = _client(uri)
    for key in ("loss", "lr"):
        points = sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
        assert points == [(step, values[key]) for step, values in history.items()]
    assert math.isnan(mlflow.get_metric_history(run_id, "nan_metric")[0].value)


def test_artifacts_upload_and_list(uri: str, parent: str, tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("hello")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    (tmp_path / "dir" / "b.txt").write_text("b")
    with StageRun(parent, "evaluate") as stage:
        stage.log_artifact(tmp_path / "report.txt")
        stage.log_artifact(tmp_path / "report.txt", artifact_path="reports")
        stage.log_artifacts(tmp_path / "dir", artifact_path="files")
        stage.log_dict({"config": Train(blob="b"), "path": tmp_path}, "config.json")
        run_id = stage.run_id

    mlflow = _client(uri)
    assert {a.path for a in mlflow.list_artifacts(run_id)} == {"report.txt", "reports", "files", "config.json"}
    assert {a.path for a in mlflow.list_artifacts(run_id, "files")} == {"files/a.txt", "files/b.txt"}
    assert {a.path for a in mlflow.list_artifacts(run_id, "reports")} == {"reports/report.txt"}
    config = json.loads(Path(mlflow.download_artifacts(run_id, "config.json", str(tmp_path / "dl"))).read_text())
    assert config["config"]["optim"]["lr"] == 3e-4
    assert config["path"] == str(tmp_path)


def test_failing_stage_is_marked_failed_and_reraises(uri: str, parent: str) -> None:
    stage = StageRun(parent, "stage1")
    with pytest.raises(RuntimeError, match="boom"), stage:
        stage.log_metrics({"loss": 1.0}, step=0)
        raise RuntimeError("boom")
    run = _client(uri).get_run(stage.run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics["loss"] == 1.0  # buffered metrics were flushed before terminating


def test_start_end_without_context_manager(uri: str, parent: str) -> None:
    stage = StageRun(parent, "features").start()
    stage.log_metrics({"clips": 3}, step=0)
    stage.end("KILLED")
    stage.end()  # second end is a no-op
    stage.log_metrics({"clips": 4}, step=1)  # after end: ignored
    run = _client(uri).get_run(stage.run_id)
    assert run.info.status == "KILLED"
    assert [m.value for m in _client(uri).get_metric_history(stage.run_id, "clips")] == [3.0]


def test_non_main_rank_logs_nothing(uri: str, parent: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    assert not tracking.is_main_process()
    before = _count_runs(uri)
    (tmp_path / "f.txt").write_text("x")
    with StageRun(parent, "stage1", params={"a": 1}) as stage:
        stage.log_params({"b": 2})
        stage.log_metrics({"loss": 1.0}, step=0)
        stage.set_tags({"t": "x"})
        stage.log_dict({"a": 1}, "a.json")
        stage.log_artifact(tmp_path / "f.txt")
        stage.log_artifacts(tmp_path)
        assert stage.run_id is None
    assert _count_runs(uri) == before
    assert tracking.find_stage_run(parent, "stage1") is None


def test_record_cache_hits(uri: str) -> None:
    first = tracking.start_pipeline_run("exec-cache-1", experiment="test-cache")
    with StageRun(first, "stage1") as s1:
        stage1_run = s1.run_id
    tracking.finish_pipeline_run(first)

    second = tracking.start_pipeline_run("exec-cache-2", experiment="test-cache")
    with StageRun(second, "stage2") as s2:  # stage1 came from the Flyte cache: its output carries stage1_run
        stage2_run = s2.run_id

    hits = tracking.record_cache_hits(second, {"stage1": stage1_run, "stage2": stage2_run, "evaluate": None})
    assert hits == {"stage1": True, "stage2": False}
    tags = _client(uri).get_run(second).data.tags
    assert tags["m2d2.stage1.source_run"] == stage1_run
    assert tags["m2d2.stage1.cache_hit"] == "true"
    assert tags["m2d2.stage2.source_run"] == stage2_run
    assert tags["m2d2.stage2.cache_hit"] == "false"
    assert "m2d2.evaluate.cache_hit" not in tags


def test_a_tracking_outage_neither_stops_a_stage_nor_loses_its_history(tmp_path, monkeypatch, caplog, smoke_data):
    """A real ``mlflow server`` is stopped in the middle of a smoke stage-1 run (after its 3rd logged step) and
    restarted, same port and database, 8 logged steps later; a second stage starts while it is away. Training goes
    on without an error, and afterwards both runs hold their full metric history with the original steps and
    timestamps."""
    import time

    from m2d2.train.stages import run_stage1
    from tests.helpers import free_port, start_mlflow_server, stop_process_group

    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    server.wait_healthy()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.delenv("RANK", raising=False)
    parent = tracking.start_pipeline_run("outage-drill", experiment="outage")
    drill = {"server": server, "logged": [], "during": {}, "second": None}
    log_metrics = StageRun.log_metrics

    def outage_at_the_third_step(self: StageRun, metrics, step: int) -> None:
        log_metrics(self, metrics, step)
        if self.stage != "stage1":
            return
        drill["logged"].append(step)
        if len(drill["logged"]) == 3:  # the server goes away mid-stage
            stop_process_group(drill["server"].proc)
            drill["outage"] = int(time.time() * 1000)  # MLflow timestamps are whole milliseconds
            second = StageRun(parent, "stage2", params={"lr": 0.2}, flush_every=5).start()  # starts during it
            for k in range(8):
                second.log_metrics({"loss": 2.0 / (k + 1)}, k)
            drill["second"] = second
        elif len(drill["logged"]) == 11:  # back, with the same database
            drill["server"] = start_mlflow_server(tmp_path, port)
            drill["server"].wait_healthy()
        elif 3 < len(drill["logged"]) < 11:
            drill["during"][step] = time.time() * 1000

    monkeypatch.setattr(StageRun, "log_metrics", outage_at_the_third_step)
    cfg, features, captions = smoke_data
    stage = cfg.stages["stage1"].replace(schedule={"max_steps": 16, "global_batch": 4}, log_every=1)
    try:
        with caplog.at_level("WARNING"):
            out = run_stage1(stage, str(features), str(captions), str(tmp_path / "stage1"), parent_run_id=parent)
        assert drill["second"].run_id is None and "trains on and keeps its metrics" in caplog.text
        assert out.steps == 16 and len(drill["logged"]) == 16
        drill["second"].end()
        client = MlflowClient(drill["server"].url)
        history = client.get_metric_history(out.mlflow_run_id, "loss")
        assert sorted(m.step for m in history) == drill["logged"]  # every step, none twice
        assert all(drill["outage"] <= m.timestamp <= drill["during"][m.step]  # logged when they happened
                   for m in history if m.step in drill["during"])
        second = drill["second"].run_id
        assert [m.step for m in sorted(client.get_metric_history(second, "loss"), key=lambda m: m.step)] == \
            list(range(8))
        assert client.get_run(second).data.params == {"lr": "0.2"}  # its params waited for its run
        run = client.get_run(out.mlflow_run_id)
        assert run.info.status == "FINISHED" and tracking.GAP_TAG not in run.data.tags
        assert "model/model.safetensors" in {f.path for f in client.list_artifacts(out.mlflow_run_id, "model")}
        print(f"outage drill: {len(history)} of {len(drill['logged'])} loss values of stage 1 on the server, "
              f"{len(drill['during'])} of them logged while it was away")
    finally:
        stop_process_group(drill["server"].proc)


def test_a_server_that_never_comes_back_does_not_stop_the_stage(monkeypatch, caplog):
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level("WARNING"), StageRun("no-such-parent", "stage1", flush_every=2, buffer_limit=5) as run:
        for step in range(6):
            run.log_metrics({"loss": 1.0, "lr": 0.1}, step)
    assert run.run_id is None and run.dropped == 7  # 12 values, 5 kept: the oldest 7 dropped and counted
    assert "5 metric values unsent, 7 dropped" in caplog.text
