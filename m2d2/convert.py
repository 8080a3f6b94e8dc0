"""Import released reference M2D / M2D-CLAP weights (nttcslab/m2d, EVAR) as M2D2 models.

The reference keeps its configuration in folder names and its weights in pickles. A converted model is
``model.safetensors`` + an explicit ``config.json``, loaded by :meth:`M2D2.from_pretrained` like any model this
pipeline trains. Three rules:

* the config comes from the tensors' shapes, or is passed in and checked against them; never from a path;
* ``pos_embed`` is always the checkpoint's own table: the 1001-frame releases hold a time-stretched 38-column
  sin-cos table, up to ~2.0 away from sin-cos evaluated on 62 columns (nttcslab/m2d's released weights);
* files are read without running pickled code (``torch.load(weights_only=True)``, or safetensors); a file that
  is damaged or would need code to load fails with one :class:`CheckpointFormatError` naming it. The readers
  (:func:`read_safetensors`, :func:`torch_load_weights`) are shared with exports and training checkpoints.

Key names and layouts live in :mod:`m2d2.models.reference_layout`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m2d2 import io
from m2d2.models.config import (
    EncoderConfig,
    M2D2Config,
    PredictorConfig,
    ProjectorConfig,
    TextConfig,
    TransformersTextConfig,
)
from m2d2.models.model import M2D2
from m2d2.models.reference_layout import LAYOUT_HELP, LAYOUTS, MappedState, key_list, to_m2d2, unwrap
from m2d2.weights import (  # noqa: F401 (re-exported: convert's errors are these)
    CheckpointFormatError,
    UnsafeCheckpointError,
    local_copy,
    read_safetensors,
    torch_load_weights,
)

log = logging.getLogger(__name__)

# Reference training checkpoints store their argparse arguments; a Namespace only holds attribute values.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
# What the reference loaders assume when a checkpoint has no ``norm_stats`` (2022 and 2024 releases).
REFERENCE_NORM_STATS = (-7.1, 4.2)
# Head counts are not stored in weights; the released models use these head widths (ViT-B 768/12, the
# 512-wide predictor with 16 heads, BERT-base 768/12, the 1-head projector).
ENCODER_HEAD_DIM = 64
PREDICTOR_HEAD_DIM = 32
TEXT_HEAD_DIM = 64
# Parts a checkpoint may lack as a whole; they keep their (seeded) initialisation and are reported.
OPTIONAL_PARTS = ("audio_proj.", "text_proj.", "logit_scale", "text_encoder.")


@dataclass
class Conversion:
    """A converted model and what the conversion did with the checkpoint's contents."""

    model: M2D2
    layout: str
    dropped: dict[str, int] = field(default_factory=dict)  # key prefix -> keys left out by design or request
    extras: list[str] = field(default_factory=list)  # top-level entries that are not weights (optimizer, args ...)
    fresh: list[str] = field(default_factory=list)  # parts the checkpoint lacks, left at their initialisation
    norm_stats_source: str = "checkpoint"

    def summary(self) -> str:
        enc = self.model.config.encoder
        lines = [
            f"layout: {self.layout} ({LAYOUT_HELP[self.layout]})",
            f"encoder: {enc.embed_dim}-d x {enc.depth} blocks, {enc.num_heads} heads, patch {enc.patch_size}, "
            f"grid {enc.grid[0]}x{enc.grid[1]} (chunks of {enc.grid[1] * enc.patch_size[1]} frames)",
            f"norm_stats: {[round(float(v), 5) for v in self.model.norm_stats]} ({self.norm_stats_source})",
        ]
        if self.model.text_encoder is not None:
            lines.append(f"text encoder: {self.model.text_encoder.model.config.model_type}, "
                         f"{self.model.text_encoder.dim}-d")
        if self.dropped:
            lines.append("left out: " + ", ".join(f"{p}* ({n})" for p, n in sorted(self.dropped.items())))
        if self.extras:
            lines.append("ignored entries: " + ", ".join(self.extras))
        if self.fresh:
            lines.append("not in the checkpoint, freshly initialised: " + ", ".join(self.fresh))
        return "\n".join(lines)


def load_state(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights of a ``.pth`` / ``.safetensors`` file (local path or URI) and its non-weight top-level entries."""
    with local_copy(src) as path:
        name = os.fspath(path) if io.is_local(src) else str(src)  # a download's temporary path means nothing
        obj = read_safetensors(path, name) if path.suffix == ".safetensors" else torch_load_weights(path, name, SAFE_GLOBALS)
    return unwrap(obj)


# ----------------------------------------------------------------------------- configuration
def _indices(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered sub-modules under ``prefix`` (``blocks.0.`` ... ``blocks.N-1.``), checked contiguous."""
    found = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}N keys are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _heads(dim: int, head_dim: int, what: str) -> int:
    if dim % head_dim:
        raise ValueError(f"cannot infer the {what} head count: width {dim} is not a multiple of {head_dim}; pass a config")
    return dim // head_dim


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"cannot infer the config: the checkpoint lacks {key}")
    return tuple(state[key].shape)


#: (time patch width, grid columns) -> the crop length the reference trained at (its released 80x608 and
#: 80x1001 weights, nttcslab/m2d).
RELEASED_CROPS: dict[tuple[int, int], int] = {(16, 38): 608, (16, 62): 1001}


def infer_config(state: Mapping[str, torch.Tensor], *, n_mels: int = 80, tokenizer: str | None = None) -> M2D2Config:
    """An M2D2 config from the shapes of M2D2-keyed weights (see :func:`m2d2.models.reference_layout.to_m2d2`).

    Widths, depths, MLP ratios, patch size and the patch grid come from the tensors. What weights cannot say is
    set by convention and named here: ``n_mels`` (80 in every release), head counts from the released head
    widths (:data:`ENCODER_HEAD_DIM` ...), LayerNorm eps, a BERT-type text encoder (the 2025 release), and
    ``input_frames``: the released crop lengths by grid (:data:`RELEASED_CROPS`: 38 columns -> 608 frames,
    62 -> 1001), else whole patches of the grid. It sets the inference chunk length, so a 1001-frame model chunks
    at 1001 and drops 9 frames per chunk exactly as the reference does. The text encoder needs a ``tokenizer``.
    """
    dim, _, patch_f, patch_t = _shape(state, "encoder.patch_embed.proj.weight")
    grid_f = n_mels // patch_f
    n_patches = _shape(state, "encoder.pos_embed")[1] - 1
    if grid_f == 0 or n_patches % grid_f:
        raise ValueError(f"pos_embed of {n_patches} patches does not fit {grid_f} frequency rows "
                         f"({n_mels} mels / patch {patch_f}); pass a config")
    grid_t = n_patches // grid_f
    encoder = EncoderConfig(
        n_mels=n_mels,
        input_frames=RELEASED_CROPS.get((patch_t, grid_t), grid_t * patch_t),
        patch_size=(patch_f, patch_t),
        embed_dim=dim,
        depth=_indices(state, "encoder.blocks."),
        num_heads=_heads(dim, ENCODER_HEAD_DIM, "encoder"),
        mlp_ratio=_shape(state, "encoder.blocks.0.mlp.fc1.weight")[0] / dim,
    )
    cfg = M2D2Config(encoder=encoder)
    if "predictor.embed.weight" in state:
        width = _shape(state, "predictor.embed.weight")[0]
        cfg.predictor = PredictorConfig(
            embed_dim=width,
            depth=_indices(state, "predictor.blocks."),
            num_heads=_heads(width, PREDICTOR_HEAD_DIM, "predictor"),
            mlp_ratio=_shape(state, "predictor.blocks.0.mlp.fc1.weight")[0] / width,
        )
    if "audio_proj.sem_token" in state:
        cfg.projector = ProjectorConfig(
            depth=_indices(state, "audio_proj.sem_blocks."),
            mlp_ratio=_shape(state, "audio_proj.sem_blocks.0.mlp.fc1.weight")[0] / dim,
        )
    if "text_proj.weight" in state:
        raise ValueError(
            f"the checkpoint maps {state['text_proj.weight'].shape[1]}-d offline sentence embeddings (text_proj); "
            "which sentence encoder made them is not recorded in the weights: pass a config naming it"
        )
    if any(k.startswith("text_encoder.") for k in state):
        cfg.text = TextConfig(mode="transformers", encoder=_infer_bert(state, tokenizer))
    norm = state.get("norm_stats")
    cfg.norm_mean, cfg.norm_std = (float(v) for v in norm) if norm is not None else REFERENCE_NORM_STATS
    return cfg


def _infer_bert(state: Mapping[str, torch.Tensor], tokenizer: str | None) -> TransformersTextConfig:
    p = "text_encoder.model."
    if f"{p}encoder.layer.0.attention.self.query.weight" not in state:
        raise ValueError("the checkpoint's text encoder is not BERT-shaped; pass a config naming it")
    if tokenizer is None:
        raise ValueError("the checkpoint holds a text encoder: pass its tokenizer directory (tokenizer=..., "
                         "CLI --tokenizer; e.g. a local bert-base-uncased) or a config naming it")
    vocab, hidden = _shape(state, f"{p}embeddings.word_embeddings.weight")
    positions = _shape(state, f"{p}embeddings.position_embeddings.weight")[0]
    return TransformersTextConfig(
        config={
            "model_type": "bert",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": _indices(state, f"{p}encoder.layer."),
            "num_attention_heads": _heads(hidden, TEXT_HEAD_DIM, "text encoder"),
            "intermediate_size": _shape(state, f"{p}encoder.layer.0.intermediate.dense.weight")[0],
            "max_position_embeddings": positions,
            "type_vocab_size": _shape(state, f"{p}embeddings.token_type_embeddings.weight")[0],
        },
        tokenizer_path=tokenizer,
        max_length=min(TransformersTextConfig.max_length, positions),
    )


# ----------------------------------------------------------------------------- building
def _part(key: str) -> str | None:
    return next((p for p in OPTIONAL_PARTS if key.startswith(p)), None)


def _check_against(model: M2D2, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys and shapes of the checkpoint versus the model a config builds; returns the parts left fresh."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        hint = ""
        if any(k.startswith("text_encoder.") for k in unexpected):
            hint = " (the checkpoint holds a text encoder: use a config with text.mode='transformers')"
        elif any(k.startswith("text_proj.") for k in unexpected):
            hint = " (the checkpoint maps its text side with text_proj: set text.offline.dim to its input width)"
        problems.append(f"not in the model{hint}: {key_list(unexpected)}")
    missing = sorted(set(expected) - set(state))
    present = {_part(k) for k in state}
    fresh = sorted({_part(k) for k in missing} - present - {None})  # a part may be absent, never half there
    missing = [k for k in missing if _part(k) not in fresh]
    if missing:
        problems.append(f"missing from the checkpoint: {key_list(missing)}")
    if "text_proj." in fresh and model.text_encoder is not None and any(k.startswith("text_encoder.") for k in state):
        problems.append(f"the text encoder's width {model.text_encoder.dim} needs a text_proj to the "
                        f"{model.config.clap_dim}-d CLAP space, which the checkpoint lacks")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {shape}" for k, shape in expected.items()
                  if k in state and tuple(state[k].shape) != shape]
    if mismatched:
        problems.append("shapes (checkpoint vs config): " + "; ".join(mismatched[:8])
                        + (f"; ... ({len(mismatched) - 8} more)" if len(mismatched) > 8 else ""))
    if "encoder.pos_embed" in state and tuple(state["encoder.pos_embed"].shape) != expected["encoder.pos_embed"]:
        f, t = model.config.encoder.grid
        problems.append(f"the config's grid is {f}x{t} patches; the checkpoint's pos_embed holds "
                        f"{state['encoder.pos_embed'].shape[1] - 1} (set encoder.input_frames / patch_size)")
    if problems:
        raise ValueError("config does not match the checkpoint: " + "; ".join(problems))
    return fresh


def build_model(
    mapped: MappedState,
    config: M2D2Config | None = None,
    *,
    tokenizer: str | None = None,
    norm_stats: tuple[float, float] | None = None,
    seed: int = 0,
) -> Conversion:
    """An M2D2 model holding the mapped weights; the predictor and target are built only if the checkpoint has them.

    Normalisation statistics: ``norm_stats`` if given, else the checkpoint's, else the reference loaders'
    default [-7.1, 4.2] (or the given config's values). Parts the checkpoint lacks as a whole (projector, text
    side, logit scale) keep an initialisation seeded by ``seed``, so a conversion is reproducible.
    """
    state = dict(mapped.state)
    cfg = copy.deepcopy(config) if config is not None else infer_config(state, tokenizer=tokenizer)
    source = "checkpoint"
    if norm_stats is not None:
        if "norm_stats" in state and not torch.allclose(state["norm_stats"].float(), torch.tensor(norm_stats)):
            log.warning("overriding the checkpoint's norm_stats %s with %s", state["norm_stats"].tolist(), norm_stats)
        state["norm_stats"], source = torch.tensor([float(v) for v in norm_stats]), "given"
    elif "norm_stats" not in state:
        state["norm_stats"] = torch.tensor([cfg.norm_mean, cfg.norm_std])
        source = "not in the checkpoint: " + ("reference default" if config is None else "config")
    cfg.norm_mean, cfg.norm_std = (float(v) for v in state["norm_stats"])
    with_m2d = any(k.startswith(("predictor.", "target.")) for k in state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = M2D2(cfg, with_m2d=with_m2d)
    fresh = _check_against(model, state)
    model.load_state_dict(state, strict=False)
    model.eval()
    return Conversion(model=model, layout=mapped.layout, dropped=mapped.dropped, fresh=fresh, norm_stats_source=source)


def convert(
    src: str | os.PathLike,
    config: M2D2Config | None = None,
    *,
    layout: str = "auto",
    tokenizer: str | None = None,
    norm_stats: tuple[float, float] | None = None,
    drop: Iterable[str] = (),
) -> Conversion:
    """Read a reference checkpoint and build the M2D2 model holding it (nothing is written)."""
    state, extras = load_state(src)
    mapped = to_m2d2(state, layout, drop)
    result = build_model(mapped, config, tokenizer=tokenizer, norm_stats=norm_stats)
    result.extras = extras
    return result


def convert_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: M2D2Config | None = None,
    *,
    layout: str = "auto",
    tokenizer: str | None = None,
    norm_stats: tuple[float, float] | None = None,
    drop: Iterable[str] = (),
) -> M2D2:
    """Convert a reference checkpoint and ``save_pretrained`` it to ``out_dir`` (local dir or ``s3://`` prefix).

    ``layout`` is ``"auto"`` (detected from the keys) or one of ``encoder``, ``pretrain``, ``clap2025``, ``evar``.
    ``config`` (optional) is checked against the weights; without one it is inferred (:func:`infer_config`).
    ``drop`` lists source-key prefixes to leave out deliberately (e.g. ``offline_predictor.``). The returned
    model still holds a pre-training checkpoint's predictor and target; the export, as always, does not.
    """
    result = convert(src, config, layout=layout, tokenizer=tokenizer, norm_stats=norm_stats, drop=drop)
    log.info("converted %s\n%s", src, result.summary())
    result.model.save_pretrained(str(out_dir))
    return result.model


# ----------------------------------------------------------------------------- command line
def _config_arg(value: str) -> M2D2Config:
    """A preset name, or a JSON file with an M2D2 config (bare, or a ``config.json`` of ``save_pretrained``)."""
    if not value.endswith(".json") and not Path(value).exists():
        from m2d2.models.presets import model_config

        return model_config(value)
    data = json.loads(Path(value).read_text())
    return M2D2Config.from_dict(data["config"] if "format" in data else data)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="reference .pth / .safetensors file (local path or URI)")
    parser.add_argument("out_dir", help="output directory (or s3:// prefix) for save_pretrained")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="checkpoint layout")
    parser.add_argument("--config", help="preset name or config JSON; default: inferred from tensor shapes")
    parser.add_argument("--tokenizer", help="tokenizer directory for a checkpoint with a text encoder")
    parser.add_argument("--norm-stats", nargs=2, type=float, metavar=("MEAN", "STD"),
                        help="override the normalisation statistics (default: the checkpoint's)")
    parser.add_argument("--drop", action="append", default=[], metavar="PREFIX",
                        help="leave out source keys with this prefix (repeatable)")


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        config = _config_arg(args.config) if args.config else None
        result = convert(args.checkpoint, config, layout=args.layout, tokenizer=args.tokenizer,
                         norm_stats=tuple(args.norm_stats) if args.norm_stats else None, drop=args.drop)
        result.model.save_pretrained(args.out_dir)
    except (ValueError, OSError) as exc:  # CheckpointFormatError is a ValueError; OSError: missing, unreadable
        from m2d2.redaction import redact_url  # the checkpoint may be named by a URL with credentials

        print(f"m2d2 convert: error: {redact_url(' '.join(str(exc).split()))}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"saved to {args.out_dir}")
    return 0


def main_convert(argv: Sequence[str]) -> int:
    """``m2d2 convert CKPT OUTDIR [options]``."""
    parser = argparse.ArgumentParser(prog="m2d2 convert", description="Import a released reference M2D checkpoint.")
    add_convert_arguments(parser)
    return cmd_convert(parser.parse_args(list(argv)))
