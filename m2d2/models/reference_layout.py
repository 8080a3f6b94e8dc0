"""Key layouts of the reference (nttcslab/m2d, EVAR) checkpoints and their mapping onto M2D2 state-dict keys.

The reference names the predictor and target by their MAE roles (``decoder_*``, ``target_*``), wraps the
encoder in runtime (``backbone.``) or EVAR DataParallel (``module.ar.runtime.backbone.``) prefixes, stores
``logit_scale`` 0-dim and keeps nnAudio buffers, BERT poolers and classifier heads that M2D2 has no use for.
This module is the one place that knows those names (nttcslab/m2d's model code); it works on plain dicts of
tensors, with no file access, so that conversion and its tests share a single table.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

Layout = Literal["encoder", "pretrain", "clap2025", "evar"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

LAYOUT_HELP: dict[str, str] = {
    "encoder": "bare encoder state dict (*_enconly weights): cls_token, pos_embed, patch_embed, blocks, norm",
    "pretrain": "reference pre-training checkpoint {'model': ...} with decoder_* (predictor) and target_* keys",
    "clap2025": "RuntimeM2D CLAP checkpoint (M2D-CLAP 2025): backbone.*, text_encoder.text_encoder.*, logit_scale",
    "evar": "EVAR fine-tuned DataParallel TaskNetwork: module.ar.runtime.backbone.* (+ head, nnAudio buffers)",
}

# A rule maps a reference key to an M2D2 key: a source ending in "." renames a prefix, any other an exact key.
Rule = tuple[str, str]

_ENCODER: tuple[Rule, ...] = (
    ("cls_token", "encoder.cls_token"),
    ("pos_embed", "encoder.pos_embed"),
    ("patch_embed.proj.", "encoder.patch_embed.proj."),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("norm_stats", "norm_stats"),
)
# 2025 projector (AudioToSemantic): the same names on both sides.
_PROJECTOR: tuple[Rule, ...] = (
    ("audio_proj.sem_token", "audio_proj.sem_token"),
    ("audio_proj.sem_blocks.", "audio_proj.sem_blocks."),
    ("audio_proj.norm.", "audio_proj.norm."),
)
_M2D_HEADS: tuple[Rule, ...] = (
    ("mask_token", "predictor.mask_token"),
    ("decoder_pos_embed", "predictor.pos_embed"),
    ("decoder_embed.", "predictor.embed."),
    ("decoder_blocks.", "predictor.blocks."),
    ("decoder_norm.", "predictor.norm."),
    ("decoder_pred.", "predictor.pred."),
    ("target_blocks.", "target.blocks."),
    ("target_norm.", "target.norm."),
)
_CLAP_STAGE1: tuple[Rule, ...] = (("logit_scale", "logit_scale"), ("text_proj.", "text_proj."))


def _under(prefix: str, rules: Iterable[Rule]) -> tuple[Rule, ...]:
    return tuple((prefix + src, dst) for src, dst in rules)


RULES: dict[str, tuple[Rule, ...]] = {
    "encoder": _ENCODER,
    "pretrain": _ENCODER + _M2D_HEADS + _PROJECTOR + _CLAP_STAGE1,
    "clap2025": _under("backbone.", _ENCODER + _PROJECTOR)
    + (("logit_scale", "logit_scale"), ("text_encoder.text_encoder.", "text_encoder.model.")),
    "evar": _under("module.ar.runtime.backbone.", _ENCODER + _PROJECTOR),
}

# Keys a layout carries that M2D2 deliberately leaves out: the front end is recomputed (torchaudio, same
# filters), CLS pooling needs no BERT pooler, ``position_ids`` is a constant buffer, and a task head is not
# part of a representation model.
DROPPED: dict[str, tuple[str, ...]] = {
    "encoder": (),
    "pretrain": (),
    "clap2025": (
        "to_spec.",
        "text_encoder.text_encoder.pooler.",
        "text_encoder.text_encoder.embeddings.position_ids",
    ),
    "evar": ("module.ar.runtime.to_spec.", "module.head."),
}

# Reference parts that exist but have no counterpart in M2D2: named in errors so that a user knows what they hit.
UNSUPPORTED: dict[str, str] = {
    "audio_proj.0.": "the 2024 M2D-CLAP MLP projector (M2D2 has the 2025 transformer projector)",
    "audio_proj.2.": "the 2024 M2D-CLAP MLP projector (M2D2 has the 2025 transformer projector)",
    "offline_predictor.": "the M2D-X / M2D-AS offline predictor",
}

_ENCODER_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight")
_BODY_PREFIX = {"encoder": "", "pretrain": "", "clap2025": "backbone.", "evar": "module.ar.runtime.backbone."}


class ReferenceLayoutError(ValueError):
    """A state dict that does not fit the expected reference layout; the message lists the offending keys."""


@dataclass
class MappedState:
    """Reference weights renamed to M2D2 keys, with what was left out and why."""

    layout: Layout
    state: dict[str, torch.Tensor]
    dropped: dict[str, int] = field(default_factory=dict)  # dropped prefix -> number of keys

    def has(self, prefix: str) -> bool:
        return any(k == prefix or k.startswith(prefix) for k in self.state)


def _match(key: str, src: str) -> bool:
    return key.startswith(src) if src.endswith(".") else key == src


def _rename(key: str, rules: Iterable[Rule]) -> str | None:
    for src, dst in rules:
        if _match(key, src):
            return dst + key[len(src) :]
    return None


def key_list(keys: Iterable[str], limit: int = 12) -> str:
    """Short, sorted listing of keys for error messages (a full 400-key dump helps nobody)."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a loaded checkpoint and the names of the other top-level entries.

    Reference training saves ``{'model': state_dict, 'optimizer', 'epoch', 'scaler', 'args'}``; the other
    formats are a bare state dict. Only tensors are accepted as weights.
    """
    if not isinstance(obj, Mapping):
        raise ReferenceLayoutError(f"expected a state dict or {{'model': state_dict, ...}}, got {type(obj).__name__}")
    extras: list[str] = []
    if "model" in obj and isinstance(obj["model"], Mapping):
        extras = sorted(str(k) for k in obj if k != "model")
        obj = obj["model"]
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ReferenceLayoutError(f"state dict entries that are not tensors: {key_list(not_tensors)}")
    return {str(k): v for k, v in obj.items()}, extras


def detect_layout(keys: Iterable[str]) -> Layout:
    """Which reference format a state dict is in, from its key names alone."""
    keys = list(keys)

    def any_starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any_starts("module.ar.runtime.backbone."):
        return "evar"
    if any_starts("backbone."):
        return "clap2025"
    if any_starts("decoder_blocks.", "target_blocks.", "decoder_embed.", "mask_token"):
        return "pretrain"
    if "patch_embed.proj.weight" in keys:
        return "encoder"
    raise ReferenceLayoutError(
        "not a known reference checkpoint layout (" + "; ".join(f"{k}: {v}" for k, v in LAYOUT_HELP.items())
        + f"). Keys found: {key_list(keys)}"
    )


def to_m2d2(state: Mapping[str, torch.Tensor], layout: Layout | str = "auto", drop: Iterable[str] = ()) -> MappedState:
    """Rename a reference state dict to M2D2 keys.

    Every key must be mapped, dropped by the layout (see :data:`DROPPED`) or dropped by the caller (``drop``:
    key prefixes); anything else is an error that lists the keys, so an unfamiliar checkpoint never loads
    half-way. ``logit_scale`` is reshaped from the reference's 0-dim to M2D2's ``(1,)``.
    """
    if layout == "auto":
        layout = detect_layout(state)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose 'auto' or one of {list(LAYOUTS)}")
    drops = tuple(DROPPED[layout]) + tuple(drop)
    mapped: dict[str, torch.Tensor] = {}
    dropped: Counter[str] = Counter()
    unknown: list[str] = []
    for key, tensor in state.items():
        prefix = next((p for p in drops if key.startswith(p)), None)
        if prefix is not None:
            dropped[prefix] += 1
            continue
        new = _rename(key, RULES[layout])
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = tensor
    if unknown:
        hints = sorted({why for key in unknown for p, why in UNSUPPORTED.items() if p in key})
        raise ReferenceLayoutError(
            f"{len(unknown)} keys do not belong to the {layout!r} layout ({LAYOUT_HELP[layout]}): {key_list(unknown)}"
            + (f". They look like {'; '.join(hints)}" if hints else "")
            + ". Pass drop=[prefix, ...] (CLI: --drop PREFIX) to leave such parts out deliberately."
        )
    body = _BODY_PREFIX[layout]
    missing = [body + k for k in _ENCODER_REQUIRED if _rename(body + k, RULES[layout]) not in mapped]
    if missing:
        raise ReferenceLayoutError(f"the {layout!r} checkpoint lacks encoder keys: {key_list(missing)}")
    if "logit_scale" in mapped:
        mapped["logit_scale"] = mapped["logit_scale"].reshape(1)
    return MappedState(layout=layout, state=mapped, dropped=dict(dropped))
