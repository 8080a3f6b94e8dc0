"""Fixtures of the integration tier: an S3 API (moto server) and a real ``mlflow server`` on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Server, free_port, moto_s3, start_mlflow_server, stop_process_group


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
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    try:
        yield server
    finally:
        stop_process_group(server.proc)


@pytest.fixture(scope="module")
def server(server_process: Server) -> str:
    """The URL of a healthy ``mlflow server`` (one per module)."""
    server_process.wait_healthy()
    return server_process.url
