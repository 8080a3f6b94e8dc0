"""Credentials never reach MLflow, the pipeline summary or ``m2d2 summary``: :mod:`m2d2.redaction` on its own, run
links, and the summary files the pipeline writes (what a real MLflow store keeps, SQLite and through a real
``mlflow server``, is in tests/integration/test_redaction.py)."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from m2d2 import tracking
from m2d2.cli import SUMMARY_FILE, main
from m2d2.redaction import redact, redact_url

# MLflow's own SQLAlchemy mappers trigger this on the local SQLite store; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

SECRETS = ("secret", "pw", "hunter2", "AKIA", "sigvalue", "tok123")


@pytest.mark.parametrize(("text", "expected"), [
    ("http://user:pw@host/", "http://***@host/"),
    ("https://user:hunter2@mlflow.example.com:5000/api?x=1#top", "https://***@mlflow.example.com:5000/api?x=1#top"),
    ("s3://AKIA:secret@bucket/x", "s3://***@bucket/x"),
    ("postgresql+psycopg2://mlflow:hunter2@db.svc:5432/mlflow", "postgresql+psycopg2://***@db.svc:5432/mlflow"),
    ("mysql+pymysql://root@db/mlflow", "mysql+pymysql://***@db/mlflow"),  # a bare user
    ("http://u:p@[2001:db8::1]:8080/p", "http://***@[2001:db8::1]:8080/p"),  # IPv6 host
    ("http://u:p@[::1]", "http://***@[::1]"),
    ("http://u:p%40x@host/", "http://***@host/"),  # an encoded '@' in the password
    ("http://u:p@ss@host/", "http://***@host/"),  # a raw one: the userinfo ends at the last '@'
    ("tracking URI http://u:pw@host:5000 (remote)", "tracking URI http://***@host:5000 (remote)"),
    ("see http://u:pw@host.", "see http://***@host."),
    ("a='http://u:pw@h' b=\"s3://AKIA:secret@b/k\"", "a='http://***@h' b=\"s3://***@b/k\""),
    ("http://u:pw@a,https://v:hunter2@b", "http://***@a,https://***@b"),  # two URLs, no space between
    ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=sigvalue&versionId=3",
     "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&versionId=3"),
    ("postgresql://db/m?sslmode=require&password=hunter2", "postgresql://db/m?sslmode=require&password=***"),
    ("https://h/p?Token=tok123&access_key=AKIA&secret=s&page=2", "https://h/p?Token=***&access_key=***&secret=***&page=2"),
    ("https://app/cb#access_token=tok123&state=1", "https://app/cb#access_token=***&state=1"),
    ("http://h/r?next=https://u:pw@x/&token=tok123", "http://h/r?next=https://***@x/&token=***"),
    # left as they are: no credentials, or no URL
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("file:///data/runs?x=1", "file:///data/runs?x=1"),
    ("https://medium.com/@user/post?tokens=3", "https://medium.com/@user/post?tokens=3"),
    ("http://[::1]:5000", "http://[::1]:5000"),
    ("write to me@example.com", "write to me@example.com"),
    ("user:pass@host without a scheme", "user:pass@host without a scheme"),
    ("", ""),
])  # fmt: skip
def test_redact_url(text: str, expected: str) -> None:
    assert redact_url(text) == expected
    assert redact_url(expected) == expected  # idempotent


def test_redact_url_is_linear_on_long_values() -> None:
    """A long value with a separator in it (6000-char params are common) must not make the scan backtrack."""
    text = "a" * 200_000 + "://" + "b" * 200_000 + "@host"
    assert redact_url(text) == "a" * 200_000 + "://***@host"


@dataclass
class Store:
    uri: str = "s3://AKIA:secret@bucket/x"
    mirrors: tuple[str, ...] = ("http://user:pw@host/", "https://ok.example/")


def test_redact_walks_containers() -> None:
    Pair = namedtuple("Pair", "a b")
    obj = {"store": Store(), "list": ["http://user:pw@host/", 3, None], "pair": Pair("s3://AKIA:secret@b/k", 1.5),
           "set": {"http://u:hunter2@h/"}, "http://u:pw@key/": True, "path": Path("/tmp/x")}
    out = redact(obj)
    assert out["store"] == {"uri": "s3://***@bucket/x", "mirrors": ("http://***@host/", "https://ok.example/")}
    assert out["list"] == ["http://***@host/", 3, None]
    assert out["pair"] == Pair("s3://***@b/k", 1.5) and type(out["pair"]) is Pair
    assert out["set"] == {"http://***@h/"}
    assert out["http://***@key/"] is True and out["path"] == Path("/tmp/x")
    assert obj["list"][0] == "http://user:pw@host/"  # a copy: the caller's object is untouched


# ----------------------------------------------------------------------------- run links and the summary
def test_run_link_and_its_warning_hold_no_secret(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A UI link from an http server whose URI carries a password, and the warning when the run is not there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:hunter2@127.0.0.1:9/")
    monkeypatch.setattr(MlflowClient, "get_run", _missing_run)
    with caplog.at_level("WARNING", logger="m2d2.tracking"):
        assert tracking.run_url("r1") is None
    assert "hunter2" not in caplog.text and "http://***@127.0.0.1:9/" in caplog.text
    monkeypatch.setattr(MlflowClient, "get_run", _found_run)
    assert tracking.run_url("r1") == "http://***@127.0.0.1:9/#/experiments/7/runs/r1?workflowType=machine_learning"


def _missing_run(self: MlflowClient, run_id: str):
    from mlflow.exceptions import MlflowException

    raise MlflowException(f"run {run_id} not found", error_code="RESOURCE_DOES_NOT_EXIST")


def _found_run(self: MlflowClient, run_id: str):
    from types import SimpleNamespace

    return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))


def _summary(parent: str) -> dict:
    return {"mlflow_parent_run_id": parent, "tracking_uri": "http://user:hunter2@mlflow:5000",
            "cache_hits": {"stage1": True, "stage2": False},
            "metrics": {"num_classes": 2, "num_eval_clips": 4, "stage1/zs_acc": 0.5, "stage1_baseline/zs_acc": 0.5,
                        "stage1/t2a_R1": 0.25, "stage1_baseline/t2a_R1": 0.25},
            "stage1_model": "s3://AKIA:secret@bucket/stage1", "report": "https://h/r.html?X-Amz-Signature=sigvalue",
            "registration": {"model_uri": "models:/m2d2/1", "promoted": True, "reason": "first version"}}


def test_summary_file_and_command_hold_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tracking.write_pipeline_summary(tmp_path / "runs", _summary("run123"))
    assert path == tmp_path / "runs" / "summaries" / "run123.json"
    for written in (path, tmp_path / "runs" / SUMMARY_FILE):
        text = written.read_text()
        assert json.loads(text)["tracking_uri"] == "http://***@mlflow:5000"
        for secret in SECRETS:
            assert secret not in text, (secret, written)
    assert main(["summary", "--data-root", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "tracking URI http://***@mlflow:5000" in out and "s3://***@bucket/stage1" in out
    for secret in SECRETS:
        assert secret not in out


def test_summary_command_masks_a_file_written_before_masking(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(_summary("old")))
    assert main(["summary", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MLflow parent run: old  (tracking URI http://***@mlflow:5000)" in out
    for secret in SECRETS:
        assert secret not in out
