"""Fixtures of the integration tier: an S3 API (moto server) and a real ``mlflow server`` on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, free_port, moto_s3, stop_process_group


@pytest.fixture(scope="module")
def s3():
    """An s3fs file system on a moto server with bucket ``m2d2-data``, which the library's own ``s3://`` I/O
    reaches too (credentials and endpoint in the environment and fsspec's config for the module's tests)."""
    import fsspec

    with moto_s3("m2d2-data") as endpoint:
        patch = pytest.MonkeyPatch()
        for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                           ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL_S3", endpoint)):
            patch.setenv(key, value)
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
        fsspec.filesystem("s3").invalidate_cache()
        yield fsspec.filesystem("s3", skip_instance_cache=True)
        fsspec.config.conf.pop("s3", None)
        patch.undo()


# ------------------------------------------------------------------------------------------------ mlflow server
@pytest.fixture(scope="module")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Launch ``mlflow server`` (SQLite backend, local artefact root) on a free loopback port, without waiting."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
        "--default-artifact-root", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # The job runner spawns ~8 huey consumer processes that each import mlflow: twice the start-up time on 2 cores.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = root / "server.log"
    with open(log_path, "wb") as server_log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def server(server_process: Server) -> str:
    """The URL of a healthy ``mlflow server`` (one per module)."""
    server_process.wait_healthy()
    return server_process.url
