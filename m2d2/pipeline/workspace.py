"""Where steps write: a data root with a workspace id, and content-keyed step directories.

Every step writes under ``<data_root>/<step>/<key>``, where ``key`` hashes the step's configuration and inputs: a
re-run with the same inputs lands in the same place (so a cache hit never points at a path that a later run
moved), and a changed setting never overwrites another run's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from m2d2 import io
from m2d2.pipeline.config import PipelineConfig
from m2d2.tracking import StageRun

WORKSPACE_FILE = ".m2d2-workspace"


def workspace_token(data_root: str) -> str:
    """``<absolute data root>#<workspace id>``; the id is created once per data root and kept in a file there.

    A deleted (or new) data root gets a new id, so anything keyed by the token — Flyte cache entries —
    cannot outlive the outputs it points at.
    """
    import uuid

    root = str(Path(data_root).resolve()) if io.is_local(data_root) else data_root.rstrip("/")
    marker = io.join(root, WORKSPACE_FILE)
    if not io.exists(marker):
        io.atomic_write_bytes(marker, uuid.uuid4().hex.encode())
    return f"{root}#{io.read_bytes(marker).decode().strip()}"


def root_of(workspace: str) -> str:
    """The absolute data root of a workspace token."""
    return workspace.rsplit("#", 1)[0]


def rooted(cfg: PipelineConfig, workspace: str) -> PipelineConfig:
    """``cfg`` with ``data_root`` set to the workspace's absolute root."""
    return dataclasses.replace(cfg, data_root=root_of(workspace))


def step_key(*parts: Any) -> str:
    """Short content key of a step's settings and inputs (dataclasses and paths alike)."""
    def plain(obj: Any) -> Any:
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def step_dir(data_root: str | Path, step: str, *parts: Any) -> Path:
    """``<data_root>/<step>/<key of parts>``: the same settings and inputs always map to the same directory."""
    return Path(data_root) / step / step_key(*parts)


def _tracked(parent_run_id: str | None, stage: str, **kwargs: Any) -> StageRun | None:
    return StageRun(parent_run_id, stage, **kwargs) if parent_run_id else None


# ----------------------------------------------------------------------------------------------------- data
LATEST = "latest"


def resolve_corpus_source(source: str) -> str:
    """The corpus directory ``source`` names ("" stays "": the demo corpus is generated).

    ``<prefix>/latest`` picks the newest snapshot under ``<prefix>`` that holds a ``manifest.parquet`` (snapshot
    names must sort by time, e.g. ``2026-11-26``); anything else must itself hold a ``manifest.parquet``.
    """
    if not source:
        return ""
    source = source.rstrip("/")
    if source.rsplit("/", 1)[-1] == LATEST:
        import fsspec

        prefix = source.rsplit("/", 1)[0]
        fs, path = fsspec.core.url_to_fs(prefix)
        if not fs.isdir(path):
            raise FileNotFoundError(f"corpus snapshot prefix {prefix} does not exist")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
        complete = [n for n in names if fs.exists(f"{path}/{n}/manifest.parquet")]
        if not complete:
            raise FileNotFoundError(f"no snapshot with a manifest.parquet under {prefix} (found {names[:5]})")
        source = io.join(prefix, complete[-1])
    elif not io.exists(io.join(source, "manifest.parquet")):
        raise FileNotFoundError(f"corpus source {source} has no manifest.parquet")
    return str(Path(source).resolve()) if io.is_local(source) else source
