"""Which caption a training step uses, and how often each clip is drawn.

Clips carry several captions (Clotho 5, AudioCaps 1, Auto-ACD + a "The sound of ..." fallback ...). The
reference pooled every caption of every source and drew from the pool, so a clip with five captions was drawn
five times as often. Here a clip is the unit: the epoch order draws clips (:func:`clip_weights` sets how much a
clip's caption count may raise its odds, none by default), and each time a clip is drawn one of its captions is
chosen (:func:`choose_caption`) from the generator of the item's ``(seed, epoch, index)`` that drew its crop in
:mod:`m2d2.data.loader`, so resumed runs and any number of DataLoader workers pick the same captions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def choose_caption(n_options: int, rng: np.random.Generator,
                   weights: Sequence[float] | np.ndarray | None = None) -> int:
    """Index (``0 <= i < n_options``) of the caption a training item uses, drawn from ``rng``.

    The loader passes the item's generator (``default_rng([seed, epoch, index])``) right after the crop start is
    drawn from it (only for a clip longer than the crop), which keeps every caption trained so far: a different
    stream would change them. ``weights`` (relative, one per caption, e.g. human captions above generated ones)
    default to uniform, one ``integers`` draw.
    """
    if n_options < 1:
        raise ValueError("a clip needs at least one caption")
    if weights is None:
        return int(rng.integers(0, n_options))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_options,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {n_options} finite, non-negative caption weights with a positive sum, got {weights}")
    cumulative = np.cumsum(w)
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(pick, int(np.flatnonzero(w)[-1]))  # rounding at the top must not land past the last weighted one


def clip_weights(caption_counts: Sequence[int], exponent: float = 0.0, sources: Sequence[str] | None = None,
                 source_weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Sampling weight per clip for :class:`m2d2.data.loader.WeightedOrder`: ``count ** exponent`` times the
    clip's source weight.

    ``exponent`` 0 (default): every clip equally likely, whatever its caption count; 1: the reference's pooled
    captions (a 5-caption clip drawn 5x as often); 0.5 in between. ``source_weights`` (default 1 for a source it
    does not name) scale whole sources, e.g. down-weight a large auto-captioned set.
    """
    counts = np.asarray(caption_counts, dtype=np.float64)
    if (counts < 1).any():
        raise ValueError("every clip needs at least one caption")
    weights = counts ** float(exponent)
    if source_weights:
        if sources is None or len(sources) != len(counts):
            raise ValueError("source_weights need one source name per clip")
        weights = weights * np.asarray([float(source_weights.get(s, 1.0)) for s in sources])
    return weights
