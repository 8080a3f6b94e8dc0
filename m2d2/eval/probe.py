"""Linear evaluation of frozen clip features, following the reference protocol (EVAR ``lineareval.py``).

Protocol (EVAR ``TorchMLPClassifier2`` with ``hidden=()``, config ``m2d.yaml``):

- features are standardised per dimension with the mean and (population) std of the training data; a constant
  dimension gets scale 1;
- one ``Linear(D, C)`` layer, Adam (lr **3e-5**, betas 0.9/0.999, eps 1e-8, weight decay 1e-8), batch
  ``min(200, N_train)``, shuffled every epoch, at most **200** epochs;
- after every epoch the validation metric (accuracy, or macro mAP for multi-label) is measured; an epoch that
  scores **at least** the best so far becomes the best (ties go to the later epoch), and training stops after
  **20** epochs without one; the best epoch's weights are restored and scored on the test data;
- without a validation split (folded tasks: ESC-50 5 folds, US8K 10 folds) 10 % of the training clips are held
  out, each class represented (EVAR retries a random split until it is; here the split is stratified and
  seeded). The standardisation statistics then include those clips, as in EVAR;
- folds: leave-one-fold-out, the task score is the mean over folds.

Deviation: the loss is the mean cross-entropy (EVAR averages ``-y log p`` over samples *and* classes, i.e.
divides it by C); Adam's updates do not depend on a constant loss scale (up to eps), so training is unchanged.
Every random draw (split, init, shuffles) comes from a generator seeded by ``seed``: results are reproducible.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m2d2.eval.metrics import mean_average_precision

__all__ = [
    "LinearProbe",
    "LinearProbeConfig",
    "ProbeResult",
    "fit_linear_probe",
    "linear_probe",
    "linear_probe_folds",
    "stratified_folds",
    "validation_split",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence


@dataclass(frozen=True)
class LinearProbeConfig:
    """The reference protocol's numbers (see the module docstring); change them only for ablations."""

    lr: float = 3e-5
    max_epochs: int = 200
    patience: int = 20
    batch_size: int = 200
    weight_decay: float = 1e-8
    valid_fraction: float = 0.1
    standardize: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.max_epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError(f"lr, max_epochs, patience and batch_size must be positive: {self}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must lie in (0, 1), got {self.valid_fraction}")


def _features(name: str, x: ArrayLike) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return a


def _labels(name: str, y: ArrayLike, n: int) -> np.ndarray:
    """1-D integer class ids (single-label) or a 2-D 0/1 matrix (multi-label), one row per clip."""
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.shape[:1] != (n,) or a.ndim not in (1, 2):
        raise ValueError(f"{name} must hold one label (or one multi-hot row) per clip: shape {a.shape} for {n} clips")
    if a.ndim == 1:
        if not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
            raise ValueError(f"{name} must be non-negative integer class ids, got {a.dtype}")
        return a.astype(np.int64)
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} as a matrix must be multi-hot (0/1)")
    return a.astype(np.float32)


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, valid_idx)``: ``fraction`` of the clips held out, stratified for single-label data.

    Each class with at least two clips gives ``max(1, round(fraction * n_c))`` clips (at least one stays for
    training), so every class that can be validated is. Multi-label data is split at random.
    """
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    if labels.ndim == 2:
        order = rng.permutation(n)
        n_valid = min(n - 1, max(1, round(fraction * n)))
        return np.sort(order[n_valid:]), np.sort(order[:n_valid])
    valid: list[int] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if members.size >= 2:
            valid.extend(members[: min(members.size - 1, max(1, round(fraction * members.size)))].tolist())
    if not valid:
        raise ValueError("cannot hold out validation clips: no class has two training clips")
    mask = np.zeros(n, dtype=bool)
    mask[valid] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def stratified_folds(labels: ArrayLike, k: int, seed: int = 0) -> np.ndarray:
    """Fold id in ``[0, k)`` per clip, each class dealt round-robin over the folds in a seeded random order.

    For eval sets that ship no folds; tasks with official folds (ESC-50, US8K) must use those.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1:
        raise ValueError("stratified_folds needs single-label class ids")
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    rng = np.random.default_rng(seed)
    folds = np.empty(y.shape[0], dtype=np.int64)
    offset = 0
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        folds[members] = (offset + np.arange(members.size)) % k
        offset += members.size  # continue where the last class stopped, so fold sizes stay balanced
    return folds


class LinearProbe:
    """A trained probe: standardisation statistics, the linear layer, and how training went."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, linear: nn.Linear, multi_label: bool,
                 best_epoch: int, epochs: int, valid_score: float):
        self.mean, self.scale, self.linear = mean, scale, linear
        self.multi_label = multi_label
        self.metric = "mAP" if multi_label else "acc"
        self.best_epoch, self.epochs, self.valid_score = best_epoch, epochs, valid_score

    def transform(self, x: ArrayLike) -> torch.Tensor:
        return torch.from_numpy(((_features("x", x) - self.mean) / self.scale).astype(np.float32))

    @torch.no_grad()
    def logits(self, x: ArrayLike) -> torch.Tensor:
        return self.linear(self.transform(x))

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Class ids (single-label) or sigmoid scores (multi-label)."""
        logits = self.logits(x)
        return logits.sigmoid().numpy() if self.multi_label else logits.argmax(dim=1).numpy()

    def score(self, x: ArrayLike, y: ArrayLike) -> float:
        x = _features("x", x)
        return _score(self.logits(x), _labels("y", y, x.shape[0]))


def _score(logits: torch.Tensor, y: np.ndarray) -> float:
    if y.ndim == 2:
        return mean_average_precision(logits, y)
    return float((logits.argmax(dim=1).numpy() == y).mean())


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run the probe on one intra-op thread: its matrices are tiny, and OpenMP workers that spin-wait for them made
    training ~50x slower on a loaded 2-core machine (measured: 28 s vs 0.56 s for one 64-d probe)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_linear_probe(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_valid: ArrayLike | None = None,
    y_valid: ArrayLike | None = None,
    config: LinearProbeConfig | None = None,
    num_classes: int | None = None,
) -> LinearProbe:
    """Train one probe with early stopping on ``(x_valid, y_valid)``, or on a held-out part of the training data."""
    cfg = config or LinearProbeConfig()
    x = _features("x_train", x_train)
    y = _labels("y_train", y_train, x.shape[0])
    multi = y.ndim == 2
    if (x_valid is None) != (y_valid is None):
        raise ValueError("give both x_valid and y_valid, or neither")
    if x_valid is None:
        train_idx, valid_idx = validation_split(y, cfg.valid_fraction, cfg.seed)
        stats_x = x  # EVAR fits the scaler before it carves out validation
        xv, yv, x, y = x[valid_idx], y[valid_idx], x[train_idx], y[train_idx]
    else:
        xv = _features("x_valid", x_valid)
        yv = _labels("y_valid", y_valid, xv.shape[0])
        stats_x = x
        if xv.shape[1] != x.shape[1] or yv.ndim != y.ndim:
            raise ValueError("validation data must match the training data's feature width and label kind")
    if multi:
        classes = y.shape[1]
    else:
        classes = int(max(y.max(), yv.max())) + 1
        if num_classes is not None:
            if num_classes < classes:
                raise ValueError(f"num_classes={num_classes}, but labels go up to {classes - 1}")
            classes = num_classes
    mean = stats_x.mean(axis=0) if cfg.standardize else np.zeros(x.shape[1])
    scale = stats_x.std(axis=0) if cfg.standardize else np.ones(x.shape[1])
    scale = np.where(scale > 0, scale, 1.0)

    generator = torch.Generator().manual_seed(cfg.seed)
    linear = nn.Linear(x.shape[1], classes)
    bound = 1.0 / math.sqrt(x.shape[1])  # nn.Linear's default init, drawn from our generator
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.Adam(linear.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay)
    xt = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    yt = torch.from_numpy(y)
    xv_t = torch.from_numpy(((xv - mean) / scale).astype(np.float32))
    with _single_thread():
        best_epoch, epochs, best_score = _train(linear, optimizer, xt, yt, xv_t, yv, cfg, generator)
    linear.requires_grad_(False)
    return LinearProbe(mean, scale, linear, multi, best_epoch, epochs, best_score)


def _train(linear: nn.Linear, optimizer: torch.optim.Optimizer, xt: torch.Tensor, yt: torch.Tensor,
           xv_t: torch.Tensor, yv: np.ndarray, cfg: LinearProbeConfig,
           generator: torch.Generator) -> tuple[int, int, float]:
    """Epochs with early stopping; leaves the best epoch's weights in ``linear``. Returns (best, run, score)."""
    multi = yt.ndim == 2
    batch = min(cfg.batch_size, xt.shape[0])
    best_score, best_epoch, best_state, waited, epoch = -math.inf, 0, None, 0, 0
    for epoch in range(cfg.max_epochs):
        order = torch.randperm(xt.shape[0], generator=generator)
        for start in range(0, xt.shape[0], batch):
            idx = order[start : start + batch]
            logits = linear(xt[idx])
            loss = (F.binary_cross_entropy_with_logits(logits, yt[idx]) if multi
                    else F.cross_entropy(logits, yt[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            score = _score(linear(xv_t), yv)
        if score >= best_score:
            best_score, best_epoch, best_state, waited = score, epoch, copy.deepcopy(linear.state_dict()), 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    linear.load_state_dict(best_state)
    return best_epoch + 1, epoch + 1, best_score


@dataclass
class ProbeResult:
    """Test score of a probe (mean over folds), with the per-fold details."""

    metric: str
    score: float
    std: float
    fold_scores: list[float] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    folds: list[int | str] = field(default_factory=list)

    def as_metrics(self, prefix: str = "probe") -> dict[str, float]:
        """Flat metrics: ``<prefix>_<metric>``, ``..._std`` (sample std over folds; 0 for one split), epochs."""
        out = {f"{prefix}_{self.metric}": self.score, f"{prefix}_{self.metric}_std": self.std,
               f"{prefix}_best_epoch_mean": float(np.mean(self.best_epochs))}
        if len(self.fold_scores) > 1:
            out.update({f"{prefix}_{self.metric}_fold{f}": s for f, s in zip(self.folds, self.fold_scores)})
        return out


def linear_probe(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_test: ArrayLike,
    y_test: ArrayLike,
    x_valid: ArrayLike | None = None,
    y_valid: ArrayLike | None = None,
    config: LinearProbeConfig | None = None,
) -> ProbeResult:
    """One train / (valid) / test split: fit, restore the best epoch, score the test data."""
    x = _features("x_train", x_train)
    y = _labels("y_train", y_train, x.shape[0])
    xt = _features("x_test", x_test)
    yt = _labels("y_test", y_test, xt.shape[0])
    num_classes = None if y.ndim == 2 else int(max(y.max(), yt.max())) + 1
    probe = fit_linear_probe(x, y, x_valid, y_valid, config, num_classes)
    score = probe.score(xt, yt)
    return ProbeResult(probe.metric, score, 0.0, [score], [probe.best_epoch], ["test"])


def linear_probe_folds(
    features: ArrayLike,
    labels: ArrayLike,
    folds: ArrayLike,
    config: LinearProbeConfig | None = None,
) -> ProbeResult:
    """Leave-one-fold-out: each fold is the test set once, the others train (10 % of them validate).

    ``folds`` holds one fold id per clip (any hashable values; at least two distinct ones).
    """
    x = _features("features", features)
    y = _labels("labels", labels, x.shape[0])
    fold_ids = np.asarray(folds.cpu() if isinstance(folds, torch.Tensor) else folds)
    if fold_ids.shape != (x.shape[0],):
        raise ValueError(f"folds must hold one fold id per clip: shape {fold_ids.shape} for {x.shape[0]} clips")
    unique = sorted(set(fold_ids.tolist()))
    if len(unique) < 2:
        raise ValueError(f"leave-one-fold-out needs at least two folds, got {unique}")
    num_classes = None if y.ndim == 2 else int(y.max()) + 1
    scores, epochs = [], []
    metric = "mAP" if y.ndim == 2 else "acc"
    for fold in unique:
        test = fold_ids == fold
        probe = fit_linear_probe(x[~test], y[~test], config=config, num_classes=num_classes)
        scores.append(probe.score(x[test], y[test]))
        epochs.append(probe.best_epoch)
    std = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
    return ProbeResult(metric, float(np.mean(scores)), std, scores, epochs, list(unique))
