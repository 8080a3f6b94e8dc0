"""Stage 1.1 training pieces: mixup and the class-balanced AudioSet sampler.

The reference ran this stage with EVAR's ``finetune.py`` (``util/ft-as2m.sh``): mixup 0.5, BCE, and a
class-balanced sampler of 200 k clips per epoch on top of the model of :mod:`m2d2.models.tagger` (resampled
positions, SpecAugment, patch-out, classifier head). Only training uses these, so they live here; the loop lives
elsewhere.

All randomness comes from an explicit ``torch.Generator`` (or torch's default one) so that a step is
reproducible from its seed; nothing reads NumPy's or torchaudio's global RNG.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from m2d2.models.tagger import generator_device

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- mixup
def log_mixup_exp(lms_a: torch.Tensor, lms_b: torch.Tensor, lam: float) -> torch.Tensor:
    """``log(lam * exp(a) + (1 - lam) * exp(b))``: mixes two raw (natural-log) log-mels as power spectra.

    Computed as ``logaddexp(a + log(lam), b + log(1 - lam))``, so it never overflows and ``lam = 1`` returns
    ``a`` exactly (``lam = 0`` returns ``b``). Unlike BYOL-A's version no eps is added inside the log.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup weight must be in [0, 1], got {lam}")
    log_a = math.log(lam) if lam > 0 else -math.inf
    log_b = math.log1p(-lam) if lam < 1 else -math.inf
    return torch.logaddexp(lms_a + log_a, lms_b + log_b)


def mixup_batch(
    lms: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup of a batch of **raw** log-mel ``[B, F, T]`` with a random permutation of itself.

    One ``lam ~ Beta(alpha, alpha)`` per batch; sample ``i`` is mixed with sample ``perm[i]``: the log-mels in
    the power domain (:func:`log_mixup_exp`), the targets linearly with the same ``lam``. Call it before
    :meth:`m2d2.models.tagger.FineTuneModel.forward`, which normalises: mixing must happen on raw log-power values.

    Differences from the reference (EVAR ``Mixup``), by choice:

    - EVAR averages AudioSet log-mels linearly (``lam * a + (1 - lam) * b`` of log values). Averaging log
      values is a geometric mean of powers, not a mix of two sounds; we mix in the power domain as BYOL-A and
      M2D-X's background-noise mix do.
    - EVAR draws one ``lam`` per *sample*; we draw one per batch (the usual mixup formulation).

    ``lam`` is drawn with NumPy's Beta sampler from a seed taken from ``generator``, so the result is a
    deterministic function of the generator's state. ``alpha <= 0`` returns the inputs unchanged with ``lam = 1``
    and consumes no randomness.
    """
    if lms.shape[0] != targets.shape[0]:
        raise ValueError(f"batch sizes differ: lms {tuple(lms.shape)} vs targets {tuple(targets.shape)}")
    if alpha <= 0:
        return lms, targets, 1.0
    device = generator_device(generator, lms.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(lms.shape[0], generator=generator, device=device).to(lms.device)
    mixed_lms = log_mixup_exp(lms, lms[perm], lam)
    mixed_targets = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_lms, mixed_targets, lam


# ----------------------------------------------------------------------------- class-balanced sampling
def audioset_sample_weights(label_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """AudioMAE / EVAR (``make_as_metadata.gen_weight``) sampling weights for multi-label clips.

    Per class ``w_c = 1000 / (count_c + 0.01)`` with ``count_c`` the number of clips carrying ``c``; per clip
    ``weight = (sum of w_c over its labels) ** (1 / 1.5)`` (the power softens the weights). A clip's labels are
    taken as a set (AudioSet has no repeated labels, so this equals the reference). Clips without labels get
    weight 0, so a sampler never draws them; their number is logged as a warning.
    """
    label_sets = [set(labels) for labels in label_lists]
    counts = Counter(label for labels in label_sets for label in labels)
    class_weight = {label: 1000.0 / (count + 0.01) for label, count in counts.items()}
    sums = np.array([sum(class_weight[label] for label in labels) for labels in label_sets], dtype=np.float64)
    unlabeled = sum(1 for labels in label_sets if not labels)
    if unlabeled:
        log.warning("%d of %d clips have no label: sampling weight 0 (never drawn)", unlabeled, len(label_sets))
    return np.power(sums, 1.0 / 1.5)
