"""The downstream benchmark: protocols on hand-made features, the runner on real files with a tiny model (cache,
undecodable clips, tagging), the table with the paper's column, suite checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d2.eval import benchmark
from m2d2.eval.benchmark import (
    BenchmarkResult,
    BenchmarkSettings,
    EvalModel,
    TaskResult,
    check_suite,
    linear_evaluation,
    run_benchmark,
    zero_shot_evaluation,
)
from m2d2.eval.probe import LinearProbeConfig
from m2d2.eval.tasks import LINEAR, RETRIEVAL, TAGGING, ZERO_SHOT, Task, TaskData
from m2d2.models import M2D2
from tests.helpers import tiny_bert, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = LinearProbeConfig(lr=1e-2, max_epochs=30, patience=5)


def _separable(n_per_class: int, classes: int = 3, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (classes, dim))
    labels = [c for c in range(classes) for _ in range(n_per_class)]
    return centres[labels] + rng.normal(0, 0.1, (len(labels), dim)), [f"c{c}" for c in labels]


def test_linear_evaluation_by_folds_and_by_split():
    x, labels = _separable(6)
    classes = ("c0", "c1", "c2")
    folded = TaskData("t", tuple(f"{i}.wav" for i in range(18)), tuple(f"fold{i % 3 + 1}" for i in range(18)),
                      labels=tuple((lab,) for lab in labels), classes=classes)
    out = linear_evaluation(x, folded, list(range(18)), FAST)
    assert out["probe_acc"] == 1.0 and out["probe_acc_std"] == 0.0
    splits = tuple(("train", "train", "train", "valid", "test", "test")[i % 6] for i in range(18))
    fixed = TaskData("t", folded.audio, splits, labels=folded.labels, classes=classes)
    out = linear_evaluation(x, fixed, list(range(18)), FAST, runs=2)
    assert out == {"probe_acc": 1.0, "probe_acc_std": 0.0}
    no_test = TaskData("t", folded.audio, ("train",) * 18, labels=folded.labels, classes=classes)
    with pytest.raises(ValueError, match="needs train and test clips"):
        linear_evaluation(x, no_test, list(range(18)), FAST)


def test_zero_shot_averages_folds_and_scores_multilabel_by_map():
    classes = ("a", "b")
    class_emb = torch.eye(2)
    # fold1: both right; fold2: one of two right -> mean 0.75 (pooled would be 3/4 too, but std shows the folds)
    audio = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [1.0, 0]])
    data = TaskData("t", ("0", "1", "2", "3"), ("fold1", "fold1", "fold2", "fold2"),
                    labels=(("a",), ("b",), ("a",), ("b",)), classes=classes)
    out = zero_shot_evaluation(audio, class_emb, data, [0, 1, 2, 3])
    assert out["zs_acc"] == pytest.approx(0.75) and out["zs_acc_std"] == pytest.approx(np.std([1, 0.5], ddof=1))
    multi = TaskData("t", ("0", "1", "2"), ("test",) * 3, labels=(("a",), ("a", "b"), ("b",)), classes=classes,
                     multi_label=True)
    out = zero_shot_evaluation(torch.tensor([[1.0, 0.0], [0.6, 0.5], [0.0, 1.0]]), class_emb, multi, [0, 1, 2])
    assert out == {"zs_mAP": pytest.approx(1.0)}  # every positive ranks above every negative, per class


def test_cut_crops_inside_the_clip_and_pads_with_zeros():
    wave = torch.arange(10, dtype=torch.float32)
    crop = benchmark._cut(wave, 4, np.random.default_rng(0))
    assert crop.shape == (4,) and torch.equal(crop, wave[int(crop[0]) : int(crop[0]) + 4])
    padded = benchmark._cut(wave, 13, np.random.default_rng(0))
    assert torch.equal(padded[:10], wave) and not padded[10:].any()


# ----------------------------------------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def clap_model() -> M2D2:
    torch.manual_seed(0)
    m = M2D2(tiny_config(), with_m2d=False)
    m.start_stage2(tiny_bert(hidden=64))
    return m.eval()


@pytest.fixture(scope="module")
def tone_task(tmp_path_factory) -> TaskData:
    """12 tones (3 pitches x 4) of 0.4-0.9 s, fixed split, one caption each, plus one undecodable file."""
    root = tmp_path_factory.mktemp("tones")
    audio, labels, splits, captions = [], [], [], []
    for name, hz in [("low", 220.0), ("mid", 660.0), ("high", 1980.0)]:
        for j in range(4):
            t = np.arange(int(16000 * (0.4 + 0.15 * j))) / 16000
            path = root / f"{name}{j}.wav"
            sf.write(path, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16000)
            audio.append(str(path))
            labels.append((name,))
            splits.append(("train", "train", "valid", "test")[j])
            captions.append((f"a {name} tone number {j}",))
    (root / "broken.wav").write_bytes(b"RIFF0000WAVEnot really")
    audio.append(str(root / "broken.wav"))
    labels.append(("low",))
    splits.append("test")
    captions.append(("a broken file",))
    return TaskData("tones", tuple(audio), tuple(splits), labels=tuple(labels), captions=tuple(captions),
                    classes=("high", "low", "mid"))


def test_runner_scores_every_protocol_caches_features_and_lists_undecodable_clips(clap_model, tone_task, tmp_path,
                                                                                  monkeypatch):
    task = Task("tones", "Tones", (LINEAR, ZERO_SHOT, RETRIEVAL), 0.5, lambda root: tone_task)
    settings = BenchmarkSettings(probe=FAST)
    first = run_benchmark([EvalModel("tiny", clap_model)], [(task, tone_task)], settings, cache_dir=tmp_path,
                          progress=False)
    (result,) = first.results
    assert result.skipped == {"corrupt": 1} and result.clips == 12
    assert {"probe_acc", "zs_acc", "a2t_R1", "t2a_R10", "t2a_mAP10"} <= set(result.metrics)
    assert all(0.0 <= result.metrics[k] <= 1.0 for k in ("probe_acc", "zs_acc", "a2t_R1"))
    assert len(list(tmp_path.rglob("*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(benchmark, "load_audio", no_decoding)
    second = run_benchmark([EvalModel("tiny", clap_model)], [(task, tone_task)], settings, cache_dir=tmp_path,
                           progress=False)
    assert second.results[0].metrics == result.metrics and second.results[0].skipped == {"corrupt": 1}


def test_a_task_no_model_can_be_scored_on_is_left_out(clap_model, tone_task, caplog):
    """A retrieval-only task and a model without its CLAP side: nothing to compute, the task is left out."""
    task = Task("tones", "Tones", (RETRIEVAL,), 0.5, lambda root: tone_task)
    with caplog.at_level("WARNING"):
        out = run_benchmark([EvalModel("encoder-only", clap_model, clap=False)], [(task, tone_task)],
                            progress=False)
    assert out.results == [] and out.task_seconds == {} and "left out" in caplog.text


def test_tagging_export_round_trip_and_tagging_protocol(tmp_path, tone_task):
    from m2d2.eval.tagging import chunked_logits, load_tagger
    from m2d2.models.tagger import FineTuneModel
    from m2d2.train.objectives import save_classifier

    torch.manual_seed(1)
    base = M2D2(tiny_config(), with_m2d=False)
    classes = ["high", "low", "mid"]
    tagger = FineTuneModel(base.encoder, base.norm_stats, len(classes)).eval()
    base.save_pretrained(str(tmp_path / "stage" / "export"))
    save_classifier(tagger, classes, str(tmp_path / "stage" / "classifier"))
    loaded_base, loaded, loaded_classes = load_tagger(str(tmp_path / "stage" / "export"))
    lms = [torch.randn(80, 150), torch.randn(80, 40)]
    assert loaded_classes == classes
    assert torch.equal(chunked_logits(loaded, lms), chunked_logits(tagger, lms))
    with pytest.raises(FileNotFoundError, match="not a tagging export"):
        load_tagger(str(tmp_path / "elsewhere" / "export"))

    multi = TaskData("tones", tone_task.audio[:12], ("test",) * 12, labels=tone_task.labels[:12],
                     classes=tuple(classes), multi_label=True)
    task = Task("tones", "Tones", (ZERO_SHOT, TAGGING), 0.5, lambda root: multi)
    out = run_benchmark([EvalModel("stage1.1", loaded_base, clap=False, linear=False, tagger=(loaded, classes))],
                        [(task, multi)], progress=False)
    assert set(out.results[0].metrics) == {"tag_mAP", "clips"} and 0.0 < out.results[0].metrics["tag_mAP"] <= 1.0


# ----------------------------------------------------------------------------------------------------- table
def test_table_puts_the_papers_number_beside_the_measured_one(tmp_path):
    result = BenchmarkResult(
        [TaskResult("esc50", "m2d2", {"probe_acc": 0.5, "probe_acc_std": 0.01, "clips": 40.0}, 40, 1.0),
         TaskResult("esc50", "m2d2-as-plus", {"probe_acc": 0.6, "clips": 40.0}, 40, 1.0),
         TaskResult("mine", "m2d2", {"zs_acc": 0.25, "clips": 8.0}, 8, 0.5)],
        titles={"esc50": "ESC-50"}, task_seconds={"esc50": 2.5, "mine": 0.5})
    rows = {(r["task"], r["metric"]): r for r in result.rows()}
    assert rows[("esc50", "probe_acc")]["m2d2 paper"] == pytest.approx(0.952)
    assert rows[("esc50", "probe_acc")]["m2d2-as-plus paper"] == pytest.approx(0.979)
    assert "m2d2 paper" not in rows[("mine", "zs_acc")]
    text = result.markdown()
    assert "| ESC-50 | probe_acc | 50.00 ± 1.00 (paper 95.20) | 60.00 (paper 97.90) | 2.5 s |" in text
    result.write(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"suite_table.csv", "suite_table.md", "suite_table.html",
                                                    "suite_results.json"}
    assert result.metrics()["m2d2/esc50/probe_acc"] == 0.5 and result.metrics()["esc50/seconds"] == 2.5


def test_suite_checks():
    check_suite(["corpus", "mine=/data/mine"], "")
    with pytest.raises(ValueError, match="twice"):
        check_suite(["corpus", "corpus"], "")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        check_suite(["nope"], "/data")


def test_m2d2_evaluate_on_a_custom_folder(clap_model, tmp_path, capsys):
    from m2d2.cli import main
    from tests.helpers import write_tone_folder

    folder = write_tone_folder(tmp_path / "tones")
    clap_model.save_pretrained(str(tmp_path / "run" / "model"))
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(tmp_path / "run" / "model"), "--tasks", f"tones={folder}",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Task | Metric | run | Time |" in printed and "| tones | probe_acc |" in printed
    results = json.loads((out / "suite_results.json").read_text())["results"]
    (row,) = results
    assert row["model"] == "run" and row["clips"] == 12
    assert {"probe_acc", "probe_acc_std", "zs_acc", "t2a_R1"} <= set(row["metrics"])
    assert json.loads((out / "suite.json").read_text())["tasks"].keys() == {"tones"}
    # errors a user makes get one line, not a traceback
    assert main(["evaluate", "--model", "x", "--tasks", "esc50"]) == 2
    assert "needs a data root" in capsys.readouterr().err
    assert main(["evaluate", "--model", "x", "--tasks", "nope", "--data-root", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "x", "--tasks", "esc50", "--data-root", str(tmp_path)]) == 2
    assert "esc50" in capsys.readouterr().err


def test_the_paper_preset_lists_the_papers_tasks():
    from m2d2.eval.tasks import TASKS
    from m2d2.presets import pipeline_config

    cfg = pipeline_config("paper")
    assert cfg.suite == ["corpus", *TASKS] and cfg.tasks_root and cfg.linear_runs == 3
    assert pipeline_config("demo").suite == ["corpus"]
    with pytest.raises(ValueError, match="needs tasks_root"):
        pipeline_config("demo", suite=["corpus", "esc50"])
    # the champion can be decided on the suite: its mean, or one task's figure; a stage's metric is refused
    assert pipeline_config("demo", primary_metric="suite_mean").primary_metric == "suite_mean"
    assert pipeline_config("demo", primary_metric="esc50/probe_acc").primary_metric == "esc50/probe_acc"
    with pytest.raises(ValueError, match="not of a stage"):
        pipeline_config("demo", primary_metric="stage2/zs_acc")
