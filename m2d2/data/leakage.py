"""Leakage filter: no clip of an evaluation set may reach training, under any dataset's name.

The same recording is re-published by several datasets (AudioCaps and WavCaps AudioSet_SL are AudioSet
segments; ESC-50, UrbanSound8K, Clotho and WavCaps FreeSound all come from Freesound), so matching only clip ids
would miss most overlaps. A training clip is removed when, against any held-out clip, it has

- the same ``clip_id`` (reason ``clip_id``),
- the same ``origin`` (reason ``origin``: the same YouTube video or Freesound recording; a different segment
  of a held-out YouTube video is removed too, as the WavCaps blacklists do),
- the same ``content_hash`` (reason ``content_hash``: byte-identical audio under unrelated names),
- or an origin in ``blocked_origins`` (reason ``blacklist``, e.g. the official WavCaps blacklists).

Which sets are held out is the caller's choice: the paper's stage 1 removes *all* of AudioCaps, Clotho, ESC-50
and US8K from AudioSet + VGGSound + WavCaps; stage 2 adds AudioCaps/Clotho training clips back but still removes
ESC-50/US8K (use :func:`select` to build the held-out table).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from m2d2.data.manifest import validate_manifest

log = logging.getLogger(__name__)

REMOVED_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("audio_uri", pa.string()),
        ("reason", pa.string()),  # clip_id | origin | content_hash | blacklist
        ("key", pa.string()),  # the matching value
        ("held_out_clip_id", pa.string()),  # null for blacklist
        ("held_out_source", pa.string()),
    ]
)


@dataclass
class LeakageReport:
    """The training manifest without leaked clips, what was removed and why, and what could not be hashed."""

    kept: pa.Table
    removed: pa.Table
    unhashed: int  # checked rows without a content_hash (probe the manifest to compare bytes too)

    def counts(self) -> dict[str, int]:
        """``{'removed': n, 'removed_<reason>': n, 'unhashed': n}`` for logging (e.g. MLflow metrics)."""
        out = {"removed": self.removed.num_rows, "unhashed": self.unhashed}
        for reason in self.removed.column("reason").to_pylist():
            out[f"removed_{reason}"] = out.get(f"removed_{reason}", 0) + 1
        return out


def select(table: pa.Table, sources: Iterable[str] = (), splits: Iterable[str] = ()) -> pa.Table:
    """Rows of ``table`` from ``sources`` and ``splits`` (empty = any), e.g. ``select(m, ["audiocaps"], ["test"])``."""
    mask = pa.array([True] * table.num_rows, pa.bool_())
    if sources := list(sources):
        mask = pc.and_(mask, pc.is_in(table.column("source"), value_set=pa.array(sources)))
    if splits := list(splits):
        mask = pc.and_(mask, pc.is_in(table.column("split"), value_set=pa.array(splits)))
    return table.filter(mask)


class HeldOutIndex:
    """Held-out clips by clip id, origin and content hash: the one matching rule of the leakage filter and of the
    per-stage views (:mod:`m2d2.data.views`). ``tables`` need ``clip_id``, ``source``, ``origin`` and
    ``content_hash`` columns (a manifest, or a feature store's index)."""

    def __init__(self, tables: Sequence[pa.Table], blocked_origins: Iterable[str] = ()):
        self.by_id: dict[str, tuple[str, str]] = {}
        self.by_origin: dict[str, tuple[str, str]] = {}
        self.by_hash: dict[str, tuple[str, str]] = {}
        for table in tables:
            for clip_id, source, origin, digest in zip(*(table.column(c).to_pylist() for c in
                                                         ("clip_id", "source", "origin", "content_hash")), strict=True):
                self.by_id.setdefault(clip_id, (clip_id, source))
                if origin:
                    self.by_origin.setdefault(origin, (clip_id, source))
                if digest:
                    self.by_hash.setdefault(digest, (clip_id, source))
        self.blocked = set(blocked_origins)

    def match(self, clip_id: str, origin: str | None, digest: str | None
              ) -> tuple[str, str, str | None, str | None] | None:
        """``(reason, key, held_out_clip_id, held_out_source)`` of the first rule that matches, else None."""
        if clip_id in self.by_id:
            return ("clip_id", clip_id, *self.by_id[clip_id])
        if origin and origin in self.by_origin:
            return ("origin", origin, *self.by_origin[origin])
        if digest and digest in self.by_hash:
            return ("content_hash", digest, *self.by_hash[digest])
        if origin and origin in self.blocked:
            return ("blacklist", origin, None, None)
        return None


def filter_leakage(
    manifest: pa.Table,
    held_out: pa.Table | Sequence[pa.Table],
    splits: Sequence[str] = ("train",),
    blocked_origins: Iterable[str] = (),
) -> LeakageReport:
    """Remove from the ``splits`` rows of ``manifest`` every clip that matches a ``held_out`` clip.

    Rows of other splits (e.g. the held-out clips themselves, kept as ``test``) are left alone. The first rule
    that matches (clip_id, origin, content_hash, blacklist) is the reported reason.
    """
    manifest = validate_manifest(manifest)
    tables = [held_out] if isinstance(held_out, pa.Table) else list(held_out)
    index = HeldOutIndex([validate_manifest(t) for t in tables], blocked_origins)
    check = set(splits)
    cols = {c: manifest.column(c).to_pylist() for c in ("clip_id", "source", "split", "audio_uri", "origin",
                                                         "content_hash")}
    keep, removed, unhashed = [], [], 0
    for i in range(manifest.num_rows):
        if cols["split"][i] not in check:
            keep.append(i)
            continue
        clip_id, origin, digest = cols["clip_id"][i], cols["origin"][i], cols["content_hash"][i]
        unhashed += digest is None
        match = index.match(clip_id, origin, digest)
        if match is None:
            keep.append(i)
            continue
        reason, key, held_id, held_source = match
        removed.append({"clip_id": clip_id, "source": cols["source"][i], "split": cols["split"][i],
                        "audio_uri": cols["audio_uri"][i], "reason": reason, "key": key,
                        "held_out_clip_id": held_id, "held_out_source": held_source})
    report = LeakageReport(kept=manifest.take(pa.array(keep, type=pa.int64())),
                           removed=pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA), unhashed=unhashed)
    checked = sum(s in check for s in cols["split"])
    log.info("leakage filter: removed %d of %d clips of splits %s: %s", len(removed), checked, sorted(check),
             report.counts())
    return report
