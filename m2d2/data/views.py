"""Per-stage data views: which training clips of the corpus each stage trains on, leakage removed.

One corpus (one log-mel store) serves every stage; a stage's ``data`` settings select its clips:

- ``sources``: clips of these sources only (empty: every source), with at least ``min_captions`` captions;
- ``exclude_overlap_with``: minus every clip that is the same recording as a clip of one of these sources (by clip
  id, origin or content hash; see :mod:`m2d2.data.leakage`), e.g. the AudioSet segments that AudioCaps re-publishes.
  A clip is never removed for overlapping its own source: stage 2 trains on AudioCaps *and* excludes the AudioSet
  copies of AudioCaps's recordings.

Every view is also filtered against the store's evaluation split (the clips the pipeline evaluates on): no
evaluation recording reaches training under any dataset's name. The paper's views (its section IV-A):

==========  ==================================  ================================================  ===========
stage       sources                             exclude_overlap_with                              paper clips
==========  ==================================  ================================================  ===========
1           audioset, vggsound, wavcaps         audiocaps, clotho, esc50, us8k                    2,532,215
1.1         audioset                            (evaluation split only)                           2,005,132
2           stage 1's + audiocaps, clotho       audiocaps, clotho, esc50, us8k                    2,585,227
2.1         wavcaps, audiocaps, clotho          esc50, us8k                                       439,743
==========  ==================================  ================================================  ===========

:func:`resolve_view` is what a stage trains on; :func:`check_views` resolves every stage's view when an execution
starts, so an empty or too-small view fails before any training, in one plain message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from m2d2 import io
from m2d2.data.leakage import REMOVED_SCHEMA, HeldOutIndex

EVAL_SPLIT = "eval"
TRAIN_SPLIT = "train"
_COLUMNS = ("clip_id", "source", "captions", "content_hash", "origin")


class ViewError(ValueError):
    """A stage's view is empty or too small to train on; the message names the stage, the rule, what the corpus
    has and the setting to change."""


@dataclass(frozen=True)
class ViewRule:
    """The selection settings of one stage (a stage's ``TrainStageConfig.data`` has these fields)."""

    sources: tuple[str, ...] = ()
    exclude_overlap_with: tuple[str, ...] = ()
    min_captions: int = 0
    min_clips: int = 1  # fewer clips than this (and than one global batch) is an error

    @classmethod
    def of(cls, data, min_clips: int = 1) -> ViewRule:
        return cls(tuple(data.sources), tuple(getattr(data, "exclude_overlap_with", ())), data.min_captions,
                   max(min_clips, 1))

    def describe(self) -> str:
        parts = [f"sources={list(self.sources) or 'any'}"]
        if self.min_captions:
            parts.append(f">= {self.min_captions} captions")
        if self.exclude_overlap_with:
            parts.append(f"excluding recordings of {list(self.exclude_overlap_with)}")
        return ", ".join(parts)


@dataclass
class View:
    """The clips one stage trains on (indices into the store's train split, in store order) and what the leakage
    rules removed (rows of :data:`m2d2.data.leakage.REMOVED_SCHEMA`)."""

    stage: str
    clips: list[int]
    candidates: int  # clips matching sources and min_captions, before the leakage rules
    removed: pa.Table
    by_source: dict[str, int]

    def metrics(self) -> dict[str, float]:
        """Counts for MLflow: ``clips``, ``candidates``, ``removed``, ``removed_<reason>``, ``clips_<source>``."""
        out = {"clips": float(len(self.clips)), "candidates": float(self.candidates),
               "removed": float(self.removed.num_rows)}
        for reason in self.removed.column("reason").to_pylist():
            out[f"removed_{reason}"] = out.get(f"removed_{reason}", 0.0) + 1
        out.update({f"clips_{source}": float(n) for source, n in self.by_source.items()})
        return out


def read_index(feature_dir: str, split: str) -> pa.Table:
    """The columns views need from a store's ``<split>.index.parquet`` (an empty table when the split is absent;
    an index written before ``origin`` existed reads it as null)."""
    uri = io.join(str(feature_dir), f"{split}.index.parquet")
    if not io.exists(uri):
        return pa.table({c: pa.array([], pa.list_(pa.string()) if c == "captions" else pa.string())
                         for c in _COLUMNS})
    table = pq.read_table(pa.BufferReader(io.read_bytes(uri)))
    columns = {c: table.column(c) if c in table.column_names else pa.nulls(table.num_rows, pa.string())
               for c in _COLUMNS}
    return pa.table(columns)


def resolve_view(feature_dir: str, stage: str, rule: ViewRule, global_batch: int = 1,
                 samples_per_epoch: int | None = None) -> View:
    """The training clips of ``stage`` under ``rule`` (see the module docstring); :class:`ViewError` when fewer
    than ``rule.min_clips`` remain, or too few for one batch of ``global_batch`` per epoch."""
    train, held = read_index(feature_dir, TRAIN_SPLIT), read_index(feature_dir, EVAL_SPLIT)
    ids, sources, captions, hashes, origins = (train.column(c).to_pylist() for c in _COLUMNS)
    wanted = set(rule.sources)
    candidates = [i for i in range(train.num_rows)
                  if (not wanted or sources[i] in wanted) and len(captions[i] or ()) >= rule.min_captions]
    evaluation = HeldOutIndex([held])
    excluded = {name: HeldOutIndex([_rows_of(train, name), _rows_of(held, name)])
                for name in rule.exclude_overlap_with}
    clips, removed = [], []
    for i in candidates:
        match = evaluation.match(ids[i], origins[i], hashes[i])
        for name, index in excluded.items():
            if match is not None:
                break
            if name != sources[i]:  # a source never overlaps itself
                match = index.match(ids[i], origins[i], hashes[i])
        if match is None:
            clips.append(i)
            continue
        reason, key, held_id, held_source = match
        removed.append({"clip_id": ids[i], "source": sources[i], "split": TRAIN_SPLIT, "audio_uri": None,
                        "reason": reason, "key": key, "held_out_clip_id": held_id, "held_out_source": held_source})
    by_source: dict[str, int] = {}
    for i in clips:
        by_source[sources[i]] = by_source.get(sources[i], 0) + 1
    view = View(stage, clips, len(candidates), pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA), by_source)
    needed = max(rule.min_clips, global_batch if samples_per_epoch is None else 1)
    if len(clips) < needed:
        raise ViewError(_too_small(view, rule, needed, sources, captions))
    return view


def check_views(feature_dir: str, rules: Mapping[str, tuple[ViewRule, int, int | None]]) -> dict[str, View]:
    """Resolve every stage's view (``rules``: stage -> (rule, global batch, samples per epoch)); raise one
    :class:`ViewError` naming every stage whose view is too small, before any of them trains."""
    views, errors = {}, []
    for stage, (rule, batch, per_epoch) in rules.items():
        try:
            views[stage] = resolve_view(feature_dir, stage, rule, batch, per_epoch)
        except ViewError as exc:
            errors.append(str(exc))
    if errors:
        raise ViewError("\n".join(errors))
    return views


def _rows_of(table: pa.Table, source: str) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("source"), source))


def _too_small(view: View, rule: ViewRule, needed: int, sources: Sequence[str],
               captions: Sequence[list[str] | None]) -> str:
    have: dict[str, int] = {}
    for source in sources:
        have[source] = have.get(source, 0) + 1
    most = max((len(c or ()) for c in captions), default=0)
    corpus = ", ".join(f"{s}: {n}" for s, n in sorted(have.items())) or "no training clips"
    hint = []
    if rule.sources and not set(rule.sources) & set(have):
        hint.append(f"data.sources (the corpus's sources are {sorted(have)})")
    if rule.min_captions > most:
        hint.append(f"data.min_captions (no clip has more than {most} captions)")
    if view.removed.num_rows:
        hint.append(f"data.exclude_overlap_with or the evaluation split ({view.removed.num_rows} clips removed as "
                    "overlapping)")
    if not hint:
        hint.append("the corpus (add clips) or schedule.global_batch")
    why = " (one global batch)" if needed > rule.min_clips else ""
    return (f"{view.stage}: its training view has {len(view.clips)} clips, it needs at least {needed}{why} "
            f"(rule: {rule.describe()}; {view.candidates} clips match before leakage removal). The corpus's "
            f"training split has {corpus}. Change {' or '.join(hint)} in stages.{view.stage}.")
