"""CLAP evaluation metrics on embedding tensors: zero-shot accuracy and audio-text retrieval.

Pure functions of tensors (no model knowledge), so they can be checked on hand-made similarity setups.

Conventions (WavCaps ``tools/utils.py``, as used by the EVAR ``retr_a2t_t2a.py`` of the reference):

- Scores are cosine similarities with no logit scale (the reference's inference scoring). A softmax or a
  temperature would not change any ranking.
- Ranks start at 1. **Ties** are broken by index: the rank of item ``i`` for a query is
  ``1 + #{j : s_j > s_i} + #{j < i : s_j == s_i}`` (a stable descending sort). This makes every metric a
  deterministic function of the scores; zero-shot ``argmax`` follows the same rule (lowest class index wins).
- **Text-to-audio** (``t2a_*``, caption queries): each caption has exactly one relevant audio.
  ``R@k`` = fraction of captions whose audio ranks <= k; ``mAP@10`` = mean over captions of
  ``1/rank`` if rank <= 10 else 0.
- **Audio-to-text** (``a2t_*``, audio queries): the relevant captions of an audio are all captions whose
  ``text_to_audio`` points to it. ``R@k`` = fraction of audios with at least one relevant caption ranked <= k;
  ``AP@10 = sum(precision@r for each relevant caption at rank r <= 10) / n_relevant`` and ``mAP@10`` is its
  mean over audios. Dividing by the number of relevant captions (not by those retrieved, nor by
  ``min(10, n)``) is what WavCaps does: it divides by 5, the fixed number of captions per clip of AudioCaps
  and Clotho, so our numbers equal theirs on those sets and stay defined when the count varies. Audios
  without any caption are not a2t queries (their AP is undefined); they remain t2a candidates.
- Every metric is a fraction in [0, 1] (WavCaps prints percentages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAP_K = 10
DEFAULT_KS = (1, 5, 10)
#: What the reference's ``retr_a2t_t2a.py`` reports (with mAP@10); the paper's Table VIII prints R@1/5/10.
RETRIEVAL_KS = (1, 5, 10, 50)


# ----------------------------------------------------------------------------- validation
def _check_embeddings(name: str, x: torch.Tensor, dims: str = "[N, D]") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor {dims}, got {shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")


def _check_index(name: str, idx: torch.Tensor, length: int, upper: int) -> None:
    """``idx`` must be a 1-D integer tensor of ``length`` values in ``[0, upper)``."""
    if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.shape[0] != length:
        shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {length} indices, got {shape}")
    if idx.dtype == torch.bool or torch.is_floating_point(idx) or torch.is_complex(idx):
        raise ValueError(f"{name} must hold integer indices, got {idx.dtype}")
    if length and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}), got [{int(idx.min())}, {int(idx.max())}]")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


# ----------------------------------------------------------------------------- similarity
def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` cosine similarities of the rows of ``a [N, D]`` and ``b [M, D]``, at least float32.

    Both sides are L2-normalised and no logit scale is applied: the reference scores this way at
    inference, and rankings do not depend on the scale anyway.
    """
    _check_embeddings("a", a)
    _check_embeddings("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = F.normalize(a.to(dtype), dim=-1)
    b = F.normalize(b.to(device=a.device, dtype=dtype), dim=-1)
    return a @ b.T


def _ranked(scores: torch.Tensor, top: int) -> torch.Tensor:
    """Column indices of each row by descending score, ties by lower index (a stable sort); first ``top``."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]


# ----------------------------------------------------------------------------- zero-shot
def zero_shot_predictions(audio_emb: torch.Tensor, class_text_emb: torch.Tensor) -> torch.Tensor:
    """Predicted class index ``[N]`` per clip: the class prompt of highest cosine similarity.

    ``torch.argmax`` returns the first maximum, so a tie goes to the lower class index.
    """
    return cosine_similarity_matrix(audio_emb, class_text_emb).argmax(dim=1)


def zero_shot_accuracy(audio_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Single-label zero-shot accuracy in [0, 1] (the softmax of the reference does not change the argmax)."""
    _check_embeddings("audio_emb", audio_emb)
    _check_embeddings("class_text_emb", class_text_emb)
    _check_index("labels", labels, audio_emb.shape[0], class_text_emb.shape[0])
    predictions = zero_shot_predictions(audio_emb, class_text_emb)
    return float((predictions == labels.to(predictions.device)).double().mean())


def zero_shot_map(audio_emb: torch.Tensor, class_text_emb: torch.Tensor, targets: torch.Tensor | np.ndarray) -> float:
    """Multi-label zero-shot mAP (AudioSet, FSD50K): cosine scores ranked per class against multi-hot ``targets``.

    The reference applies a sigmoid first; a monotone map changes no ranking, so the cosine is scored directly.
    """
    return mean_average_precision(cosine_similarity_matrix(audio_emb, class_text_emb), targets)


def confusion_matrix(labels: torch.Tensor | np.ndarray, predictions: torch.Tensor | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """``[C, C]`` counts, row = true class, column = predicted class (sklearn's orientation)."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    p = np.asarray(predictions.cpu() if isinstance(predictions, torch.Tensor) else predictions, np.int64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and predictions ({p.shape[0]}) differ in length")
    for name, v in (("labels", y), ("predictions", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{v.min()}, {v.max()}]")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


# ----------------------------------------------------------------------------- retrieval
def retrieval_metrics(
    audio_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_audio: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Audio-to-text and text-to-audio ``R@k`` and ``mAP@10`` of caption embeddings against clip embeddings.

    ``text_to_audio[j]`` is the row of ``audio_emb`` that caption ``j`` describes. Each clip is embedded
    once (the reference repeats a clip embedding per caption; that changes nothing but the cost).
    See the module docstring for the exact definitions.
    """
    _check_embeddings("audio_emb", audio_emb)
    _check_embeddings("text_emb", text_emb)
    return retrieval_metrics_from_scores(cosine_similarity_matrix(audio_emb, text_emb), text_to_audio, ks)


def retrieval_metrics_from_scores(
    scores: torch.Tensor,
    text_to_audio: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """The metrics of :func:`retrieval_metrics` from a precomputed score matrix ``[N_audio, N_text]``.

    Keys, in order: ``a2t_R@k`` for each k, ``a2t_mAP@10``, then the same for ``t2a``.
    """
    ks = _check_ks(ks)
    _check_embeddings("scores", scores, "[N_audio, N_text]")
    n_audio, n_text = scores.shape
    _check_index("text_to_audio", text_to_audio, n_text, n_audio)
    owner = text_to_audio.to(device=scores.device, dtype=torch.long)
    top = max(*ks, MAP_K)

    # Audio queries: hits[a, p] says whether the caption at rank p + 1 belongs to audio a.
    n_relevant = torch.bincount(owner, minlength=n_audio)
    queries = n_relevant > 0
    order = _ranked(scores[queries], top)
    audio_ids = torch.arange(n_audio, device=scores.device)[queries]
    a2t = _metrics_from_hits(owner[order] == audio_ids[:, None], n_relevant[queries], ks)

    # Caption queries: exactly one relevant audio each.
    order = _ranked(scores.T, top)
    t2a = _metrics_from_hits(order == owner[:, None], torch.ones_like(owner), ks)

    out = {f"a2t_{k}": v for k, v in a2t.items()}
    out.update({f"t2a_{k}": v for k, v in t2a.items()})
    return out


def _metrics_from_hits(hits: torch.Tensor, n_relevant: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """``R@k`` and ``mAP@10`` from a ``[Q, top]`` relevance table of each query's first ranks."""
    hits = hits.double()
    out = {f"R@{k}": float(hits[:, :k].amax(dim=1).mean()) for k in ks}
    hits = hits[:, :MAP_K]
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=hits.dtype)
    precision = hits.cumsum(dim=1) / ranks
    average_precision = (precision * hits).sum(dim=1) / n_relevant.to(hits.dtype)
    out[f"mAP@{MAP_K}"] = float(average_precision.mean())
    return out


# ----------------------------------------------------------------------------- aggregation
def mean_and_std(values: Sequence[dict[str, float]]) -> dict[str, float]:
    """``<key>`` (mean) and ``<key>_std`` over runs, e.g. a baseline scored from several random inits.

    The std is the sample standard deviation (n - 1 in the denominator): the runs are a sample of
    possible seeds. A single run gets std 0. Every run must report the same keys.
    """
    if not values:
        raise ValueError("mean_and_std needs at least one run")
    keys = list(values[0])
    for i, run in enumerate(values):
        if set(run) != set(keys):
            raise ValueError(f"run {i} has keys {sorted(run)}, run 0 has {sorted(keys)}")
    clash = [k for k in keys if f"{k}_std" in values[0]]
    if clash:
        raise ValueError(f"keys {clash} would clash with the std keys {[f'{k}_std' for k in clash]}")
    n = len(values)
    out: dict[str, float] = {}
    for key in keys:
        column = [float(run[key]) for run in values]
        mean = math.fsum(column) / n
        var = math.fsum((v - mean) ** 2 for v in column) / (n - 1) if n > 1 else 0.0
        out[key] = mean
        out[f"{key}_std"] = math.sqrt(var)
    return out


def mean_average_precision(scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Macro mAP over the classes that have at least one positive (the others are skipped, not counted as 0).

    Per class, clips are ranked by descending score; **ties are broken by index** (a stable sort: the lower
    index ranks first). ``AP = mean over positives of precision@rank(positive)``. With distinct scores this
    equals sklearn's ``average_precision_score``; with ties sklearn scores the tied group at once instead.
    """
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, float)
    t = targets.detach().cpu().double().numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets, float)
    if s.ndim != 2 or s.shape != t.shape or s.shape[0] == 0:
        raise ValueError(f"scores and targets must be non-empty [N, C] of equal shape, got {s.shape} and {t.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores have NaN or infinite values")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("targets must be binary (0/1)")
    order = np.argsort(-s, axis=0, kind="stable")
    hits = np.take_along_axis(t, order, axis=0)  # [N, C] targets in ranked order
    n_pos = hits.sum(axis=0)
    valid = n_pos > 0
    if not valid.any():
        raise ValueError("no class has a positive example: mAP is undefined")
    ranks = np.arange(1, s.shape[0] + 1, dtype=np.float64)[:, None]
    precision = np.cumsum(hits, axis=0) / ranks
    ap = (precision * hits).sum(axis=0)[valid] / n_pos[valid]
    return float(ap.mean())
