"""Import of reference checkpoints: synthetic weights in the four reference layouts, checked against an
independent forward pass that reads the reference key names (nttcslab/m2d's model and runtime code) straight into
timm blocks, not through the converter's key mapping."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from m2d2.convert import UnsafeCheckpointError, convert, convert_checkpoint, main_convert
from m2d2.io import resolve_model_path
from m2d2.models import M2D2, EncoderConfig, M2D2Config, PatchMask, PredictorConfig, TextConfig
from m2d2.models.pos_embed import sincos_2d
from m2d2.models.reference_layout import ReferenceLayoutError, to_m2d2, unwrap
from tests.helpers import MINILM, tiny_bert

D, DEPTH, HEADS = 64, 2, 4  # encoder
PD, PDEPTH, PHEADS = 32, 2, 2  # predictor
N_MELS, PATCH, GRID_F = 80, 16, 5
FRAMES = {38: 608, 62: 1001}  # trained crop length of each reference grid
NORM_STATS = [-7.26178, 4.35115]  # the 2025 release's values
TOL = 1e-5


# ----------------------------------------------------------------------------- synthetic reference weights
def rnd(g: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def block_weights(g: torch.Generator, prefix: str, dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """One timm Block's 12 keys, all random (LayerNorm too) so that any swapped key changes the output."""
    return {
        f"{prefix}norm1.weight": 1 + rnd(g, dim), f"{prefix}norm1.bias": rnd(g, dim),
        f"{prefix}attn.qkv.weight": rnd(g, 3 * dim, dim), f"{prefix}attn.qkv.bias": rnd(g, 3 * dim),
        f"{prefix}attn.proj.weight": rnd(g, dim, dim), f"{prefix}attn.proj.bias": rnd(g, dim),
        f"{prefix}norm2.weight": 1 + rnd(g, dim), f"{prefix}norm2.bias": rnd(g, dim),
        f"{prefix}mlp.fc1.weight": rnd(g, hidden, dim), f"{prefix}mlp.fc1.bias": rnd(g, hidden),
        f"{prefix}mlp.fc2.weight": rnd(g, dim, hidden), f"{prefix}mlp.fc2.bias": rnd(g, dim),
    }


def stretched_pos_embed(dim: int, grid_t: int) -> torch.Tensor:
    """The 38-column sin-cos table, bicubic-resampled in time as the 1001-frame releases store it."""
    table = sincos_2d(dim, GRID_F, 38)
    if grid_t == 38:
        return table
    patches = resample_abs_pos_embed(table[:, 1:], new_size=(GRID_F, grid_t), old_size=(GRID_F, 38),
                                     num_prefix_tokens=0, interpolation="bicubic", antialias=False)
    return torch.cat([table[:, :1], patches], dim=1)


def encoder_weights(grid_t: int, seed: int = 0, norm_stats: bool = True) -> dict[str, torch.Tensor]:
    """A bare reference encoder state dict (``*_enconly`` layout, as nttcslab/m2d util/to_encoder_only_weight.py)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": rnd(g, 1, 1, D, scale=0.02),
        "pos_embed": stretched_pos_embed(D, grid_t),
        "patch_embed.proj.weight": rnd(g, D, 1, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rnd(g, D),
    }
    for i in range(DEPTH):
        sd.update(block_weights(g, f"blocks.{i}.", D, 4 * D))
    sd.update({"norm.weight": 1 + rnd(g, D), "norm.bias": rnd(g, D)})
    if norm_stats:
        sd["norm_stats"] = torch.tensor(NORM_STATS)
    return sd


def m2d_heads(grid_t: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Predictor (``decoder_*``, ``mask_token``) and EMA target (``target_*``) keys of a pre-training state dict."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "mask_token": rnd(g, 1, 1, PD, scale=0.02),
        "decoder_pos_embed": sincos_2d(PD, GRID_F, grid_t),
        "decoder_embed.weight": rnd(g, PD, D), "decoder_embed.bias": rnd(g, PD),
        "decoder_norm.weight": 1 + rnd(g, PD), "decoder_norm.bias": rnd(g, PD),
        "decoder_pred.weight": rnd(g, D, PD), "decoder_pred.bias": rnd(g, D),
        "target_norm.weight": 1 + rnd(g, D), "target_norm.bias": rnd(g, D),
    }
    for i in range(PDEPTH):
        sd.update(block_weights(g, f"decoder_blocks.{i}.", PD, 4 * PD))
    for i in range(DEPTH):
        sd.update(block_weights(g, f"target_blocks.{i}.", D, 4 * D))
    return sd


def projector_weights(seed: int = 2) -> dict[str, torch.Tensor]:
    """2025 ``AudioToSemantic``: semantic token, one 1-head block with mlp-ratio 1, LayerNorm (15 keys)."""
    g = torch.Generator().manual_seed(seed)
    return {"audio_proj.sem_token": rnd(g, 1, 1, D), **block_weights(g, "audio_proj.sem_blocks.0.", D, D),
            "audio_proj.norm.weight": 1 + rnd(g, D), "audio_proj.norm.bias": rnd(g, D)}


def nnaudio_buffers(prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}mel_basis": torch.rand(80, 201), f"{prefix}stft.wsin": torch.rand(201, 1, 400),
            f"{prefix}stft.wcos": torch.rand(201, 1, 400), f"{prefix}stft.window_mask": torch.ones(400)}


def bert_fields() -> dict:
    fields = dict(tiny_bert(D).config)
    fields.pop("model_type")
    return fields


def bert_weights(seed: int = 3) -> dict[str, torch.Tensor]:
    """A BertModel state dict with its pooler (the reference keeps it) and an old-style ``position_ids``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    sd = BertModel(BertConfig(**bert_fields())).state_dict()
    sd["embeddings.position_ids"] = torch.arange(bert_fields()["max_position_embeddings"])[None]
    return sd


def reference_checkpoint(layout: str, grid_t: int) -> object:
    """The object the reference code would have saved, in its checkpoint layouts."""
    enc = encoder_weights(grid_t)
    if layout == "encoder":
        return enc
    if layout == "pretrain":
        args = argparse.Namespace(model="m2d_vit_base", input_size=[80, FRAMES[grid_t]], mask_ratio=0.7)
        return {"model": {**enc, **m2d_heads(grid_t)}, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
                "epoch": 299, "scaler": {"scale": 65536.0, "_growth_tracker": 3}, "args": args}
    if layout == "clap2025":
        model = {f"backbone.{k}": v for k, v in {**enc, **projector_weights()}.items()}
        model.update(nnaudio_buffers("to_spec."))
        model.update({f"text_encoder.text_encoder.{k}": v for k, v in bert_weights().items()})
        model["logit_scale"] = torch.tensor(4.6052)  # 0-dim, as in the reference
        return {"model": model, "epoch": 30}
    if layout == "evar":
        sd = {f"module.ar.runtime.backbone.{k}": v for k, v in {**enc, **projector_weights()}.items()}
        sd.update(nnaudio_buffers("module.ar.runtime.to_spec."))
        sd.update({"module.head.norm.running_mean": torch.zeros(GRID_F * D),
                   "module.head.norm.running_var": torch.ones(GRID_F * D),
                   "module.head.norm.num_batches_tracked": torch.tensor(7),
                   "module.head.mlp.mlp.0.weight": torch.randn(527, GRID_F * D) * 0.01,
                   "module.head.mlp.mlp.0.bias": torch.zeros(527)})
        return sd
    raise ValueError(layout)


def small_config(grid_t: int, text: TextConfig | None = None) -> M2D2Config:
    cfg = M2D2Config(encoder=EncoderConfig(input_frames=FRAMES[grid_t], embed_dim=D, depth=DEPTH, num_heads=HEADS),
                     predictor=PredictorConfig(embed_dim=PD, depth=PDEPTH, num_heads=PHEADS))
    if text is not None:
        cfg.text = text
    return cfg


def bert_text() -> TextConfig:
    return TextConfig(mode="transformers", encoder=tiny_bert(D))


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------- independent reference forward
def blocks_from(sd: dict, prefix: str, depth: int, dim: int, heads: int, mlp_ratio: float, eps: float | None) -> list:
    norm = nn.LayerNorm if eps is None else partial(nn.LayerNorm, eps=eps)
    blocks = []
    for i in range(depth):
        block = Block(dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
        p = f"{prefix}{i}."
        block.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, strict=True)
        blocks.append(block.eval())
    return blocks


def run(blocks: list, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def ref_embed(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS + its zero position, patch tokens + the first t columns of pos_embed) for normalised ``[B, 80, T]``."""
    y = F.conv2d(x[:, None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    f, t = y.shape[-2:]
    grid_t = (sd["pos_embed"].shape[1] - 1) // f
    pos = sd["pos_embed"][:, 1:].reshape(1, f, grid_t, D)[:, :, :t].reshape(1, f * t, D)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    return cls, y.flatten(2).transpose(1, 2) + pos


def ref_encode(sd: dict, cls: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    x = run(blocks_from(sd, "blocks.", DEPTH, D, HEADS, 4.0, 1e-6), torch.cat([cls, tokens], dim=1))
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def ref_chunks(sd: dict, lms: torch.Tensor, unit: int) -> list[torch.Tensor]:
    """Reference inference (nttcslab/m2d m2d/runtime_audio.py): normalise, pad so that ``T mod unit`` is a multiple of 16, split
    into chunks of ``unit`` frames (frames beyond a chunk's last whole patch are dropped); patch tokens per chunk."""
    x = (lms - sd["norm_stats"][0]) / sd["norm_stats"][1]
    x = F.pad(x, (0, -(x.shape[-1] % unit) % PATCH))
    return [ref_encode(sd, *ref_embed(sd, c))[:, 1:] for c in x.split(unit, dim=-1) if c.shape[-1] >= PATCH]


def ref_frames(sd: dict, lms: torch.Tensor, unit: int) -> torch.Tensor:
    """Frame features ``[B, T, F*D]``: ``b (f t) d -> b t (f d)`` per chunk, concatenated in time."""
    frames = []
    for tok in ref_chunks(sd, lms, unit):
        b, n, d = tok.shape
        frames.append(tok.reshape(b, GRID_F, n // GRID_F, d).permute(0, 2, 1, 3).reshape(b, n // GRID_F, GRID_F * d))
    return torch.cat(frames, dim=1)


def ref_clap_audio(sd: dict, lms: torch.Tensor, unit: int) -> torch.Tensor:
    """2025 projector over every patch token of every chunk: semantic token first, torch-default LayerNorm eps."""
    tokens = torch.cat(ref_chunks(sd, lms, unit), dim=1)
    x = torch.cat([sd["audio_proj.sem_token"].expand(tokens.shape[0], -1, -1), tokens], dim=1)
    x = run(blocks_from(sd, "audio_proj.sem_blocks.", 1, D, 1, 1.0, None), x)
    return F.layer_norm(x[:, 0], (D,), sd["audio_proj.norm.weight"], sd["audio_proj.norm.bias"])


def ref_predictor(sd: dict, visible: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """MAE decoder as patched by M2D: embed, append mask tokens, unshuffle, + positions, blocks, norm, pred."""
    x = F.linear(visible, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    restore = torch.argsort(torch.cat([keep, masked], dim=1), dim=1)
    patches = torch.cat([x[:, 1:], sd["mask_token"].expand(x.shape[0], masked.shape[1], -1)], dim=1)
    patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, PD))
    x = torch.cat([x[:, :1], patches], dim=1) + sd["decoder_pos_embed"]
    x = run(blocks_from(sd, "decoder_blocks.", PDEPTH, PD, PHEADS, 4.0, 1e-6), x)
    x = F.layer_norm(x, (PD,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    x = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]
    return torch.gather(x, 1, masked[..., None].expand(-1, -1, D))


def gather(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def raw_lms(frames: int, batch: int = 2, seed: int = 5) -> torch.Tensor:
    """Un-normalised log-mel of about the reference's statistics."""
    return -7.0 + 4.0 * torch.randn(batch, N_MELS, frames, generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def flat(obj: object) -> dict[str, torch.Tensor]:
    """The reference-named weights inside a checkpoint object, wrapper prefixes removed (for the reference pass)."""
    state = obj.get("model", obj)
    out = {}
    for key, value in state.items():
        for prefix in ("module.ar.runtime.backbone.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ----------------------------------------------------------------------------- frame features, every layout
CASES = [("encoder", 38), ("encoder", 62), ("pretrain", 38), ("clap2025", 62), ("evar", 62), ("evar", 38)]


@pytest.mark.parametrize(("layout", "grid_t"), CASES)
def test_frames_match_reference_forward(tmp_path, layout, grid_t):
    obj = reference_checkpoint(layout, grid_t)
    assert to_m2d2(unwrap(obj)[0]).layout == layout  # detected from the keys alone
    text = bert_text() if layout == "clap2025" else None
    model = convert_checkpoint(save(obj, tmp_path / "ckpt.pth"), tmp_path / "out", small_config(grid_t, text))
    sd = flat(obj)
    assert torch.equal(model.encoder.pos_embed, sd["pos_embed"])  # the checkpoint's table, never regenerated
    assert torch.equal(model.norm_stats, torch.tensor(NORM_STATS))

    lms = raw_lms(1001)  # 10 s
    with torch.no_grad():
        ref = ref_frames(sd, lms, unit=FRAMES[grid_t])
        got = model.encode_frames_lms(lms)
        exported = M2D2.from_pretrained(str(tmp_path / "out")).eval().encode_frames_lms(lms)
    # Fact sheet 1.3: 10 s gives 63 frames with the 608 weights, 62 with the 1001 weights (9 frames dropped).
    assert ref.shape == (2, 63 if grid_t == 38 else 62, GRID_F * D)
    assert got.shape == ref.shape
    assert maxdiff(got, ref) <= TOL
    assert maxdiff(exported, got) == 0.0


def test_1001_frame_weights_keep_their_stretched_table_and_match_on_whole_chunks(tmp_path):
    obj = reference_checkpoint("encoder", 62)
    assert maxdiff(obj["pos_embed"], sincos_2d(D, GRID_F, 62)) > 0.1  # not a 62-column sin-cos table
    model = convert_checkpoint(save(obj, tmp_path / "ckpt.pth"), tmp_path / "out", small_config(62))
    lms = raw_lms(1001 + 400)  # one whole chunk (9 frames unused), then a shorter one with truncated positions
    with torch.no_grad():
        ref = ref_frames(obj, lms, unit=1001)
        got = model.encode_frames_lms(lms)
        first = ref_frames(obj, lms[..., :1001], unit=1001)
    assert model.config.encoder.input_frames == 1001
    assert got.shape == ref.shape == (2, 62 + 25, GRID_F * D)  # 1401 -> 1408 -> 1001 + 407 -> 62 + 25 columns
    assert maxdiff(got, ref) <= TOL and maxdiff(got[:, :62], first) <= TOL


def test_pretrain_checkpoint_loads_predictor_and_target(tmp_path):
    obj = reference_checkpoint("pretrain", 38)
    result = convert(save(obj, tmp_path / "ckpt.pth"), small_config(38))  # args Namespace: read safely
    model, sd = result.model, obj["model"]
    assert result.layout == "pretrain" and result.extras == ["args", "epoch", "optimizer", "scaler"]
    assert result.fresh == ["audio_proj.", "logit_scale", "text_proj."]
    assert torch.equal(model.predictor.pos_embed, sd["decoder_pos_embed"])

    g = torch.Generator().manual_seed(9)
    x = (raw_lms(608) - sd["norm_stats"][0]) / sd["norm_stats"][1]
    ids = torch.argsort(torch.rand(2, GRID_F * 38, generator=g), dim=1)
    keep, masked = ids[:, :57], ids[:, 57:]
    with torch.no_grad():
        cls, tokens = ref_embed(sd, x)
        ref_visible = ref_encode(sd, cls, gather(tokens, keep))
        target_in = torch.cat([cls, gather(tokens, masked)], dim=1)
        ref_target = run(blocks_from(sd, "target_blocks.", DEPTH, D, HEADS, 4.0, 1e-6), target_in)
        ref_target = F.layer_norm(ref_target, (D,), sd["target_norm.weight"], sd["target_norm.bias"], eps=1e-6)
        ref_pred = ref_predictor(sd, ref_visible, keep, masked)

        embedded = model.encoder.embed(x)
        visible = model.encoder.forward_tokens(embedded, keep)
        target = model.target(torch.cat([model.encoder.cls(2), gather(embedded, masked)], dim=1))
        pred = model.predictor(visible, PatchMask(ids_keep=keep, ids_masked=masked))
        losses = model(raw_lms(608), torch.randn(2, model.config.text.offline.dim))
    assert maxdiff(visible, ref_visible) <= TOL
    assert maxdiff(target, ref_target) <= TOL
    assert maxdiff(pred, ref_pred) <= TOL
    assert torch.isfinite(losses["loss"])  # stage 1 can go on from the reference weights


# ----------------------------------------------------------------------------- CLAP 2025 layout
@pytest.mark.parametrize(("grid_t", "frames"), [(62, 992), (38, 1001)])
def test_clap2025_text_and_audio_embeddings(tmp_path, grid_t, frames):
    from transformers import AutoTokenizer, BertConfig, BertModel

    obj = reference_checkpoint("clap2025", grid_t)
    out = tmp_path / "out"
    result = convert(save(obj, tmp_path / "ckpt.pth"), small_config(grid_t, bert_text()))
    model = result.model
    assert result.fresh == []
    assert result.dropped == {"to_spec.": 4, "text_encoder.text_encoder.pooler.": 2,
                              "text_encoder.text_encoder.embeddings.position_ids": 1}
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(4.6052)
    model.save_pretrained(str(out))
    reloaded = M2D2.from_pretrained(str(out)).eval()

    captions = ["a dog barks twice", "rain on a tin roof while thunder rolls in the distance"]
    bert = BertModel(BertConfig(**bert_fields())).eval()
    prefix = "text_encoder.text_encoder."
    bert.load_state_dict({k[len(prefix):]: v for k, v in obj["model"].items()
                          if k.startswith(prefix) and not k.endswith("position_ids")}, strict=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    lms = raw_lms(frames)  # lengths where both chunkings cut at the same frames
    with torch.no_grad():
        ref_text = bert(**tokenizer(captions, padding="longest", return_tensors="pt")).last_hidden_state[:, 0]
        ref_audio = ref_clap_audio(flat(obj), lms, unit=FRAMES[grid_t])
        text, audio = model.encode_clap_text(captions), model.encode_clap_audio_lms(lms)
        assert maxdiff(reloaded.encode_clap_text(captions), text) == 0.0
        assert maxdiff(reloaded.encode_clap_audio_lms(lms), audio) == 0.0
    assert maxdiff(text, ref_text) <= TOL
    assert maxdiff(audio, ref_audio) <= TOL
    assert torch.equal(reloaded.logit_scale, model.logit_scale)


def test_clap2025_config_inferred_from_shapes(tmp_path):
    path = save(reference_checkpoint("clap2025", 62), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="tokenizer"):
        convert(path)
    cfg = convert(path, tokenizer=MINILM).model.config
    assert cfg.encoder.grid == (GRID_F, 62) and cfg.encoder.patch_size == (16, 16)
    assert (cfg.encoder.embed_dim, cfg.encoder.depth, cfg.encoder.mlp_ratio) == (D, DEPTH, 4.0)
    assert cfg.encoder.num_heads == D // 64  # not in the weights: the released 64-d heads
    assert (cfg.projector.depth, cfg.projector.num_heads, cfg.projector.mlp_ratio) == (1, 1, 1.0)
    bert = cfg.text.encoder.config
    assert cfg.text.mode == "transformers" and cfg.text.encoder.tokenizer_path == MINILM
    assert (bert["hidden_size"], bert["num_hidden_layers"], bert["intermediate_size"]) == (D, 1, 2 * D)
    assert (bert["vocab_size"], bert["max_position_embeddings"]) == (30522, 128)
    assert [cfg.norm_mean, cfg.norm_std] == pytest.approx(NORM_STATS)


# ----------------------------------------------------------------------------- formats, config, errors
def test_safetensors_input_and_inferred_encoder_config(tmp_path):
    sd = encoder_weights(62, norm_stats=False)
    path = tmp_path / "enc.safetensors"
    save_file(sd, str(path))
    result = convert(path)
    cfg = result.model.config.encoder
    assert (cfg.embed_dim, cfg.depth, cfg.grid, cfg.input_frames, cfg.num_heads) == (D, DEPTH, (5, 62), 1001, 1)
    assert result.norm_stats_source == "not in the checkpoint: reference default"
    assert result.model.norm_stats.tolist() == pytest.approx([-7.1, 4.2])
    model = convert(path, small_config(62)).model
    with torch.no_grad():
        sd["norm_stats"] = torch.tensor([-7.1, 4.2])
        assert maxdiff(model.encode_frames_lms(raw_lms(992)), ref_frames(sd, raw_lms(992), 1001)) <= TOL


def test_checkpoint_from_a_uri(tmp_path):
    import fsspec

    obj = reference_checkpoint("encoder", 38)
    with fsspec.open("memory://bucket/enc.pth", "wb") as handle:
        torch.save(obj, handle)
    model = convert_checkpoint("memory://bucket/enc.pth", "memory://bucket/out", small_config(38))
    reloaded = M2D2.from_pretrained("memory://bucket/out").eval()
    with torch.no_grad():
        assert maxdiff(reloaded.encode_frames_lms(raw_lms(608)), model.encode_frames_lms(raw_lms(608))) == 0.0
        assert maxdiff(model.encode_frames_lms(raw_lms(608)), ref_frames(obj, raw_lms(608), 608)) <= TOL


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this object would call ``_touch``: what an unsafe ``torch.load`` would execute."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "executed"
    path = save({"model": encoder_weights(38), "extra": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle.*_touch"):
        convert(path, small_config(38))
    assert not marker.exists()
    assert main_convert([str(path), str(tmp_path / "out")]) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_and_missing_keys_are_listed(tmp_path):
    sd = encoder_weights(38)
    with pytest.raises(ReferenceLayoutError, match=r"foo\.weight"):
        convert(save({**sd, "foo.weight": torch.zeros(1)}, tmp_path / "a.pth"), small_config(38))
    clap2024 = {**sd, **m2d_heads(38), "audio_proj.0.weight": torch.zeros(D, D), "audio_proj.0.bias": torch.zeros(D),
                "audio_proj.2.weight": torch.zeros(D, D), "audio_proj.2.bias": torch.zeros(D),
                "logit_scale": torch.tensor(2.0)}
    path = save(clap2024, tmp_path / "b.pth")
    with pytest.raises(ReferenceLayoutError, match="2024 M2D-CLAP MLP projector"):
        convert(path, small_config(38))
    kept = convert(path, small_config(38), drop=["audio_proj."])
    assert kept.dropped == {"audio_proj.": 4} and kept.model.logit_scale.item() == 2.0
    incomplete = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: encoder\.blocks\.1\.mlp\.fc2\.bias"):
        convert(save(incomplete, tmp_path / "c.pth"), small_config(38))
    with pytest.raises(ReferenceLayoutError, match="not a known reference checkpoint layout"):
        convert(save({"weight": torch.zeros(1)}, tmp_path / "d.pth"))


def test_config_mismatch_is_an_error(tmp_path):
    path = save(reference_checkpoint("encoder", 62), tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match=r"grid is 5x38 patches; the checkpoint's pos_embed holds 310"):
        convert(path, small_config(38))
    deeper = small_config(62)
    deeper.encoder.depth = 3
    with pytest.raises(ValueError, match=r"missing from the checkpoint: encoder\.blocks\.2\."):
        convert(path, deeper)
    clap = save(reference_checkpoint("clap2025", 62), tmp_path / "clap.pth")
    with pytest.raises(ValueError, match="text.mode='transformers'"):
        convert(clap, small_config(62))
    with pytest.raises(ValueError, match="unknown layout"):
        convert(path, small_config(62), layout="nope")
    with pytest.raises(ReferenceLayoutError, match="do not belong to the 'evar' layout"):
        convert(path, small_config(62), layout="evar")


def test_cli_converts_with_a_config_file(tmp_path, capsys):
    obj = reference_checkpoint("evar", 62)
    path = save(obj, tmp_path / "weights_ep66it3124-0.49058.pth")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small_config(62).to_dict()))
    assert main_convert([str(path), str(tmp_path / "out"), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "layout: evar" in printed and "module.head.* (5)" in printed and "saved to" in printed
    model = M2D2.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert maxdiff(model.encode_frames_lms(raw_lms(992)), ref_frames(flat(obj), raw_lms(992), 1001)) <= TOL
    assert main_convert([str(tmp_path / "missing.pth"), str(tmp_path / "out2")]) == 1
    assert "does not exist" in capsys.readouterr().err
