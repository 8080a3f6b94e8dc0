"""Evaluation suite: hand-computed metrics, Table VI prompts, the EVAR-protocol linear probe, reports, the driver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2d2.eval import ClapEvalSet
from m2d2.eval.metrics import (
    RETRIEVAL_KS,
    confusion_matrix,
    mean_average_precision,
    retrieval_metrics_from_scores,
    zero_shot_map,
)
from m2d2.eval.probe import (
    LinearProbeConfig,
    fit_linear_probe,
    linear_probe,
    linear_probe_folds,
    stratified_folds,
    validation_split,
)
from m2d2.eval.prompts import PromptRule, class_prompts, prompt_rule
from m2d2.eval.reports import attention_weights, build_report, projector_attention, report_html
from m2d2.eval.suite import evaluate_suite
from m2d2.models import M2D2
from tests.helpers import tiny_bert, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------- metrics
def test_retrieval_with_several_captions_per_audio_by_hand():
    """3 clips, 5 captions (clip 0: c0, c1; clip 1: c2; clip 2: c3, c4); ranks worked out in the comments."""
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.3, 0.2],  # clip 0 ranks c0 c2 c3 c4 c1: relevant at 1, 5 -> AP (1 + 2/5)/2 = 0.7
        [0.5, 0.4, 0.3, 0.6, 0.7],  # clip 1 ranks c4 c3 c0 c1 c2: relevant at 5 -> AP 1/5
        [0.2, 0.6, 0.1, 0.5, 0.4],  # clip 2 ranks c1 c3 c4 c0 c2: relevant at 2, 3 -> AP (1/2 + 2/3)/2
    ])
    got = retrieval_metrics_from_scores(scores, torch.tensor([0, 0, 1, 2, 2]), RETRIEVAL_KS)
    # captions rank their clip: c0 1st, c1 3rd, c2 2nd, c3 2nd, c4 2nd
    expected = {
        "a2t_R@1": 1 / 3, "a2t_R@5": 1.0, "a2t_R@10": 1.0, "a2t_R@50": 1.0, "a2t_mAP@10": (0.7 + 0.2 + 7 / 12) / 3,
        "t2a_R@1": 1 / 5, "t2a_R@5": 1.0, "t2a_R@10": 1.0, "t2a_R@50": 1.0,
        "t2a_mAP@10": (1 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 5,
    }
    assert got == pytest.approx(expected)
    assert list(got) == list(expected)


def test_recall_at_50_and_the_map_cutoff():
    """60 clips, 3 captions whose clips rank 1st, 30th and 55th: R@10 1/3, R@50 2/3, mAP@10 counts rank 1 only."""
    n_audio, ranks = 60, (1, 30, 55)
    scores = torch.empty(n_audio, len(ranks))
    for j, rank in enumerate(ranks):
        others = [a for a in range(n_audio) if a != j]
        order = others[: rank - 1] + [j] + others[rank - 1 :]
        for position, audio in enumerate(order):
            scores[audio, j] = 1.0 - position / 100
    got = retrieval_metrics_from_scores(scores, torch.arange(3), RETRIEVAL_KS)
    assert (got["t2a_R@1"], got["t2a_R@10"], got["t2a_R@50"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))
    assert got["t2a_mAP@10"] == pytest.approx(1 / 3)


def test_confusion_matrix_by_hand():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix([0, 3], [0, 0], 3)


def test_multilabel_zero_shot_map_by_hand():
    """Cosine scores: class 0 = [1, .6, .8, 0], class 1 = [0, .8, .6, 1]; positives {0, 1} and {3}."""
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    classes = torch.eye(2)
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    # class 0 ranks a0 a2 a1 a3: positives at 1 and 3 -> AP (1 + 2/3)/2; class 1: a3 first -> AP 1
    assert zero_shot_map(audio, classes, targets) == pytest.approx((5 / 6 + 1) / 2)
    assert mean_average_precision(np.array([[0.1], [0.9], [0.5]]), np.array([[1], [0], [1]])) == pytest.approx(
        (1 / 2 + 2 / 3) / 2)


# ----------------------------------------------------------------------------------------------------- prompts
def test_table_vi_prompt_rules():
    assert class_prompts("ESC-50", ["dog", "crackling_fire"]) == ["dog can be heard", "crackling fire can be heard"]
    assert class_prompts("us8k", ["street_music"]) == ["street music can be heard"]
    assert class_prompts("AS", ["Speech, human voice"]) == ["Speech, human voice can be heard"]
    assert class_prompts("gtzan", ["blues"]) == ["blues music can be heard"]
    assert class_prompts("nsynth", ["brass"]) == ["the musical instrument sound of brass can be heard"]
    assert class_prompts("cremad", ["ANG", "dis", "Fear", "HAP", "NEU", "SAD"]) == [
        "angry person talking can be heard", "someone talking in disgust can be heard",
        "someone talking with a sense of fear can be heard", "someone talking happily and joyfully can be heard",
        "someone talking calmly can be heard", "someone talking sadly can be heard"]
    assert class_prompts(None, ["rain"]) == ["rain can be heard"]
    assert class_prompts(PromptRule("the sound of {}"), ["rain"]) == ["the sound of rain"]
    with pytest.raises(ValueError, match="no phrase"):
        class_prompts("cremad", ["bored"])
    with pytest.raises(ValueError, match="no prompt rule"):
        prompt_rule("librispeech")
    with pytest.raises(ValueError, match="exactly one"):
        PromptRule("no placeholder")


# ----------------------------------------------------------------------------------------------------- linear probe
def _blobs(n_per_class: int, classes: int, dim: int, seed: int, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = spread * rng.normal(size=(classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(size=(y.size, dim)) + 5.0, y  # offset: standardisation has work to do


def test_probe_separates_separable_data():
    x, y = _blobs(40, 4, 768, seed=0)
    test = np.arange(y.size) % 4 == 0
    result = linear_probe(x[~test], y[~test], x[test], y[test])
    assert result.metric == "acc" and result.score >= 0.97


def test_probe_on_random_labels_scores_chance_over_folds():
    x, _ = _blobs(50, 4, 768, seed=1)
    y = np.random.default_rng(2).integers(0, 4, x.shape[0])
    result = linear_probe_folds(x, y, stratified_folds(y, 5, seed=0))
    assert len(result.fold_scores) == 5
    assert abs(result.score - 0.25) < 0.1


def test_leave_one_fold_out_never_trains_on_the_test_fold(monkeypatch):
    import m2d2.eval.probe as lp

    x, y = _blobs(6, 3, 8, seed=3)
    x[:, 0] = np.arange(y.size)  # a clip id in column 0
    folds = np.array(["a", "b", "c"] * 6)
    seen: list[set[int]] = []
    real = lp.fit_linear_probe

    def spy(x_train, y_train, *args, **kwargs):
        seen.append(set(np.asarray(x_train)[:, 0].astype(int).tolist()))
        return real(x_train, y_train, *args, **kwargs)

    monkeypatch.setattr(lp, "fit_linear_probe", spy)
    result = linear_probe_folds(x, y, folds, LinearProbeConfig(max_epochs=3))
    assert result.folds == ["a", "b", "c"]
    for fold, train_ids in zip(result.folds, seen, strict=True):
        assert train_ids == set(np.flatnonzero(folds != fold).tolist())
    assert result.as_metrics()["probe_acc"] == pytest.approx(np.mean(result.fold_scores))


def test_probe_protocol_details():
    x, y = _blobs(20, 3, 16, seed=4)
    x[:, 3] = 7.0  # constant dimension: scale 1, not a division by zero
    cfg = LinearProbeConfig(seed=5)
    probe = fit_linear_probe(x[:45], y[:45], x[45:], y[45:], cfg)
    np.testing.assert_allclose(probe.mean, x[:45].mean(0))  # train statistics only
    np.testing.assert_allclose(probe.scale, np.where(x[:45].std(0) > 0, x[:45].std(0), 1.0))
    assert probe.scale[3] == 1.0
    # early stopping: a stop before max_epochs comes exactly `patience` epochs after the best one
    assert probe.epochs == cfg.max_epochs or probe.epochs == probe.best_epoch + cfg.patience
    again = fit_linear_probe(x[:45], y[:45], x[45:], y[45:], cfg)
    assert torch.equal(again.linear.weight, probe.linear.weight)  # seeded: reproducible
    # the carved validation split keeps every class and leaves each one training clips
    train, valid = validation_split(y, 0.1, seed=0)
    assert set(y[valid]) == set(y) and set(y[train]) == set(y) and not set(train) & set(valid)


def test_multilabel_probe_reports_map():
    x, y = _blobs(40, 3, 768, seed=6)  # the protocol lr (3e-5) is set for wide (3840-d) features
    multi = np.eye(3)[y]
    result = linear_probe(x[::2], multi[::2], x[1::2], multi[1::2])
    assert result.metric == "mAP" and result.score > 0.95


# ----------------------------------------------------------------------------------------------------- reports
@pytest.fixture(scope="module")
def model() -> M2D2:
    torch.manual_seed(0)
    m = M2D2(tiny_config(input_frames=72), with_m2d=False)
    m.start_stage2(tiny_bert(hidden=64))
    with torch.no_grad():  # a non-trivial semantic token, so attention is not near-uniform
        m.audio_proj.sem_token.normal_(0, 1.0)
    return m.eval()


def test_recomputed_attention_reproduces_the_block(model):
    block = model.audio_proj.sem_blocks[0]
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        weights = attention_weights(block, x)
        attn = block.attn
        v = attn.qkv(block.norm1(x)).reshape(2, 9, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(2, 9, 64)))
        torch.testing.assert_close(out, block.attn(block.norm1(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, attn.num_heads, 9))


def test_projector_attention_maps_tokens_to_the_patch_grid(model):
    lms = torch.randn(80, 150) - 5.0  # 150 frames -> chunks of 72, 72, 6 (+10 pad) -> 4 + 4 + 1 columns
    amap = projector_attention(model, lms, "x")
    assert amap.weights.shape == (5, 9)
    assert amap.starts.tolist() == [0, 16, 32, 48, 72, 88, 104, 120, 144]
    assert amap.weights.sum() + amap.self_weight == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # frequency-major token order: chunk token f * t + c is grid cell (f, chunk offset + c)
        chunks = model.encoder.encode_chunks(model.normalize(lms[None]))
        x = torch.cat([model.audio_proj.sem_token, torch.cat(chunks, 1)], 1)
        row = attention_weights(model.audio_proj.sem_blocks[0], x)[0, :, 0].mean(0)
    assert amap.weights[2, 5] == pytest.approx(float(row[1 + 20 + 2 * 4 + 1]), abs=1e-7)  # chunk 1, band 2, col 1
    assert amap.weights[4, 8] == pytest.approx(float(row[1 + 40 + 4]), abs=1e-7)  # chunk 2 (1 column), band 4
    image = amap.frame_image()
    assert np.isnan(image[:, 64:72]).all() and image[0, 0] == amap.weights[0, 0]  # the 8 unused frames stay empty


def test_build_report_writes_a_self_contained_page(model, tmp_path):
    rng = np.random.default_rng(0)
    maps = [projector_attention(model, torch.randn(80, 100) - 5.0, "clip a")]
    out = build_report(tmp_path / "rep", "Unit <report>", {"Zero-shot": {"zs_acc": 0.5, "t2a_R@1": 0.25}},
                       confusion=np.array([[3, 1], [0, 4]]), class_names=["rain", "dog"],
                       clip_features=rng.normal(size=(12, 20)), clip_labels=[0, 1] * 6, attention=maps)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["attention.png", "confusion.png", "report.html", "tsne.png"]
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.endswith(".png"))
    page = report_html(out)
    assert "Unit &lt;report&gt;" in page and "t2a_R@1" in page and "0.2500" in page
    assert page.count("data:image/png;base64,") == 3  # self-contained for Flyte Decks and the MLflow viewer
    assert "0.750 (4 clips)" in page  # per-class recall of "rain"
    # log_report (MLflow) is tested in test_registry.py, next to the other tracking-store tests


# ----------------------------------------------------------------------------------------------------- driver
def test_evaluate_suite_end_to_end(model, tmp_path):
    g = torch.Generator().manual_seed(1)
    classes = ["rain", "dog_bark", "siren"]
    lms, labels, captions = [], [], []
    for i in range(18):
        label = classes[i % 3]
        lms.append(torch.randn(80, 40 + 7 * i, generator=g) + 2.0 * (i % 3) - 6.0)
        labels.append(label)
        captions.append([f"{label} number {i}", f"another {label}"] if i % 2 else [f"{label} once"])
    data = ClapEvalSet(lms=lms, labels=labels, captions=captions, class_names=classes)
    model.train()
    result = evaluate_suite(model, data, tmp_path / "suite", task="esc50", attention_clips=3,
                            probe_config=LinearProbeConfig(max_epochs=30))
    assert model.training  # flags restored
    m = result.metrics
    assert 0.0 <= m["zs_acc"] <= 1.0 and m["zs_chance"] == pytest.approx(1 / 3)
    assert {"a2t_R@50", "t2a_R@50", "a2t_mAP@10", "t2a_mAP@10", "probe_acc", "probe_acc_std"} <= set(m)
    assert sum(k.startswith("probe_acc_fold") for k in m) == 5
    page = report_html(result.report_dir)
    assert "dog bark can be heard" in page and "Linear probe" in page and "Retrieval (27 captions, 18 clips)" in page
    # deterministic: a second run gives the same numbers
    again = evaluate_suite(model.eval(), data, tmp_path / "again", task="esc50", attention_clips=0,
                           probe_config=LinearProbeConfig(max_epochs=30))
    assert again.metrics == m
