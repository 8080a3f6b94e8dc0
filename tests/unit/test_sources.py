"""Source adapters on small fixture files in each dataset's published metadata format (tests/fixtures/sources)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import soundfile as sf

from m2d2.data import sources
from m2d2.data.manifest import MANIFEST_SCHEMA, validate_manifest
from m2d2.data.sources import SourceFormatError
from tests.helpers import FIXTURES

FIX = FIXTURES / "sources"
ROOT = "s3://corpus/audio"


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {row["clip_id"]: row for row in table.to_pylist()}


def test_audioset_segments_labels_layout_and_captions_by_full_segment_key():
    captions = sources.read_autoacd(str(FIX / "autoacd" / "train.csv"))
    table = sources.audioset_manifest(
        [str(FIX / "audioset" / "balanced_train_segments.csv"), str(FIX / "audioset" / "eval_segments.csv")],
        ROOT, class_labels=str(FIX / "audioset" / "class_labels_indices.csv"),
        ontology=str(FIX / "audioset" / "ontology.json"), captions=captions)
    assert table.schema == MANIFEST_SCHEMA and table.num_rows == 5  # the 3 comment lines of each file skipped
    rows = _by_id(table)
    first = rows["audioset:--PJHxphWEs_000030"]
    assert first["labels"] == ["Speech", "Water"]  # the quoted, comma-separated label list, as display names
    assert first["captions"] == ["A man speaks while water gushes nearby, echoing in a tiled room."]
    assert first["audio_uri"] == "s3://corpus/audio/balanced_train_segments/Y--PJHxphWEs.wav"
    assert first["origin"] == "yt:--PJHxphWEs" and first["split"] == "train" and first["duration_s"] == 10.0
    # No Auto-ACD caption: the paper's label caption; an ontology-only id gets the ontology's name.
    assert rows["audioset:--ZhevVpy1s_000050"]["captions"] == ["The sound of Dog."]
    assert rows["audioset:0-0EdrpdT00_000000"]["captions"] == [
        "The sound of Male speech, man speaking, Speech, and Human sounds."]
    # The eval file is the eval split; a caption keyed by the bare video id is used (one segment of that video).
    evaluation = rows["audioset:-0RWZT-miFs_000420"]
    assert evaluation["split"] == "eval" and evaluation["labels"] == ["Music", "Car"]
    assert evaluation["captions"] == ["A car radio plays music while the engine idles."]


def test_audioset_unknown_label_id_names_file_and_line(tmp_path):
    bad = tmp_path / "unbalanced_train_segments.csv"
    bad.write_text("# YTID, start_seconds, end_seconds, positive_labels\n--PJHxphWEs, 30.000, 40.000, \"/m/nope\"\n")
    with pytest.raises(SourceFormatError, match=r"unbalanced_train_segments.csv:2: .*'/m/nope'"):
        sources.audioset_manifest(str(bad), ROOT, class_labels=str(FIX / "audioset" / "class_labels_indices.csv"))
    bad.write_text("--PJHxphWEs, 30.000, \"/m/09x0r\"\n")
    with pytest.raises(SourceFormatError, match=r":1: expected 4 fields"):
        sources.audioset_manifest(str(bad), ROOT, class_labels=str(FIX / "audioset" / "class_labels_indices.csv"))


def test_vggsound_captions_never_come_from_another_segment_of_the_same_video():
    captions = sources.read_autoacd(str(FIX / "autoacd" / "train.csv"))
    table = sources.vggsound_manifest(str(FIX / "vggsound" / "vggsound.csv"), ROOT, captions=captions)
    rows = _by_id(table)
    assert len(rows) == 3  # the two rows of --0PQM4-hqg@30 are one clip with two labels
    # --PJHxphWEs also has an AudioSet segment at 30 s: the reference's 11-character key would pool its caption.
    clip = rows["vggsound:--PJHxphWEs_000050"]
    assert clip["captions"] == ["People crunch on crisps at a noisy table."]
    assert clip["labels"] == ["people eating crisps, crunchy"]
    assert clip["audio_uri"] == "s3://corpus/audio/--PJHxphWEs_000050.wav"
    assert rows["vggsound:--0PQM4-hqg_000030"]["labels"] == ["waterfall burbling", "stream burbling"]
    marching = rows["vggsound:---g-f_I2yQ_000001"]
    assert marching["split"] == "test" and marching["captions"] == ["The sound of people marching."]


def test_wavcaps_subsets_and_their_json_variants():
    tables = {name: sources.wavcaps_manifest(str(FIX / "wavcaps" / f"{name}.json"), ROOT)
              for name in ("fsd_final", "bbc_final", "sb_final", "as_final")}
    fsd = _by_id(tables["fsd_final"])["wavcaps:FreeSound/180913"]
    assert fsd["origin"] == "fs:180913" and fsd["captions"] == ["A phone rings with a traditional ringtone."]
    assert fsd["audio_uri"] == "s3://corpus/audio/FreeSound/180913.flac" and fsd["duration_s"] == 3.2
    bbc = _by_id(tables["bbc_final"])["wavcaps:BBC_Sound_Effects/07070291"]
    assert bbc["origin"] == "bbc:07070291" and bbc["source"] == "wavcaps"
    sb = _by_id(tables["sb_final"])  # a bare list, one id given as an int
    assert set(sb) == {"wavcaps:SoundBible/1234", "wavcaps:SoundBible/1235"}
    assert sb["wavcaps:SoundBible/1235"]["origin"] == "soundbible:1235"
    as_sl = _by_id(tables["as_final"])["wavcaps:AudioSet_SL/Y7fmOlUlwoNg"]
    assert as_sl["origin"] == "yt:7fmOlUlwoNg" and as_sl["audio_uri"].endswith("AudioSet_SL/Y7fmOlUlwoNg.flac")
    with pytest.raises(SourceFormatError, match="cannot tell the WavCaps subset"):
        sources.wavcaps_manifest(str(FIX / "audiocaps" / "train.csv").replace("train.csv", "x.json"), ROOT)


def test_audiocaps_groups_captions_per_clip_and_splits_by_file():
    table = sources.audiocaps_manifest([str(FIX / "audiocaps" / "train.csv"), str(FIX / "audiocaps" / "test.csv")],
                                       ROOT)
    rows = _by_id(table)
    test_clip = rows["audiocaps:7fmOlUlwoNg_000020"]
    assert test_clip["split"] == "test" and len(test_clip["captions"]) == 5
    assert test_clip["captions"][0] == "Vibrations and rattling, with people speaking in the distance"  # id order
    assert test_clip["audio_uri"] == "s3://corpus/audio/test/Y7fmOlUlwoNg.wav"
    assert rows["audiocaps:r1nicOVtvkQ_000130"]["split"] == "train"


def test_clotho_captions_splits_and_freesound_origin_from_latin1_metadata():
    table = sources.clotho_manifest(
        [str(FIX / "clotho" / "clotho_captions_development.csv"), str(FIX / "clotho" / "clotho_captions_evaluation.csv")],
        ROOT, metadata_csvs=str(FIX / "clotho" / "clotho_metadata_evaluation.csv"))
    rows = _by_id(table)
    frogs = rows["clotho:Night Frogs: 2nd take?.wav"]  # the file name kept verbatim (no ':' / '?' mangling)
    assert frogs["split"] == "train" and len(frogs["captions"]) == 5 and frogs["origin"] is None
    assert frogs["audio_uri"] == "s3://corpus/audio/development/Night Frogs: 2nd take?.wav"
    motor = rows["clotho:Santa Motor.wav"]
    assert motor["split"] == "test" and motor["origin"] == "fs:12345"


def test_esc50_and_urbansound8k_labels_origins_and_label_captions():
    esc = _by_id(sources.esc50_manifest(str(FIX / "esc50" / "meta" / "esc50.csv"), ROOT))
    birds = esc["esc50:1-100038-A-14.wav"]
    assert birds["labels"] == ["chirping_birds"] and birds["captions"] == ["The sound of chirping birds."]
    assert birds["origin"] == "fs:100038" and birds["split"] == "eval"
    assert birds["audio_uri"] == "s3://corpus/audio/audio/1-100038-A-14.wav"
    us8k = _by_id(sources.urbansound8k_manifest(str(FIX / "urbansound8k" / "metadata" / "UrbanSound8K.csv"), ROOT))
    siren = us8k["us8k:180913-8-0-0.wav"]
    assert siren["audio_uri"] == "s3://corpus/audio/audio/fold10/180913-8-0-0.wav"
    assert siren["origin"] == "fs:180913" and siren["duration_s"] == pytest.approx(3.2)


def test_folder_with_csv_and_without(tmp_path):
    table = sources.folder_manifest(str(tmp_path), csv_path=str(FIX / "folder" / "captions.csv"), source="home")
    rows = _by_id(table)
    assert rows["home:kitchen/kettle.wav"]["labels"] == ["kettle", "kitchen"]
    assert rows["home:street/horn.flac"]["captions"] == ["The sound of car horn."]
    assert rows["home:street/horn.flac"]["split"] == "eval"
    for rel in ("dogs/a.wav", "b.flac", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("txt"):
            (tmp_path / rel).write_text("not audio")
        else:
            sf.write(tmp_path / rel, [0.0] * 160, 16000)
    scanned = _by_id(sources.folder_manifest(str(tmp_path), source="home"))
    assert set(scanned) == {"home:dogs/a.wav", "home:b.flac"}
    assert scanned["home:dogs/a.wav"]["labels"] == ["dogs"] and scanned["home:b.flac"]["captions"] == []


def test_segment_keys_and_blacklist(tmp_path):
    assert sources.parse_segment_key("--PJHxphWEs_000030") == ("--PJHxphWEs", 30)
    assert sources.parse_segment_key("Y--PJHxphWEs") == ("--PJHxphWEs", None)
    assert sources.segment_key("abcdefghijk", 7) == "abcdefghijk_000007"
    with pytest.raises(ValueError, match="not a YouTube segment key"):
        sources.parse_segment_key("short")
    blacklist = tmp_path / "blacklist_exclude_test_ac.json"
    blacklist.write_text('{"AudioSet": ["Y7fmOlUlwoNg.wav"], "FreeSound": ["100032", "12345"]}')
    assert sources.read_wavcaps_blacklist(str(blacklist)) == {"yt:7fmOlUlwoNg", "fs:100032", "fs:12345"}


def test_concatenated_sources_validate_and_group_by_split():
    tables = [sources.audiocaps_manifest([str(FIX / "audiocaps" / "test.csv"), str(FIX / "audiocaps" / "train.csv")],
                                         ROOT),
              sources.esc50_manifest(str(FIX / "esc50" / "meta" / "esc50.csv"), ROOT)]
    combined = sources.concat_manifests(tables)
    splits = combined.column("split").to_pylist()
    assert splits == sorted(splits) and combined.num_rows == 6
    validate_manifest(combined)


def test_demo_manifest_validates_and_matches_the_schema(tmp_path):
    import pyarrow.parquet as pq

    from m2d2.data import DEMO_MANIFEST_SCHEMA
    from m2d2.data.demo import DemoCorpusConfig, generate_demo_corpus
    from m2d2.data.manifest import REQUIRED_SCHEMA

    assert DEMO_MANIFEST_SCHEMA == REQUIRED_SCHEMA
    cfg = DemoCorpusConfig(train_per_class=1, eval_per_class=20)
    manifest = generate_demo_corpus(tmp_path, cfg, progress=False)
    table = validate_manifest(pq.read_table(manifest))
    assert table.num_rows == 210 and table.column("origin").null_count == table.num_rows
