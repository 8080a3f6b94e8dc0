"""The paper's published numbers for the M2D2 family, for the reference column of the suite table.

Fractions in [0, 1], keyed by ``(task, metric)`` then by model variant (``m2d2-minus``, ``m2d2``, ``m2d2-plus``,
``m2d2-as-plus``) or ``stage1.1``. Sources (M2D2 paper, IEEE/ACM TASLP version on arXiv):

- linear evaluation: Table II (M2D2⁻, M2D2 and M2D2⁺ share stage 1's frozen encoder, hence one row);
- zero-shot classification: Table VII (AS and FSD50K in mAP, the rest accuracy);
- audio-text retrieval: Table VIII (the "LS+WC" M2D2 row is stage 1's model, M2D2⁻);
- AudioSet tagging: Table V, AS2M fine-tuning mAP of M2D2 (the stage-1.1 model).

Paper results come from models trained at the ``paper`` preset on the full datasets; a run at another scale (the
demo) is not expected to reach them, the column says where the reference stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["PAPER_RESULTS", "paper_value"]

_SHARED = ("m2d2-minus", "m2d2", "m2d2-plus")
_FAMILY = ("m2d2-minus", "m2d2", "m2d2-plus", "m2d2-as-plus")


def _linear(shared: float, as_plus: float) -> dict[str, float]:
    return {**{v: shared / 100 for v in _SHARED}, "m2d2-as-plus": as_plus / 100}


def _family(*values: float) -> dict[str, float]:
    return {v: x / 100 for v, x in zip(_FAMILY, values, strict=True)}


_RETRIEVAL = {  # Table VIII: T2A R@1, R@5, R@10, mAP@10, then A2T, for M2D2-, M2D2, M2D2+, M2D2^AS+
    "audiocaps": ((27.34, 58.14, 71.45, 40.14, 36.05, 65.31, 77.43, 23.95),
                  (37.24, 72.52, 84.54, 52.00, 52.56, 82.34, 90.60, 38.74),
                  (40.54, 74.52, 86.92, 55.09, 57.99, 83.91, 91.43, 41.72),
                  (41.96, 77.07, 88.57, 56.74, 59.25, 84.74, 92.79, 43.24)),
    "clotho": ((15.92, 37.88, 49.26, 25.37, 18.09, 39.90, 52.54, 12.39),
               (18.09, 42.53, 55.52, 28.51, 24.88, 48.13, 60.48, 15.53),
               (19.43, 45.84, 58.64, 30.55, 26.32, 51.20, 65.07, 17.65),
               (20.08, 45.99, 59.48, 31.21, 24.98, 51.67, 64.59, 17.35)),
}
_RETRIEVAL_KEYS = ("t2a_R1", "t2a_R5", "t2a_R10", "t2a_mAP10", "a2t_R1", "a2t_R5", "a2t_R10", "a2t_mAP10")


def _table() -> dict[tuple[str, str], dict[str, float]]:
    table = {
        ("esc50", "probe_acc"): _linear(95.2, 97.9),
        ("us8k", "probe_acc"): _linear(89.5, 89.7),
        ("spcv2", "probe_acc"): _linear(95.6, 94.8),
        ("vc1", "probe_acc"): _linear(68.6, 56.3),
        ("voxforge", "probe_acc"): _linear(98.1, 97.1),
        ("cremad", "probe_acc"): _linear(73.4, 69.7),
        ("gtzan", "probe_acc"): _linear(86.6, 86.3),
        ("nsynth", "probe_acc"): _linear(76.5, 76.7),
        ("surge", "probe_acc"): _linear(42.2, 41.1),
        ("audioset", "zs_mAP"): _family(23.15, 28.27, 27.13, 30.05),
        ("fsd50k", "zs_mAP"): _family(43.43, 46.76, 42.03, 50.04),
        ("esc50", "zs_acc"): _family(90.07, 93.67, 94.55, 94.30),
        ("us8k", "zs_acc"): _family(76.52, 81.92, 82.90, 82.30),
        ("cremad", "zs_acc"): _family(17.41, 23.50, 21.73, 28.56),
        ("gtzan", "zs_acc"): _family(79.31, 72.41, 70.86, 70.69),
        ("nsynth", "zs_acc"): _family(31.76, 24.57, 29.52, 30.57),
        ("audioset", "tag_mAP"): {"stage1.1": 0.490},
    }
    for task, rows in _RETRIEVAL.items():
        for k, key in enumerate(_RETRIEVAL_KEYS):
            table[(task, key)] = _family(*(row[k] for row in rows))
    return table


PAPER_RESULTS: Mapping[tuple[str, str], Mapping[str, float]] = MappingProxyType(_table())


def paper_value(task: str, metric: str, model: str) -> float | None:
    """The paper's number for ``model`` (a variant name or ``stage1.1``) on ``task``/``metric``, if it reports one."""
    return PAPER_RESULTS.get((task, metric), {}).get(model)
