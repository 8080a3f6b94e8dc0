"""Downstream tasks: each one an adapter for its published layout plus the protocols the paper evaluates it with.

The paper (Table I, Sections IV-B to IV-D) evaluates frozen features by linear evaluation, CLAP features by
zero-shot classification and audio-text retrieval, and stage 1.1's tagger by AudioSet mAP, on a fixed set of
public datasets, with the splits and clip lengths of the EVAR platform (github.com/nttcslab/eval-audio-repr,
``evar/ds_tasks.py``, ``evar/utils/make_metadata.py``). A :class:`Task` names the dataset's adapter (its official
metadata files, unchanged as published, read into a :class:`TaskData`), its protocols, its clip length and its
zero-shot caption rule. :data:`TASKS` lists the paper's tasks; :func:`custom_task` turns any folder with a CSV of
labels into one. The protocols themselves live in :mod:`m2d2.eval.benchmark`.

Adapters read metadata only; they never open audio (decoding happens when the task is evaluated), except that
the datasets whose layout *is* a folder tree (Speech Commands, CREMA-D, GTZAN, Surge) are listed. Every root may
be a local folder or an fsspec URI (``s3://bucket/esc50``). Layouts under each task's root:

=========  ==========================================================  =========================================
task       files read                                                  audio, split
=========  ==========================================================  =========================================
esc50      ``meta/esc50.csv``                                          ``audio/<filename>``, ``fold1``-``fold5``
us8k       ``metadata/UrbanSound8K.csv``                               ``audio/fold<k>/<slice_file_name>``,
                                                                       ``fold1``-``fold10``
spcv2      ``validation_list.txt``, ``testing_list.txt``, the tree     ``<word>/<file>.wav``; the rest is train
vc1        ``iden_split.txt``                                          ``wav/<spk>/<video>/<utt>.wav``; 1/2/3
voxforge   ``voxforge.csv`` (EVAR metadata)                            ``<file_name>``; its ``split`` column
cremad     the tree; ``cremad.csv`` (EVAR metadata) if present         ``AudioWAV/<actor>_<sent>_<emo>_<lvl>.wav``;
                                                                       else speakers 70/10/20 % (seed 0)
gtzan      ``{train,valid,test}_filtered.txt``, the tree               ``genres[_original]/<genre>/<genre>.NNNNN.<ext>``
nsynth     ``nsynth-{train,valid,test}/examples.json``                 ``nsynth-<split>/audio/<note_str>.wav``
surge      ``surge_tone_splits.csv`` (EVAR predefined), the tree       ``<tone>/<pitch>.ogg``; split per tone
audioset   ``eval_segments.csv``, ``class_labels_indices.csv``         ``eval_segments/Y<ytid>.wav``; test
fsd50k     ``FSD50K.ground_truth/{eval,vocabulary}.csv``               ``FSD50K.eval_audio/<fname>.wav``; test
audiocaps  ``test.csv``                                                ``test/Y<youtube_id>.wav``; test
clotho     ``clotho_captions_evaluation.csv``                          ``evaluation/<file_name>``; test
custom     ``labels.csv`` (:func:`read_custom`)                        ``<file_name>``; split, fold or 5 folds
=========  ==========================================================  =========================================

A malformed input (missing file or column, empty field, unknown split code or label) raises
:class:`TaskFormatError` naming the file and line; a file the layout holds but the split leaves out is counted in
:attr:`TaskData.excluded`, never dropped silently.
"""

from __future__ import annotations

import csv
import io as _io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

import fsspec
import numpy as np

from m2d2 import io
from m2d2.data.sources import SourceFormatError, _dict_rows, _read_text, read_audioset_segments
from m2d2.eval.probe import stratified_folds

__all__ = [
    "LINEAR",
    "PROTOCOLS",
    "RETRIEVAL",
    "TAGGING",
    "TASKS",
    "ZERO_SHOT",
    "Task",
    "TaskData",
    "TaskFormatError",
    "custom_task",
    "read_audiocaps",
    "read_audioset",
    "read_clotho",
    "read_cremad",
    "read_custom",
    "read_esc50",
    "read_fsd50k",
    "read_gtzan",
    "read_nsynth",
    "read_spcv2",
    "read_surge",
    "read_us8k",
    "read_vc1",
    "read_voxforge",
    "task",
]

LINEAR = "linear"  # linear evaluation of the frozen clip features (EVAR lineareval.py)
ZERO_SHOT = "zero_shot"  # CLAP zero-shot classification, Table VI captions (EVAR zeroshot.py)
RETRIEVAL = "retrieval"  # audio<->text retrieval, every caption a query (EVAR retr_a2t_t2a.py)
TAGGING = "tagging"  # a fine-tuned tagger's mAP (stage 1.1 on AudioSet)
PROTOCOLS = (LINEAR, ZERO_SHOT, RETRIEVAL, TAGGING)
SPLITS = ("train", "valid", "test")


class TaskFormatError(ValueError):
    """A task's files do not match its published layout (missing file, bad row, unknown split): names the file."""


@dataclass(frozen=True)
class TaskData:
    """One task's clips as its adapter read them: where each clip's audio is, its labels, split and captions.

    ``splits`` holds ``train``/``valid``/``test`` per clip, or ``fold<k>`` (1-based) for tasks evaluated by
    leave-one-fold-out (ESC-50, US8K). ``classes`` is the label vocabulary in the task's order (sorted unless
    the dataset fixes one, e.g. AudioSet's index order). ``excluded`` counts, per reason, files the layout holds
    that the task leaves out (e.g. GTZAN tracks outside the fault-filtered split): reported, never silent.
    """

    name: str
    audio: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...] = ()
    captions: tuple[tuple[str, ...], ...] = ()
    classes: tuple[str, ...] = ()
    multi_label: bool = False
    excluded: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.audio)
        if n == 0:
            raise TaskFormatError(f"task {self.name!r} has no clips")
        for what, column in (("splits", self.splits), ("labels", self.labels), ("captions", self.captions)):
            if column and len(column) != n:
                raise TaskFormatError(f"task {self.name!r}: {len(column)} {what} for {n} clips")
        bad = sorted({s for s in self.splits if s not in SPLITS and not _is_fold(s)})
        if bad:
            raise TaskFormatError(f"task {self.name!r}: unknown splits {bad}; use {list(SPLITS)} or fold<k>")
        if self.labels:
            known = set(self.classes)
            missing = sorted({lab for labs in self.labels for lab in labs} - known)
            if missing:
                raise TaskFormatError(f"task {self.name!r}: labels {missing[:5]} are not among its classes")

    @property
    def folds(self) -> tuple[str, ...]:
        """The fold names, in numeric order, when the task is folded; empty otherwise."""
        folds = {s for s in self.splits if _is_fold(s)}
        return tuple(sorted(folds, key=lambda s: int(s[4:])))

    def indices(self, *splits: str) -> list[int]:
        """Clip indices whose split is one of ``splits``, in clip order."""
        wanted = set(splits)
        return [i for i, s in enumerate(self.splits) if s in wanted]


def _is_fold(split: str) -> bool:
    return split.startswith("fold") and split[4:].isdigit() and int(split[4:]) >= 1


@dataclass(frozen=True)
class Task:
    """A downstream task: ``read(root)`` -> :class:`TaskData` from the dataset's published layout under ``root``.

    ``duration_s`` is the clip length of every protocol (EVAR's ``unit_sec``: waveforms are randomly cropped, or
    zero-padded, to it; 0 = the mean duration of the task's clips, measured when it is evaluated); ``prompt``
    names the Table VI caption rule in :data:`m2d2.eval.prompts.PROMPT_RULES`; ``folder`` is the task's directory
    under a data root when the user does not give one.
    """

    name: str
    title: str
    protocols: tuple[str, ...]
    duration_s: float
    read: Callable[[str], TaskData]
    prompt: str = "default"
    folder: str = ""
    layout: str = ""  # one line: the files the adapter reads, for docs and error messages

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"task {self.name!r}: protocols must be among {PROTOCOLS}, got {self.protocols}")
        if self.duration_s < 0:
            raise ValueError(f"task {self.name!r}: duration_s must be positive, or 0 for the clips' mean duration")
        if not self.folder:
            object.__setattr__(self, "folder", self.name)


def task(name: str) -> Task:
    """The registered task ``name`` (see :data:`TASKS`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)} (or NAME=FOLDER for a custom task)") from None


# ----------------------------------------------------------------------------------------------------- helpers
def _fs(root: str) -> tuple[Any, str]:
    fs, path = fsspec.core.url_to_fs(str(root))
    return fs, (path.rstrip("/") or "/")


def _files(root: str, folder: str = "") -> list[tuple[str, ...]]:
    """Every file under ``root/folder`` as its path parts relative to ``root``, sorted (a deterministic order on
    every file system)."""
    fs, base = _fs(root)
    top = f"{base.rstrip('/')}/{folder}" if folder else base
    prefix = base.rstrip("/") + "/"
    found = []
    for path in fs.find(top):
        if path.startswith(top.rstrip("/") + "/"):
            found.append(tuple(p for p in path[len(prefix):].split("/") if p))
    return sorted(found)


def _exists(root: str, rel: str) -> bool:
    fs, base = _fs(root)
    return bool(fs.exists(f"{base.rstrip('/')}/{rel}"))


def _uri(root: str, rel: str) -> str:
    return io.join(root, *rel.split("/"))


def _text(root: str, rel: str) -> tuple[str, str]:
    """``(uri, text)`` of a required metadata file."""
    uri = _uri(root, rel)
    try:
        return uri, _read_text(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise TaskFormatError(f"{uri}: metadata file missing (the task's layout needs it)") from None


def _csv(root: str, rel: str, required: Sequence[str]) -> tuple[str, list[tuple[int, dict[str, str]]]]:
    """``(uri, [(line, row)])`` of a required headed CSV with columns ``required``."""
    uri = _uri(root, rel)
    try:
        return uri, _dict_rows(uri, required)
    except (FileNotFoundError, IsADirectoryError):
        raise TaskFormatError(f"{uri}: metadata file missing (the task's layout needs it)") from None
    except SourceFormatError as exc:
        raise TaskFormatError(str(exc)) from None


def _lines(root: str, rel: str) -> tuple[str, list[tuple[int, str]]]:
    """``(uri, [(line, text)])`` of a required list file, blank lines skipped."""
    uri, text = _text(root, rel)
    return uri, [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _need(uri: str, line: int, row: Mapping[str, str], column: str) -> str:
    value = row.get(column, "")
    if not value:
        raise TaskFormatError(f"{uri}:{line}: empty {column!r}")
    return value


def _split(uri: str, line: int, value: str) -> str:
    if value not in SPLITS:
        raise TaskFormatError(f"{uri}:{line}: unknown split {value!r}; expected one of {list(SPLITS)}")
    return value


def _fold(uri: str, line: int, value: str, k: int | None = None) -> str:
    if not (value.isascii() and value.isdigit()) or int(value) < 1 or (k is not None and int(value) > k):
        expected = f"1..{k}" if k else "a positive integer"
        raise TaskFormatError(f"{uri}:{line}: bad fold {value!r}; expected {expected}")
    return f"fold{int(value)}"


def _where(uri: str, line: int | None) -> str:
    return uri if line is None else f"{uri}:{line}"


def _parts(uri: str, line: int | None, name: str, what: str = "file name") -> list[str]:
    """The parts of a relative name from a metadata row; one that could leave the root is a format error."""
    try:
        return io.safe_parts(name, what)
    except io.UnsafePathError as exc:
        raise TaskFormatError(f"{_where(uri, line)}: {exc}") from None


def _one_part(uri: str, line: int | None, name: str, what: str = "file name") -> str:
    parts = _parts(uri, line, name, what)
    if len(parts) != 1:
        raise TaskFormatError(f"{_where(uri, line)}: {what} {name!r} must be a single file name, without folders")
    return parts[0]


def _class_key(label: str) -> tuple[int, int, str]:
    """Numeric labels in numeric order (Surge pitches, as EVAR's pandas-read labels sort), then the others."""
    return (0, int(label), "") if label.isascii() and label.isdigit() else (1, 0, label)


def _data(name: str, audio: Sequence[str], splits: Sequence[str], labels: Sequence[Sequence[str]] = (),
          captions: Sequence[Sequence[str]] = (), classes: Sequence[str] | None = None,
          excluded: Mapping[str, int] | None = None, multi_label: bool | None = None, source: str = "") -> TaskData:
    """A :class:`TaskData`, classes sorted unless the dataset fixes them, multi-label when a clip has several
    (unless the dataset says so: AudioSet and FSD50K stay multi-label on any subset). ``source`` names the file
    (or folder) the clips came from, for the error when there are none."""
    if not audio:
        raise TaskFormatError(f"{source or name}: no clips (task {name!r})")
    label_rows = tuple(tuple(x) for x in labels)
    if classes is None:
        classes = sorted({x for row in label_rows for x in row}, key=_class_key)
    return TaskData(name=name, audio=tuple(audio), splits=tuple(splits), labels=label_rows,
                    captions=tuple(tuple(c) for c in captions), classes=tuple(classes),
                    multi_label=any(len(row) > 1 for row in label_rows) if multi_label is None else multi_label,
                    excluded={k: v for k, v in (excluded or {}).items() if v})


def _no_duplicates(uri: str, items: Iterable[tuple[int, str]], what: str) -> None:
    seen: dict[str, int] = {}
    for line, key in items:
        if key in seen:
            raise TaskFormatError(f"{uri}:{line}: {what} {key!r} already listed on line {seen[key]}")
        seen[key] = line


# ----------------------------------------------------------------------------------------------------- folded
def read_esc50(root: str) -> TaskData:
    """ESC-50's ``meta/esc50.csv``: the five official folds, because its clips of one recording share a fold."""
    uri, rows = _csv(root, "meta/esc50.csv", ["filename", "fold", "category"])
    audio, splits, labels = [], [], []
    for line, row in rows:
        name = _one_part(uri, line, _need(uri, line, row, "filename"))
        splits.append(_fold(uri, line, _need(uri, line, row, "fold"), 5))
        labels.append([_need(uri, line, row, "category")])
        audio.append(io.join(root, "audio", name))
    return _data("esc50", audio, splits, labels, source=uri)


def read_us8k(root: str) -> TaskData:
    """UrbanSound8K's ``metadata/UrbanSound8K.csv``: the ten official folds (slices of one recording share one)."""
    uri, rows = _csv(root, "metadata/UrbanSound8K.csv", ["slice_file_name", "fold", "class"])
    audio, splits, labels = [], [], []
    for line, row in rows:
        name = _one_part(uri, line, _need(uri, line, row, "slice_file_name"))
        split = _fold(uri, line, _need(uri, line, row, "fold"), 10)
        splits.append(split)
        labels.append([_need(uri, line, row, "class")])
        audio.append(io.join(root, "audio", split, name))
    return _data("us8k", audio, splits, labels, source=uri)


# ----------------------------------------------------------------------------------------------------- speech
def read_spcv2(root: str) -> TaskData:
    """Speech Commands V2: every ``<word>/<file>.wav`` (word folders start with a-z, as EVAR globs ``[a-z]*``), the
    official ``validation_list.txt`` / ``testing_list.txt`` for valid/test and the rest for train."""
    lists = {split: _lines(root, f"{stem}_list.txt") for split, stem in (("valid", "validation"), ("test", "testing"))}
    clips, other = [], 0
    for parts in _files(root):
        if len(parts) != 2 or not parts[1].endswith(".wav"):
            continue
        if re.match(r"[a-z]", parts[0]):
            clips.append(parts)
        else:
            other += 1
    if not clips:
        raise TaskFormatError(f"{root}: no <word>/<file>.wav files (Speech Commands layout)")
    known = {"/".join(p) for p in clips}
    split_of: dict[str, str] = {}
    for split, (uri, lines) in lists.items():
        for line, rel in lines:
            rel = "/".join(_parts(uri, line, rel))
            if rel not in known:
                raise TaskFormatError(f"{uri}:{line}: {rel!r} is not a <word>/<file>.wav under {root}")
            if rel in split_of:
                raise TaskFormatError(f"{uri}:{line}: {rel!r} is already in the {split_of[rel]} list")
            split_of[rel] = split
    return _data("spcv2", [io.join(root, *p) for p in clips], [split_of.get("/".join(p), "train") for p in clips],
                 [[p[0]] for p in clips], excluded={"folder is not a word (_background_noise_)": other})


def read_vc1(root: str) -> TaskData:
    """VoxCeleb1 identification: the official ``iden_split.txt`` (``1`` train, ``2`` valid, ``3`` test)."""
    uri, lines = _lines(root, "iden_split.txt")
    codes = {"1": "train", "2": "valid", "3": "test"}
    audio, splits, labels = [], [], []
    for line, text in lines:
        fields = text.split()
        if len(fields) != 2:
            raise TaskFormatError(f"{uri}:{line}: expected '<1|2|3> <speaker>/<video>/<utt>.wav', got {text!r}")
        code, rel = fields
        if code not in codes:
            raise TaskFormatError(f"{uri}:{line}: unknown split code {code!r}; expected 1 (train), 2 (valid), 3 (test)")
        parts = _parts(uri, line, rel)
        if len(parts) < 2:
            raise TaskFormatError(f"{uri}:{line}: {rel!r} names no speaker folder")
        audio.append(io.join(root, "wav", *parts))
        splits.append(codes[code])
        labels.append([parts[0]])
    return _data("vc1", audio, splits, labels, source=uri)


def read_voxforge(root: str) -> TaskData:
    """VoxForge ships no split: EVAR's ``voxforge.csv`` (``file_name,label,split``) is the one the paper used."""
    uri, rows = _csv(root, "voxforge.csv", ["file_name", "label", "split"])
    audio, splits, labels = [], [], []
    for line, row in rows:
        audio.append(io.join(root, *_parts(uri, line, _need(uri, line, row, "file_name"))))
        labels.append([_need(uri, line, row, "label")])
        splits.append(_split(uri, line, _need(uri, line, row, "split")))
    return _data("voxforge", audio, splits, labels, source=uri)


CREMAD_EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
_CREMAD_NAME = re.compile(r"(?P<actor>\d+)_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})\.wav")


def cremad_speaker_split(actors: Iterable[str], seed: int = 0) -> dict[str, str]:
    """Actor -> split, speaker-disjoint as NOSS/EVAR define it (70 % train, 10 % valid, the rest test).

    EVAR drew its speakers with an unseeded ``np.random.choice`` (63/9/19 of 91); only its ``cremad.csv`` holds
    that exact draw, so :func:`read_cremad` prefers the file. Without it: actors sorted numerically, permuted with
    ``numpy.random.default_rng(seed)``, the first ``round(0.7 n)`` train, the next ``round(0.1 n)`` valid
    (91 actors: 64/9/18).
    """
    ordered = sorted(set(actors), key=int)
    order = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    n_train, n_valid = round(0.7 * len(order)), round(0.1 * len(order))
    return {a: "train" if i < n_train else "valid" if i < n_train + n_valid else "test" for i, a in enumerate(order)}


def read_cremad(root: str) -> TaskData:
    """CREMA-D: every ``AudioWAV/*.wav``, labelled by the emotion code of its name; split by EVAR's
    ``cremad.csv`` when present (the paper's speakers), else by :func:`cremad_speaker_split`."""
    files = [p for p in _files(root, "AudioWAV") if len(p) == 2 and p[1].lower().endswith(".wav")]
    if not files:
        raise TaskFormatError(f"{_uri(root, 'AudioWAV')}: no .wav files (CREMA-D layout)")
    folder = _uri(root, "AudioWAV")
    parsed = []
    for parts in files:
        match = _CREMAD_NAME.fullmatch(parts[1])
        if not match:
            raise TaskFormatError(f"{folder}/{parts[1]}: not a CREMA-D name <actor>_<sentence>_<emotion>_<level>.wav")
        if match["emotion"] not in CREMAD_EMOTIONS:
            raise TaskFormatError(f"{folder}/{parts[1]}: unknown emotion {match['emotion']!r}; "
                                  f"expected one of {list(CREMAD_EMOTIONS)}")
        parsed.append((parts, match["actor"], match["emotion"]))
    excluded: dict[str, int] = {}
    if _exists(root, "cremad.csv"):
        uri, rows = _csv(root, "cremad.csv", ["file_name", "split"])
        names = {p[1] for p, _, _ in parsed}
        by_name: dict[str, str] = {}
        for line, row in rows:
            base = PurePosixPath(_need(uri, line, row, "file_name")).name
            if base in by_name:
                raise TaskFormatError(f"{uri}:{line}: {base!r} listed twice")
            if base not in names:
                raise TaskFormatError(f"{uri}:{line}: {base!r} is not in {folder}")
            by_name[base] = _split(uri, line, _need(uri, line, row, "split"))
        kept = [entry for entry in parsed if entry[0][1] in by_name]
        excluded["not in cremad.csv"] = len(parsed) - len(kept)
        parsed, splits = kept, [by_name[p[1]] for p, _, _ in kept]
    else:
        split_of = cremad_speaker_split(a for _, a, _ in parsed)
        splits = [split_of[a] for _, a, _ in parsed]
    return _data("cremad", [io.join(root, *p) for p, _, _ in parsed], splits, [[e] for _, _, e in parsed],
                 excluded=excluded, source=folder)


# ----------------------------------------------------------------------------------------------------- music
_GTZAN_TRACK = re.compile(r"(?P<genre>[a-z]+)\.(?P<number>\d{5})\.(?:wav|au)")
_GTZAN_LISTED = re.compile(r"(?P<stem>[a-z]+\.\d{5})(?:\.[A-Za-z0-9]+)?")
GTZAN_FILTERED = "outside the fault-filtered split"


def read_gtzan(root: str) -> TaskData:
    """GTZAN with the fault-filtered split (Kereliuk et al., Sturm; EVAR's lists): the full dataset repeats
    artists and tracks across a random split, so ``{train,valid,test}_filtered.txt`` decide; other tracks are
    excluded and counted. Tracks are matched by stem (``blues.00012``) so .au and converted .wav both fit."""
    lists = {split: _lines(root, f"{split}_filtered.txt") for split in SPLITS}
    tracks: list[tuple[str, ...]] = []
    for top in ("genres", "genres_original"):
        tracks = [p for p in _files(root, top) if len(p) == 3 and p[2].lower().endswith((".wav", ".au"))]
        if tracks:
            break
    if not tracks:
        raise TaskFormatError(f"{root}: no genres/<genre>/<genre>.NNNNN.(wav|au) tracks (GTZAN layout)")
    by_stem: dict[str, tuple[str, ...]] = {}
    for parts in tracks:
        match = _GTZAN_TRACK.fullmatch(parts[2])
        if not match or match["genre"] != parts[1]:
            raise TaskFormatError(f"{io.join(root, *parts)}: not a GTZAN track name <genre>.NNNNN.(wav|au) "
                                  f"of its genre folder {parts[1]!r}")
        stem = f"{match['genre']}.{match['number']}"
        if stem in by_stem:
            raise TaskFormatError(f"{io.join(root, *parts)}: a second audio file for track {stem}")
        by_stem[stem] = parts
    split_of: dict[str, str] = {}
    for split, (uri, lines) in lists.items():
        for line, text in lines:
            match = _GTZAN_LISTED.fullmatch(PurePosixPath(text).name)
            if not match:
                raise TaskFormatError(f"{uri}:{line}: {text!r} is not a GTZAN track (<genre>/<genre>.NNNNN.<ext>)")
            stem = match["stem"]
            if stem not in by_stem:
                raise TaskFormatError(f"{uri}:{line}: track {stem} has no audio under {root}")
            if stem in split_of:
                raise TaskFormatError(f"{uri}:{line}: track {stem} is already in the {split_of[stem]} list")
            split_of[stem] = split
    kept = [(stem, parts) for stem, parts in sorted(by_stem.items(), key=lambda kv: kv[1]) if stem in split_of]
    return _data("gtzan", [io.join(root, *p) for _, p in kept], [split_of[s] for s, _ in kept],
                 [[p[1]] for _, p in kept], excluded={GTZAN_FILTERED: len(by_stem) - len(kept)},
                 source=" ".join(uri for uri, _ in lists.values()))


def read_nsynth(root: str) -> TaskData:
    """NSynth's official ``nsynth-<split>/examples.json`` (note_str -> attributes): instrument family labels."""
    audio, splits, labels = [], [], []
    for split in SPLITS:
        uri, text = _text(root, f"nsynth-{split}/examples.json")
        try:
            notes = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskFormatError(f"{uri}: not valid JSON ({exc})") from None
        if not isinstance(notes, dict):
            raise TaskFormatError(f"{uri}: expected an object of note_str -> attributes")
        for note, attrs in notes.items():
            family = attrs.get("instrument_family_str") if isinstance(attrs, dict) else None
            if not isinstance(family, str) or not family:
                raise TaskFormatError(f"{uri}: note {note!r} has no instrument_family_str")
            name = _one_part(uri, None, f"{note}.wav", "note_str")
            audio.append(io.join(root, f"nsynth-{split}", "audio", name))
            splits.append(split)
            labels.append([family])
    return _data("nsynth", audio, splits, labels, source=_uri(root, "nsynth-test/examples.json"))


SURGE_EXTENSIONS = (".ogg", ".wav", ".flac")
SURGE_UNSPLIT = "tone not in surge_tone_splits.csv"


def read_surge(root: str) -> TaskData:
    """Surge synthesizer pitch: every ``<tone>/<pitch>.ogg``, split by tone with EVAR's predefined
    ``surge_tone_splits.csv`` so no tone (timbre) is in two splits; the label is the file stem."""
    uri, rows = _csv(root, "surge_tone_splits.csv", ["tone", "split"])
    files = [p for p in _files(root) if len(p) == 2 and p[1].lower().endswith(SURGE_EXTENSIONS)]
    if not files:
        raise TaskFormatError(f"{root}: no <tone>/<pitch>.(ogg|wav|flac) files (Surge layout)")
    tones = {p[0] for p in files}
    split_of: dict[str, str] = {}
    for line, row in rows:
        tone = _need(uri, line, row, "tone")
        if tone in split_of:
            raise TaskFormatError(f"{uri}:{line}: tone {tone!r} listed twice")
        if tone not in tones:
            raise TaskFormatError(f"{uri}:{line}: tone {tone!r} has no folder of audio under {root}")
        split_of[tone] = _split(uri, line, _need(uri, line, row, "split"))
    kept = [p for p in files if p[0] in split_of]
    return _data("surge", [io.join(root, *p) for p in kept], [split_of[p[0]] for p in kept],
                 [[p[1].rsplit(".", 1)[0]] for p in kept], excluded={SURGE_UNSPLIT: len(files) - len(kept)}, source=uri)


# ----------------------------------------------------------------------------------------------------- tagging
def read_audioset(root: str) -> TaskData:
    """AudioSet's ``eval_segments.csv`` with ``class_labels_indices.csv``: 527 display names in index order (the
    order taggers and published mAPs use), multi-label, all test."""
    cls_uri, class_rows = _csv(root, "class_labels_indices.csv", ["index", "mid", "display_name"])
    indexed = []
    for line, row in class_rows:
        index = _need(cls_uri, line, row, "index")
        if not (index.isascii() and index.isdigit()):
            raise TaskFormatError(f"{cls_uri}:{line}: index {index!r} is not a number")
        indexed.append((int(index), line, _need(cls_uri, line, row, "mid"), _need(cls_uri, line, row, "display_name")))
    indexed.sort()
    _no_duplicates(cls_uri, ((line, mid) for _, line, mid, _ in indexed), "mid")
    _no_duplicates(cls_uri, ((line, name) for _, line, _, name in indexed), "display_name")
    names = {mid: name for _, _, mid, name in indexed}
    seg_uri = _uri(root, "eval_segments.csv")
    try:
        segments = read_audioset_segments(seg_uri)
    except (FileNotFoundError, IsADirectoryError):
        raise TaskFormatError(f"{seg_uri}: metadata file missing (the task's layout needs it)") from None
    except SourceFormatError as exc:
        raise TaskFormatError(str(exc)) from None
    audio, labels = [], []
    for line, ytid, _, _, mids in segments:
        if not mids:
            raise TaskFormatError(f"{seg_uri}:{line}: empty positive_labels")
        unknown = [m for m in mids if m not in names]
        if unknown:
            raise TaskFormatError(f"{seg_uri}:{line}: label id(s) {unknown} are not in {cls_uri}")
        audio.append(io.join(root, "eval_segments", f"Y{_one_part(seg_uri, line, ytid, 'YTID')}.wav"))
        labels.append(list(dict.fromkeys(names[m] for m in mids)))
    return _data("audioset", audio, ["test"] * len(audio), labels, classes=[n for _, _, _, n in indexed],
                 multi_label=True, source=seg_uri)


def read_fsd50k(root: str) -> TaskData:
    """FSD50K's eval set: ``eval.csv`` (labels comma-separated in one field) and ``vocabulary.csv`` (no header:
    index,label,mid), whose order is the class order; multi-label, all test."""
    voc_uri, text = _text(root, "FSD50K.ground_truth/vocabulary.csv")
    vocabulary = []
    for line, fields in enumerate(csv.reader(_io.StringIO(text)), start=1):
        if not fields:
            continue
        if len(fields) != 3 or not re.fullmatch(r"[0-9]+", fields[0].strip()) or not fields[1].strip():
            raise TaskFormatError(f"{voc_uri}:{line}: expected 'index,label,mid', got {fields}")
        vocabulary.append((int(fields[0]), line, fields[1].strip()))
    vocabulary.sort()
    _no_duplicates(voc_uri, ((line, label) for _, line, label in vocabulary), "label")
    classes = [label for _, _, label in vocabulary]
    known = set(classes)
    uri, rows = _csv(root, "FSD50K.ground_truth/eval.csv", ["fname", "labels"])
    audio, labels = [], []
    for line, row in rows:
        fname = _one_part(uri, line, _need(uri, line, row, "fname"), "fname")
        labs = list(dict.fromkeys(x.strip() for x in _need(uri, line, row, "labels").split(",") if x.strip()))
        unknown = [x for x in labs if x not in known]
        if unknown or not labs:
            raise TaskFormatError(f"{uri}:{line}: labels {unknown or labs} are not in {voc_uri}")
        audio.append(io.join(root, "FSD50K.eval_audio", f"{fname}.wav"))
        labels.append(labs)
    return _data("fsd50k", audio, ["test"] * len(audio), labels, classes=classes, multi_label=True,
                 source=uri)


# ----------------------------------------------------------------------------------------------------- retrieval
_YTID = re.compile(r"[A-Za-z0-9_-]{11}")


def read_audiocaps(root: str) -> TaskData:
    """AudioCaps ``test.csv``: one clip per (youtube_id, start_time), its five captions in file order."""
    uri, rows = _csv(root, "test.csv", ["audiocap_id", "youtube_id", "start_time", "caption"])
    clips: dict[tuple[str, float], list[str]] = {}
    start_of: dict[str, tuple[int, float]] = {}
    for line, row in rows:
        ytid = _need(uri, line, row, "youtube_id")
        if not _YTID.fullmatch(ytid):
            raise TaskFormatError(f"{uri}:{line}: youtube_id {ytid!r} is not an 11-character YouTube id")
        try:
            start = float(_need(uri, line, row, "start_time"))
        except ValueError:
            raise TaskFormatError(f"{uri}:{line}: start_time {row['start_time']!r} is not a number") from None
        first = start_of.setdefault(ytid, (line, start))
        if first[1] != start:  # test/Y<ytid>.wav could not tell the two segments apart
            raise TaskFormatError(f"{uri}:{line}: {ytid} starts at {start:g} s here and at {first[1]:g} s on line "
                                  f"{first[0]}; the layout test/Y<youtube_id>.wav holds one segment per video")
        clips.setdefault((ytid, start), []).append(_need(uri, line, row, "caption"))
    audio = [io.join(root, "test", f"Y{ytid}.wav") for ytid, _ in clips]
    return _data("audiocaps", audio, ["test"] * len(audio), captions=list(clips.values()), source=uri)


def read_clotho(root: str) -> TaskData:
    """Clotho's ``clotho_captions_evaluation.csv``: each file with its (five) non-empty captions."""
    uri, rows = _csv(root, "clotho_captions_evaluation.csv", ["file_name", "caption_1"])
    audio, captions = [], []
    for line, row in rows:
        name = _one_part(uri, line, _need(uri, line, row, "file_name"))
        keys = sorted((k for k in row if re.fullmatch(r"caption_\d+", k)), key=lambda k: int(k[8:]))
        caps = [row[k] for k in keys if row[k]]
        if not caps:
            raise TaskFormatError(f"{uri}:{line}: no caption for {name!r}")
        audio.append(io.join(root, "evaluation", name))
        captions.append(caps)
    return _data("clotho", audio, ["test"] * len(audio), captions=captions, source=uri)


# ----------------------------------------------------------------------------------------------------- custom
CUSTOM_FOLDS = 5
_TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _dealt_folds(first_labels: Sequence[str]) -> list[str]:
    """Stratified folds for a folder that ships no split: k = min(5, smallest class), at least 2, else all test."""
    if not any(first_labels):
        return ["test"] * len(first_labels)
    counts = Counter(first_labels)
    k = min(CUSTOM_FOLDS, min(counts.values()))
    if k < 2:
        return ["test"] * len(first_labels)
    ids = {label: i for i, label in enumerate(sorted(counts))}
    folds = stratified_folds(np.array([ids[x] for x in first_labels]), k, seed=0)
    return [f"fold{int(f) + 1}" for f in folds]


def read_custom(root: str, name: str = "custom") -> TaskData:
    """Any folder with a ``labels.csv``: ``file_name`` (relative to the folder) and optional ``label`` (``;``-
    separated), ``split`` (train/valid/test) or ``fold`` (1, 2, ...), ``caption`` and/or ``caption_1..N``.

    Without split and fold the clips are dealt into 5 folds stratified by their first label (fewer when the
    smallest class is smaller; all test when it has a single clip, or no clip has a label).
    """
    uri, rows = _csv(root, "labels.csv", ["file_name"])
    header = set(rows[0][1]) if rows else set()
    if "split" in header and "fold" in header:
        raise TaskFormatError(f"{uri}: has both a 'split' and a 'fold' column; give one")
    audio, splits, labels, captions = [], [], [], []
    for line, row in rows:
        audio.append(io.join(root, *_parts(uri, line, _need(uri, line, row, "file_name"))))
        labels.append(list(dict.fromkeys(x.strip() for x in row.get("label", "").split(";") if x.strip())))
        keys = (["caption"] if "caption" in row else []) + sorted(
            (k for k in row if re.fullmatch(r"caption_\d+", k)), key=lambda k: int(k[8:]))
        captions.append([row[k] for k in keys if row[k]])
        if "split" in header:
            splits.append(_split(uri, line, _need(uri, line, row, "split")))
        elif "fold" in header:
            splits.append(_fold(uri, line, _need(uri, line, row, "fold")))
    if not splits:
        splits = _dealt_folds([labs[0] if labs else "" for labs in labels])
    return _data(name, audio, splits, labels if any(labels) else (),
                 captions=captions if any(captions) else (), source=uri)


def custom_task(name: str, root: str, protocols: Sequence[str] = (LINEAR, ZERO_SHOT), duration_s: float = 0.0,
                prompt: str = "default") -> Task:
    """Any folder with a ``labels.csv`` as a task (see :func:`read_custom`); ``duration_s`` 0 = the clips' mean.

    Its ``read`` always reads ``root`` (the folder is part of the task), whatever root it is called with.
    """
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r} must match {_TASK_NAME.pattern!r}")
    folder = str(root)

    def read(_root: str | None = None) -> TaskData:
        return read_custom(folder, name)

    return Task(name=name, title=name, protocols=tuple(protocols), duration_s=duration_s, read=read, prompt=prompt,
                folder=folder, layout="labels.csv: file_name[,label][,split|fold][,caption|caption_N]")


# ----------------------------------------------------------------------------------------------------- registry
def _registry(*tasks: Task) -> Mapping[str, Task]:
    return MappingProxyType({t.name: t for t in tasks})


TASKS: Mapping[str, Task] = _registry(
    Task("esc50", "ESC-50", (LINEAR, ZERO_SHOT), 5.0, read_esc50, "esc50",
         layout="meta/esc50.csv; audio/<filename>; fold1-fold5"),
    Task("us8k", "UrbanSound8K", (LINEAR, ZERO_SHOT), 4.0, read_us8k, "us8k",
         layout="metadata/UrbanSound8K.csv; audio/fold<fold>/<slice_file_name>; fold1-fold10"),
    Task("spcv2", "Speech Commands V2", (LINEAR,), 1.0, read_spcv2,
         layout="<word>/<file>.wav; validation_list.txt, testing_list.txt; the rest train"),
    Task("vc1", "VoxCeleb1 (speaker identification)", (LINEAR,), 8.2, read_vc1,
         layout="iden_split.txt (1 train, 2 valid, 3 test); wav/<speaker>/<video>/<utt>.wav"),
    Task("voxforge", "VoxForge (language identification)", (LINEAR,), 5.8, read_voxforge,
         layout="voxforge.csv (EVAR: file_name,label,split); <file_name>"),
    Task("cremad", "CREMA-D (emotion)", (LINEAR, ZERO_SHOT), 2.5, read_cremad, "cremad",
         layout="AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav; cremad.csv (EVAR) split, else speakers 70/10/20"),
    Task("gtzan", "GTZAN (genre)", (LINEAR, ZERO_SHOT), 30.0, read_gtzan, "gtzan",
         layout="genres/<genre>/<genre>.NNNNN.(au|wav); {train,valid,test}_filtered.txt"),
    Task("nsynth", "NSynth (instrument family)", (LINEAR, ZERO_SHOT), 4.0, read_nsynth, "nsynth",
         layout="nsynth-{train,valid,test}/examples.json; nsynth-<split>/audio/<note_str>.wav"),
    Task("surge", "Surge synthesizer (pitch)", (LINEAR,), 4.0, read_surge,
         layout="<tone>/<pitch>.ogg; surge_tone_splits.csv (EVAR: tone,split)"),
    Task("audioset", "AudioSet (eval segments)", (ZERO_SHOT, TAGGING), 10.0, read_audioset, "as",
         layout="eval_segments.csv, class_labels_indices.csv; eval_segments/Y<ytid>.wav; test"),
    Task("fsd50k", "FSD50K (eval)", (ZERO_SHOT,), 7.6358, read_fsd50k, "fsd50k",
         layout="FSD50K.ground_truth/{eval,vocabulary}.csv; FSD50K.eval_audio/<fname>.wav; test"),
    Task("audiocaps", "AudioCaps test", (RETRIEVAL,), 10.0, read_audiocaps,
         layout="test.csv (audiocap_id,youtube_id,start_time,caption); test/Y<youtube_id>.wav"),
    Task("clotho", "Clotho evaluation", (RETRIEVAL,), 30.0, read_clotho,
         layout="clotho_captions_evaluation.csv (file_name,caption_1..5); evaluation/<file_name>"),
)
"""The paper's downstream tasks, in Table I order (name -> :class:`Task`)."""
