"""Task adapters on tiny fixtures written in each dataset's published metadata format (no audio is decoded: the
tree layouts get empty files)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from m2d2.eval import tasks
from m2d2.eval.tasks import LINEAR, RETRIEVAL, TAGGING, TASKS, ZERO_SHOT, TaskFormatError


def _write(root: Path, rel: str, text: str = "") -> Path:
    path = root.joinpath(*rel.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _ends(uri: str, rel: str) -> bool:
    return uri.replace("\\", "/").endswith("/" + rel)


# ----------------------------------------------------------------------------------------------------- registry
EXPECTED = [
    ("esc50", (LINEAR, ZERO_SHOT), 5.0, "esc50"),
    ("us8k", (LINEAR, ZERO_SHOT), 4.0, "us8k"),
    ("spcv2", (LINEAR,), 1.0, "default"),
    ("vc1", (LINEAR,), 8.2, "default"),
    ("voxforge", (LINEAR,), 5.8, "default"),
    ("cremad", (LINEAR, ZERO_SHOT), 2.5, "cremad"),
    ("gtzan", (LINEAR, ZERO_SHOT), 30.0, "gtzan"),
    ("nsynth", (LINEAR, ZERO_SHOT), 4.0, "nsynth"),
    ("surge", (LINEAR,), 4.0, "default"),
    ("audioset", (ZERO_SHOT, TAGGING), 10.0, "as"),
    ("fsd50k", (ZERO_SHOT,), 7.6358, "fsd50k"),
    ("audiocaps", (RETRIEVAL,), 10.0, "default"),
    ("clotho", (RETRIEVAL,), 30.0, "default"),
]


def test_registry_lists_the_paper_tasks_in_order_with_protocols_durations_and_prompts():
    assert list(TASKS) == [name for name, *_ in EXPECTED]
    for name, protocols, duration, prompt in EXPECTED:
        t = tasks.task(name)
        assert (t.protocols, t.duration_s, t.prompt, t.folder) == (protocols, duration, prompt, name)
        assert t.read is getattr(tasks, f"read_{name}") and t.layout and "\n" not in t.layout
    assert all(f"read_{name}" in tasks.__all__ for name, *_ in EXPECTED) and "read_custom" in tasks.__all__
    with pytest.raises(TypeError):
        TASKS["x"] = TASKS["esc50"]  # read-only


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown task 'nope'.*'audiocaps'.*'vc1'"):
        tasks.task("nope")


# ----------------------------------------------------------------------------------------------------- folded
def test_esc50_official_folds_and_categories(tmp_path):
    _write(tmp_path, "meta/esc50.csv", "filename,fold,target,category,esc10,src_file,take\n"
           "1-100032-A-0.wav,1,0,dog,True,100032,A\n1-100038-A-14.wav,1,14,chirping_birds,False,100038,A\n"
           "2-100648-A-43.wav,2,43,chainsaw,False,100648,A\n5-9032-A-0.wav,5,0,dog,True,9032,A\n")
    data = tasks.read_esc50(str(tmp_path))
    assert data.name == "esc50" and len(data.audio) == 4
    assert data.splits == ("fold1", "fold1", "fold2", "fold5") and data.folds == ("fold1", "fold2", "fold5")
    assert data.labels == (("dog",), ("chirping_birds",), ("chainsaw",), ("dog",))
    assert data.classes == ("chainsaw", "chirping_birds", "dog") and not data.multi_label
    assert _ends(data.audio[2], "audio/2-100648-A-43.wav") and data.audio[2].startswith(str(tmp_path))


def test_esc50_missing_metadata_and_bad_fold_name_the_file(tmp_path):
    with pytest.raises(TaskFormatError, match=r"meta/esc50.csv: metadata file missing"):
        tasks.read_esc50(str(tmp_path))
    _write(tmp_path, "meta/esc50.csv", "filename,fold,target,category,esc10,src_file,take\n")
    with pytest.raises(TaskFormatError, match=r"meta/esc50.csv: no clips"):
        tasks.read_esc50(str(tmp_path))
    _write(tmp_path, "meta/esc50.csv", "filename,fold,target,category,esc10,src_file,take\n"
           "a.wav,1,0,dog,True,1,A\na.wav,6,0,dog,True,1,A\n")
    with pytest.raises(TaskFormatError, match=r"esc50.csv:3: bad fold '6'; expected 1..5"):
        tasks.read_esc50(str(tmp_path))


def test_us8k_fold_folders_and_missing_column(tmp_path):
    header = "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
    _write(tmp_path, "metadata/UrbanSound8K.csv", header + "100032-3-0-0.wav,100032,0.0,0.317,1,5,3,dog_bark\n"
           "100263-2-0-117.wav,100263,58.5,62.5,1,10,2,children_playing\n")
    data = tasks.read_us8k(str(tmp_path))
    assert data.splits == ("fold5", "fold10") and data.folds == ("fold5", "fold10")
    assert data.classes == ("children_playing", "dog_bark")
    assert _ends(data.audio[0], "audio/fold5/100032-3-0-0.wav")
    assert _ends(data.audio[1], "audio/fold10/100263-2-0-117.wav")
    _write(tmp_path, "metadata/UrbanSound8K.csv", header.replace(",class\n", "\n") + "a.wav,1,0,1,1,5,3\n")
    with pytest.raises(TaskFormatError, match=r"UrbanSound8K.csv: header .* lacks column\(s\) \['class'\]"):
        tasks.read_us8k(str(tmp_path))


# ----------------------------------------------------------------------------------------------------- speech
def _spc(root: Path) -> None:
    for rel in ("yes/a_nohash_0.wav", "yes/b_nohash_0.wav", "no/a_nohash_0.wav", "no/c_nohash_1.wav",
                "up/d_nohash_0.wav", "_background_noise_/white_noise.wav", "_background_noise_/pink_noise.wav"):
        _write(root, rel)
    _write(root, "_background_noise_/README.md", "noise")
    _write(root, "LICENSE", "cc-by")
    _write(root, "validation_list.txt", "no/a_nohash_0.wav\n")
    _write(root, "testing_list.txt", "yes/b_nohash_0.wav\nup/d_nohash_0.wav\n\n")


def test_spcv2_lists_give_valid_and_test_and_background_noise_is_counted(tmp_path):
    _spc(tmp_path)
    data = tasks.read_spcv2(str(tmp_path))
    assert [Path(a).relative_to(tmp_path).as_posix() for a in data.audio] == [
        "no/a_nohash_0.wav", "no/c_nohash_1.wav", "up/d_nohash_0.wav", "yes/a_nohash_0.wav", "yes/b_nohash_0.wav"]
    assert data.splits == ("valid", "train", "test", "train", "test")
    assert data.labels == (("no",), ("no",), ("up",), ("yes",), ("yes",)) and data.classes == ("no", "up", "yes")
    assert dict(data.excluded) == {"folder is not a word (_background_noise_)": 2}


def test_spcv2_needs_both_lists_and_every_listed_file(tmp_path):
    _spc(tmp_path)
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(TaskFormatError, match=r"testing_list.txt: metadata file missing"):
        tasks.read_spcv2(str(tmp_path))
    _write(tmp_path, "testing_list.txt", "yes/b_nohash_0.wav\ngo/zz_nohash_0.wav\n")
    with pytest.raises(TaskFormatError, match=r"testing_list.txt:2: 'go/zz_nohash_0.wav' is not"):
        tasks.read_spcv2(str(tmp_path))


def test_vc1_iden_split_codes_and_a_bad_code(tmp_path):
    _write(tmp_path, "iden_split.txt", "3 id10001/1zcIwhmdeo4/00001.wav\n1 id10001/1zcIwhmdeo4/00002.wav\n"
           "2 id10002/0_laIeN-Q44/00001.wav\n")
    data = tasks.read_vc1(str(tmp_path))
    assert data.splits == ("test", "train", "valid") and data.classes == ("id10001", "id10002")
    assert data.labels[2] == ("id10002",) and _ends(data.audio[0], "wav/id10001/1zcIwhmdeo4/00001.wav")
    _write(tmp_path, "iden_split.txt", "1 id10001/a/00001.wav\n4 id10001/a/00002.wav\n")
    with pytest.raises(TaskFormatError, match=r"iden_split.txt:2: unknown split code '4'"):
        tasks.read_vc1(str(tmp_path))


def test_voxforge_evar_split_file_with_extra_columns_and_a_bad_split(tmp_path):
    _write(tmp_path, "voxforge.csv", ",file_name,label,split\n0,de/anon-20100101/wav/a0001.wav,de,train\n"
           "1,en/bob-20091231/wav/b0002.wav,en,valid\n2,fr/x-1/wav/c.wav,fr,test\n")
    data = tasks.read_voxforge(str(tmp_path))
    assert data.splits == ("train", "valid", "test") and data.classes == ("de", "en", "fr")
    assert _ends(data.audio[1], "en/bob-20091231/wav/b0002.wav")
    _write(tmp_path, "voxforge.csv", "file_name,label,split\nde/a.wav,de,val\n")
    with pytest.raises(TaskFormatError, match=r"voxforge.csv:2: unknown split 'val'"):
        tasks.read_voxforge(str(tmp_path))
    _write(tmp_path, "voxforge.csv", "file_name,label,split\nde/a.wav,,train\n")
    with pytest.raises(TaskFormatError, match=r"voxforge.csv:2: empty 'label'"):
        tasks.read_voxforge(str(tmp_path))


def _cremad(root: Path, actors=range(1001, 1011)) -> list[str]:
    names = [f"{a}_{s}_{e}_XX.wav" for a in actors for s, e in (("DFA", "ANG"), ("IEO", "HAP"), ("TAI", "SAD"))]
    for name in names:
        _write(root, f"AudioWAV/{name}")
    return names


def test_cremad_speaker_disjoint_split_without_evar_file(tmp_path):
    _cremad(tmp_path)
    data = tasks.read_cremad(str(tmp_path))
    assert len(data.audio) == 30 and data.classes == ("ANG", "HAP", "SAD") and not data.excluded
    assert data.labels[:3] == (("ANG",), ("HAP",), ("SAD",)) and _ends(data.audio[0], "AudioWAV/1001_DFA_ANG_XX.wav")
    actors: dict[str, set[str]] = {}
    for uri, split in zip(data.audio, data.splits, strict=True):
        actors.setdefault(split, set()).add(Path(uri).name[:4])
    assert {k: len(v) for k, v in actors.items()} == {"train": 7, "valid": 1, "test": 2}  # round(7), round(1), rest
    assert sum(len(v) for v in actors.values()) == len(set().union(*actors.values()))  # speaker-disjoint
    split = tasks.cremad_speaker_split(str(a) for a in range(1001, 1092))  # the 91 CREMA-D actors
    assert Counter(split.values()) == {"train": 64, "valid": 9, "test": 18}
    assert split == tasks.cremad_speaker_split(str(a) for a in reversed(range(1001, 1092)))  # order-independent


def test_cremad_evar_file_decides_and_unlisted_files_are_counted(tmp_path):
    names = _cremad(tmp_path, actors=(1001, 1002))
    rows = "".join(f"{n},{n.split('_')[2]},{n[:4]},{'test' if n.startswith('1001') else 'train'}\n" for n in names[:-1])
    _write(tmp_path, "cremad.csv", "file_name,label,speaker_id,split\n" + rows)
    data = tasks.read_cremad(str(tmp_path))
    assert data.splits == ("test",) * 3 + ("train",) * 2 and dict(data.excluded) == {"not in cremad.csv": 1}
    _write(tmp_path, "AudioWAV/1003_DFA_ANGRY_XX.wav")
    with pytest.raises(TaskFormatError, match=r"1003_DFA_ANGRY_XX.wav: not a CREMA-D name"):
        tasks.read_cremad(str(tmp_path))


def test_cremad_reads_an_object_store_root():
    fs = fsspec.filesystem("memory")
    root = "memory://m2d2-test-tasks/cremad"
    try:
        for a in (1001, 1002):
            fs.pipe(f"/m2d2-test-tasks/cremad/AudioWAV/{a}_DFA_NEU_XX.wav", b"")
        data = tasks.read_cremad(root)
        assert data.audio == (f"{root}/AudioWAV/1001_DFA_NEU_XX.wav", f"{root}/AudioWAV/1002_DFA_NEU_XX.wav")
    finally:
        fs.rm("/m2d2-test-tasks", recursive=True)


# ----------------------------------------------------------------------------------------------------- music
def _gtzan(root: Path, top: str = "genres", ext: str = "au") -> None:
    for genre in ("blues", "jazz"):
        for i in range(3):
            _write(root, f"{top}/{genre}/{genre}.{i:05d}.{ext}")
    _write(root, f"{top}/bextract_single.mf", "not a track")
    _write(root, "train_filtered.txt", "blues/blues.00000.au\njazz/jazz.00001.au\n")
    _write(root, "valid_filtered.txt", "blues/blues.00002.au\n")
    _write(root, "test_filtered.txt", "jazz/jazz.00002.au\n")


@pytest.mark.parametrize(("top", "ext"), [("genres", "au"), ("genres_original", "wav")])
def test_gtzan_fault_filtered_split_by_stem(tmp_path, top, ext):
    _gtzan(tmp_path, top, ext)
    data = tasks.read_gtzan(str(tmp_path))
    assert [Path(a).name for a in data.audio] == [f"blues.00000.{ext}", f"blues.00002.{ext}", f"jazz.00001.{ext}",
                                                  f"jazz.00002.{ext}"]
    assert data.splits == ("train", "valid", "train", "test") and data.classes == ("blues", "jazz")
    assert _ends(data.audio[0], f"{top}/blues/blues.00000.{ext}")
    assert dict(data.excluded) == {"outside the fault-filtered split": 2}


def test_gtzan_listed_track_without_audio_and_missing_list(tmp_path):
    _gtzan(tmp_path)
    _write(tmp_path, "test_filtered.txt", "jazz/jazz.00002.au\nrock/rock.00007.au\n")
    with pytest.raises(TaskFormatError, match=r"test_filtered.txt:2: track rock.00007 has no audio"):
        tasks.read_gtzan(str(tmp_path))
    (tmp_path / "valid_filtered.txt").unlink()
    with pytest.raises(TaskFormatError, match=r"valid_filtered.txt: metadata file missing"):
        tasks.read_gtzan(str(tmp_path))


def _nsynth(root: Path) -> None:
    notes = {"train": ["bass_synthetic_033-022-050", "guitar_acoustic_010-066-100"],
             "valid": ["keyboard_electronic_001-021-127"], "test": ["bass_electronic_018-022-025"]}
    for split, names in notes.items():
        doc = {n: {"note_str": n, "pitch": 22, "instrument_family_str": n.split("_")[0]} for n in names}
        _write(root, f"nsynth-{split}/examples.json", json.dumps(doc))


def test_nsynth_examples_json_per_split_and_a_missing_split(tmp_path):
    _nsynth(tmp_path)
    data = tasks.read_nsynth(str(tmp_path))
    assert data.splits == ("train", "train", "valid", "test") and data.classes == ("bass", "guitar", "keyboard")
    assert data.labels[1] == ("guitar",)
    assert _ends(data.audio[2], "nsynth-valid/audio/keyboard_electronic_001-021-127.wav")
    (tmp_path / "nsynth-test" / "examples.json").unlink()
    with pytest.raises(TaskFormatError, match=r"nsynth-test/examples.json: metadata file missing"):
        tasks.read_nsynth(str(tmp_path))


def test_surge_tone_splits_numeric_pitch_classes_and_unsplit_tones(tmp_path):
    for tone in ("tone-a", "tone-b", "tone-c"):
        for pitch in (9, 60, 100):
            _write(tmp_path, f"{tone}/{pitch}.ogg")
    _write(tmp_path, "surge_tone_splits.csv", "tone,split\ntone-b,test\ntone-a,train\n")
    data = tasks.read_surge(str(tmp_path))
    assert len(data.audio) == 6 and data.splits == ("train",) * 3 + ("test",) * 3
    assert data.classes == ("9", "60", "100") and data.labels[:3] == (("100",), ("60",), ("9",))
    assert _ends(data.audio[0], "tone-a/100.ogg")
    assert dict(data.excluded) == {"tone not in surge_tone_splits.csv": 3}
    (tmp_path / "surge_tone_splits.csv").unlink()
    with pytest.raises(TaskFormatError, match=r"surge_tone_splits.csv: metadata file missing"):
        tasks.read_surge(str(tmp_path))


# ----------------------------------------------------------------------------------------------------- tagging
AS_CLASSES = 'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n2,/m/0jbk,Animal\n'
AS_SEGMENTS = ("# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ytids=2, num_segs=2, num_unique_labels=3\n"
               "# YTID, start_seconds, end_seconds, positive_labels\n"
               '--4gqARaEJE, 0.000, 10.000, "/m/0jbk,/m/05zppz"\n--BfvyPmVMo, 20.000, 30.000, "/m/09x0r"\n')


def test_audioset_eval_segments_multi_label_in_index_order(tmp_path):
    _write(tmp_path, "class_labels_indices.csv", AS_CLASSES)
    _write(tmp_path, "eval_segments.csv", AS_SEGMENTS)
    data = tasks.read_audioset(str(tmp_path))
    assert data.classes == ("Speech", "Male speech, man speaking", "Animal")  # index order, not sorted
    assert data.labels == (("Animal", "Male speech, man speaking"), ("Speech",)) and data.multi_label
    assert data.splits == ("test", "test") and _ends(data.audio[0], "eval_segments/Y--4gqARaEJE.wav")
    _write(tmp_path, "eval_segments.csv", AS_SEGMENTS + '--aaaaaaaaa, 0.000, 10.000, "/m/09x0r,/m/xxxx"\n')
    with pytest.raises(TaskFormatError, match=r"eval_segments.csv:6: label id\(s\) \['/m/xxxx'\]"):
        tasks.read_audioset(str(tmp_path))


def test_fsd50k_eval_labels_in_one_field_and_vocabulary_order(tmp_path):
    _write(tmp_path, "FSD50K.ground_truth/vocabulary.csv", "0,Accelerating_and_revving_and_vroom,/m/07q2z82\n"
           "1,Accordion,/m/0mkg\n2,Acoustic_guitar,/m/042v_gx\n")
    _write(tmp_path, "FSD50K.ground_truth/eval.csv", 'fname,labels,mids\n37199,Accordion,/m/0mkg\n'
           '175151,"Acoustic_guitar,Accelerating_and_revving_and_vroom","/m/042v_gx,/m/07q2z82"\n')
    data = tasks.read_fsd50k(str(tmp_path))
    assert data.classes == ("Accelerating_and_revving_and_vroom", "Accordion", "Acoustic_guitar")
    assert data.labels == (("Accordion",), ("Acoustic_guitar", "Accelerating_and_revving_and_vroom"))
    assert data.multi_label and data.splits == ("test", "test")
    assert _ends(data.audio[1], "FSD50K.eval_audio/175151.wav")


# ----------------------------------------------------------------------------------------------------- retrieval
def test_audiocaps_one_clip_per_segment_captions_in_file_order(tmp_path):
    _write(tmp_path, "test.csv", "audiocap_id,youtube_id,start_time,caption\n"
           "103549,7fmOlUlwoNg,20,Constant rattling noise\n103548,7fmOlUlwoNg,20,A rattling noise\n"
           "103541,-NsC63dA01g,30,\"A woman speaks, then a dog barks\"\n103550,7fmOlUlwoNg,20,Rattling and a hum\n")
    data = tasks.read_audiocaps(str(tmp_path))
    assert len(data.audio) == 2 and data.splits == ("test", "test") and not data.labels
    assert data.captions == (("Constant rattling noise", "A rattling noise", "Rattling and a hum"),
                             ("A woman speaks, then a dog barks",))
    assert _ends(data.audio[0], "test/Y7fmOlUlwoNg.wav") and _ends(data.audio[1], "test/Y-NsC63dA01g.wav")


def test_clotho_evaluation_non_empty_captions(tmp_path):
    _write(tmp_path, "clotho_captions_evaluation.csv", "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
           "Santa Motor.wav,A machine whines.,A motor hums.,c3,c4,c5\n"
           "\"Rain, light.wav\",Rain falls.,,Drops hit a roof.,,\n")
    data = tasks.read_clotho(str(tmp_path))
    assert data.captions == (("A machine whines.", "A motor hums.", "c3", "c4", "c5"),
                             ("Rain falls.", "Drops hit a roof."))
    assert _ends(data.audio[1], "evaluation/Rain, light.wav") and data.splits == ("test", "test")


# ----------------------------------------------------------------------------------------------------- custom
def test_custom_task_with_split_and_with_fold_columns(tmp_path):
    _write(tmp_path, "labels.csv", "file_name,label,split,caption\nclips/a.wav,dog;bark,train,A dog barks.\n"
           "clips/b.wav,cat,valid,\nc.wav,dog,test,A dog.\n")
    t = tasks.custom_task("pets", str(tmp_path))
    data = t.read("/ignored")
    assert (t.name, t.folder, t.protocols, t.duration_s) == ("pets", str(tmp_path), (LINEAR, ZERO_SHOT), 0.0)
    assert data.name == "pets" and data.splits == ("train", "valid", "test") and data.multi_label
    assert data.labels == (("dog", "bark"), ("cat",), ("dog",)) and data.classes == ("bark", "cat", "dog")
    assert data.captions == (("A dog barks.",), (), ("A dog.",)) and _ends(data.audio[0], "clips/a.wav")
    _write(tmp_path, "labels.csv", "file_name,label,fold\na.wav,x,1\nb.wav,y,3\n")
    assert tasks.read_custom(str(tmp_path)).splits == ("fold1", "fold3")
    _write(tmp_path, "labels.csv", "file_name,label,fold\na.wav,x,0\n")
    with pytest.raises(TaskFormatError, match=r"labels.csv:2: bad fold '0'"):
        tasks.read_custom(str(tmp_path))
    with pytest.raises(ValueError, match="must match"):
        tasks.custom_task("Bad Name", str(tmp_path))


def test_custom_task_without_split_is_dealt_into_stratified_folds(tmp_path):
    rows = "".join(f"{c}/{i}.wav,{c}\n" for c in ("a", "b", "c") for i in range(7))
    _write(tmp_path, "labels.csv", "file_name,label\n" + rows)
    data = tasks.read_custom(str(tmp_path))
    assert data.folds == ("fold1", "fold2", "fold3", "fold4", "fold5")
    for cls in ("a", "b", "c"):
        per_class = Counter(s for s, labs in zip(data.splits, data.labels, strict=True) if labs == (cls,))
        assert sorted(per_class.values()) == [1, 1, 1, 2, 2]  # 7 clips dealt over 5 folds
    assert max(Counter(data.splits).values()) - min(Counter(data.splits).values()) <= 1
    _write(tmp_path, "labels.csv", "file_name,label\n" + "".join(f"{c}{i}.wav,{c}\n" for c in "ab" for i in range(3)))
    assert tasks.read_custom(str(tmp_path)).folds == ("fold1", "fold2", "fold3")  # smallest class: 3 clips
    _write(tmp_path, "labels.csv", "file_name,label\na.wav,x\nb.wav,x\nc.wav,y\n")
    assert tasks.read_custom(str(tmp_path)).splits == ("test",) * 3  # a class of one clip: nothing to fold


@pytest.mark.parametrize("name", ["../outside.wav", "a/../../b.wav", "/etc/passwd"])
def test_custom_file_names_cannot_leave_the_folder(tmp_path, name):
    _write(tmp_path, "labels.csv", f"file_name,label\nok.wav,x\n{name},x\n")
    with pytest.raises(TaskFormatError, match=r"labels.csv:3: file name .*(\.\.|absolute)"):
        tasks.read_custom(str(tmp_path))
