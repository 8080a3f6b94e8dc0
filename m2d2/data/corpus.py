"""Corpus snapshots: audio on disk (local or ``s3://``) and its published metadata -> a validated, probed corpus.

A snapshot is a directory ``<prefix>/<name>`` (names sort by time, e.g. ``2026-12-06T101500Z``, so the pipeline's
``corpus_source: <prefix>/latest`` picks the newest) holding:

- ``manifest.parquet``: every clip that can be trained or evaluated on (:mod:`m2d2.data.manifest`), with each
  file's duration, sample rate, channels and sha256 filled by probing;
- ``quarantine.parquet``: the rows whose file is missing or unreadable, each with its reason (never dropped
  silently; the feature store would quarantine them too, later);
- ``leakage.parquet``: training clips that are the same recording as an evaluation clip of the snapshot (by clip
  id, origin, content hash; :func:`m2d2.data.leakage.filter_leakage`), removed from training with their reason;
- ``summary.json``: clips per source and split, what was quarantined or removed, and the audio roots the pipeline
  must be allowed to read;
- ``pipeline.yaml``: a ``--cfg`` file for ``m2d2 run`` / ``pyflyte run workflows/full.py full`` that trains on it.

Sources are the dataset adapters of :mod:`m2d2.data.sources` (their published layouts) and any folder, with an
optional CSV of captions, labels and split. A folder without a split column can hold out a fraction for evaluation.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from m2d2 import io
from m2d2.data import sources as adapters
from m2d2.data.leakage import filter_leakage, select
from m2d2.data.manifest import probe_manifest, validate_manifest, write_manifest
from m2d2.data.shards import parquet_bytes

log = logging.getLogger(__name__)

EVAL_SPLITS = ("eval", "val", "test")

#: ``kind`` of a source -> its adapter; a source's other keys are that adapter's arguments.
ADAPTERS: dict[str, Callable[..., pa.Table]] = {
    "folder": adapters.folder_manifest,
    "audioset": adapters.audioset_manifest,
    "vggsound": adapters.vggsound_manifest,
    "wavcaps": adapters.wavcaps_manifest,
    "audiocaps": adapters.audiocaps_manifest,
    "clotho": adapters.clotho_manifest,
    "esc50": adapters.esc50_manifest,
    "us8k": adapters.urbansound8k_manifest,
}


class CorpusSpecError(ValueError):
    """A source description that names an unknown kind or argument, or misses a required one."""


@dataclass
class SourceSpec:
    """One source of a snapshot: an adapter ``kind`` and its arguments (``audio_root`` always among them).

    ``autoacd`` (AudioSet, VGGSound): Auto-ACD caption CSVs whose captions replace the label captions.
    ``eval_fraction`` (folder): the share of clips held out as ``eval``, chosen by a hash of the clip id (stable
    across snapshots), when the CSV gives no split.
    """

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "source") -> SourceSpec:
        if not isinstance(data, Mapping) or "kind" not in data:
            raise CorpusSpecError(f"{where}: expected a mapping with a 'kind' ({', '.join(ADAPTERS)})")
        spec = cls(str(data["kind"]), {k: v for k, v in data.items() if k != "kind"})
        spec.check(where)
        return spec

    def check(self, where: str = "source") -> None:
        if self.kind not in ADAPTERS:
            raise CorpusSpecError(f"{where}: kind {self.kind!r} is not one of {', '.join(ADAPTERS)}")
        params = inspect.signature(ADAPTERS[self.kind]).parameters
        known = set(params) | {"eval_fraction", "autoacd"} - {"captions"}
        unknown = sorted(set(self.args) - known)
        if unknown:
            raise CorpusSpecError(f"{where} ({self.kind}): unknown argument(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(sorted(known))}")
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in self.args]
        if missing:
            raise CorpusSpecError(f"{where} ({self.kind}): missing {', '.join(missing)}")
        fraction = self.args.get("eval_fraction", 0.0)
        if not isinstance(fraction, int | float) or not 0.0 <= fraction < 1.0:
            raise CorpusSpecError(f"{where}: eval_fraction={fraction!r} must be in [0, 1)")

    def manifest(self) -> pa.Table:
        args = dict(self.args)
        if io.is_local(str(args["audio_root"])):  # absolute: the manifest's paths must not depend on the cwd
            args["audio_root"] = str(Path(args["audio_root"]).resolve())
        fraction = float(args.pop("eval_fraction", 0.0))
        if autoacd := args.pop("autoacd", None):
            args["captions"] = adapters.read_autoacd(autoacd)
        table = ADAPTERS[self.kind](**args)
        return hold_out(table, fraction) if fraction else table


def hold_out(table: pa.Table, fraction: float) -> pa.Table:
    """``table`` with about ``fraction`` of its ``train`` rows moved to ``eval``, chosen by the sha256 of the clip
    id, so a clip stays on its side when the folder grows."""
    splits = table.column("split").to_pylist()
    for i, clip_id in enumerate(table.column("clip_id").to_pylist()):
        if splits[i] == "train" and int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 16**8 < fraction:
            splits[i] = "eval"
    return table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))


@dataclass
class Snapshot:
    """What :func:`build_snapshot` wrote, and its numbers."""

    uri: str
    clips: dict[str, dict[str, int]]  # split -> source -> clips in manifest.parquet
    quarantined: dict[str, int]  # reason -> rows
    leakage: dict[str, int]  # LeakageReport.counts()
    audio_roots: list[str]

    def describe(self) -> str:
        lines = [f"corpus snapshot {self.uri}"]
        for split, by_source in sorted(self.clips.items()):
            total = sum(by_source.values())
            parts = ", ".join(f"{s} {n}" for s, n in sorted(by_source.items()))
            lines.append(f"  {split:5s} {total:7d} clips ({parts})")
        if not self.clips:
            lines.append("  no usable clips")
        q = sum(self.quarantined.values())
        lines.append(f"  quarantined {q} ({', '.join(f'{k} {v}' for k, v in sorted(self.quarantined.items())) or '-'})"
                     f"  -> quarantine.parquet")
        lines.append(f"  removed from training as evaluation recordings: {self.leakage.get('removed', 0)}"
                     "  -> leakage.parquet")
        lines.append(f"train on it:  m2d2 run --cfg {io.join(self.uri, 'pipeline.yaml')}")
        return "\n".join(lines)


def snapshot_name(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H%M%SZ")


def build_snapshot(sources: Sequence[SourceSpec], prefix: str, name: str | None = None, probe: bool = True,
                   workers: int = 8, progress: bool = True) -> Snapshot:
    """Read every source, probe its files, quarantine what cannot be read, remove training clips that are
    evaluation recordings, and write the snapshot ``<prefix>/<name>`` (files written whole; ``manifest.parquet``
    last, so ``<prefix>/latest`` never picks a half-written snapshot)."""
    if not sources:
        raise CorpusSpecError("no sources: give --folder or a --spec file with at least one source")
    name = name or snapshot_name()
    io.check_token(name, "snapshot name")
    uri = io.join(str(Path(prefix).resolve()) if io.is_local(prefix) else prefix, name)
    if io.exists(io.join(uri, "manifest.parquet")):
        raise FileExistsError(f"{uri} already holds a snapshot; snapshots are never overwritten (choose --name)")
    tables = []
    roots: list[str] = []
    for k, spec in enumerate(sources):
        spec.check(f"sources[{k}]")
        table = spec.manifest()
        log.info("source %d (%s): %d rows", k, spec.kind, table.num_rows)
        root = str(spec.args["audio_root"])
        root = str(Path(root).resolve()) if io.is_local(root) else root.rstrip("/")
        if probe:  # the adapter's paths lie under its audio root; nothing else is read
            table = probe_manifest(table, root, workers=workers, progress=progress)
        tables.append(table)
        roots.append(root)
    manifest = adapters.concat_manifests(tables)
    manifest, quarantine = _quarantine_unreadable(manifest) if probe else (manifest, _empty_quarantine())
    held_out = select(manifest, splits=EVAL_SPLITS)
    report = filter_leakage(manifest, held_out, splits=("train",))
    manifest = report.kept
    io.atomic_write_bytes(io.join(uri, "quarantine.parquet"), parquet_bytes(quarantine))
    io.atomic_write_bytes(io.join(uri, "leakage.parquet"), parquet_bytes(report.removed))
    snapshot = Snapshot(uri=uri, clips=_counts(manifest), quarantined=_reasons(quarantine),
                        leakage=report.counts(), audio_roots=sorted(set(roots)))
    summary = {"clips": snapshot.clips, "quarantined": snapshot.quarantined, "leakage": snapshot.leakage,
               "audio_roots": snapshot.audio_roots, "sources": [{"kind": s.kind, **s.args} for s in sources]}
    io.atomic_write_bytes(io.join(uri, "summary.json"), json.dumps(summary, indent=2, default=str).encode())
    most = max((len(c) for c in manifest.column("captions").to_pylist()), default=0)
    io.atomic_write_bytes(io.join(uri, "pipeline.yaml"), _pipeline_yaml(uri, snapshot.audio_roots, most).encode())
    write_manifest(manifest, io.join(uri, "manifest.parquet"))  # last: it marks the snapshot complete
    return snapshot


def _quarantine_unreadable(manifest: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Rows whose file could not be probed (no duration or no hash) go to quarantine, with the reason."""
    unreadable = pc.or_(pc.is_null(manifest.column("duration_s")), pc.is_null(manifest.column("content_hash")))
    bad = manifest.filter(unreadable)
    reasons = []
    for uri in bad.column("audio_uri").to_pylist():
        if not io.exists(uri):
            reasons.append(("missing", f"{uri} does not exist"))
        else:
            reasons.append(("unreadable", f"{uri} could not be read as audio (or exceeds the probe's size limit)"))
    quarantine = pa.table({"clip_id": bad.column("clip_id"), "source": bad.column("source"),
                           "split": bad.column("split"), "audio_uri": bad.column("audio_uri"),
                           "kind": pa.array([k for k, _ in reasons], pa.string()),
                           "reason": pa.array([r for _, r in reasons], pa.string())})
    return validate_manifest(manifest.filter(pc.invert(unreadable))), quarantine


def _empty_quarantine() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in ("clip_id", "source", "split", "audio_uri", "kind",
                                                             "reason")})


def _counts(manifest: pa.Table) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, source in zip(manifest.column("split").to_pylist(), manifest.column("source").to_pylist(),
                             strict=True):
        out.setdefault(split, {}).setdefault(source, 0)
        out[split][source] += 1
    return out


def _reasons(quarantine: pa.Table) -> dict[str, int]:
    out: dict[str, int] = {}
    for kind in quarantine.column("kind").to_pylist():
        out[kind] = out.get(kind, 0) + 1
    return out


def _pipeline_yaml(uri: str, roots: list[str], max_captions: int) -> str:
    """The ``--cfg`` overlay that trains the default preset on this snapshot."""
    import yaml

    text = ("# Train on this snapshot: m2d2 run --cfg <this file>  (or pyflyte run workflows/full.py full --cfg ...)\n"
            "# audio_roots: where its audio_uri values point; nothing else may be read (m2d2.data.manifest).\n")
    text += yaml.safe_dump({"corpus_source": uri, "audio_roots": roots}, sort_keys=False)
    if max_captions < 3:
        text += ("# Stage 2.1's default subset is the clips with >= 3 captions; this corpus has at most "
                 f"{max_captions},\n# so stage 2.1 (on both lines: M2D2⁺ and M2D2^AS+) continues on every captioned "
                 "clip.\n")
        stages = {name: {"data": {"min_captions": 1}} for name in ("stage2.1", "stage2.1-as")}  # no YAML anchors
        text += yaml.safe_dump({"stages": stages}, sort_keys=False)
    return text
