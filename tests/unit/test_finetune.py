"""Stage 1.1 fine-tuning blocks: the optimiser, mixup, SpecAugment, AudioSet sampling, pos-embed resampling, model, mAP."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from m2d2.eval.metrics import mean_average_precision
from m2d2.models import AudioEncoder, EncoderConfig
from m2d2.models.pos_embed import sincos_2d, truncate_time
from m2d2.models.tagger import (
    ClassifierHead,
    FineTuneModel,
    expand_encoder_frames,
    resample_pos_embed,
    spec_augment,
)
from m2d2.train.finetune import audioset_sample_weights, log_mixup_exp, mixup_batch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_encoder(input_frames: int = 64) -> AudioEncoder:
    torch.manual_seed(0)
    return AudioEncoder(EncoderConfig(input_frames=input_frames, embed_dim=32, depth=1, num_heads=2))


# ----------------------------------------------------------------------------- optimiser
def test_reference_lars_without_weight_decay_is_sgd_momentum():
    """The reference's ``--optim lars`` is timm ``Lars(momentum=0.9, weight_decay=0)``: no trust ratio then."""
    from timm.optim import Lars

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    lars = Lars([a], lr=2.0, momentum=0.9, weight_decay=0.0)
    sgd = torch.optim.SGD([b], lr=2.0, momentum=0.9)
    b.data.copy_(a.data)
    for _ in range(3):
        g = torch.randn(4, 3)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach())
    a.grad = torch.ones(4, 3)
    Lars([a], lr=1.0, momentum=0.0, weight_decay=0.1).step()  # with decay, the trust ratio scales the update
    assert not torch.allclose(a.detach(), b.detach() - 1.0)


# ----------------------------------------------------------------------------- mixup
def test_log_mixup_exp_formula_and_endpoints():
    a, b = torch.randn(2, 5, 7) * 3 - 5, torch.randn(2, 5, 7) * 3 - 5
    lam = 0.3
    direct = torch.log(lam * a.double().exp() + (1 - lam) * b.double().exp())
    torch.testing.assert_close(log_mixup_exp(a, b, lam).double(), direct, atol=1e-5, rtol=1e-5)
    assert torch.equal(log_mixup_exp(a, b, 1.0), a)
    assert torch.equal(log_mixup_exp(a, b, 0.0), b)
    big = torch.full((3,), 200.0)  # exp overflows float32; logaddexp does not
    torch.testing.assert_close(log_mixup_exp(big, big, 0.4), big)


def test_mixup_batch_deterministic_same_lam_and_permutation():
    lms = torch.randn(6, 4, 9) - 5
    targets = torch.eye(6)
    out1 = mixup_batch(lms, targets, 0.5, gen(3))
    out2 = mixup_batch(lms, targets, 0.5, gen(3))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1]) and out1[2] == out2[2]
    mixed_lms, mixed_t, lam = out1
    assert 0.0 < lam < 1.0 and abs(lam - 0.5) > 1e-6
    # targets = lam*I + (1-lam)*P: recover the permutation from the off-lam entries
    perm = torch.where(torch.eye(6, dtype=torch.bool), torch.zeros(6, 6), mixed_t).argmax(dim=1)
    fixed = mixed_t.diagonal() > lam + 1e-6  # perm[i] == i puts all weight on the diagonal
    perm[fixed] = torch.arange(6)[fixed]
    assert sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed_t, lam * targets + (1 - lam) * targets[perm])
    torch.testing.assert_close(mixed_lms, log_mixup_exp(lms, lms[perm], lam))
    assert mixup_batch(lms, targets, 0.5, gen(4))[2] != lam


def test_mixup_alpha_zero_is_identity():
    lms, targets = torch.randn(3, 4, 5), torch.rand(3, 2)
    g = gen(0)
    state = g.get_state()
    m, t, lam = mixup_batch(lms, targets, 0.0, g)
    assert m is lms and t is targets and lam == 1.0
    assert torch.equal(g.get_state(), state)


# ----------------------------------------------------------------------------- SpecAugment
def _bands(masked: torch.Tensor) -> tuple[list[int], list[int]]:
    rows = torch.nonzero((masked == 0).all(dim=1)).flatten().tolist()
    cols = torch.nonzero((masked == 0).all(dim=0)).flatten().tolist()
    return rows, cols


def test_spec_augment_one_band_each_per_sample_reproducible():
    x = torch.ones(16, 20, 50)
    out = spec_augment(x, freq_mask=8, time_mask=12, generator=gen(1))
    assert torch.equal(out, spec_augment(x, freq_mask=8, time_mask=12, generator=gen(1)))
    assert torch.equal(x, torch.ones(16, 20, 50))  # input untouched
    patterns = set()
    for sample in out:
        rows, cols = _bands(sample)
        for band in (rows, cols):
            assert band == list(range(band[0], band[0] + len(band))) if band else not band  # contiguous
        assert len(rows) < 8 and len(cols) < 12  # floor(U * param) < param
        zero = sample == 0
        expected = torch.zeros_like(zero)
        expected[rows, :] = True
        expected[:, cols] = True
        assert torch.equal(zero, expected)  # nothing but the two bands, filled with 0
        assert set(sample.unique().tolist()) <= {0.0, 1.0}
        patterns.add((tuple(rows), tuple(cols)))
    assert len(patterns) > 1  # drawn per sample


def test_spec_augment_shared_mask_and_param_larger_than_axis():
    x = torch.ones(4, 20, 30)
    shared = spec_augment(x, freq_mask=8, time_mask=192, generator=gen(2), iid_masks=False)
    assert all(torch.equal(shared[0], s) for s in shared)
    out = spec_augment(x, freq_mask=0, time_mask=192, generator=gen(5))  # as torchaudio: width may cover all
    for sample in out:
        rows, cols = _bands(sample)
        assert len(cols) <= 30 and (len(rows) == 0 or len(cols) == 30)
    assert torch.equal(spec_augment(x, 0, 0, generator=gen(0)), x)


# ----------------------------------------------------------------------------- class-balanced sampling
def test_audioset_sample_weights_formula(caplog):
    labels = [["a"], ["a"], ["a", "b"], ["c"], []]
    with caplog.at_level(logging.WARNING, logger="m2d2.train.finetune"):
        w = audioset_sample_weights(labels)
    wa, wb, wc = 1000 / 3.01, 1000 / 1.01, 1000 / 1.01
    expected = np.array([wa ** (1 / 1.5), wa ** (1 / 1.5), (wa + wb) ** (1 / 1.5), wc ** (1 / 1.5), 0.0])
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert w[4] == 0.0
    assert "1 of 5 clips have no label" in caplog.text


def test_weighted_order_unique_seeded_and_clamped(caplog):
    from m2d2.data.loader import WeightedOrder

    w = audioset_sample_weights([["a"], ["a"], ["a", "b"], ["c"], []])
    with caplog.at_level(logging.WARNING, logger="m2d2.data.loader"):
        order = WeightedOrder(w, num_samples=10, seed=0)
    assert "only 4 clips" in caplog.text
    assert len(order) == 4 and sorted(order.indices(0)) == [0, 1, 2, 3]
    order = WeightedOrder(w, num_samples=3, seed=0)
    drawn = order.indices(5)
    assert len(drawn) == 3 and len(set(drawn)) == 3 and 4 not in drawn
    assert drawn == WeightedOrder(w, num_samples=3, seed=0).indices(5)
    assert any(order.indices(e) != drawn for e in range(6, 12))  # each epoch draws anew
    with pytest.raises(ValueError, match="every sampling weight is 0"):
        WeightedOrder([0.0, 0.0], 1)


# ----------------------------------------------------------------------------- positional table
def test_resample_pos_embed_shapes_identity_trim_and_not_sincos():
    table = sincos_2d(16, 5, 38)
    table[:, 0] = torch.arange(16.0)  # a recognisable CLS row
    out = resample_pos_embed(table, 5, 38, 62)
    assert out.shape == (1, 1 + 5 * 62, 16)
    assert torch.equal(out[:, 0], table[:, 0])
    torch.testing.assert_close(resample_pos_embed(table, 5, 38, 38), table, atol=1e-6, rtol=0)
    trimmed = resample_pos_embed(table, 5, 38, 20, mode="trim")
    assert torch.equal(trimmed[:, 1:], truncate_time(table[:, 1:], 5, 38, 20))
    assert torch.equal(trimmed[:, 0], table[:, 0])
    assert (out[:, 1:] - sincos_2d(16, 5, 62)[:, 1:]).abs().max() > 0.5  # stretched, not re-evaluated
    # frequency rows keep their (frequency-half) values: only time is resampled
    rows = out[0, 1:].reshape(5, 62, 16)
    torch.testing.assert_close(rows[:, :, 8:], table[0, 1:].reshape(5, 38, 16)[:, :1, 8:].expand(5, 62, 8))
    with pytest.raises(ValueError):
        resample_pos_embed(table, 5, 38, 62, mode="trim")


def test_expand_encoder_frames_accepts_longer_input():
    enc = tiny_encoder(64)
    lms = torch.randn(2, 80, 100)
    with pytest.raises(ValueError):
        enc(lms)
    old = enc.pos_embed.clone()
    expand_encoder_frames(enc, 100)
    assert enc.grid == (5, 6) and enc.config.input_frames == 100
    assert enc.pos_embed.shape == (1, 31, 32) and "pos_embed" in dict(enc.named_buffers())
    assert torch.equal(enc.pos_embed[:, 0], old[:, 0])
    assert enc(lms).shape == (2, 31, 32)


# ----------------------------------------------------------------------------- head and model
def test_classifier_head_init():
    torch.manual_seed(0)
    head = ClassifierHead(256, 512)
    assert abs(head.linear.weight.std().item() - 0.01) < 0.0005
    assert abs(head.linear.weight.mean().item()) < 0.0005
    assert torch.equal(head.linear.bias, torch.zeros(512))
    assert not head.norm.affine and list(head.norm.parameters()) == []
    assert head(torch.randn(4, 256)).shape == (4, 512)


def test_finetune_model_train_eval():
    model = FineTuneModel(tiny_encoder(64), (-5.0, 3.0), num_classes=7, freq_mask=10, time_mask=20)
    seen: list[int] = []
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(o.shape[1] - 1))
    lms = torch.randn(4, 80, 64) * 3 - 5
    targets = (torch.rand(4, 7) > 0.5).float()

    model.train()
    out = model(lms, targets, patch_out=0.5, generator=gen(0))
    assert out["logits"].shape == (4, 7) and torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    out["loss"].backward()
    for p in (model.encoder.patch_embed.proj.weight, model.encoder.blocks[0].attn.qkv.weight, model.head.linear.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert seen[-1] < 20  # structured patch-out at 0.5 on a 5x4 grid keeps 10 or 12 tokens
    again = model(lms, targets, patch_out=0.5, generator=gen(0))  # same draws -> same augmentation
    assert seen[-1] == seen[-2] and torch.isfinite(again["loss"])

    model.eval()
    a = model(lms, targets, generator=gen(1))
    b = model(lms, targets, generator=gen(2))
    assert seen[-1] == 20 and seen[-2] == 20  # no patch-out at eval
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(model.predict(lms), a["logits"])
    with pytest.raises(ValueError, match="exceeds"):
        model.predict(torch.randn(1, 80, 65))
    assert "norm_stats" in model.state_dict()


# ----------------------------------------------------------------------------- metric
def test_mean_average_precision_hand_examples():
    scores = torch.tensor([[0.9, 0.9, 0.5], [0.8, 0.8, 0.4], [0.7, 0.7, 0.3], [0.6, 0.6, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # class 0: positives at ranks 1, 3 -> (1 + 2/3) / 2; class 1: ranks 2, 4 -> (1/2 + 2/4) / 2; class 2 skipped
    assert mean_average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    assert mean_average_precision(scores[:, :1], torch.tensor([[1], [1], [0], [0]])) == 1.0
    assert mean_average_precision(torch.zeros(2, 1), torch.tensor([[0], [1]])) == 0.5  # tie: index 0 first
    with pytest.raises(ValueError):
        mean_average_precision(scores, torch.zeros(4, 3))


def test_mean_average_precision_matches_sklearn_on_distinct_scores():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    scores = rng.random((50, 6))
    targets = (rng.random((50, 6)) < 0.3).astype(float)
    expected = metrics.average_precision_score(targets, scores, average=None).mean()
    assert mean_average_precision(scores, targets) == pytest.approx(expected)


# ----------------------------------------------------------------------------- tagging evaluation
class _Store:
    """What tagging reads of a LogMelStore: raw float32 log-mels [n_mels, T], labels, the split's name."""

    split = "eval"

    def __init__(self, clips: list[np.ndarray], labels: list[list[str]]):
        self.clips, self.labels = clips, labels

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.clips[i]


def test_tagging_scores_the_chunks_inference_encodes():
    """Stage-1.1 tagging cuts a clip as inference does (m2d2.models.chunks): chunks of ``input_frames`` over the
    clip padded with the mean to whole patches, so tails and clips shorter than a patch are scored too."""
    from m2d2.eval.tagging import clip_logits, evaluate_tagging
    from m2d2.models.chunks import chunk_spans

    torch.manual_seed(0)
    model = FineTuneModel(tiny_encoder(64), (-5.0, 3.0), num_classes=3).eval()
    rng = np.random.default_rng(0)
    lengths = (64, 70, 130, 135, 20, 10)
    clips = [rng.normal(-5.0, 3.0, (80, t)).astype(np.float32) for t in lengths]
    assert [len(chunk_spans(t, 64, 16)) for t in lengths] == [1, 2, 3, 3, 1, 1]
    store = _Store(clips, [["a"], ["b"], ["c"], ["a", "b"], ["c"], ["a"]])
    got = clip_logits(model, store, batch_size=2)
    with torch.no_grad():
        for i, lms in enumerate(clips):
            chunks = model.encoder.encode_chunks(model.normalize(torch.from_numpy(lms))[None])  # inference's path
            expected = torch.cat([model.head(tokens.mean(dim=1)) for tokens in chunks]).mean(dim=0)
            torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)
    metrics = evaluate_tagging(model, store, ["a", "b", "c"])
    assert metrics["eval_clips"] == 6.0 and 0.0 <= metrics["mAP"] <= 1.0 and "top1_acc" not in metrics
    assert not model.training
