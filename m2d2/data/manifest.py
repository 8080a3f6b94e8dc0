"""The corpus manifest: one Parquet row per clip, the contract between source adapters and ingestion.

Every adapter (:mod:`m2d2.data.sources`), the demo corpus and any hand-made corpus produce this table; ingestion
(:mod:`m2d2.data.shards`) reads nothing else. :func:`validate_manifest` checks it up front so a bad row fails with
its row number and field instead of surfacing hours later inside a shard task.

Fields (``MANIFEST_SCHEMA``):

- ``clip_id``: unique, ``<source>:<dataset key>`` for the adapters (e.g. ``vggsound:--0PQM4-hqg_000030``).
- ``source``: the dataset (``audioset``, ``vggsound``, ``wavcaps``, ``audiocaps``, ``clotho``, ``esc50``, ``us8k``,
  ``demo``, ...); training stages select subsets by it.
- ``audio_uri``: a local path, an ``s3://`` URI, or a path relative to the ``audio_root`` given to ingestion.
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

import hashlib
import io as _io
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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


def resolve_audio_uri(audio_uri: str, audio_root: str) -> str:
    """An absolute path or URI as is; a relative one joined onto ``audio_root``."""
    if "://" in audio_uri or audio_uri.startswith("/") or not audio_root:
        return audio_uri
    return io.join(audio_root, *audio_uri.split("/"))


def _probe_one(uri: str) -> tuple[float | None, int | None, int | None, str | None, str | None]:
    from m2d2.audio import AudioDecodeError, audio_info

    try:
        data = io.read_bytes(uri)
    except (FileNotFoundError, OSError) as exc:
        return None, None, None, None, f"{type(exc).__name__}: {exc}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = audio_info(data)
    except AudioDecodeError as exc:
        return None, None, None, digest, str(exc)
    return info.duration_s, info.sample_rate, info.channels, digest, None


def probe_manifest(table: pa.Table, audio_root: str = "", workers: int = 8, progress: bool = True) -> pa.Table:
    """Fill null ``duration_s``/``sample_rate``/``channels``/``content_hash`` from the files (header + sha256).

    Files that cannot be read keep their nulls (they are logged here and quarantined, with their reason, when
    the store is built); nothing is dropped.
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
        results = pool.map(lambda i: _probe_one(resolve_audio_uri(uris[i], audio_root)), todo)
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
