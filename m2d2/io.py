"""Storage helpers: one code path for local paths and ``s3://`` URIs, with atomic writes.

A local write goes to a temporary file in the same directory and is renamed into place, so a crash never
leaves a half-written file under the final name. An object-store PUT is already all-or-nothing.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import fsspec


def is_local(uri: str | os.PathLike) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def local_path(uri: str | os.PathLike) -> Path:
    return Path(str(uri).removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([base.rstrip("/"), *parts])


def atomic_write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    if is_local(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        with fsspec.open(str(uri), "wb") as handle:
            handle.write(data)


def read_bytes(uri: str | os.PathLike) -> bytes:
    if is_local(uri):
        return local_path(uri).read_bytes()
    with fsspec.open(str(uri), "rb") as handle:
        return handle.read()


def exists(uri: str | os.PathLike) -> bool:
    if is_local(uri):
        return local_path(uri).exists()
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs.exists(path)


def upload_dir(local_dir: str | os.PathLike, uri: str, last: str | None = None) -> None:
    """Copy a local directory's files to ``uri``; ``last`` (a file name) is written after all others.

    Writing a marker file last lets readers treat its presence as "the directory is complete".
    """
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for path in files:
        atomic_write_bytes(join(uri, *path.relative_to(local_dir).parts), path.read_bytes())


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    fs, root = fsspec.core.url_to_fs(uri)
    target = Path(local_dir)
    for remote in fs.find(root):
        rel = remote[len(root) :].lstrip("/")
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(remote, str(dest))
    return target


def resolve_model_path(path: str) -> str:
    """Turn ``package:<module>`` into the directory that module ships; check a plain path exists."""
    if path.startswith("package:"):
        module_name = path.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FileNotFoundError(f"text model package {module_name!r} is not installed ({exc})") from exc
        return str(module.get_model_path())
    if not Path(path).is_dir():
        raise FileNotFoundError(f"text model directory {path!r} does not exist (models are never downloaded)")
    return path
