"""Multi-label tagging evaluation (stage 1.1's AudioSet mAP) of a fine-tuned encoder + classifier head.

A clip is scored in the encoder chunks of inference (:mod:`m2d2.models.chunks`: chunks of the encoder's
``input_frames``, the clip padded with the normalised mean to whole patches, a last chunk kept when it holds a
patch) and its chunk logits averaged, so every encoded frame counts once and no clip is cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from safetensors.torch import load as load_safetensors

from m2d2 import io
from m2d2.data.features import LogMelStore
from m2d2.eval.metrics import mean_average_precision
from m2d2.models import M2D2
from m2d2.models.chunks import split_chunks
from m2d2.models.tagger import CLASSES_FILE, CLASSIFIER_DIR, HEAD_FILE, FineTuneModel


@torch.no_grad()
def clip_logits(model: FineTuneModel, store: LogMelStore, clips: Sequence[int] | None = None,
                batch_size: int = 32) -> torch.Tensor:
    """``[N, C]`` chunk-averaged logits of ``clips`` (default: all) of a feature store, in eval mode."""
    clips = list(range(len(store))) if clips is None else list(clips)
    return chunked_logits(model, [torch.from_numpy(store[clip]) for clip in clips], batch_size)


@torch.no_grad()
def chunked_logits(model: FineTuneModel, lms: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """``[N, C]`` chunk-averaged logits of raw log-mels ``[n_mels, T]`` of any length, with the model in eval mode."""
    crop, patch = model.max_frames, model.encoder.patch_frames
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # Chunks trimmed to their whole patches (all the encoder reads) and batched by length: one length a batch.
        # They stay on the CPU (an eval set need not fit the accelerator); each batch moves on its own.
        by_length: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for row, clip in enumerate(lms):
            x = model.normalize(clip.to(device)).cpu()
            for chunk in split_chunks(x, crop, patch):
                used = chunk.shape[-1] // patch * patch
                by_length.setdefault(used, []).append((row, chunk[..., :used]))
        sums = torch.zeros(len(lms), model.head.linear.out_features, dtype=torch.float64)
        counts = torch.zeros(len(lms), 1, dtype=torch.float64)
        for group in by_length.values():
            for i in range(0, len(group), batch_size):
                part = group[i : i + batch_size]
                logits = model.predict_normalized(torch.stack([c for _, c in part]).to(device)).double().cpu()
                rows = torch.tensor([r for r, _ in part])
                sums.index_add_(0, rows, logits)
                counts.index_add_(0, rows, torch.ones(len(part), 1, dtype=torch.float64))
        return (sums / counts).float()
    finally:
        model.train(was_training)


def load_tagger(export_uri: str, map_location: str | torch.device = "cpu"):
    """A stage-1.1 export as ``(M2D2 base, FineTuneModel, class names)``: the export's encoder with the
    ``classifier/`` head saved beside it (``head.safetensors``, ``classes.json``), ready for :func:`chunked_logits`."""
    classifier = io.join(export_uri.rstrip("/").rsplit("/", 1)[0], CLASSIFIER_DIR)
    if not io.exists(io.join(classifier, CLASSES_FILE)):
        raise FileNotFoundError(f"{export_uri} is not a tagging export: no {classifier}/{CLASSES_FILE} beside it")
    classes = json.loads(io.read_bytes(io.join(classifier, CLASSES_FILE)))["classes"]
    base = M2D2.from_pretrained(export_uri, map_location=map_location)
    tagger = FineTuneModel(base.encoder, base.norm_stats, len(classes))
    tagger.head.load_state_dict(load_safetensors(io.read_bytes(io.join(classifier, HEAD_FILE))))
    return base, tagger.eval(), classes


def evaluate_tagging(model: FineTuneModel, store: LogMelStore, classes: Sequence[str],
                     batch_size: int = 32) -> dict[str, float]:
    """Macro mAP over classes with a positive clip, plus the chance level of the same targets.

    ``mAP_chance`` is the mAP of constant scores' expectation: each class's positive rate, averaged — what a
    model that learned nothing scores, for reading ``mAP`` on a small eval set.
    """
    column = {name: k for k, name in enumerate(classes)}
    keep = [i for i in range(len(store)) if all(label in column for label in store.labels[i])]
    if not keep:
        raise ValueError(f"no '{store.split}' clip has labels among the {len(classes)} classes")
    targets = torch.zeros(len(keep), len(classes))
    for row, clip in enumerate(keep):
        for label in store.labels[clip]:
            targets[row, column[label]] = 1.0
    logits = clip_logits(model, store, keep, batch_size)
    positives = targets.sum(0)
    rate = positives[positives > 0] / len(keep)
    out = {"mAP": mean_average_precision(logits, targets), "mAP_chance": float(rate.mean()),
           "eval_clips": float(len(keep)), "eval_clips_skipped": float(len(store) - len(keep))}
    if bool((targets.sum(1) == 1).all()):  # single-label sets also get top-1 accuracy
        out["top1_acc"] = float((logits.argmax(1) == targets.argmax(1)).float().mean())
    return out
