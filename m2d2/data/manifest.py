"""The corpus manifest: one Parquet row per clip, the contract between source adapters and ingestion.

Every adapter (:mod:`m2d2.data.sources`), the demo corpus and any hand-made corpus produce this table; ingestion
(:mod:`m2d2.data.shards`) reads nothing else. :func:`validate_manifest` checks it up front so a bad row fails with
its row number and field instead of surfacing hours later inside a shard task.

Fields (``MANIFEST_SCHEMA``):

- ``clip_id``: unique, ``<source>:<dataset key>`` for the adapters (e.g. ``vggsound:--0PQM4-hqg_000030``).
- ``source``: the dataset (``audioset``, ``vggsound``, ``wavcaps``, ``audiocaps``, ``clotho``, ``esc50``, ``us8k``,
  ``demo``, ...); training stages select subsets by it.
- ``audio_uri``: a path relative to the ``audio_root`` given to ingestion (the usual case), or an absolute path or
  URI under ``audio_root`` or under one of the roots an :class:`AudioAccess` allows; schemes are ``file`` and
  ``s3`` unless the user allows more. A manifest is outside input: ``..``, other schemes (``http://``, an
  instance-metadata address) and absolute paths elsewhere are quarantined, never read.
- ``duration_s``, ``sample_rate``, ``channels``: from the file header, or null when not probed yet
  (:func:`probe_manifest` fills them); a metadata duration is only a planning estimate.
- ``captions``, ``labels``: lists (possibly empty) of non-empty strings.
- ``split``: lower-case name (``train``, ``val``, ``eval``, ``test``, ...), used in store file names.
- ``content_hash``: sha256 hex of the audio file's bytes, or null when not probed; the leakage filter
  compares it, and ingestion quarantines a file whose bytes no longer match it.
- ``origin`` (optional column): the recording's identity across datasets that re-use it: ``yt:<video id>``
  (AudioSet, VGGSound, AudioCaps, WavCaps AudioSet_SL), ``fs:<freesound id>`` (WavCaps FreeSound, Clotho, ESC-50,
  UrbanSound8K), ``bbc:<id>``, ``soundbible:<id>``. The leakage filter matches on it.
"""

from __future__ import annotations

import io as _io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from m2d2 import io

log = logging.getLogger(__name__)

REQUIRED_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("audio_uri", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("labels", pa.list_(pa.string())),
        ("split", pa.string()),
        ("content_hash", pa.string()),
    ]
)
OPTIONAL_SCHEMA = pa.schema([("origin", pa.string())])
MANIFEST_SCHEMA = pa.schema(list(REQUIRED_SCHEMA) + list(OPTIONAL_SCHEMA))
#: Columns a hand-made manifest may leave out: they are unknown until probed and are filled with nulls.
NULLABLE = frozenset({"duration_s", "sample_rate", "channels", "content_hash", "origin"})
SPLIT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_REPORTED = 20
MAX_CAPTION_CHARS = 2000  # longer "captions" are scraped pages, not captions; one would pad its embedding batch
MAX_CAPTIONS_PER_CLIP = 100
ROW_GROUP_SIZE = 10_000  # small row groups let a shard task read only its rows of a large manifest


class ManifestError(ValueError):
    """A manifest that breaks the schema; the message lists the offending rows and fields."""


def label_caption(labels: Sequence[str]) -> str:
    """The paper's caption for a clip with labels but no caption: ``The sound of A, B, and C.``

    Underscores become spaces (ESC-50 / UrbanSound8K class names such as ``crackling_fire``).
    """
    names = [label.replace("_", " ").strip() for label in labels if label and label.strip()]
    if not names:
        raise ValueError("a label caption needs at least one label")
    if len(names) == 1:
        text = names[0]
    elif len(names) == 2:
        text = f"{names[0]} and {names[1]}"
    else:
        text = ", ".join(names[:-1]) + f", and {names[-1]}"
    return f"The sound of {text}."


def manifest_table(rows: Iterable[Mapping[str, Any]], label_captions: bool = True) -> pa.Table:
    """Rows (dicts with ``MANIFEST_SCHEMA`` keys; missing keys are null / empty lists) -> a validated table.

    With ``label_captions`` a clip with labels but no caption gets :func:`label_caption` (paper, §IV-A3).
    """
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for row in rows:
        captions = [c for c in (row.get("captions") or []) if c and c.strip()]
        labels = list(row.get("labels") or [])
        if label_captions and not captions and labels:
            captions = [label_caption(labels)]
        for name in MANIFEST_SCHEMA.names:
            value = row.get(name)
            if name == "captions":
                value = captions
            elif name == "labels":
                value = labels
            columns[name].append(value)
    return validate_manifest(pa.table(columns, schema=MANIFEST_SCHEMA))


def _rows_where(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask)[:MAX_REPORTED].tolist()


def _bad_list_elements(column: pa.ChunkedArray) -> np.ndarray:
    """Row mask: the list is null, or holds a null / empty / whitespace-only string."""
    array = column.combine_chunks()
    bad = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool).copy()
    flat = pc.list_flatten(array)
    if len(flat):
        parents = pc.list_parent_indices(array).to_numpy()
        stripped = pc.utf8_trim_whitespace(flat)
        bad_element = pc.or_(pc.is_null(stripped), pc.equal(pc.utf8_length(stripped), 0))
        bad_element = np.asarray(pc.fill_null(bad_element, True).to_numpy(zero_copy_only=False), dtype=bool)
        bad[np.unique(parents[bad_element])] = True
    return bad


def validate_manifest(table: pa.Table) -> pa.Table:
    """Check ``table`` against the manifest schema and return it conformed (types cast, columns ordered, absent
    :data:`NULLABLE` columns added as nulls). Extra columns are dropped.

    Raises:
        ManifestError: naming each problem as ``row <i> (clip_id '<id>'): field '<name>' ...`` (the first
            ``MAX_REPORTED`` per rule, plus counts).
    """
    missing = [name for name in REQUIRED_SCHEMA.names if name not in table.column_names and name not in NULLABLE]
    if missing:
        raise ManifestError(f"manifest lacks required column(s) {missing}; required: "
                            f"{[n for n in REQUIRED_SCHEMA.names if n not in NULLABLE]} (may be absent: "
                            f"{sorted(NULLABLE)})")
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ManifestError(f"manifest column '{field.name}' has type {column.type}, expected {field.type} "
                                f"({exc})") from exc
    table = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)
    ids = table.column("clip_id").to_pylist()
    problems: list[str] = []

    def report(mask: np.ndarray, field: str, rule: str, values: list[Any] | None = None) -> None:
        rows = _rows_where(mask)
        for i in rows:
            got = f", got {values[i]!r}" if values is not None else ""
            problems.append(f"row {i} (clip_id {ids[i]!r}): field '{field}' {rule}{got}")
        extra = int(mask.sum()) - len(rows)
        if extra > 0:
            problems.append(f"... and {extra} more rows with field '{field}' {rule}")

    def text_mask(name: str) -> np.ndarray:
        col = pc.utf8_trim_whitespace(table.column(name))
        empty = pc.or_(pc.is_null(col), pc.equal(pc.utf8_length(col), 0))
        return np.asarray(pc.fill_null(empty, True).to_numpy(zero_copy_only=False), dtype=bool)

    for name in ("clip_id", "source", "audio_uri", "split"):
        report(text_mask(name), name, "must be a non-empty string")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, clip_id in enumerate(ids):
        if clip_id:
            counts[clip_id] = counts.get(clip_id, 0) + 1
            first.setdefault(clip_id, i)
    dup = np.zeros(table.num_rows, dtype=bool)
    for i, clip_id in enumerate(ids):
        if clip_id and counts[clip_id] > 1 and first[clip_id] != i:
            dup[i] = True
    if dup.any():
        for i in _rows_where(dup):
            problems.append(f"row {i} (clip_id {ids[i]!r}): field 'clip_id' duplicates row {first[ids[i]]}")
    splits = table.column("split").to_pylist()
    bad_split = np.array([bool(s) and not SPLIT_RE.match(s) for s in splits], dtype=bool)
    report(bad_split, "split", "must be lower-case letters, digits, '_' or '-'", splits)
    durations = np.asarray(table.column("duration_s").to_numpy(zero_copy_only=False), dtype=np.float64)
    present = ~np.asarray(table.column("duration_s").is_null().to_numpy(zero_copy_only=False), dtype=bool)
    with np.errstate(invalid="ignore"):
        report(present & ~(np.isfinite(durations) & (durations > 0)), "duration_s",
               "must be null or a positive finite number", durations.tolist())
    for name, low in (("sample_rate", 1), ("channels", 1)):
        values = table.column(name).to_pylist()
        report(np.array([v is not None and v < low for v in values], dtype=bool), name, f"must be null or >= {low}",
               values)
    for name in ("captions", "labels"):
        report(_bad_list_elements(table.column(name)), name, "must be a list of non-empty strings")
    captions = table.column("captions")
    longest = pc.fill_null(pc.list_value_length(captions), 0).to_numpy(zero_copy_only=False)
    report(np.asarray(longest > MAX_CAPTIONS_PER_CLIP, dtype=bool), "captions",
           f"must hold at most {MAX_CAPTIONS_PER_CLIP} captions", longest.tolist())
    flat_lengths = pc.fill_null(pc.utf8_length(pc.list_flatten(captions)), 0).to_numpy(zero_copy_only=False)
    too_long = np.zeros(table.num_rows, dtype=bool)
    if len(flat_lengths):
        parents = pc.list_parent_indices(captions).to_numpy(zero_copy_only=False)
        too_long[parents[flat_lengths > MAX_CAPTION_CHARS]] = True
    report(too_long, "captions", f"must hold captions of at most {MAX_CAPTION_CHARS} characters")
    uris = table.column("audio_uri").to_pylist()
    report(np.array([bool(u) and ("\x00" in u or ".." in u.split("/")) for u in uris], dtype=bool), "audio_uri",
           "must not contain '..' parts or NUL characters", uris)
    hashes = table.column("content_hash").to_pylist()
    report(np.array([h is not None and not HASH_RE.match(h) for h in hashes], dtype=bool), "content_hash",
           "must be null or 64 lower-case hex digits (sha256)", hashes)
    origins = table.column("origin").to_pylist()
    report(np.array([o is not None and not o.strip() for o in origins], dtype=bool), "origin",
           "must be null or a non-empty string", origins)
    if problems:
        raise ManifestError(f"invalid manifest ({table.num_rows} rows):\n  " + "\n  ".join(problems))
    return table


def read_manifest(uri: str) -> pa.Table:
    """Read and validate a manifest from a local path or ``s3://`` URI."""
    return validate_manifest(pq.read_table(_io.BytesIO(io.read_bytes(uri))))


def write_manifest(table: pa.Table, uri: str) -> pa.Table:
    """Validate ``table`` and write it atomically (small row groups, so shard tasks read only their rows)."""
    table = validate_manifest(table)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE)
    io.atomic_write_bytes(uri, sink.getvalue().to_pybytes())
    return table


@dataclass(frozen=True)
class AudioAccess:
    """Where the ``audio_uri`` values of a manifest may point; a manifest is outside input.

    A relative ``audio_uri`` is normalised and must stay under ``audio_root``. An absolute one (a path or a URI)
    must lie under ``audio_root`` or under one of ``roots``, which the user names explicitly (e.g. the mount of
    a dataset that adapters wrote absolute paths for). Only ``schemes`` are read (``file`` = local paths), so a
    manifest cannot make a task pod fetch ``http://169.254.169.254/...`` or any other fsspec protocol.
    """

    schemes: tuple[str, ...] = ("file", "s3")
    roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", tuple(s.lower() for s in self.schemes))
        object.__setattr__(self, "roots", tuple(str(r) for r in self.roots))


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def resolve_audio_uri(audio_uri: str, audio_root: str, access: AudioAccess | None = None) -> str:
    """The location of ``audio_uri``: joined onto ``audio_root`` when relative, else checked against the roots
    ``access`` allows. Raises :class:`~m2d2.io.UnsafePathError` (a quarantine reason at ingestion) otherwise."""
    access = access or AudioAccess()
    scheme = _scheme(audio_uri)
    if scheme not in access.schemes:
        raise io.UnsafePathError(f"audio_uri {audio_uri!r} uses the scheme {scheme!r}; allowed: "
                                 f"{list(access.schemes)} (AudioAccess.schemes)")
    if "://" not in audio_uri and not audio_uri.startswith("/"):
        if not audio_root:
            raise io.UnsafePathError(f"audio_uri {audio_uri!r} is relative and no audio_root was given")
        return io.confine(audio_root, audio_uri, "audio_uri")
    uri = io.normalise(audio_uri)
    roots = ([audio_root] if audio_root else []) + list(access.roots)
    if not any(io.is_within(uri, root) for root in roots):
        raise io.UnsafePathError(
            f"audio_uri {audio_uri!r} is absolute and lies outside the audio root {audio_root!r}"
            + (f" and the allowed roots {list(access.roots)}" if access.roots else "")
            + "; write it relative to the audio root, or allow its root explicitly (AudioAccess.roots, "
              "the pipeline setting audio_roots)")
    return uri


PROBE_MAX_FILE_MB = 512.0  # m2d2.audio.decode.DEFAULT_MAX_FILE_MB; repeated so this module imports no torch


def _probe_one(uri: str, max_file_mb: float | None = PROBE_MAX_FILE_MB
               ) -> tuple[float | None, int | None, int | None, str | None, str | None]:
    """Duration, rate, channels, sha256 and error of one file, holding one block of it at a time.

    Probing runs several files at once, so reading whole files would hold the largest few together; the hash is
    streamed instead and the header read on its own (a few KB). A file over ``max_file_mb`` is not hashed.
    """
    from m2d2.audio import AudioDecodeError, audio_info

    try:
        digest, _ = io.sha256_limited(uri, None if max_file_mb is None else int(max_file_mb * 2**20))
    except io.FileTooLargeError as exc:
        return None, None, None, None, (f"audio {uri} is {exc.size / 2**20:.1f} MiB, over the file size limit of "
                                        f"{max_file_mb:g} MiB (setting max_file_mb)")
    except OSError as exc:
        return None, None, None, None, f"{type(exc).__name__}: {exc}"
    try:
        if io.is_local(uri):
            info = audio_info(str(io.local_path(uri)))
        else:
            with io.open_binary(uri) as handle:
                info = audio_info(handle)
    except (AudioDecodeError, OSError) as exc:
        return None, None, None, digest, str(exc)
    return info.duration_s, info.sample_rate, info.channels, digest, None


def _probe_row(audio_uri: str, audio_root: str, max_file_mb: float | None, access: AudioAccess | None = None
               ) -> tuple[float | None, int | None, int | None, str | None, str | None]:
    try:
        uri = resolve_audio_uri(audio_uri, audio_root, access)
    except ValueError as exc:  # a location the manifest may not name: left for ingestion to quarantine
        return None, None, None, None, str(exc)
    return _probe_one(uri, max_file_mb)


def probe_manifest(table: pa.Table, audio_root: str = "", workers: int = 8, progress: bool = True,
                   max_file_mb: float | None = PROBE_MAX_FILE_MB, access: AudioAccess | None = None) -> pa.Table:
    """Fill null ``duration_s``/``sample_rate``/``channels``/``content_hash`` from the files (header + sha256).

    Files that cannot be read, or are larger than ``max_file_mb``, keep their nulls (they are logged here and
    quarantined, with their reason, when the store is built); nothing is dropped. Each worker holds one block of
    one file, so memory does not grow with file sizes. ``access`` says where ``audio_uri`` values may point
    (see :class:`AudioAccess`); rows pointing elsewhere are not read.
    """
    table = validate_manifest(table)
    todo = [i for i, (d, h) in enumerate(zip(table.column("duration_s").to_pylist(),
                                              table.column("content_hash").to_pylist(), strict=True))
            if d is None or h is None]
    if not todo:
        return table
    uris = table.column("audio_uri").to_pylist()
    columns = {name: table.column(name).to_pylist() for name in ("duration_s", "sample_rate", "channels",
                                                                  "content_hash")}
    failures = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: _probe_row(uris[i], audio_root, max_file_mb, access), todo)
        for i, (duration, rate, channels, digest, error) in tqdm(zip(todo, results, strict=True), total=len(todo),
                                                                  desc="probe audio", unit="file",
                                                                  disable=not progress, leave=False):
            if error:
                failures += 1
                log.debug("probe %s: %s", uris[i], error)
            if columns["duration_s"][i] is None and duration is not None and math.isfinite(duration) and duration > 0:
                columns["duration_s"][i] = duration
            if columns["sample_rate"][i] is None and rate:
                columns["sample_rate"][i] = rate
            if columns["channels"][i] is None and channels:
                columns["channels"][i] = channels
            if columns["content_hash"][i] is None and digest:
                columns["content_hash"][i] = digest
    if failures:
        log.warning("probe: %d of %d files could not be read or parsed; they keep null fields and will be "
                    "quarantined with their reason at ingestion", failures, len(todo))
    for name, values in columns.items():
        table = table.set_column(MANIFEST_SCHEMA.get_field_index(name), MANIFEST_SCHEMA.field(name),
                                 pa.array(values, type=MANIFEST_SCHEMA.field(name).type))
    return table
