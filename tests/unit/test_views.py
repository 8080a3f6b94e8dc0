"""Per-stage views: the paper's selection rules on a fixture corpus index, leakage removal, early plain errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2d2 import presets
from m2d2.data.views import ViewError, ViewRule, check_views, resolve_view
from m2d2.pipeline import step_settings

# A paper-style corpus in miniature: (clip id, source, origin, content hash, captions) per split. AudioCaps re-uses
# AudioSet segments (same YouTube origin); WavCaps' AudioSet_SL copies one of them; ESC-50 / US8K / Clotho come
# from Freesound, and a WavCaps FreeSound clip is an ESC-50 recording; one VGGSound clip is byte-identical to an
# ESC-50 evaluation clip under another name.
TRAIN = [
    ("audioset:a1", "audioset", "yt:a1", "h-a1", ["dog"]),
    ("audioset:a2", "audioset", "yt:a2", "h-a2", ["rain"]),  # AudioCaps re-publishes it
    ("audioset:a3", "audioset", "yt:a3", "h-a3", ["siren"]),
    ("audioset:a4", "audioset", "yt:a4", "h-a4", ["speech"]),  # its video holds an AudioCaps *test* segment
    ("vggsound:v1", "vggsound", "yt:v1", "h-v1", ["a dog"]),
    ("vggsound:v2", "vggsound", "yt:v2", "h-esc-eval", ["a cat"]),  # the bytes of an ESC-50 eval clip
    ("wavcaps:AudioSet_SL/a2", "wavcaps", "yt:a2", "h-w1", ["rain falls"]),  # = AudioCaps' a2
    ("wavcaps:FreeSound/f1", "wavcaps", "fs:1", "h-w2", ["a door"]),  # = an ESC-50 recording
    ("wavcaps:FreeSound/f2", "wavcaps", "fs:2", "h-w3", ["birds"]),
    ("audiocaps:a2", "audiocaps", "yt:a2", "h-ac2", ["rain on a roof", "rain", "water"]),
    ("audiocaps:a5", "audiocaps", "yt:a5", "h-ac5", ["a car passes", "traffic", "engine"]),
    ("clotho:c1", "clotho", "fs:3", "h-c1", ["wind", "a breeze", "gusts", "air", "noise"]),
    ("esc50:e1", "esc50", "fs:1", "h-e1", ["door_wood_knock"]),  # ESC-50's training folds are not for training
]
EVAL = [
    ("audiocaps:a4t", "audiocaps", "yt:a4", "h-ac4t", ["a man speaks"]),
    ("esc50:e2", "esc50", "fs:9", "h-esc-eval", ["cat"]),
    ("us8k:u1", "us8k", "fs:8", "h-u1", ["siren"]),
]


def _index(rows) -> pa.Table:
    names = ("clip_id", "source", "origin", "content_hash", "captions")
    return pa.table({name: [r[i] for r in rows] for i, name in enumerate(names)},
                    schema=pa.schema([(n, pa.list_(pa.string()) if n == "captions" else pa.string()) for n in names]))


@pytest.fixture
def store(tmp_path):
    pq.write_table(_index(TRAIN), tmp_path / "train.index.parquet")
    pq.write_table(_index(EVAL), tmp_path / "eval.index.parquet")
    return str(tmp_path)


def _ids(store, view) -> list[str]:
    return [TRAIN[i][0] for i in view.clips]


def test_the_paper_presets_views_on_a_fixture_corpus(store):
    settings = step_settings(presets.pipeline_config("paper")).views
    views = check_views(store, {stage: (ViewRule(tuple(v.sources), tuple(v.exclude_overlap_with), v.min_captions,
                                                 v.min_clips), 1, None) for stage, v in settings.items()})
    # Stage 1: AudioSet + VGGSound + WavCaps, minus AudioCaps's segment a2 (twice: AudioSet and WavCaps' copy), the
    # video of an AudioCaps test clip, the WavCaps copy of an ESC-50 recording and the ESC-50 eval clip's bytes.
    assert _ids(store, views["stage1"]) == ["audioset:a1", "audioset:a3", "vggsound:v1", "wavcaps:FreeSound/f2"]
    assert _ids(store, views["stage1.1"]) == ["audioset:a1", "audioset:a2", "audioset:a3"]
    assert _ids(store, views["stage2"]) == ["audioset:a1", "audioset:a3", "vggsound:v1", "wavcaps:FreeSound/f2",
                                            "audiocaps:a2", "audiocaps:a5", "clotho:c1"]
    assert _ids(store, views["stage2.1"]) == ["wavcaps:FreeSound/f2", "audiocaps:a2", "audiocaps:a5", "clotho:c1"]
    # the AS+ line's stages 2 and 2.1 select as stages 2 and 2.1 do (same recipes, another encoder)
    assert _ids(store, views["stage2-as"]) == _ids(store, views["stage2"])
    assert _ids(store, views["stage2.1-as"]) == _ids(store, views["stage2.1"])
    removed = {(r["clip_id"], r["reason"], r["held_out_clip_id"]) for r in views["stage1"].removed.to_pylist()}
    assert removed == {("audioset:a2", "origin", "audiocaps:a2"), ("audioset:a4", "origin", "audiocaps:a4t"),
                       ("vggsound:v2", "content_hash", "esc50:e2"), ("wavcaps:AudioSet_SL/a2", "origin", "audiocaps:a2"),
                       ("wavcaps:FreeSound/f1", "origin", "esc50:e1")}
    metrics = views["stage1"].metrics()
    assert metrics["clips"] == 4 and metrics["candidates"] == 9 and metrics["removed"] == 5
    assert metrics["removed_origin"] == 4 and metrics["removed_content_hash"] == 1
    assert metrics["clips_audioset"] == 2 and metrics["clips_wavcaps"] == 1


def test_a_source_never_overlaps_itself_but_the_evaluation_split_always_applies(store):
    view = resolve_view(store, "s", ViewRule(sources=("audiocaps",), exclude_overlap_with=("audiocaps",)))
    assert _ids(store, view) == ["audiocaps:a2", "audiocaps:a5"]
    view = resolve_view(store, "s", ViewRule(sources=("audioset",)))  # nothing excluded but the evaluation split
    assert _ids(store, view) == ["audioset:a1", "audioset:a2", "audioset:a3"]
    assert view.removed.to_pylist()[0]["reason"] == "origin" and view.removed.num_rows == 1


def test_a_too_small_view_fails_with_one_plain_message(store):
    with pytest.raises(ViewError) as raised:
        check_views(store, {"stage1": (ViewRule(sources=("audioset",)), 1, None),
                            "stage2.1": (ViewRule(min_captions=3), 1, None),
                            "stage1.1": (ViewRule(sources=("as2m",)), 1, None)})
    message = str(raised.value)
    assert "stage1:" not in message  # only the stages that fail
    assert ("stage2.1: its training view has 3 clips, it needs at least 1" not in message
            and "stage1.1: its training view has 0 clips, it needs at least 1 (rule: sources=['as2m']" in message)
    assert "The corpus's training split has audiocaps: 2, audioset: 4" in message
    assert "Change data.sources (the corpus's sources are ['audiocaps', 'audioset'" in message
    assert "in stages.stage1.1." in message
    with pytest.raises(ViewError, match=r"stage2.1: its training view has 3 clips, it needs at least 8 .*"
                                        r"Change the corpus \(add clips\) or schedule.global_batch"):
        resolve_view(store, "stage2.1", ViewRule(min_captions=3), global_batch=8)
    with pytest.raises(ViewError, match=r"no clip has more than 5 captions"):
        resolve_view(store, "stage2.1", ViewRule(min_captions=6))
    # samples drawn with replacement fill any batch from one clip; min_clips still applies
    assert len(resolve_view(store, "x", ViewRule(sources=("clotho",)), global_batch=64, samples_per_epoch=64).clips) == 1
    with pytest.raises(ViewError, match="needs at least 2"):
        resolve_view(store, "x", ViewRule(sources=("clotho",), min_clips=2), global_batch=64, samples_per_epoch=64)


def test_the_demo_presets_views_select_every_training_clip_with_its_caption_rule():
    demo = step_settings(presets.pipeline_config("demo")).views
    assert {k: (v.sources, v.exclude_overlap_with, v.min_captions) for k, v in demo.items()} == {
        "stage1": ([], [], 0), "stage1.1": ([], [], 0), "stage2": ([], [], 0), "stage2.1": ([], [], 3),
        "stage2-as": ([], [], 0), "stage2.1-as": ([], [], 3)}
    off = presets.pipeline_config("demo", variants=["m2d2-minus", "m2d2"])
    assert list(step_settings(off).views) == ["stage1", "stage2"]  # a stage that does not train has no view to check
