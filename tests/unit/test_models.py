"""M2D2 model core: shapes and counts of the paper preset, masking, EMA, losses, stages, persistence (the paper
model's forward pass on 10 s of audio, several seconds on CPU, is in tests/integration/test_models.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m2d2.models import (
    M2D2,
    TRAINABLE,
    ClipLoss,
    M2D2Config,
    ema_decay,
    norm_mse_loss,
    random_structured_mask,
    random_unstructured_mask,
)
from m2d2.models.pos_embed import sincos_1d, sincos_2d
from m2d2.presets import model_config
from tests.helpers import MINILM, tiny_bert, tiny_config


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_model() -> M2D2:
    torch.manual_seed(0)
    return M2D2(model_config("paper")).eval()


# ----------------------------------------------------------------------------- paper preset facts
def test_paper_parameter_counts(paper_model):
    enc, pred = paper_model.encoder, paper_model.predictor
    assert n_params(enc) == 85_254_144
    assert n_params(enc) + enc.pos_embed.numel() == 85_400_832  # with the fixed 191x768 table
    assert n_params(pred) == 26_008_320
    assert n_params(pred) + pred.pos_embed.numel() == 26_106_112
    assert abs(n_params(paper_model.audio_proj) - 3.55e6) < 0.01e6
    assert n_params(paper_model.target) == n_params(enc) - n_params(enc.patch_embed) - enc.cls_token.numel()
    assert not enc.pos_embed.requires_grad and tuple(enc.pos_embed.shape) == (1, 191, 768)
    assert tuple(pred.pos_embed.shape) == (1, 191, 512)


def test_paper_clap_dim_and_text_map(paper_model):
    cfg = paper_model.config
    assert cfg.clap_dim == 768 and cfg.encoder.grid == (5, 38)
    assert isinstance(paper_model.text_proj, torch.nn.Linear)
    assert tuple(paper_model.text_proj.weight.shape) == (768, 4096)  # NV-Embed-v2 -> 768
    with torch.no_grad():
        assert paper_model.encode_clap_text(torch.randn(3, 4096)).shape == (3, 768)


def test_paper_masking_split_in_forward(paper_model):
    mask = random_unstructured_mask(4, paper_model.config.encoder.num_patches, 0.7)
    assert mask.ids_keep.shape == (4, 57) and mask.ids_masked.shape == (4, 133)
    assert random_unstructured_mask(1, 190, 0.6).num_visible == 76
    assert random_unstructured_mask(1, 190, 0.75).num_visible == 47


def test_demo_preset_matches_minilm():
    cfg = model_config("demo")
    assert cfg.clap_dim == cfg.text.offline.dim == 384
    assert cfg.encoder.input_frames < 608
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        model_config("huge")


def test_config_round_trip():
    cfg = model_config("paper")
    again = M2D2Config.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.encoder.patch_size, tuple)
    with pytest.raises(ValueError, match="encoder.widht: unknown key; known: n_mels, input_frames"):
        M2D2Config.from_dict({"encoder": {"widht": 3}})


# ----------------------------------------------------------------------------- positions and masking
def test_sincos_layout_time_first_cls_zero():
    table = sincos_2d(16, grid_f=3, grid_t=5)[0]
    assert table.shape == (16, 16) and torch.all(table[0] == 0)
    patches = table[1:].reshape(3, 5, 16)
    # Same time column -> same first half; same frequency row -> same second half.
    assert torch.allclose(patches[0, :, :8], patches[2, :, :8])
    assert torch.allclose(patches[:, 0, 8:], patches[:, 4, 8:])
    assert torch.allclose(patches[1, :, :8], sincos_1d(8, torch.arange(5)).float())
    assert torch.allclose(patches[:, 2, 8:], sincos_1d(8, torch.arange(3)).float())


def test_unstructured_mask_is_a_partition_per_sample():
    gen = torch.Generator().manual_seed(0)
    mask = random_unstructured_mask(8, 190, 0.7, gen)
    both = torch.cat([mask.ids_keep, mask.ids_masked], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(190).expand(8, -1))
    assert not torch.equal(mask.ids_keep[0].sort().values, mask.ids_keep[1].sort().values)
    restored = torch.gather(torch.cat([mask.ids_keep, mask.ids_masked], 1), 1, mask.ids_restore)
    assert torch.equal(restored, torch.arange(190).expand(8, -1))
    again = random_unstructured_mask(8, 190, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(again.ids_keep, mask.ids_keep)


@pytest.mark.parametrize(("ratio", "counts", "mean"), [
    # (masked rows, masked columns) the reference's rule allows at 5x38, and its average masked fraction
    (0.3, {(0, 11), (1, 4), (2, 0)}, 0.309),
    (0.5, {(0, 19), (1, 11), (2, 4), (3, 0)}, 0.484),
])
def test_structured_mask_follows_the_reference_rule(ratio, counts, mean):
    grid = (5, 38)
    seen, ratios = set(), []
    for seed in range(400):
        mask = random_structured_mask(2, grid, ratio, torch.Generator().manual_seed(seed))
        kept = torch.zeros(2, 190, dtype=torch.bool)
        kept.scatter_(1, mask.ids_keep, True)
        kept = kept.reshape(2, 5, 38)
        for sample in kept:
            rows, cols = sample.any(dim=1), sample.any(dim=0)
            assert torch.equal(sample, rows[:, None] & cols[None, :])  # a product set: whole rows/cols masked
        seen.add((int((~kept[0].any(dim=1)).sum()), int((~kept[0].any(dim=0)).sum())))
        ratios.append(mask.ids_masked.shape[1] / 190)
        assert mask.ids_keep.shape[1] + mask.ids_masked.shape[1] == 190
    assert seen == counts
    assert sum(ratios) / len(ratios) == pytest.approx(mean, abs=0.01)  # about nominal, not below it
    assert random_structured_mask(2, grid, 0.0).ids_masked.shape == (2, 0)


# ----------------------------------------------------------------------------- M2D branch
def test_norm_mse_loss_hand_values():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]]])
    standardised = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True)
    assert norm_mse_loss(standardised * 3.0, target).item() == pytest.approx(0.0, abs=1e-6)
    assert norm_mse_loss(-standardised, target).item() == pytest.approx(4.0, abs=1e-6)
    # Prediction orthogonal to the centred target of the first token, aligned with the second: (2 + 0) / 2.
    pred = torch.stack([torch.tensor([1.0, -1.0, -1.0, 1.0]), standardised[0, 1]])[None]
    assert norm_mse_loss(pred, target).item() == pytest.approx(1.0, abs=1e-6)
    # The prediction is not centred: a constant offset changes the loss.
    assert norm_mse_loss(standardised + 5.0, target).item() > 0.5


def test_ema_decay_schedule():
    assert ema_decay(0, 1000, 0.99995, 0.99999) == 0.99995
    assert ema_decay(999, 1000, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-12)
    assert ema_decay(333, 1000, 0.99995, 0.99999) == pytest.approx(0.99995 + 0.00004 * 333 / 999, abs=1e-12)
    assert ema_decay(5000, 1000, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-12)


def test_ema_moves_exactly_the_target_blocks_and_norm(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny)
    model.set_stage("stage1")
    online = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    target = {n: p.detach().clone() for n, p in model.target.named_parameters()}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("target.")}
    # Independent initialisation: the target is not a copy of the online blocks.
    assert not torch.allclose(target["blocks.0.attn.qkv.weight"], online["blocks.0.attn.qkv.weight"])
    out = model.after_optimizer_step(step=10, total_steps=21)
    tau = 0.99995 + (0.99999 - 0.99995) * 10 / 20
    assert out["ema_decay"] == pytest.approx(tau)
    for name, param in model.target.named_parameters():
        expected = tau * target[name] + (1 - tau) * online[name]
        torch.testing.assert_close(param, expected, atol=1e-7, rtol=0)
        assert not torch.equal(param, target[name]) or torch.equal(target[name], online[name])
    for name, param in model.named_parameters():
        if not name.startswith("target.") and name != "logit_scale":
            assert torch.equal(param, others[name]), name  # EMA never touches the online side
    assert not any(p.requires_grad for p in model.target.parameters())


def test_stage1_forward_loss_parts_and_weights(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny)
    model.set_stage("stage1")
    lms = torch.randn(4, 80, 64) * 3 - 5
    text = torch.randn(4, 48)
    out = model(lms, text, generator=torch.Generator().manual_seed(1))
    lam_m2d, lam_clap = tiny.clap.lambda_m2d, tiny.clap.lambda_clap
    assert out["loss"].item() == pytest.approx(lam_m2d * out["loss_m2d"].item() + lam_clap * out["loss_clap"].item(), rel=1e-6)
    assert 0.0 < out["loss_m2d"].item() < 4.0
    again = model(lms, text, generator=torch.Generator().manual_seed(1))
    assert again["loss"].item() == out["loss"].item()  # masking is reproducible from the generator


# ----------------------------------------------------------------------------- CLAP branch
def test_clip_loss_hand_values():
    feats = torch.eye(2)
    s = 5.0
    loss = ClipLoss()(feats * 3.0, feats, torch.tensor(math.log(s)))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-s)), rel=1e-6)
    # Asymmetric case: compare with a direct evaluation of both cross-entropies.
    audio = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    logits = 2.0 * audio @ text.T
    expected = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert ClipLoss()(audio, text, torch.tensor(math.log(2.0))).item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_gradient_scale_is_identity_forward_and_scales_backward():
    audio = torch.randn(4, 8, requires_grad=True)
    text = torch.randn(4, 8, requires_grad=True)
    scale = torch.tensor(2.0, requires_grad=True)
    grads = {}
    for c in (1.0, 0.25):
        for t in (audio, text, scale):
            t.grad = None
        loss = ClipLoss(feature_grad_scale=c)(audio, text, scale)
        loss.backward()
        grads[c] = (loss.item(), audio.grad.clone(), text.grad.clone(), scale.grad.clone())
    assert grads[1.0][0] == grads[0.25][0]
    torch.testing.assert_close(grads[0.25][1], 0.25 * grads[1.0][1])
    torch.testing.assert_close(grads[0.25][2], 0.25 * grads[1.0][2])
    torch.testing.assert_close(grads[0.25][3], grads[1.0][3])  # the temperature keeps its full gradient


def test_logit_scale_init_and_clamp(tiny):
    model = M2D2(tiny)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert float(model.after_optimizer_step(0, 10)["logit_scale"]) == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def test_projector_starts_with_zero_semantic_token_and_eps(tiny):
    model = M2D2(tiny)
    assert torch.all(model.audio_proj.sem_token == 0)
    assert model.audio_proj.norm.eps == 1e-5 and model.encoder.norm.eps == 1e-6
    block = model.audio_proj.sem_blocks[0]
    assert block.attn.num_heads == 1 and block.mlp.fc1.out_features == 64 and block.attn.qkv.bias is not None


# ----------------------------------------------------------------------------- stages and gradient flow
def _grad_parts(model: M2D2) -> dict[str, bool]:
    parts = {}
    for name in ("encoder", "predictor", "target", "audio_proj", "text_proj", "text_encoder", "logit_scale"):
        part = getattr(model, name)
        if part is None:
            continue
        params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
        if params:
            parts[name] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    return parts


def test_stage1_gradients_reach_exactly_the_stage1_groups(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny)
    model.set_stage("stage1")
    model(torch.randn(4, 80, 64) * 3 - 5, torch.randn(4, 48))["loss"].backward()
    flow = _grad_parts(model)
    assert flow == {"encoder": True, "predictor": True, "target": False, "audio_proj": True,
                    "text_proj": True, "logit_scale": True}
    assert set(model.parameter_groups()) >= set(TRAINABLE["stage1"]) - {"text_encoder"}


def test_stage2_switch_freezes_encoder_and_trains_text_side(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny_config(text_dim=48))
    model.set_stage("stage1")
    model.audio_proj.sem_token.data.fill_(0.5)
    encoder_before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    model.start_stage2(tiny_bert(hidden=64))
    assert model.predictor is None and model.target is None
    assert torch.all(model.audio_proj.sem_token == 0)  # re-initialised projector
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    assert isinstance(model.text_proj, torch.nn.Identity)  # BERT width == CLAP dim: no text projector
    out = model(torch.randn(4, 80, 64) * 3 - 5, ["a dog barks", "rain on a roof", "a bell rings twice", "wind"])
    assert set(out) == {"loss", "loss_clap"}
    out["loss"].backward()
    flow = _grad_parts(model)
    assert flow == {"encoder": False, "audio_proj": True, "text_encoder": True, "logit_scale": True}
    assert all(not p.requires_grad for p in model.encoder.parameters())
    for name, param in model.encoder.named_parameters():
        assert torch.equal(param, encoder_before[name])


def test_stage2_structured_mask_applies_to_the_frozen_encoder(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny_config(input_frames=608 // 2))
    model.start_stage2(tiny_bert(hidden=64))
    seen = []
    handle = model.audio_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    lms = torch.randn(2, 80, 304) * 3 - 5
    model(lms, ["a", "b"], generator=torch.Generator().manual_seed(0))
    model(lms, ["a", "b"], mask_ratio=0.0)
    handle.remove()
    assert seen[0] < 5 * 19 and seen[0] >= 0.7 * 5 * 19 - 1e-9 and seen[1] == 5 * 19


def test_stage2_on_a_shorter_encoder_masks_and_encodes_each_chunk(tiny):
    """M2D2 (stage 2 on stage 1's encoder): crops longer than the encoder go through it in chunks of its length, each
    masked on its own grid; unmasked, the training features are exactly inference's (encode_clap_audio_lms)."""
    from m2d2.models import ChunkMasks

    torch.manual_seed(0)
    model = M2D2(tiny_config(input_frames=64))  # 5 x 4 patches
    model.start_stage2(tiny_bert(hidden=64))
    model.eval()  # no dropout: the two paths must agree exactly
    mask = model.make_mask(3, 96, generator=torch.Generator().manual_seed(0))  # 96 frames = 64 + 32
    assert isinstance(mask, ChunkMasks)
    assert [m.ids_keep.shape[1] + m.ids_masked.shape[1] for m in mask.chunks] == [5 * 4, 5 * 2]
    part = mask.select(slice(1, 2))
    assert [m.ids_keep.shape[0] for m in part.chunks] == [1, 1]
    assert torch.equal(part.chunks[1].ids_keep, mask.chunks[1].ids_keep[1:2])
    assert not isinstance(model.make_mask(3, 64), ChunkMasks)  # within the encoder's length: one mask, as before

    lms = torch.randn(3, 80, 96) * 3 - 5
    seen = []
    handle = model.audio_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    unmasked = model.forward_features(lms, ["a", "b", "c"], model.make_mask(3, 96, mask_ratio=0.0))
    masked = model.forward_features(lms, ["a", "b", "c"], mask)
    handle.remove()
    assert seen == [5 * 4 + 5 * 2, sum(m.num_visible for m in mask.chunks)]
    with torch.no_grad():
        assert torch.allclose(unmasked["audio"], model.encode_clap_audio_lms(lms), atol=1e-6)
    assert masked["audio"].shape == (3, model.config.clap_dim)

    # M2D2^TA (train_audio_encoder): the same chunked path carries gradients into the encoder
    model.train()
    model.encoder.requires_grad_(True)
    out = model.losses({}, *model.forward_features(lms, ["a", "b", "c"], mask).values())
    out["loss"].backward()
    assert _grad_parts(model)["encoder"]


def test_stage1_requires_m2d_heads(tiny):
    with pytest.raises(ValueError, match="with_m2d=True"):
        M2D2(tiny, with_m2d=False).set_stage("stage1")
    with pytest.raises(ValueError, match="start_stage2"):
        M2D2(tiny).set_stage("stage2")


# ----------------------------------------------------------------------------- inference and persistence
def test_chunked_inference_equals_manual_chunking(tiny):
    torch.manual_seed(0)
    model = M2D2(tiny).eval()
    wave = 0.1 * torch.randn(2, 160 * 149, generator=torch.Generator().manual_seed(3))  # 150 log-mel frames
    with torch.inference_mode():
        lms = model.to_log_mel(wave)
        assert lms.shape == (2, 80, 150)
        full = model.encode_frames(wave)
        assert full.shape == (2, 10, 5 * 64)  # 64 + 64 + (22 -> 32) frames -> 4 + 4 + 2 columns
        x = model.normalize(lms)
        manual = []
        for start, stop in ((0, 64), (64, 128), (128, 150)):
            chunk = torch.nn.functional.pad(x[..., start:stop], (0, (-(stop - start)) % 16))
            t = chunk.shape[-1] // 16
            patches = model.encoder.patch_embed(chunk[:, None])
            pos = model.encoder.pos_embed[:, 1:].reshape(1, 5, 4, 64)[:, :, :t].reshape(1, 5 * t, 64)
            tokens = torch.cat([model.encoder.cls(2), patches + pos], 1)
            for block in model.encoder.blocks:
                tokens = block(tokens)
            tokens = model.encoder.norm(tokens)[:, 1:]
            manual.append(tokens.reshape(2, 5, t, 64).permute(0, 2, 1, 3).reshape(2, t, 320))
        torch.testing.assert_close(full, torch.cat(manual, 1), atol=1e-5, rtol=1e-5)
        # A chunk encoded on its own gives the same frames as inside the long input.
        torch.testing.assert_close(model.encode_frames_lms(lms[..., 64:128]), full[:, 4:8], atol=1e-5, rtol=1e-5)
        clap = model.encode_clap_audio(wave)
        assert clap.shape == (2, 64)


def test_short_and_malformed_inputs_fail_clearly(tiny):
    model = M2D2(tiny)
    with pytest.raises(ValueError, match="waveform batch"):
        model.encode_frames(torch.zeros(1, 1, 16000))
    with pytest.raises(ValueError, match="log-mel"):
        model.encoder(torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="16 to 64"):
        model.encoder(torch.zeros(1, 80, 128))


def test_save_load_round_trip_stage1(tmp_path, tiny):
    torch.manual_seed(0)
    model = M2D2(tiny).eval()
    model.set_norm_stats(-7.25, 4.35)
    model.save_pretrained(str(tmp_path / "m"))
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    loaded = M2D2.from_pretrained(str(tmp_path / "m")).eval()
    assert loaded.predictor is None and loaded.target is None
    assert not any(k.startswith(("predictor.", "target.")) for k in loaded.state_dict())
    assert loaded.config.norm_mean == -7.25 and loaded.norm_stats.tolist() == pytest.approx([-7.25, 4.35])
    wave = 0.1 * torch.randn(2, 24000)
    text = torch.randn(2, 48)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_frames(wave), model.encode_frames(wave), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_clap_audio(wave), model.encode_clap_audio(wave), atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_clap_text(text), model.encode_clap_text(text), atol=0, rtol=0)
    assert loaded.logit_scale.item() == model.logit_scale.item()


def test_save_load_round_trip_stage2_with_text_encoder(tmp_path, tiny):
    torch.manual_seed(0)
    model = M2D2(tiny)
    model.start_stage2(tiny_bert(hidden=64))
    model.eval()
    model.save_pretrained(str(tmp_path / "s2"))
    assert (tmp_path / "s2" / "tokenizer").is_dir()
    loaded = M2D2.from_pretrained(str(tmp_path / "s2")).eval()
    assert loaded.config.text.mode == "transformers" and loaded.config.text.encoder.path is None
    captions = ["a dog barks twice", "a long and low organ note can be heard"]
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_clap_text(captions), model.encode_clap_text(captions), atol=0, rtol=0)


def test_from_pretrained_rejects_incomplete_export(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M2D2.from_pretrained(str(tmp_path / "half"))


def test_offline_text_strings_use_the_configured_sentence_encoder():
    from m2d2.inference import attach_text_embedder
    from m2d2.text import OfflineTextEncoder

    cfg = model_config("demo")
    cfg.encoder.depth = 1
    model = M2D2(cfg, with_m2d=False).eval()
    captions = ["a dog barks", "a dog is barking loudly", "soft rain falls on a tin roof"]
    with pytest.raises(RuntimeError, match="m2d2.inference.load_pretrained"):  # models never loads text models
        model.encode_clap_text(captions)
    attach_text_embedder(model)
    with torch.inference_mode():
        emb = model.encode_clap_text(captions)
        direct = OfflineTextEncoder(cfg.text.offline).encode(captions)
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb, direct)  # the demo's text map is the identity (384 = 384)
    sim = F.normalize(direct, dim=-1) @ F.normalize(direct, dim=-1).T
    assert sim[0, 1] > sim[0, 2]  # a real sentence encoder, not noise
    assert cfg.text.offline.path == MINILM


def test_a_text_embedder_is_the_callers_and_never_part_of_the_weights(tiny):
    model = M2D2(tiny, with_m2d=False).eval()
    keys = set(model.state_dict())
    seen = []

    def embedder(texts: list[str]) -> torch.Tensor:
        seen.append(list(texts))
        return torch.ones(len(texts), 48)

    model.set_text_embedder(embedder)
    assert model.text_embedder is embedder and set(model.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_clap_text(["a", "b"]), model.encode_clap_text(torch.ones(2, 48)))
    assert seen == [["a", "b"]]
    model.set_text_embedder(torch.nn.Linear(2, 2))  # even a module stays out of the module tree
    assert set(model.state_dict()) == keys
    model.start_stage2(tiny_bert(hidden=64))
    assert model.text_embedder is None  # stage 2 embeds strings with its own text encoder



def test_one_chunking_rule_for_inference_reports_and_tagging():
    from m2d2.models.chunks import chunk_spans, frame_starts, split_chunks

    assert chunk_spans(1001, 1001, 16) == [(0, 1001)]
    # the reference's tail rule: the frames past the last full chunk are padded to whole patches, never dropped
    assert chunk_spans(1006, 1001, 16) == [(0, 1001), (1001, 1017)]  # 5 frames: one padded patch
    assert chunk_spans(1011, 1001, 16) == [(0, 1001), (1001, 1017)]  # 10 frames: one padded patch
    assert chunk_spans(1001 + 17, 1001, 16) == [(0, 1001), (1001, 1033)]  # 17 frames: two patches
    assert chunk_spans(1001 + 995, 1001, 16) == [(0, 1001), (1001, 2002)]  # a tail longer than 992: a full chunk
    assert chunk_spans(2 * 608 + 1, 608, 16) == [(0, 608), (608, 1216), (1216, 1232)]
    assert chunk_spans(10, 608, 16) == [(0, 16)]  # shorter than a patch: one padded patch
    x = torch.randn(2, 80, 1011)
    chunks = split_chunks(x, 1001, 16)
    assert [c.shape[-1] for c in chunks] == [1001, 16]
    assert torch.equal(chunks[0], x[..., :1001]) and torch.equal(chunks[1][..., :10], x[..., 1001:])
    assert not chunks[1][..., 10:].any()  # padded with the normalised mean
    assert frame_starts(1011, 1001, 16).tolist()[-2:] == [976, 1001] and len(frame_starts(1011, 1001, 16)) == 63
    with pytest.raises(ValueError, match="at least one"):
        chunk_spans(0, 1001, 16)
