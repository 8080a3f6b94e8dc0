"""MLflow-backed parts of evaluation: the eval-gated registry (m2d2.registry) and report logging.

One SQLite tracking store per module (the registry needs a database backend; creating one costs ~10 s of
migrations on a loaded 2-core machine, a server would cost more), with a fresh model name per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from m2d2.eval.reports import build_report, log_report
from m2d2.registry import REASON_TAG, STATUS_TAG, metric_tag, register_model

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # create the schema once
    return uri


@pytest.fixture
def client(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)  # the default artefact root (./mlruns) lands in the test's directory
    monkeypatch.delenv("RANK", raising=False)
    return MlflowClient(tracking_uri=store)


def _export(root: Path, tag: str) -> Path:
    """A stand-in export directory: what the registry checks (config.json, written last) and ships."""
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(f"weights {tag}".encode())
    (root / "config.json").write_text(json.dumps({"format": "m2d2", "tag": tag}))
    return root


def _version(client: MlflowClient, name: str, version: str):
    return client.get_model_version(name, version)


def test_first_version_takes_the_alias_then_only_better_ones_move_it(client, tmp_path, request):
    name = request.node.name
    first = register_model(_export(tmp_path / "a", "a"), name, {"zs_acc": 0.50, "t2a_R@1": 0.1}, "zs_acc")
    assert first.promoted and first.version == "1" and first.incumbent_version is None
    assert "first version" in first.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    v1 = _version(client, name, "1")
    # a handful of tags: the primary metric only (the others stay on the run); the decision in the description
    assert v1.tags[metric_tag("zs_acc")] == "0.5" and metric_tag("t2a_R@1") not in v1.tags
    assert metric_tag("t2a_R@1") == "m2d2.metric.t2a_R1"
    assert v1.tags[STATUS_TAG] == "promoted" and v1.source == f"runs:/{first.run_id}/model"
    assert v1.description.startswith("**Promoted** to `champion`: first version")
    # the run's model/ folder holds an MLflow model (pyfunc defined by code) carrying the export; it recorded metrics
    artifacts = {a.path for a in client.list_artifacts(first.run_id, "model")}
    assert {"model/MLmodel", "model/mlflow_model.py", "model/artifacts"} <= artifacts
    (carried,) = client.list_artifacts(first.run_id, "model/artifacts")  # the export, under its own name
    assert sorted(a.path.rsplit("/", 1)[1] for a in client.list_artifacts(first.run_id, carried.path)) == [
        "config.json", "model.safetensors"]
    assert client.get_run(first.run_id).data.metrics == {"zs_acc": 0.5, "t2a_R1": 0.1}

    worse = register_model(_export(tmp_path / "b", "b"), name, {"zs_acc": 0.40}, "zs_acc")
    assert not worse.promoted and worse.version == "2"
    assert (worse.incumbent_version, worse.incumbent_value) == ("1", 0.5)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    v2 = _version(client, name, "2")
    assert v2.tags[STATUS_TAG] == "not_promoted" and "does not beat v1" in v2.tags[REASON_TAG]
    assert v2.tags[REASON_TAG] == worse.reason

    tie = register_model(_export(tmp_path / "c", "c"), name, {"zs_acc": 0.50}, "zs_acc")
    assert not tie.promoted and "ties v1" in tie.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    better = register_model(_export(tmp_path / "d", "d"), name, {"zs_acc": 0.55}, "zs_acc")
    assert better.promoted and better.version == "4" and "beats v1" in better.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    assert better.model_uri == f"models:/{name}/4"


def test_lower_is_better_and_a_second_alias(client, tmp_path, request):
    name = request.node.name
    export = _export(tmp_path / "m", "m")
    key = "stage2.1/val loss"  # pipeline metric names carry a '/', and may hold spaces
    assert register_model(export, name, {key: 2.0}, key, higher_is_better=False, alias="smallest").promoted
    assert not register_model(export, name, {key: 2.5}, key, higher_is_better=False, alias="smallest").promoted
    third = register_model(export, name, {key: 1.5}, key, higher_is_better=False, alias="smallest")
    assert third.promoted and "lower is better" in third.reason
    assert _version(client, name, "3").tags["m2d2.metric.stage2.1/val loss"] == "1.5"
    assert str(client.get_model_version_by_alias(name, "smallest").version) == "3"
    with pytest.raises(Exception, match="champion"):  # other aliases untouched
        client.get_model_version_by_alias(name, "champion")


def test_a_champion_evaluated_on_another_suite_is_not_compared(client, tmp_path, request):
    """A version evaluated on other data (another suite digest) is registered but never ranked against the champion,
    however good its number; one on the champion's suite is compared as usual."""
    from m2d2.registry import SUITE_TAG

    name = request.node.name
    export = _export(tmp_path / "m", "m")
    assert register_model(export, name, {"zs_acc": 0.40}, "zs_acc", suite="demo-suite").promoted
    other = register_model(export, name, {"zs_acc": 0.95}, "zs_acc", suite="folder-suite")
    assert not other.promoted and other.incumbent_version == "1" and other.incumbent_value is None
    assert other.reason.startswith("not compared: v1 (alias 'champion') was evaluated on suite demo-suite, this "
                                   "version on folder-suite")
    assert _version(client, name, "2").tags[SUITE_TAG] == "folder-suite"
    assert _version(client, name, "2").tags[REASON_TAG] == other.reason
    assert not register_model(export, name, {"zs_acc": 0.95}, "zs_acc").promoted  # no digest: not the same suite
    same = register_model(export, name, {"zs_acc": 0.41}, "zs_acc", suite="demo-suite")
    assert same.promoted and same.incumbent_value == 0.40
    assert str(client.get_model_version_by_alias(name, "champion").version) == same.version


def test_the_suite_digest_follows_the_evaluation_data_and_protocol():
    import torch

    from m2d2.eval.clap import ClapEvalSet, suite_digest

    def data(**changes):
        fields = {"lms": [torch.zeros(80, 30), torch.ones(80, 20)], "labels": ["a", "b"],
                  "captions": [["an a"], []], "class_names": ["a", "b"]}
        return ClapEvalSet(**{**fields, **changes})

    base = suite_digest(data())
    assert base == suite_digest(data()) and len(base) == 64
    assert suite_digest(data(lms=[torch.zeros(80, 30), torch.ones(80, 21)])) != base  # other audio
    assert suite_digest(data(labels=["b", "a"])) != base
    assert suite_digest(data(captions=[["an a"], ["a b"]])) != base
    assert suite_digest(data(prompt_template="the sound of {}")) != base


def test_given_run_receives_the_export(client, tmp_path, request):
    name = request.node.name
    experiment = client.create_experiment(name)
    run_id = client.create_run(experiment).info.run_id
    result = register_model(_export(tmp_path / "e", "e"), name, {"zs_acc": 0.3}, "zs_acc", run_id=run_id)
    assert result.run_id == run_id and _version(client, name, "1").run_id == run_id
    assert [a.path for a in client.list_artifacts(run_id)] == ["model"]
    assert client.get_run(run_id).info.status == "RUNNING"  # the caller's run stays the caller's


def test_clear_errors_and_nothing_written(client, tmp_path, request):
    name = request.node.name
    export = _export(tmp_path / "x", "x")
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    with pytest.raises(ValueError, match=r"primary metric 'zs_acc' is not among the metrics: \['t2a_R@1'\]"):
        register_model(export, name, {"t2a_R@1": 0.3}, "zs_acc")
    with pytest.raises(ValueError, match="not finite"):
        register_model(export, name, {"zs_acc": float("nan")}, "zs_acc")
    with pytest.raises(ValueError, match="invalid alias"):
        register_model(export, name, {"zs_acc": 0.3}, "zs_acc", alias="latest")
    with pytest.raises(FileNotFoundError, match="config.json"):
        register_model(tmp_path, name, {"zs_acc": 0.3}, "zs_acc")
    assert client.search_registered_models(f"name = '{name}'") == []
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before

    # an incumbent registered without the primary metric cannot be compared: error, no new version
    register_model(export, name, {"t2a_R@1": 0.3}, "t2a_R@1")
    with pytest.raises(ValueError, match=r"v1 holds alias 'champion' but has no tag 'm2d2.metric.zs_acc'"):
        register_model(export, name, {"zs_acc": 0.9}, "zs_acc")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]


def test_log_report_uploads_the_directory(client, tmp_path):
    out = build_report(tmp_path / "rep", "r", {"Zero-shot": {"zs_acc": 0.5}},
                       confusion=np.array([[2, 0], [1, 1]]), class_names=["a", "b"])
    run_id = client.create_run(client.create_experiment("reports")).info.run_id
    log_report(out, run_id)
    assert sorted(a.path for a in client.list_artifacts(run_id, "report")) == [
        "report/confusion.png", "report/report.html"]
    with pytest.raises(FileNotFoundError, match="report.html"):
        log_report(tmp_path, run_id)


def test_experiments_are_model_training_and_lineage_errors_are_one_line(client, capsys):
    from m2d2 import tracking
    from m2d2.cli import main

    made = tracking.experiment_id(client, "kind-new")
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("kind-old")  # made before the tag existed: it gets it
    assert tracking.experiment_id(client, "kind-old") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("kind-chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.experiment_id(client, "kind-chosen")  # a kind set on purpose stays
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    assert main(["lineage", "m2d2@champion"]) == 2 and "models:/<name>@<alias>" in capsys.readouterr().err
    assert main(["lineage", "models:/no-such-model@champion"]) == 2
    assert "no-such-model" in capsys.readouterr().err
