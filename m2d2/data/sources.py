"""Source adapters: the public metadata layouts of the pre-training and evaluation datasets -> manifest rows.

Each ``*_manifest`` function reads the dataset's own metadata files, unchanged as published, and returns a
validated manifest table (:mod:`m2d2.data.manifest`). Audio URIs are the dataset's audio root joined with a
``layout`` template (a ``str.format`` pattern whose fields are listed per adapter), so any download layout can
be described without code. Defaults (the layouts the usual download tools produce):

=============  ======================================  ========================================================
dataset        default layout                          fields
=============  ======================================  ========================================================
AudioSet       ``{subset}/Y{ytid}.wav``                subset (CSV stem, e.g. ``balanced_train_segments``),
                                                       ytid, start, end (float s), start_s (int s), start_ms
VGGSound       ``{ytid}_{start_s:06d}.wav``            ytid, start_s, split
WavCaps        ``{subset}/{stem}.flac``                subset (``FreeSound``, ``BBC_Sound_Effects``,
                                                       ``SoundBible``, ``AudioSet_SL``), stem (id without ext.)
AudioCaps      ``{split}/Y{ytid}.wav``                 split (CSV stem: train/val/test), ytid, start_s
Clotho         ``{split_dir}/{file_name}``             split_dir (development/validation/evaluation), file_name
ESC-50         ``audio/{filename}``                    filename, fold
UrbanSound8K   ``audio/fold{fold}/{slice_file_name}``  slice_file_name, fold
folder + CSV   ``{file_name}``                         file_name (path relative to the root)
=============  ======================================  ========================================================

Captions are keyed by the **full** clip key, never by the 11-character YouTube-ID prefix the reference used
(which hands a VGGSound clip the caption of a different AudioSet segment of the same video): YouTube segments
are keyed ``<ytid>_<start seconds, 6 digits>`` (Auto-ACD's ``youtube_id`` form). A clip with labels but no
caption gets ``The sound of <labels>.`` (paper, §IV-A3).
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa

from m2d2 import io
from m2d2.data.manifest import manifest_table

log = logging.getLogger(__name__)

AUDIOSET_LAYOUT = "{subset}/Y{ytid}.wav"
VGGSOUND_LAYOUT = "{ytid}_{start_s:06d}.wav"
WAVCAPS_LAYOUT = "{subset}/{stem}.flac"
AUDIOCAPS_LAYOUT = "{split}/Y{ytid}.wav"
CLOTHO_LAYOUT = "{split_dir}/{file_name}"
ESC50_LAYOUT = "audio/{filename}"
US8K_LAYOUT = "audio/fold{fold}/{slice_file_name}"
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")

#: WavCaps JSON file names (as published in ``json_files/``) -> subset.
WAVCAPS_FILES = {"fsd_final": "FreeSound", "bbc_final": "BBC_Sound_Effects", "sb_final": "SoundBible",
                 "as_final": "AudioSet_SL"}
WAVCAPS_ORIGIN = {"FreeSound": "fs", "BBC_Sound_Effects": "bbc", "SoundBible": "soundbible", "AudioSet_SL": "yt"}
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
YTID_LEN = 11
_SEGMENT_RE = re.compile(r"^(?P<ytid>[A-Za-z0-9_-]{11})(?:_(?P<start>\d+(?:\.\d+)?))?$")


class SourceFormatError(ValueError):
    """A metadata file that does not have its dataset's published format; names the file and line."""


# ----------------------------------------------------------------------------------------------------- reading
def _read_text(path: str) -> str:
    """A metadata file's text: UTF-8 (with or without BOM), falling back to Latin-1 (older Clotho CSVs)."""
    data = io.read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _dict_rows(path: str, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a headed CSV, checking the header has ``required`` columns."""
    reader = csv.DictReader(_io.StringIO(_read_text(path)))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceFormatError(f"{path}: header {header} lacks column(s) {missing}")
    return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]


def _stem(path: str) -> str:
    return PurePosixPath(str(path).rstrip("/")).name.rsplit(".", 1)[0]


def _as_list(paths: str | Sequence[str]) -> list[str]:
    return [str(paths)] if isinstance(paths, str) or not isinstance(paths, Sequence) else [str(p) for p in paths]


def _uri(audio_root: str, layout: str, **fields: Any) -> str:
    return io.join(audio_root, *layout.format(**fields).split("/")) if audio_root else layout.format(**fields)


def segment_key(ytid: str, start_s: int) -> str:
    """Key of a YouTube segment: ``<ytid>_<start seconds as 6 digits>`` (Auto-ACD / VGGSound file naming)."""
    return f"{ytid}_{int(start_s):06d}"


def parse_segment_key(text: str) -> tuple[str, int | None]:
    """``'<ytid>_000030'`` -> ``(ytid, 30)``; a bare 11-character ID -> ``(ytid, None)``."""
    text = text.strip()
    if text.startswith("Y") and len(text) == YTID_LEN + 1:
        text = text[1:]  # the "Y<ytid>" file-name form of audioset_tagging_cnn / AudioCaps / WavCaps
    match = _SEGMENT_RE.match(text)
    if not match:
        raise ValueError(f"not a YouTube segment key: {text!r} (expected '<11-char id>' or '<id>_<start s>')")
    start = match.group("start")
    return match.group("ytid"), (None if start is None else int(round(float(start))))


class CaptionIndex:
    """Captions of YouTube segments keyed by full segment key (Auto-ACD and similar caption files).

    A caption file row keyed by a bare video ID (no start) is used only for a clip that is the only segment of
    that video among the clips it is asked about, so it can never land on another segment of the same video.
    """

    def __init__(self, segments: Mapping[str, list[str]] | None = None,
                 videos: Mapping[str, list[str]] | None = None):
        self.segments: dict[str, list[str]] = dict(segments or {})
        self.videos: dict[str, list[str]] = dict(videos or {})

    def __len__(self) -> int:
        return len(self.segments) + len(self.videos)

    def add(self, key: str, caption: str) -> None:
        ytid, start = parse_segment_key(key)
        target = self.videos.setdefault(ytid, []) if start is None else self.segments.setdefault(
            segment_key(ytid, start), [])
        if caption not in target:
            target.append(caption)

    def lookup(self, ytid: str, start_s: int, segments_of_video: int) -> list[str]:
        found = self.segments.get(segment_key(ytid, start_s))
        if found:
            return list(found)
        if segments_of_video == 1:
            return list(self.videos.get(ytid, []))
        return []


def read_autoacd(paths: str | Sequence[str]) -> CaptionIndex:
    """Auto-ACD caption CSVs (``youtube_id,caption``; ``youtube_id`` is ``<ytid>_<start s>`` or a bare ID)."""
    index = CaptionIndex()
    for path in _as_list(paths):
        for line, row in _dict_rows(path, ["youtube_id", "caption"]):
            if not row["caption"]:
                continue
            try:
                index.add(row["youtube_id"], row["caption"])
            except ValueError as exc:
                raise SourceFormatError(f"{path}:{line}: {exc}") from exc
    return index


def _video_counts(keys: Iterable[tuple[str, int]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for ytid, _ in set(keys):
        counts[ytid] += 1
    return counts


# ----------------------------------------------------------------------------------------------------- AudioSet
def audioset_class_names(class_labels_csv: str, ontology_json: str | None = None) -> dict[str, str]:
    """``mid -> display name`` from ``class_labels_indices.csv`` (``index,mid,display_name``), with the
    ontology's ``name`` for mids it does not list (the ontology has 632 classes, the CSV the 527 used)."""
    names: dict[str, str] = {}
    if ontology_json:
        try:
            nodes = json.loads(_read_text(ontology_json))
        except json.JSONDecodeError as exc:
            raise SourceFormatError(f"{ontology_json}: not valid JSON ({exc})") from exc
        if not isinstance(nodes, list) or not all(isinstance(n, dict) and "id" in n and "name" in n for n in nodes):
            raise SourceFormatError(f"{ontology_json}: expected a list of {{'id', 'name', ...}} objects")
        names.update({n["id"]: n["name"] for n in nodes})
    for _, row in _dict_rows(class_labels_csv, ["index", "mid", "display_name"]):
        names[row["mid"]] = row["display_name"]
    return names


def read_audioset_segments(path: str) -> list[tuple[int, str, float, float, list[str]]]:
    """Rows ``(line, ytid, start, end, mids)`` of a segments CSV (``# YTID, start_seconds, end_seconds,
    positive_labels`` after ``#`` comment lines; the label list is quoted and comma-separated)."""
    rows = []
    for line, fields in enumerate(csv.reader(_io.StringIO(_read_text(path)), skipinitialspace=True), start=1):
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 4:
            raise SourceFormatError(f"{path}:{line}: expected 4 fields (YTID, start_seconds, end_seconds, "
                                    f"positive_labels), got {len(fields)}: {fields}")
        ytid, start, end, labels = fields
        try:
            start_f, end_f = float(start), float(end)
        except ValueError as exc:
            raise SourceFormatError(f"{path}:{line}: start/end are not numbers: {start!r}, {end!r}") from exc
        if len(ytid) != YTID_LEN:
            raise SourceFormatError(f"{path}:{line}: YTID {ytid!r} is not {YTID_LEN} characters")
        rows.append((line, ytid, start_f, end_f, [m.strip() for m in labels.split(",") if m.strip()]))
    return rows


def audioset_manifest(
    segments: str | Sequence[str],
    audio_root: str,
    class_labels: str,
    ontology: str | None = None,
    captions: CaptionIndex | None = None,
    layout: str = AUDIOSET_LAYOUT,
    split: str | None = None,
) -> pa.Table:
    """AudioSet segments CSVs -> manifest (source ``audioset``, labels = display names, origin ``yt:<ytid>``).

    Split: ``eval`` for ``eval_segments.csv``, else ``train`` (unless ``split`` is given). Captions come from
    ``captions`` (e.g. :func:`read_autoacd`) by full segment key, else ``The sound of <labels>.``.
    """
    names = audioset_class_names(class_labels, ontology)
    rows: list[dict[str, Any]] = []
    parsed = [(path, read_audioset_segments(path)) for path in _as_list(segments)]
    videos = _video_counts((ytid, int(round(start))) for _, seg in parsed for _, ytid, start, _, _ in seg)
    for path, seg in parsed:
        subset = _stem(path)
        row_split = split or ("eval" if subset.startswith("eval") else "train")
        for line, ytid, start, end, mids in seg:
            unknown = [m for m in mids if m not in names]
            if unknown:
                raise SourceFormatError(f"{path}:{line}: label id(s) {unknown} are in neither {class_labels} nor "
                                        "the ontology")
            start_s = int(round(start))
            rows.append({
                "clip_id": f"audioset:{segment_key(ytid, start_s)}", "source": "audioset",
                "audio_uri": _uri(audio_root, layout, subset=subset, ytid=ytid, start=start, end=end,
                                  start_s=start_s, start_ms=int(round(start * 1000))),
                "duration_s": (end - start) if end > start else None,
                "labels": [names[m] for m in mids],
                "captions": captions.lookup(ytid, start_s, videos[ytid]) if captions else [],
                "split": row_split, "origin": f"yt:{ytid}",
            })
    return manifest_table(rows)


# ----------------------------------------------------------------------------------------------------- VGGSound
def vggsound_manifest(csv_path: str, audio_root: str, captions: CaptionIndex | None = None,
                      layout: str = VGGSOUND_LAYOUT, split: str | None = None) -> pa.Table:
    """``vggsound.csv`` (no header: ``youtube_id,start_seconds,label,train|test``) -> manifest (source
    ``vggsound``). Rows of one segment are merged (their labels collected)."""
    segments: dict[tuple[str, int], dict[str, Any]] = {}
    for line, fields in enumerate(csv.reader(_io.StringIO(_read_text(csv_path))), start=1):
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 4:
            raise SourceFormatError(f"{csv_path}:{line}: expected 4 fields (youtube_id, start_seconds, label, "
                                    f"split), got {len(fields)}: {fields}")
        ytid, start, label, row_split = (f.strip() for f in fields)
        try:
            start_s = int(round(float(start)))
        except ValueError:
            if line == 1:
                continue  # a header line added by some mirrors
            raise SourceFormatError(f"{csv_path}:{line}: start {start!r} is not a number") from None
        if len(ytid) != YTID_LEN:
            raise SourceFormatError(f"{csv_path}:{line}: youtube_id {ytid!r} is not {YTID_LEN} characters")
        entry = segments.setdefault((ytid, start_s), {"labels": [], "split": row_split})
        if label and label not in entry["labels"]:
            entry["labels"].append(label)
    videos = _video_counts(segments)
    rows = []
    for (ytid, start_s), entry in segments.items():
        row_split = split or entry["split"]
        rows.append({
            "clip_id": f"vggsound:{segment_key(ytid, start_s)}", "source": "vggsound",
            "audio_uri": _uri(audio_root, layout, ytid=ytid, start_s=start_s, split=row_split),
            "labels": entry["labels"], "split": row_split, "origin": f"yt:{ytid}",
            "captions": captions.lookup(ytid, start_s, videos[ytid]) if captions else [],
        })
    return manifest_table(rows)


# ----------------------------------------------------------------------------------------------------- WavCaps
def wavcaps_manifest(json_path: str, audio_root: str, subset: str | None = None, layout: str = WAVCAPS_LAYOUT,
                     split: str = "train") -> pa.Table:
    """One WavCaps subset's JSON -> manifest (source ``wavcaps``, clip id ``wavcaps:<Subset>/<id>``).

    The subset is taken from the published file name (``fsd_final*.json``, ``bbc_final.json``,
    ``sb_final.json``, ``as_final.json``) unless given. Layouts differ per subset and are all accepted:
    ``{"num_captions_per_audio": 1, "data": [...]}`` or a bare list (early ``sb_final.json``); ``id`` is a
    Freesound / BBC / SoundBible number (string or int) or, for AudioSet_SL, ``"Y<ytid>.wav"``; FreeSound adds
    ``file_name``/``tags``, BBC ``category``, SoundBible ``title``; ``caption`` is one string (a list is accepted).
    """
    stem = _stem(json_path)
    if subset is None:
        subset = next((s for prefix, s in WAVCAPS_FILES.items() if stem.startswith(prefix)), None)
        if subset is None:
            raise SourceFormatError(f"{json_path}: cannot tell the WavCaps subset from the file name; pass subset= "
                                    f"(one of {sorted(WAVCAPS_ORIGIN)})")
    if subset not in WAVCAPS_ORIGIN:
        raise SourceFormatError(f"unknown WavCaps subset {subset!r}; expected one of {sorted(WAVCAPS_ORIGIN)}")
    try:
        doc = json.loads(_read_text(json_path))
    except json.JSONDecodeError as exc:
        raise SourceFormatError(f"{json_path}: not valid JSON ({exc})") from exc
    entries = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise SourceFormatError(f"{json_path}: expected a list of entries or {{'data': [...]}}")
    rows = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise SourceFormatError(f"{json_path}: entry {n} has no 'id': {str(entry)[:200]}")
        clip = str(entry["id"]).strip()
        clip_stem = clip.rsplit(".", 1)[0] if clip.lower().endswith(AUDIO_EXTENSIONS) else clip
        caption = entry.get("caption", entry.get("captions"))
        captions = [caption] if isinstance(caption, str) else list(caption or [])
        if subset == "AudioSet_SL":
            ytid = clip_stem[1:] if clip_stem.startswith("Y") and len(clip_stem) == YTID_LEN + 1 else clip_stem
            origin = f"yt:{ytid}"
        else:
            origin = f"{WAVCAPS_ORIGIN[subset]}:{clip_stem}"
        duration = entry.get("duration")
        rows.append({
            "clip_id": f"wavcaps:{subset}/{clip_stem}", "source": "wavcaps",
            "audio_uri": _uri(audio_root, layout, subset=subset, stem=clip_stem, id=clip),
            "duration_s": float(duration) if isinstance(duration, int | float) and duration > 0 else None,
            "captions": captions, "labels": [], "split": split, "origin": origin,
        })
    return manifest_table(rows)


def read_wavcaps_blacklist(path: str) -> set[str]:
    """Origins listed in a WavCaps blacklist JSON (``{"AudioSet": ["Y<ytid>.wav", ...], "FreeSound": [ids]}``),
    for :func:`m2d2.data.leakage.filter_leakage`'s ``blocked_origins``."""
    doc = json.loads(_read_text(path))
    if not isinstance(doc, dict):
        raise SourceFormatError(f"{path}: expected an object of subset -> id list")
    origins = set()
    for subset, ids in doc.items():
        key = subset.lower()
        for value in ids:
            stem = str(value).rsplit(".", 1)[0]
            if key.startswith("audioset"):
                origins.add(f"yt:{parse_segment_key(stem)[0]}")
            elif key.startswith("freesound"):
                origins.add(f"fs:{stem}")
            else:
                raise SourceFormatError(f"{path}: unknown blacklist subset {subset!r}")
    return origins


# ----------------------------------------------------------------------------------------------------- AudioCaps
def audiocaps_manifest(csv_paths: str | Sequence[str], audio_root: str, layout: str = AUDIOCAPS_LAYOUT,
                       split: str | None = None) -> pa.Table:
    """AudioCaps CSVs (``audiocap_id,youtube_id,start_time,caption``; one row per caption) -> manifest (source
    ``audiocaps``, clip id ``audiocaps:<ytid>_<start>``, captions in ``audiocap_id`` order). The split is the
    file stem (``train``/``val``/``test``) unless given."""
    rows = []
    for path in _as_list(csv_paths):
        row_split = split or _stem(path)
        clips: dict[tuple[str, int], list[tuple[int, str]]] = {}
        for line, row in _dict_rows(path, ["audiocap_id", "youtube_id", "start_time", "caption"]):
            try:
                start_s, cap_id = int(round(float(row["start_time"]))), int(row["audiocap_id"])
            except ValueError as exc:
                raise SourceFormatError(f"{path}:{line}: start_time/audiocap_id not numeric: {row}") from exc
            if len(row["youtube_id"]) != YTID_LEN:
                raise SourceFormatError(f"{path}:{line}: youtube_id {row['youtube_id']!r} is not {YTID_LEN} chars")
            clips.setdefault((row["youtube_id"], start_s), []).append((cap_id, row["caption"]))
        for (ytid, start_s), caps in clips.items():
            rows.append({
                "clip_id": f"audiocaps:{segment_key(ytid, start_s)}", "source": "audiocaps",
                "audio_uri": _uri(audio_root, layout, split=row_split, ytid=ytid, start_s=start_s),
                "captions": [c for _, c in sorted(caps)], "labels": [], "split": row_split, "origin": f"yt:{ytid}",
            })
    return manifest_table(rows)


# ----------------------------------------------------------------------------------------------------- Clotho
def clotho_manifest(captions_csvs: str | Sequence[str], audio_root: str, metadata_csvs: str | Sequence[str] = (),
                    layout: str = CLOTHO_LAYOUT, split: str | None = None) -> pa.Table:
    """Clotho ``clotho_captions_<split>.csv`` (``file_name,caption_1..caption_5``) -> manifest (source
    ``clotho``, clip id ``clotho:<file_name>``, the file name kept verbatim).

    Split: development -> ``train``, validation -> ``val``, evaluation -> ``test``. With the matching
    ``clotho_metadata_<split>.csv`` the Freesound ``sound_id`` becomes the origin (``fs:<id>``), which lets the
    leakage filter catch the same recording in WavCaps FreeSound.
    """
    sound_ids: dict[str, str] = {}
    for path in _as_list(metadata_csvs):
        for _, row in _dict_rows(path, ["file_name", "sound_id"]):
            if row["sound_id"]:
                sound_ids[row["file_name"]] = row["sound_id"]
    rows = []
    for path in _as_list(captions_csvs):
        stem = _stem(path)
        split_dir = next((d for d in CLOTHO_SPLITS if stem.endswith(d)), None)
        if split_dir is None and split is None:
            raise SourceFormatError(f"{path}: cannot tell the Clotho split from the file name; pass split=")
        row_split = split or CLOTHO_SPLITS[split_dir]
        for line, row in _dict_rows(path, ["file_name", "caption_1"]):
            caps = [row[k] for k in sorted((k for k in row if k.startswith("caption_")),
                                           key=lambda k: int(k.split("_")[1])) if row[k]]
            if not row["file_name"]:
                raise SourceFormatError(f"{path}:{line}: empty file_name")
            sound_id = sound_ids.get(row["file_name"])
            rows.append({
                "clip_id": f"clotho:{row['file_name']}", "source": "clotho",
                "audio_uri": _uri(audio_root, layout, split_dir=split_dir or row_split, file_name=row["file_name"]),
                "captions": caps, "labels": [], "split": row_split,
                "origin": f"fs:{sound_id}" if sound_id else None,
            })
    return manifest_table(rows)


# ----------------------------------------------------------------------------------------------------- ESC-50, US8K
def esc50_manifest(meta_csv: str, audio_root: str, layout: str = ESC50_LAYOUT, split: str = "eval") -> pa.Table:
    """ESC-50 ``meta/esc50.csv`` (``filename,fold,target,category,esc10,src_file,take``) -> manifest (source
    ``esc50``, label = category, origin = the Freesound recording ``fs:<src_file>``)."""
    rows = []
    for line, row in _dict_rows(meta_csv, ["filename", "fold", "target", "category", "src_file"]):
        if not row["filename"] or not row["category"]:
            raise SourceFormatError(f"{meta_csv}:{line}: empty filename or category")
        rows.append({
            "clip_id": f"esc50:{row['filename']}", "source": "esc50",
            "audio_uri": _uri(audio_root, layout, filename=row["filename"], fold=row["fold"]),
            "duration_s": 5.0, "labels": [row["category"]], "split": split,
            "origin": f"fs:{row['src_file']}" if row["src_file"] else None,
        })
    return manifest_table(rows)


def urbansound8k_manifest(meta_csv: str, audio_root: str, layout: str = US8K_LAYOUT, split: str = "eval") -> pa.Table:
    """UrbanSound8K ``metadata/UrbanSound8K.csv`` (``slice_file_name,fsID,start,end,salience,fold,classID,
    class``) -> manifest (source ``us8k``, label = class, origin ``fs:<fsID>``)."""
    rows = []
    for line, row in _dict_rows(meta_csv, ["slice_file_name", "fsID", "start", "end", "fold", "class"]):
        try:
            duration = float(row["end"]) - float(row["start"])
        except ValueError as exc:
            raise SourceFormatError(f"{meta_csv}:{line}: start/end are not numbers") from exc
        rows.append({
            "clip_id": f"us8k:{row['slice_file_name']}", "source": "us8k",
            "audio_uri": _uri(audio_root, layout, slice_file_name=row["slice_file_name"], fold=row["fold"]),
            "duration_s": duration if duration > 0 else None, "labels": [row["class"]], "split": split,
            "origin": f"fs:{row['fsID']}" if row["fsID"] else None,
        })
    return manifest_table(rows)


# ----------------------------------------------------------------------------------------------------- generic
def folder_manifest(audio_root: str, csv_path: str | None = None, source: str = "custom", split: str = "train",
                    extensions: Sequence[str] = AUDIO_EXTENSIONS) -> pa.Table:
    """Any folder of audio, described by a CSV or by its own tree.

    With ``csv_path``: columns ``file_name`` (path under ``audio_root``, required) and optionally ``clip_id``,
    ``caption`` and/or ``caption_1``..``caption_N``, ``labels`` (``;``-separated), ``split``, ``origin``.
    Without: every file with one of ``extensions`` under ``audio_root``; its parent folder (if any) is the label.
    Clip ids are ``<source>:<clip_id or file_name>``.
    """
    rows = []
    if csv_path:
        for line, row in _dict_rows(csv_path, ["file_name"]):
            if not row["file_name"]:
                raise SourceFormatError(f"{csv_path}:{line}: empty file_name")
            caption_keys = sorted((k for k in row if re.fullmatch(r"caption_\d+", k)), key=lambda k: int(k[8:]))
            caps = [row[k] for k in (["caption"] if "caption" in row else []) + caption_keys if row.get(k)]
            rows.append({
                "clip_id": f"{source}:{row.get('clip_id') or row['file_name']}", "source": source,
                "audio_uri": _uri(audio_root, "{f}", f=row["file_name"]), "captions": caps,
                "labels": [x.strip() for x in row.get("labels", "").split(";") if x.strip()],
                "split": row.get("split") or split, "origin": row.get("origin") or None,
            })
        return manifest_table(rows)
    fs, root = fsspec.core.url_to_fs(str(audio_root))
    root = root.rstrip("/")
    for path in sorted(fs.find(root)):
        if not path.lower().endswith(tuple(extensions)):
            continue
        rel = path[len(root):].lstrip("/")
        parent = PurePosixPath(rel).parent.name
        rows.append({"clip_id": f"{source}:{rel}", "source": source, "audio_uri": io.join(str(audio_root), *rel.split("/")),
                     "labels": [parent] if parent else [], "split": split})
    if not rows:
        raise SourceFormatError(f"{audio_root}: no audio files with extensions {list(extensions)}")
    return manifest_table(rows)


def concat_manifests(tables: Sequence[pa.Table]) -> pa.Table:
    """Several sources' manifests as one (validated: clip ids must stay unique), grouped by split so each shard
    of the feature store holds one split."""
    from m2d2.data.manifest import MANIFEST_SCHEMA, validate_manifest

    table = pa.concat_tables([validate_manifest(t) for t in tables]).cast(MANIFEST_SCHEMA)
    splits = table.column("split").to_pylist()
    order = sorted(range(table.num_rows), key=splits.__getitem__)  # stable: source order kept within a split
    return validate_manifest(table.take(pa.array(order, type=pa.int64())))
