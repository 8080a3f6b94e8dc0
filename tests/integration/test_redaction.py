"""Credentials never reach what MLflow stores or prints: a real MLflow store (a SQLite file: its schema migrations
take ~5 s on 2 cores) and a real ``mlflow server`` reached as ``http://user:pass@host`` (the ``server`` fixture of
tests/integration/conftest.py). :mod:`m2d2.redaction` on its own is in tests/unit/test_redaction.py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient

from m2d2 import tracking
from m2d2.tracking import StageRun
from tests.unit.test_redaction import SECRETS, Store

# MLflow's own SQLAlchemy mappers trigger this on the local SQLite store; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow tracking store (SQLite file) behind ``m2d2.tracking``."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    monkeypatch.delenv("RANK", raising=False)
    return uri


@dataclass
class TrainParams:
    data: Store = field(default_factory=Store)
    corpus: str = "http://user:pw@host/corpus"


def _everything_logged(uri: str, run_id: str, tmp_path: Path) -> str:
    """Every param and tag of ``run_id``, and its artefacts' text, as one string."""
    mlflow = MlflowClient(tracking_uri=uri)
    run = mlflow.get_run(run_id)
    texts = [*run.data.params.items(), *run.data.tags.items()]
    for artifact in mlflow.list_artifacts(run_id):
        texts.append(Path(mlflow.download_artifacts(run_id, artifact.path, str(tmp_path / "dl"))).read_text())
    return json.dumps(texts)


def test_params_tags_and_dicts_in_mlflow_hold_no_secret(store: str, tmp_path: Path) -> None:
    parent = tracking.start_pipeline_run(
        "exec-redact", experiment="redact",
        tags={"source": "tracking URI http://user:hunter2@host:5000"},
        params={"corpus_source": "s3://AKIA:secret@bucket/x", "tracking": "http://user:pw@host/"},
    )  # fmt: skip
    with StageRun(parent, "stage1", params=TrainParams(), tags={"db": "postgresql://u:hunter2@db/m"}) as stage:
        stage.log_params({"presigned": "https://b.s3.amazonaws.com/k?X-Amz-Signature=sigvalue&X-Amz-Credential=AKIA"})
        stage.set_tags({"m2d2.export_dir": "s3://AKIA:secret@bucket/export", "auth": "https://h/?token=tok123"})
        stage.log_dict({"config": TrainParams(), "url": "http://user:pw@host/"}, "config.json")
        child = stage.run_id
    tracking.finish_pipeline_run(parent, tags={"m2d2.registered_model": "http://user:pw@host/models/1"})

    for run_id in (parent, child):
        logged = _everything_logged(store, run_id, tmp_path)
        for secret in SECRETS:
            assert secret not in logged, (secret, logged)
    params = MlflowClient(tracking_uri=store).get_run(child).data.params
    assert params["data.uri"] == "s3://***@bucket/x" and params["corpus"] == "http://***@host/corpus"
    assert params["presigned"] == "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Credential=***"



def test_nothing_printed_holds_the_password_of_an_http_tracking_uri(
    server: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """A tracking server reached as ``http://user:pass@host``: MLflow prints a "View run" link built from that URI
    when a run ends, and the REST store keeps params as everywhere else."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.replace("http://", "http://user:hunter2@"))
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    parent = tracking.start_pipeline_run("exec-http", experiment="redact-http",
                                         params={"corpus_source": "s3://AKIA:secret@bucket/x"})
    with StageRun(parent, "stage1", params=TrainParams()) as stage:
        child = stage.run_id
    tracking.finish_pipeline_run(parent)
    printed = capfd.readouterr()
    assert "hunter2" not in printed.out + printed.err
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ  # set only while a run is terminated
    mlflow = MlflowClient(tracking_uri=server)
    assert mlflow.get_run(child).info.status == "FINISHED"
    for run_id in (parent, child):
        run = mlflow.get_run(run_id)
        logged = json.dumps([run.data.params, run.data.tags])
        assert not any(secret in logged for secret in SECRETS), logged
