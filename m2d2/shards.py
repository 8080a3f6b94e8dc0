"""One shard primitive for every sharded job: plan -> ``build`` each shard (a Flyte map task) -> finish.

The log-mel store (:mod:`m2d2.data.shards`) and the caption embeddings (:mod:`m2d2.text.shards`) both run on it.
A plan (stored at a URI) fixes every shard before any is built; a shard task gets a :class:`ShardRef` (the plan's
URI and the shard's number), builds the shard's files and commits them; a finish task merges the committed shards.

A shard's files live in one folder (local or ``s3://``) and share a stem: ``<root>/<name>.<suffix>`` for its
outputs and ``<root>/<name>.done.json`` for its commit marker. :func:`build` is the commit protocol:

1. a marker that vouches for the shard (same fingerprint, every listed file present with its recorded size; in a
   local folder also with its recorded sha256) means the shard is committed: nothing is built;
2. otherwise the marker is deleted first, so a stale one can never vouch for new bytes;
3. every output is written all-or-nothing (local: a temporary name in the same folder, fsync, rename; ``s3://``:
   one PUT, or a multipart upload that is aborted on error), its sha256 and size recorded;
4. the marker is written last: the fingerprint, the sha256 and size of every output, and what the job reports.

A crash anywhere leaves at most invisible files, and a re-run rebuilds exactly the shards without a valid marker.
sha256 is the one content hash; :func:`npy_header` is the one ``.npy`` header writer of both jobs.

**Damage after the commit** (a bad disk, a truncated copy) is not trusted: readers check the sha256 they use and
raise :class:`ShardCorruptError`, and a build re-hashes a local shard's outputs before it believes its marker, so
running the build again rebuilds exactly the damaged shards. (Objects in a store are checked by size here; S3
guards the bytes of a stored object itself, and every reader verifies the sha256 of what it downloads.)

**No orphans.** Once every shard of a plan is committed, :func:`sweep` removes from the shard folder whatever no
marker of the plan lists: temporary files of killed writes, the files of shards an earlier plan had and this one
does not, markers of other plans, and (``s3://``) multipart uploads that were never completed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from m2d2 import io

log = logging.getLogger(__name__)

PROTOCOL = "m2d2-shard/1"
MARKER = "done.json"  # suffix of a shard's commit marker


class ShardCorruptError(ValueError):
    """A committed shard file whose bytes no longer match the sha256 its commit marker recorded."""


@dataclass(frozen=True)
class ShardRef:
    """One shard of a stored plan, as it crosses a task boundary (a map task's element).

    ``plan`` is the plan file's URI and ``index`` the shard's number in it. ``workspace`` is a cache-key salt only:
    the Flyte wiring fills it with the data root's workspace token, so a cached element can never outlive the
    outputs it points at (a recreated data root gets a new token). The library ignores it.
    """

    plan: str
    index: int
    workspace: str = ""


def shard_refs(plan_uri: str, count: int, workspace: str = "") -> list[ShardRef]:
    """The refs of the ``count`` shards of the plan at ``plan_uri``."""
    return [ShardRef(str(plan_uri), k, workspace) for k in range(count)]


def plan_of(refs: Sequence[ShardRef]) -> str:
    """The one plan URI that ``refs`` share (a finish task gets the refs of one plan)."""
    plans = {ref.plan for ref in refs}
    if len(plans) != 1:
        raise ValueError(f"expected the shards of one plan, got {len(plans)} plans: {sorted(plans)[:3]}")
    return plans.pop()


@dataclass(frozen=True)
class Shard:
    """Where one shard's files live and the fingerprint (identity of its inputs) its marker must carry."""

    root: str  # folder: a local path or an s3:// prefix
    name: str  # stem shared by the shard's files
    fingerprint: str

    def uri(self, suffix: str) -> str:
        return io.join(self.root, f"{self.name}.{suffix}")

    @property
    def marker_uri(self) -> str:
        return self.uri(MARKER)


# ----------------------------------------------------------------------------------------------------- storage
def _put(uri: str, data: bytes | bytearray | memoryview) -> None:
    """All-or-nothing write of one file (see :func:`m2d2.io.atomic_write_bytes`)."""
    io.atomic_write_bytes(uri, data)


def _fsync_dir(path: Path) -> None:
    """Make the renames in ``path`` durable (a marker must never reach the disk before its outputs' names)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def npy_header(shape: Sequence[int], dtype: np.dtype | str = np.float16) -> bytes:
    """The ``.npy`` (version 1.0) header of a C-order array: writers stream the data right after it."""
    buffer = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    return buffer.getvalue()


class _Hashing:
    """A write-only binary stream that hashes (sha256) and counts what passes through it."""

    def __init__(self, raw: Any):
        self._raw = raw
        self._digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._digest.update(data)
        self.bytes += memoryview(data).nbytes
        return self._raw.write(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


class ShardWriter:
    """Writes one shard's outputs all-or-nothing and records the sha256 and size of each (for the marker)."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.files: dict[str, dict[str, Any]] = {}

    def put(self, suffix: str, data: bytes | bytearray) -> None:
        """Write output ``<name>.<suffix>`` from memory."""
        _put(self.shard.uri(suffix), data)
        self.files[suffix] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    @contextlib.contextmanager
    def open(self, suffix: str) -> Iterator[_Hashing]:
        """Stream output ``<name>.<suffix>``: it appears under its name only if the block finishes.

        Locally the bytes go to a temporary name beside the target, are fsynced and renamed; for ``s3://`` they
        are spooled to a local temporary file (``TMPDIR``) and uploaded whole (one PUT or an aborted-on-error
        multipart upload).
        """
        target = self.shard.uri(suffix)
        local = io.is_local(target)
        if local:
            path = io.local_path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        else:
            fd, tmp = tempfile.mkstemp(prefix="m2d2-shard-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw:
                sink = _Hashing(raw)
                yield sink
                raw.flush()
                os.fsync(raw.fileno())
            if local:
                os.replace(tmp, path)
            else:
                io.upload_file(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.files[suffix] = {"sha256": sink.sha256, "bytes": sink.bytes}


# ----------------------------------------------------------------------------------------------------- markers
def read_marker(shard: Shard, check_files: bool = True) -> dict[str, Any] | None:
    """The shard's marker if it vouches for ``shard``: this protocol, the same fingerprint, and (``check_files``)
    every output it lists present with its recorded size; else ``None``. Contents are not re-hashed here: the
    readers verify the sha256 they use (a merge while it copies, a download before it is used)."""
    try:
        marker = json.loads(io.read_bytes(shard.marker_uri))
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable JSON: a marker of no one
        return None
    if (not isinstance(marker, dict) or marker.get("protocol") != PROTOCOL
            or marker.get("fingerprint") != shard.fingerprint or not isinstance(marker.get("files"), dict)):
        return None
    if check_files:
        for suffix, meta in marker["files"].items():
            try:
                if io.size(shard.uri(suffix)) != meta["bytes"]:
                    return None
            except FileNotFoundError:
                return None
    return marker


def damaged_files(shard: Shard, marker: dict[str, Any]) -> list[str]:
    """The outputs of ``shard`` (suffixes) whose sha256 differs from what ``marker`` recorded (reads every byte)."""
    damaged = []
    for suffix, meta in sorted(marker["files"].items()):
        uri = shard.uri(suffix)
        try:
            digest = io.sha256_limited(uri, None)[0]
        except FileNotFoundError:
            digest = None
        if digest != meta["sha256"]:
            damaged.append(suffix)
    return damaged


def is_committed(shard: Shard) -> bool:
    """True when ``shard`` is committed: its marker carries the plan's fingerprint and its outputs are there."""
    return read_marker(shard) is not None


def read_markers(shards: Sequence[Shard], check_files: bool = True, workers: int = 16) -> list[dict[str, Any] | None]:
    """:func:`read_marker` of many shards, ``workers`` at a time (each is a few requests on an object store)."""
    if len(shards) <= 1 or workers <= 1:
        return [read_marker(s, check_files) for s in shards]
    with ThreadPoolExecutor(max_workers=min(workers, len(shards))) as pool:
        return list(pool.map(lambda s: read_marker(s, check_files), shards))


def _clear_temps(shard: Shard) -> None:
    """Remove the temporary files a killed local build of ``shard`` left (``.<name>.<suffix>.<random>.tmp``)."""
    if io.is_local(shard.root):
        folder = io.local_path(shard.root)
        if folder.is_dir():
            for stale in folder.glob(f".{shard.name}.*.tmp"):
                stale.unlink(missing_ok=True)


@dataclass
class Built:
    """Outcome of :func:`build`: the shard's marker, and whether it was built now (else it was committed)."""

    marker: dict[str, Any]
    built: bool
    info: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.info = self.marker["info"]


def build(shard: Shard, make: Callable[[ShardWriter], dict[str, Any]]) -> Built:
    """Build and commit ``shard``, or find it committed (then ``make`` is not called).

    ``make`` writes the outputs through the :class:`ShardWriter` it gets and returns what the job wants in the
    marker (JSON-serialisable, under ``info``). Safe to run concurrently for different shards and to re-run after
    a crash at any point.
    """
    marker = read_marker(shard)
    if marker is not None:
        damaged = damaged_files(shard, marker) if io.is_local(shard.root) else []
        if not damaged:
            return Built(marker, built=False)
        log.warning("shard %s in %s is committed but its %s no longer match(es) the recorded sha256: rebuilding it",
                    shard.name, shard.root, ", ".join(damaged))
    io.remove(shard.marker_uri)  # a stale marker is gone before any output is rewritten
    _clear_temps(shard)
    writer = ShardWriter(shard)
    info = make(writer)
    marker = {"protocol": PROTOCOL, "fingerprint": shard.fingerprint, "files": writer.files, "info": info}
    local = io.is_local(shard.root)
    if local:
        io.local_path(shard.root).mkdir(parents=True, exist_ok=True)
        _fsync_dir(io.local_path(shard.root))
    _put(shard.marker_uri, json.dumps(marker, indent=1, sort_keys=True).encode())
    if local:
        _fsync_dir(io.local_path(shard.root))
    return Built(marker, built=True)


# ----------------------------------------------------------------------------------------------------- orphans
def sweep(root: str, committed: Sequence[tuple[Shard, dict[str, Any]]]) -> list[str]:
    """Remove from the shard folder ``root`` every file that no marker in ``committed`` (each shard of a finished
    plan with its marker) lists; returns the names removed.

    ``root`` must hold shards only (the stores keep other files beside it, never in it). Call it once every shard
    of the plan is committed: an output without a marker then belongs to no one (a killed build's temporary file,
    a shard of an earlier plan with more shards). On ``s3://`` the multipart uploads under ``root`` that were never
    completed (invisible, but billed) are aborted too.
    """
    keep: set[str] = set()
    for shard, marker in committed:
        keep.add(f"{shard.name}.{MARKER}")
        keep.update(f"{shard.name}.{suffix}" for suffix in marker["files"])
    removed: list[str] = []
    if io.is_local(root):
        folder = io.local_path(root)
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name not in keep:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
    else:
        fs, prefix = fsspec.core.url_to_fs(root)
        prefix = prefix.rstrip("/")
        names = io.retrying(lambda: [p.rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False, refresh=True)
                                     if fs.isfile(p)] if fs.exists(prefix) else [], root, "list shards")
        for name in sorted(set(names) - keep):
            io.remove(io.join(root, name))
            removed.append(name)
        removed += [f"(multipart upload) {key}" for key in _abort_uploads(fs, prefix)]
    if removed:
        log.info("removed %d orphaned file(s) from %s: %s", len(removed), root, ", ".join(removed[:10]))
    return removed


def _abort_uploads(fs: Any, prefix: str) -> list[str]:
    """Abort the incomplete multipart uploads under ``bucket/prefix`` (s3fs); their keys."""
    call = getattr(fs, "call_s3", None)
    if call is None:  # not S3
        return []
    bucket, _, key_prefix = prefix.partition("/")
    listing = io.retrying(lambda: call("list_multipart_uploads", Bucket=bucket, Prefix=key_prefix + "/"),
                          f"s3://{prefix}", "list multipart uploads")
    aborted = []
    for upload in listing.get("Uploads", []):
        io.retrying(lambda u=upload: call("abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                                          UploadId=u["UploadId"]), f"s3://{bucket}/{upload['Key']}",
                    "abort multipart upload")
        aborted.append(upload["Key"])
    return aborted
