"""CLAP evaluation: metric values on hand-made similarity setups, tie rule, chance level, and evaluate_clap."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from m2d2.eval import (
    ClapEvalSet,
    cosine_similarity_matrix,
    embed_audio,
    embed_text,
    evaluate_clap,
    mean_and_std,
    retrieval_metrics,
    retrieval_metrics_from_scores,
    zero_shot_accuracy,
    zero_shot_predictions,
)
from m2d2.models import M2D2
from tests.helpers import tiny_config

KEYS = ["a2t_R@1", "a2t_R@5", "a2t_R@10", "a2t_mAP@10", "t2a_R@1", "t2a_R@5", "t2a_R@10", "t2a_mAP@10"]


def long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def scores_with_ranks(n_items: int, ranks: dict[int, int]) -> torch.Tensor:
    """A score row over ``n_items`` where item ``i`` sits at rank ``ranks[i]``; other items fill the rest."""
    slots: list[int | None] = [None] * n_items
    for item, rank in ranks.items():
        slots[rank - 1] = item
    rest = iter(i for i in range(n_items) if i not in ranks)
    slots = [next(rest) if s is None else s for s in slots]
    row = torch.empty(n_items)
    for position, item in enumerate(slots):
        row[item] = float(n_items - position)
    return row


def brute_force(scores: torch.Tensor, text_to_audio: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """The metric definitions written out literally, rank by rank (ties: lower index first)."""
    s = scores.tolist()

    def rank(row: list[float], i: int) -> int:
        return 1 + sum(v > row[i] for v in row) + sum(row[j] == row[i] for j in range(i))

    a2t = []  # (best rank, AP@10) per audio with captions
    for a, row in enumerate(s):
        relevant = sorted(rank(row, j) for j, owner in enumerate(text_to_audio) if owner == a)
        if relevant:
            ap = sum((i + 1) / r for i, r in enumerate(relevant) if r <= 10) / len(relevant)
            a2t.append((relevant[0], ap))
    t2a = []
    for j, owner in enumerate(text_to_audio):
        r = rank([row[j] for row in s], owner)
        t2a.append((r, 1 / r if r <= 10 else 0.0))
    out = {}
    for name, per_query in (("a2t", a2t), ("t2a", t2a)):
        for k in ks:
            out[f"{name}_R@{k}"] = sum(r <= k for r, _ in per_query) / len(per_query)
        out[f"{name}_mAP@10"] = sum(ap for _, ap in per_query) / len(per_query)
    return out


def assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ----------------------------------------------------------------------------- similarity
def test_cosine_similarity_matrix_normalises_both_sides():
    a = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 1.0], [5.0, 0.0], [0.0, -1.0]])
    expected = torch.tensor([[1 / math.sqrt(2), 1.0, 0.0], [1 / math.sqrt(2), 0.0, -1.0]])
    sim = cosine_similarity_matrix(a, b)
    assert sim.shape == (2, 3)
    torch.testing.assert_close(sim, expected)
    torch.testing.assert_close(cosine_similarity_matrix(7 * a, 0.1 * b), expected)


# ----------------------------------------------------------------------------- retrieval
def test_perfect_alignment_scores_one_everywhere():
    text_to_audio = long([0, 0, 1, 2, 2, 3])  # 2, 1, 2, 1 captions per clip
    audio = torch.eye(4, 8)
    text = 3.0 * audio[text_to_audio]
    got = retrieval_metrics(audio, text, text_to_audio)
    assert list(got) == KEYS
    assert all(v == 1.0 for v in got.values())


def test_two_relevant_captions_at_ranks_1_and_3():
    # captions 0, 1 describe audio 0; captions 2, 3 describe audio 1.
    scores = torch.tensor([[4.0, 2.0, 3.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    got = retrieval_metrics_from_scores(scores, long([0, 0, 1, 1]))
    ap0 = (1 / 1 + 2 / 3) / 2  # audio 0: its captions at ranks 1 and 3
    ap1 = (1 / 3 + 2 / 4) / 2  # audio 1: its captions at ranks 3 and 4
    # Captions (columns): 0 -> its audio 0 wins the 4-4 tie by index (rank 1); 1 -> rank 2; 2 -> rank 2;
    # 3 -> 1-1 tie lost to audio 0 (rank 2).
    expected = {
        "a2t_R@1": 0.5, "a2t_R@5": 1.0, "a2t_R@10": 1.0, "a2t_mAP@10": (ap0 + ap1) / 2,
        "t2a_R@1": 0.25, "t2a_R@5": 1.0, "t2a_R@10": 1.0, "t2a_mAP@10": (1 + 1 / 2 + 1 / 2 + 1 / 2) / 4,
    }  # fmt: skip
    assert_metrics(got, expected)
    assert got == pytest.approx(brute_force(scores, [0, 0, 1, 1]))


def test_t2a_ranks_4_11_and_1():
    # 12 audios, 3 captions describing audios 0, 1, 2, ranked 4th, 11th and 1st by their caption.
    columns = [scores_with_ranks(12, {0: 4}), scores_with_ranks(12, {1: 11}), scores_with_ranks(12, {2: 1})]
    got = retrieval_metrics_from_scores(torch.stack(columns, dim=1), long([0, 1, 2]))
    expected = {"t2a_R@1": 1 / 3, "t2a_R@5": 2 / 3, "t2a_R@10": 2 / 3, "t2a_mAP@10": (1 / 4 + 0 + 1) / 3}
    assert_metrics(got, expected)


def test_a2t_rank_11_contributes_nothing_and_normaliser_counts_all_relevant():
    # 3 audios, 12 captions: audio 0 owns {0, 1} at ranks 6, 7; audio 1 owns {2, 3} at ranks 1, 11;
    # audio 2 owns {4..11} at ranks 1..8.
    text_to_audio = [0, 0, 1, 1] + [2] * 8
    rows = [
        scores_with_ranks(12, {0: 6, 1: 7}),
        scores_with_ranks(12, {2: 1, 3: 11}),
        scores_with_ranks(12, {j: j - 3 for j in range(4, 12)}),
    ]
    scores = torch.stack(rows)
    got = retrieval_metrics_from_scores(scores, long(text_to_audio))
    ap = [(1 / 6 + 2 / 7) / 2, (1 / 1) / 2, 1.0]
    expected = {"a2t_R@1": 2 / 3, "a2t_R@5": 2 / 3, "a2t_R@10": 1.0, "a2t_mAP@10": sum(ap) / 3}
    assert_metrics(got, expected)
    assert got == pytest.approx(brute_force(scores, text_to_audio))


def test_ties_go_to_the_lower_index():
    scores = torch.ones(3, 3)  # every score tied
    got = retrieval_metrics_from_scores(scores, long([2, 0, 1]), ks=(1, 2, 3))
    # Audio queries: audio 0 -> caption 1 at rank 2, audio 1 -> caption 2 at rank 3, audio 2 -> caption 0 at 1.
    # Caption queries: caption 0 -> audio 2 at rank 3, caption 1 -> audio 0 at 1, caption 2 -> audio 1 at 2.
    for name in ("a2t", "t2a"):
        assert_metrics(got, {f"{name}_R@1": 1 / 3, f"{name}_R@2": 2 / 3, f"{name}_R@3": 1.0})
        assert got[f"{name}_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_audio_without_captions_is_a_candidate_but_not_a_query():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # audio 2 has no caption and outscores both
    got = retrieval_metrics_from_scores(scores, long([0, 1]))
    assert_metrics(got, {"a2t_R@1": 1.0, "t2a_R@1": 0.0, "t2a_mAP@10": 0.5})


@pytest.mark.parametrize("n_audio,n_text", [(3, 7), (15, 40), (40, 15)])
def test_matches_literal_definitions_with_many_ties(n_audio, n_text):
    g = torch.Generator().manual_seed(n_audio * 100 + n_text)
    scores = torch.randint(0, 4, (n_audio, n_text), generator=g).float()  # few values: many ties
    text_to_audio = torch.randint(0, n_audio, (n_text,), generator=g)
    ks = (1, 2, 5, 10, 50)
    got = retrieval_metrics_from_scores(scores, text_to_audio, ks)
    assert got == pytest.approx(brute_force(scores, text_to_audio.tolist(), ks), abs=1e-12)


def test_random_embeddings_score_near_chance():
    g = torch.Generator().manual_seed(0)
    n, k, d = 2000, 10, 32
    acc = zero_shot_accuracy(
        torch.randn(n, d, generator=g), torch.randn(k, d, generator=g), torch.randint(0, k, (n,), generator=g)
    )
    assert abs(acc - 1 / k) < 0.04
    n_audio = 400
    got = retrieval_metrics(
        torch.randn(n_audio, d, generator=g), torch.randn(2 * n_audio, d, generator=g), torch.arange(n_audio).repeat(2)
    )
    assert got["t2a_R@10"] == pytest.approx(10 / n_audio, abs=0.02)
    assert got["a2t_R@10"] == pytest.approx(1 - (1 - 10 / (2 * n_audio)) ** 2, abs=0.03)
    assert all(v < 0.1 for v in got.values())


# ----------------------------------------------------------------------------- zero-shot
def test_zero_shot_accuracy_on_a_constructed_case():
    classes = torch.eye(3, 4)
    audio = torch.tensor([[5.0, 1, 0, 0], [0, 2, 1, 9], [0, 0, 3, 0], [1, 1, 0, 0], [0.1, 0, 0, 0]])
    predictions = zero_shot_predictions(audio, 2 * classes)
    assert predictions.tolist() == [0, 1, 2, 0, 0]  # the tie of clip 3 goes to the lower class index
    assert zero_shot_accuracy(audio, classes, long([0, 1, 2, 1, 2])) == pytest.approx(3 / 5)


# ----------------------------------------------------------------------------- errors, aggregation
@pytest.mark.parametrize(
    "call",
    [
        lambda: cosine_similarity_matrix(torch.ones(2, 3), torch.ones(2, 4)),
        lambda: cosine_similarity_matrix(torch.ones(3), torch.ones(2, 3)),
        lambda: cosine_similarity_matrix(torch.ones(0, 3), torch.ones(2, 3)),
        lambda: cosine_similarity_matrix(torch.tensor([[float("nan"), 1.0]]), torch.ones(2, 2)),
        lambda: zero_shot_accuracy(torch.ones(4, 3), torch.ones(2, 3), long([0, 1, 0])),
        lambda: zero_shot_accuracy(torch.ones(2, 3), torch.ones(2, 3), long([0, 2])),
        lambda: zero_shot_accuracy(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0.0, 1.0])),
        lambda: retrieval_metrics(torch.ones(2, 3), torch.ones(3, 3), long([0, 1])),
        lambda: retrieval_metrics(torch.ones(2, 3), torch.ones(2, 3), long([0, 2])),
        lambda: retrieval_metrics(torch.ones(2, 3), torch.ones(2, 3), long([[0, 1]])),
        lambda: retrieval_metrics(torch.ones(2, 3), torch.ones(2, 3), long([0, 1]), ks=(0,)),
        lambda: retrieval_metrics_from_scores(torch.ones(2, 3, 1), long([0, 1, 0])),
    ],
)
def test_bad_shapes_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_mean_and_std():
    runs = [{"zs_acc": 0.1, "t2a_R@1": 0.0}, {"zs_acc": 0.2, "t2a_R@1": 0.5}, {"zs_acc": 0.3, "t2a_R@1": 1.0}]
    got = mean_and_std(runs)
    assert list(got) == ["zs_acc", "zs_acc_std", "t2a_R@1", "t2a_R@1_std"]
    assert got["zs_acc"] == pytest.approx(0.2) and got["zs_acc_std"] == pytest.approx(0.1)  # sample std
    assert got["t2a_R@1"] == pytest.approx(0.5) and got["t2a_R@1_std"] == pytest.approx(0.5)
    assert mean_and_std([{"x": 0.4}]) == {"x": 0.4, "x_std": 0.0}
    with pytest.raises(ValueError):
        mean_and_std([])
    with pytest.raises(ValueError):
        mean_and_std([{"x": 1.0}, {"y": 1.0}])


# ----------------------------------------------------------------------------- evaluate_clap on a real tiny model
def fake_sentence_vectors(texts: list[str]) -> torch.Tensor:
    """Deterministic 48-d vectors per string, standing in for an offline sentence-vector cache."""
    rows = [torch.randn(48, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tiny_model() -> M2D2:
    torch.manual_seed(0)
    return M2D2(tiny_config(text_dim=48), with_m2d=False)


@pytest.fixture(scope="module")
def eval_set() -> ClapEvalSet:
    g = torch.Generator().manual_seed(1)
    lengths = [64, 100, 64, 100, 100, 64, 64]
    return ClapEvalSet(
        lms=[torch.randn(80, t, generator=g) * 3 - 5 for t in lengths],
        labels=["dog_bark", "rain", "siren", "rain", "dog_bark", "siren", "rain"],
        captions=[
            ["a dog barks", "barking"],
            ["rain falls"],
            ["a siren wails", "sirens", "an alarm"],
            [],
            ["dogs"],
            ["police siren"],
            ["heavy rain", "drizzle"],
        ],
        class_names=["dog_bark", "rain", "siren"],
    )


def test_embed_audio_keeps_input_order(tiny_model, eval_set):
    batched = embed_audio(tiny_model, eval_set.lms, batch_size=2)
    with torch.inference_mode():
        single = torch.cat([tiny_model.eval().encode_clap_audio_lms(x[None]) for x in eval_set.lms])
    assert batched.shape == (7, 64)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_embed_text_applies_the_model_text_map_to_embedder_vectors(tiny_model):
    texts = [f"caption {i}" for i in range(70)]  # more than one chunk of 64
    got = embed_text(tiny_model, texts, fake_sentence_vectors)
    with torch.inference_mode():
        expected = tiny_model.text_proj(fake_sentence_vectors(texts))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_clap_on_a_tiny_model(tiny_model, eval_set, training):
    tiny_model.train(training)
    tiny_model.encoder.eval()  # a mixed state (as in stage 2) must survive too
    got = evaluate_clap(tiny_model, eval_set, text_embedder=fake_sentence_vectors)
    assert list(got) == ["zs_acc", *KEYS]
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert tiny_model.training is training and tiny_model.audio_proj.training is training
    assert tiny_model.encoder.training is False

    audio = embed_audio(tiny_model, eval_set.lms)
    texts, text_to_audio = eval_set.caption_pairs()
    assert text_to_audio.tolist() == [0, 0, 1, 2, 2, 2, 4, 5, 6, 6]
    expected = retrieval_metrics(audio, embed_text(tiny_model, texts, fake_sentence_vectors), text_to_audio)
    assert {k: got[k] for k in KEYS} == pytest.approx(expected)
    prompts = eval_set.prompts()
    assert prompts[0] == "dog bark can be heard"
    labels = eval_set.label_indices()
    assert got["zs_acc"] == pytest.approx(
        zero_shot_accuracy(audio, embed_text(tiny_model, prompts, fake_sentence_vectors), labels)
    )


def test_eval_set_validation():
    lms = [torch.zeros(80, 64)]
    with pytest.raises(ValueError):
        ClapEvalSet(lms, ["cat"], [["a cat"]], ["dog"])  # label not a class
    with pytest.raises(ValueError):
        ClapEvalSet(lms, ["dog"], [], ["dog"])  # no caption list per clip
    with pytest.raises(ValueError):
        ClapEvalSet(lms, [], [[]], [])  # nothing to evaluate
    retrieval_only = ClapEvalSet(lms, [], [["a cat"]], [])
    assert retrieval_only.caption_pairs()[1].tolist() == [0]
