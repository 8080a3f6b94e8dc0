"""The M2D2 model: audio encoder + M2D heads + CLAP branch, one class for training and inference."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from m2d2 import io
from m2d2.audio import LogMelConfig, LogMelSpectrogram
from m2d2.models.chunks import chunk_spans, split_chunks
from m2d2.models.clap import AudioProjector, ClipLoss
from m2d2.models.config import M2D2Config, TransformersTextConfig
from m2d2.models.encoder import AudioEncoder
from m2d2.models.m2d import Predictor, TargetEncoder, ema_decay, norm_mse_loss
from m2d2.models.masking import ChunkMasks, PatchMask, random_structured_mask, random_unstructured_mask
from m2d2.models.text import TransformersTextEncoder

log = logging.getLogger(__name__)

Stage = Literal["stage1", "stage2"]
FORMAT = "m2d2"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
#: What an export consists of: the only files copied from an object store by :meth:`M2D2.from_pretrained`.
EXPORT_FILES = (CONFIG_FILE, WEIGHTS_FILE, f"{TOKENIZER_DIR}/*")
# Parts that only pre-training needs; exported weights leave them out, training checkpoints keep them.
TRAINING_ONLY = ("predictor.", "target.")
TRAINABLE: dict[str, tuple[str, ...]] = {
    "stage1": ("encoder", "predictor", "audio_proj", "text_proj", "logit_scale"),
    "stage2": ("audio_proj", "text_encoder", "text_proj", "logit_scale"),
}
#: Raw sentence vectors ``[B, D_text]`` of captions (a sentence encoder, a cache lookup). How a stage-1
#: (offline-text) model embeds strings: the caller supplies one (:func:`m2d2.inference.load_pretrained` attaches the
#: configured encoder), so this package never loads a sentence encoder itself.
TextEmbedder = Callable[[list[str]], torch.Tensor]


class M2D2(nn.Module):
    """M2D2 audio-language model.

    Training: ``forward(raw_log_mel, text)`` returns the loss parts of the current stage. Stage 1 is M2D +
    CLAP against precomputed sentence vectors; :meth:`start_stage2` turns a stage-1 model into stage 2
    (frozen encoder, fresh projector, trainable transformers text encoder, CLAP only).

    Inference (16 kHz float waveforms ``[B, S]``, any length): :meth:`encode_frames`, :meth:`encode_clip`,
    :meth:`encode_clap_audio`, :meth:`encode_clap_text`. Wrap calls in ``torch.inference_mode()``. Caption strings
    of a stage-1 model need a :data:`TextEmbedder` (:meth:`set_text_embedder`; :mod:`m2d2.inference` sets one).
    """

    def __init__(self, config: M2D2Config, *, with_m2d: bool = True, pretrained_root: str | None = None):
        super().__init__()
        self.config = config = copy.deepcopy(config)
        self.frontend = LogMelSpectrogram(LogMelConfig(n_mels=config.encoder.n_mels))
        self.register_buffer("norm_stats", torch.tensor([config.norm_mean, config.norm_std]), persistent=True)
        self.encoder = AudioEncoder(config.encoder)
        self.audio_proj = AudioProjector(config.clap_dim, config.projector)
        self.text_encoder: TransformersTextEncoder | None = None
        if config.text.mode == "transformers":
            self.text_encoder = TransformersTextEncoder(config.text.encoder, tokenizer_root=pretrained_root)
            text_dim = self.text_encoder.dim
        else:
            text_dim = config.text.offline.dim
        self.text_proj = self._make_text_proj(text_dim)
        # Shape (1,), not the reference's 0-dim: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.tensor([config.clap.logit_scale_init]))
        self.predictor = Predictor(config.encoder, config.predictor) if with_m2d else None
        self.target = TargetEncoder(config.encoder) if with_m2d else None
        self.clip_loss = ClipLoss(config.clap.local_loss, config.clap.feature_grad_scale)
        self.stage: Stage = "stage1" if config.text.mode == "offline" else "stage2"
        self.set_text_embedder(None)
        self.pretrained_root = pretrained_root  # relative text-model paths of an export resolve here

    def _make_text_proj(self, text_dim: int) -> nn.Module:
        if text_dim == self.config.clap_dim:
            return nn.Identity()
        if self.config.text.mode == "transformers":
            log.warning("text encoder width %d != CLAP dim %d: adding a Linear text map (the paper uses none)",
                        text_dim, self.config.clap_dim)
        proj = nn.Linear(text_dim, self.config.clap_dim)
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)
        return proj

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: Stage) -> None:
        """Freeze everything, then let the parameter groups of ``stage`` train (the target never trains)."""
        if stage not in TRAINABLE:
            raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(TRAINABLE)}")
        if stage == "stage1" and self.predictor is None:
            raise ValueError("stage 1 needs the M2D predictor and target; build the model with with_m2d=True")
        if stage == "stage2" and self.text_encoder is None:
            raise ValueError("stage 2 needs a transformers text encoder; call start_stage2() first")
        self.requires_grad_(False)
        for name in TRAINABLE[stage]:
            part = getattr(self, name)
            if part is not None:
                part.requires_grad_(True)
        self.stage = stage

    def start_stage2(self, text: TransformersTextConfig) -> None:
        """Stage 1 -> 2: re-initialise the projector, swap the offline text side for a trainable encoder,
        reset the logit scale (ln 100), drop the M2D heads, and freeze the audio encoder."""
        self.config.text.mode = "transformers"
        self.config.text.encoder = copy.deepcopy(text)
        self.config.clap.logit_scale_init = self.config.clap.stage2_logit_scale_init
        self.text_encoder = TransformersTextEncoder(text)
        self.text_proj = self._make_text_proj(self.text_encoder.dim).to(self.logit_scale.device)
        self.text_encoder.to(self.logit_scale.device)
        self.audio_proj.reset_parameters()
        with torch.no_grad():
            self.logit_scale.fill_(self.config.clap.logit_scale_init)
        self.predictor = None
        self.target = None
        self.set_text_embedder(None)
        self.set_stage("stage2")

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (encoder, predictor, audio_proj, text_proj, text_encoder, logit_scale)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name in ("encoder", "predictor", "audio_proj", "text_proj", "text_encoder", "logit_scale"):
            part = getattr(self, name)
            if part is None:
                continue
            params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
            groups[name] = [p for p in params if p.requires_grad]
        return groups

    # ------------------------------------------------------------------ training
    def make_mask(
        self,
        batch: int,
        frames: int,
        *,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> PatchMask | ChunkMasks:
        """The training mask of the current stage for ``batch`` crops of ``frames`` frames.

        Stage 1: unstructured at ``m2d.mask_ratio`` (0.7). Stage 2: structured at ``mask_ratio`` or
        ``clap.stage2_mask_ratio`` (0.3); a crop longer than the encoder (stage 2 on stage 1's encoder) gets one mask
        per encoder chunk (:class:`~m2d2.models.masking.ChunkMasks`). Drawing it outside :meth:`forward` lets the
        trainer draw one mask for a whole (accumulated) batch from a per-step generator: re-forwards, micro-batch
        splits and resumed runs all see the same masks.
        """
        grid_f, patch = self.encoder.grid[0], self.encoder.patch_frames
        device = self.logit_scale.device
        if self.stage == "stage1":
            return random_unstructured_mask(batch, grid_f * (frames // patch), self.config.m2d.mask_ratio, generator,
                                            device)
        ratio = self.config.clap.stage2_mask_ratio if mask_ratio is None else mask_ratio
        if frames > self.encoder.chunk_frames:
            return ChunkMasks(tuple(random_structured_mask(batch, (grid_f, (stop - start) // patch), ratio, generator,
                                                           device)
                                    for start, stop in chunk_spans(frames, self.encoder.chunk_frames, patch)))
        return random_structured_mask(batch, (grid_f, frames // patch), ratio, generator, device)

    def forward(
        self,
        lms: torch.Tensor,
        text: torch.Tensor | list[str],
        *,
        mask: PatchMask | ChunkMasks | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss parts for a batch of raw (un-normalised) log-mel crops ``[B, n_mels, T]``.

        ``text`` is a batch of precomputed sentence vectors (stage 1) or caption strings (stage 2). Without
        ``mask`` one is drawn by :meth:`make_mask` (from ``generator``).
        """
        if mask is None:
            mask = self.make_mask(lms.shape[0], lms.shape[-1], mask_ratio=mask_ratio, generator=generator)
        parts = self.forward_features(lms, text, mask)
        return self.losses(parts, parts["audio"], parts["text"])

    def forward_features(self, lms: torch.Tensor, text: torch.Tensor | list[str],
                         mask: PatchMask | ChunkMasks) -> dict[str, torch.Tensor]:
        """CLAP features (``audio``, ``text``) and, in stage 1, the micro-batch's ``loss_m2d``.

        Split from :meth:`losses` so that a trainer can cache features of the whole accumulated batch and
        re-forward one micro-batch at a time against all of them (contrastive gradient accumulation).
        """
        x = self.normalize(lms)
        if self.stage == "stage1":
            tokens = self.encoder.embed(x)
            visible = self.encoder.forward_tokens(tokens, mask.ids_keep)
            prediction = self.predictor(visible, mask)
            with torch.no_grad():
                masked = torch.gather(tokens.detach(), 1, mask.ids_masked[..., None].expand(-1, -1, tokens.shape[-1]))
                target = self.target(torch.cat([self.encoder.cls(x.shape[0]), masked], dim=1))[:, 1:]
            loss_m2d = norm_mse_loss(prediction, target, self.config.m2d.target_norm_eps)
            return {"audio": self.audio_proj(visible[:, 1:]), "text": self.encode_clap_text(text),
                    "loss_m2d": loss_m2d}
        encoder_trains = any(p.requires_grad for p in self.encoder.parameters())  # M2D2^TA trains it in stage 2
        with torch.set_grad_enabled(encoder_trains and torch.is_grad_enabled()):
            if isinstance(mask, ChunkMasks):  # the projector sees the visible tokens of every chunk, as at inference
                chunks = split_chunks(x, self.encoder.chunk_frames, self.encoder.patch_frames)
                visible = torch.cat([self.encoder(chunk, m.ids_keep)[:, 1:]
                                     for chunk, m in zip(chunks, mask.chunks, strict=True)], dim=1)
            else:
                visible = self.encoder(x, mask.ids_keep)[:, 1:]
        return {"audio": self.audio_proj(visible), "text": self.encode_clap_text(text)}

    def losses(self, parts: dict[str, torch.Tensor], audio: torch.Tensor, text: torch.Tensor,
               m2d_weight: float = 1.0, logit_scale_grad: bool = True) -> dict[str, torch.Tensor]:
        """``loss = λ_m2d · m2d_weight · L_m2d + λ_clap · L_clap(audio, text)`` (stage 2: ``L_clap`` only).

        ``audio``/``text`` may be the features of a whole accumulated batch with only this micro-batch's slice
        carrying gradients; ``m2d_weight`` (1/M) and ``logit_scale_grad`` (True for one micro-batch only) make the
        accumulated gradient equal to that of the full batch.
        """
        scale = self.logit_scale if logit_scale_grad else self.logit_scale.detach()
        loss_clap = self.clip_loss(audio, text, scale)
        if "loss_m2d" not in parts:
            return {"loss": loss_clap, "loss_clap": loss_clap.detach()}
        cfg = self.config.clap
        loss = cfg.lambda_m2d * m2d_weight * parts["loss_m2d"] + cfg.lambda_clap * loss_clap
        return {"loss": loss, "loss_m2d": parts["loss_m2d"].detach(), "loss_clap": loss_clap.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float | torch.Tensor]:
        """Call after every optimiser step: EMA update of the target (stage 1), then the logit-scale clamp.

        ``logit_scale`` comes back as a device tensor: reading it every step would be a host sync.
        """
        out: dict[str, float | torch.Tensor] = {}
        if self.stage == "stage1" and self.target is not None:
            decay = ema_decay(step, total_steps, self.config.m2d.ema_decay_start, self.config.m2d.ema_decay_end)
            self.target.ema_update(self.encoder.blocks, self.encoder.norm, decay)
            out["ema_decay"] = decay
        self.clamp_logit_scale()
        out["logit_scale"] = self.logit_scale.detach().exp().squeeze()
        return out

    def keep_ema_target_fp32(self) -> None:
        """Put the EMA target back in fp32 after a trainer cast the model to bf16 (DeepSpeed's bf16 mode casts every
        parameter). Its forward then runs under autocast; see :meth:`TargetEncoder.ema_update` for why."""
        if self.target is not None:
            self.target.float()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0.0, self.config.clap.logit_scale_max)

    # ------------------------------------------------------------------ front end
    def set_norm_stats(self, mean: float, std: float) -> None:
        """Store dataset statistics in the weights (``norm_stats``) and the config alike."""
        self.norm_stats.copy_(torch.tensor([mean, std]))
        self.config.norm_mean, self.config.norm_std = float(mean), float(std)

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        """``(lms - mean) / std`` in at least float32, then cast to the encoder's dtype (bf16 under DeepSpeed)."""
        stats = self.norm_stats.float() if self.norm_stats.dtype in (torch.float16, torch.bfloat16) else self.norm_stats
        x = (lms.to(stats.dtype) - stats[0]) / stats[1]
        return x.to(self.encoder.patch_embed.proj.weight.dtype)

    def to_log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """Raw log-mel ``[B, n_mels, T]`` of 16-kHz waveforms ``[B, S]`` (or ``[S]``)."""
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2:
            raise ValueError(f"expected a waveform batch [B, samples] at 16 kHz, got shape {tuple(wave.shape)}")
        return self.frontend(wave.to(self.norm_stats.device))

    # ------------------------------------------------------------------ inference
    def encode_frames(self, wave: torch.Tensor) -> torch.Tensor:
        """Frame-level features ``[B, T', F*D]`` (160 ms per frame; 3840-d for ViT-B)."""
        return self.encode_frames_lms(self.to_log_mel(wave))

    def encode_frames_lms(self, lms: torch.Tensor) -> torch.Tensor:
        return self._frames(self.encoder.encode_chunks(self.normalize(lms)))

    def _frames(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.encoder.tokens_to_frames(c) for c in chunks], dim=1)

    def encode_frames_and_clap_audio_lms(self, lms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_frames_lms` and :meth:`encode_clap_audio_lms` from one encoder pass (an evaluation needs
        both of every clip; the same numbers as the two calls)."""
        chunks = self.encoder.encode_chunks(self.normalize(lms))
        return self._frames(chunks), self.audio_proj(torch.cat(chunks, dim=1))

    def encode_clip(self, wave: torch.Tensor) -> torch.Tensor:
        """Clip-level features ``[B, F*D]``: the time mean of :meth:`encode_frames`."""
        return self.encode_frames(wave).mean(dim=1)

    def encode_clap_audio(self, wave: torch.Tensor) -> torch.Tensor:
        """CLAP audio embedding ``[B, D_clap]`` (not normalised; compare with cosine similarity)."""
        return self.encode_clap_audio_lms(self.to_log_mel(wave))

    def encode_clap_audio_lms(self, lms: torch.Tensor) -> torch.Tensor:
        """The projector sees every patch token of every chunk (it has no positions, so order is free)."""
        tokens = torch.cat(self.encoder.encode_chunks(self.normalize(lms)), dim=1)
        return self.audio_proj(tokens)

    def encode_clap_text(self, text: torch.Tensor | list[str]) -> torch.Tensor:
        """CLAP text embedding ``[B, D_clap]`` from caption strings or precomputed sentence vectors."""
        if isinstance(text, torch.Tensor):
            return self.text_proj(text.to(self.logit_scale.device, self.logit_scale.dtype))
        if isinstance(text, str):
            raise TypeError("encode_clap_text takes a list of captions, not a single string")
        if self.text_encoder is not None:
            return self.text_proj(self.text_encoder(text))
        if self.text_embedder is None:
            raise RuntimeError("this stage-1 model embeds captions with an offline sentence encoder, which m2d2.models "
                               "does not load: pass sentence vectors, load the model with "
                               "m2d2.inference.load_pretrained, or call set_text_embedder first")
        return self.text_proj(self.text_embedder(list(text)).to(self.logit_scale.device))

    @property
    def text_embedder(self) -> TextEmbedder | None:
        """What turns caption strings into sentence vectors in stage 1 (None in stage 2, or until one is set)."""
        return self.__dict__["_text_embedder"]

    def set_text_embedder(self, embedder: TextEmbedder | None) -> None:
        """Use ``embedder`` for caption strings in stage 1. Kept outside the module tree, so it is never part of the
        weights, ``.to()`` or a checkpoint, even when it is an ``nn.Module``."""
        self.__dict__["_text_embedder"] = embedder

    # ------------------------------------------------------------------ persistence
    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith(TRAINING_ONLY)
        }

    def save_pretrained(self, uri: str) -> None:
        """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer/``) to a local dir or ``s3://`` prefix.

        Everything inference needs (encoder, projector, text side, norm stats) and nothing it does not
        (predictor, target). ``config.json`` is written last: its presence marks a complete export.
        """
        config = copy.deepcopy(self.config)
        config.norm_mean, config.norm_std = (float(v) for v in self.norm_stats)
        with tempfile.TemporaryDirectory() as tmp:
            save_file(self.inference_state_dict(), str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})
            if self.text_encoder is not None:
                self.text_encoder.tokenizer.save_pretrained(str(Path(tmp) / TOKENIZER_DIR))
                config.text.encoder = dataclasses.replace(
                    config.text.encoder, path=None, config=self.text_encoder.portable_config(),
                    tokenizer_path=TOKENIZER_DIR,
                )
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict()}
            (Path(tmp) / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            io.upload_dir(tmp, str(uri), last=CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, uri: str, map_location: str | torch.device = "cpu") -> M2D2:
        """Rebuild a model saved by :meth:`save_pretrained` (weights via safetensors: nothing is unpickled)."""
        with tempfile.TemporaryDirectory() as tmp:
            root = io.local_path(uri) if io.is_local(uri) else io.download_dir(str(uri), tmp, EXPORT_FILES)
            config_path = Path(root) / CONFIG_FILE
            if not config_path.exists():
                raise FileNotFoundError(f"{uri}: no {CONFIG_FILE}; not an M2D2 export (or an incomplete one)")
            meta = json.loads(config_path.read_text())
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{uri}: unsupported format {meta.get('format')!r} v{meta.get('format_version')}")
            model = cls(M2D2Config.from_dict(meta["config"]), with_m2d=False, pretrained_root=str(root))
            from m2d2.weights import read_safetensors  # one error type for a damaged file

            state = read_safetensors(Path(root) / WEIGHTS_FILE, io.join(str(uri), WEIGHTS_FILE),
                                     device=str(map_location))
            model.load_state_dict(state, strict=True)
        return model.to(map_location)
