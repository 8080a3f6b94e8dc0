"""Inference from an exported model directory: frame / clip features with timestamps, CLAP embeddings, HEAR API.

**Determinism.** Every clip is encoded on its own (a batch of one), so its features are a function of that clip
and the model only: the same clip gives bit-identical output whether it is passed alone or in a list with other
clips of any length. Batching clips together would change float rounding with the batch composition (GEMM
blocking depends on the batch size), and padding clips to a common length would change the features of the
padded clips; neither is done. Per-clip cost is one encoder pass per chunk, as the reference runtime does.

**Timestamps.** The encoder sees a clip as non-overlapping chunks of its trained length (608 or 1001 log-mel
frames, by the rule of :mod:`m2d2.models.chunks`); in each chunk, patch column ``c`` covers
log-mel frames ``[s, s + 16)`` with ``s = chunk_start + 16 c``. Log-mel frame ``j`` is centred on sample
``j * hop`` (centred STFT), so a feature frame's timestamp is the **centre of its 16 log-mel frame centres**:
``(s + 7.5) * hop / sample_rate`` = ``0.16 c + 0.075`` s for 608-frame chunks. With 1001-frame chunks every
chunk ends with 9 unused frames, so timestamps step by 0.16 s inside a chunk and jump by 0.25 s between
chunks; computing them from the chunk layout (instead of spreading ``n`` frames evenly over the duration, as
the reference's ``get_timestamp_embeddings`` does) keeps them exact. The last frame may reach past the end of
the clip: its 16 frames include the zero padding.

The HEAR functions (:func:`load_model`, :func:`get_scene_embeddings`, :func:`get_timestamp_embeddings`) follow
the HEAR 2021 API: timestamps in milliseconds, scene embeddings = clip features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from m2d2 import io
from m2d2.audio import DEFAULT_MAX_CHANNELS, DEFAULT_MAX_FILE_MB
from m2d2.models import M2D2
from m2d2.models.chunks import frame_starts

log = logging.getLogger(__name__)

__all__ = [
    "AudioInput",
    "Embedder",
    "EmbeddingCache",
    "FrameFeatures",
    "HearModel",
    "LazySentenceEncoder",
    "SearchResult",
    "attach_text_embedder",
    "audio_files",
    "frame_starts",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
    "load_pretrained",
    "search_folder",
]

#: One clip ``[S]``, a batch of equal-length clips ``[B, S]``, or clips of any lengths; 16 kHz float in [-1, 1].
AudioInput = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


@dataclass(frozen=True)
class FrameFeatures:
    """Frame-level features of one clip and the time (seconds, frame centre) each row describes."""

    features: torch.Tensor  # [T, F*D]
    timestamps: torch.Tensor  # [T] float64 seconds


class LazySentenceEncoder:
    """A stage-1 model's :data:`~m2d2.models.TextEmbedder`: its configured offline sentence encoder, loaded on the
    model's device at the first caption, so loading a model for audio features never loads a text model."""

    def __init__(self, model: M2D2):
        self._model = weakref.ref(model)  # the model holds this object: no reference cycle
        self._encoder = None

    def __deepcopy__(self, memo: dict) -> LazySentenceEncoder:
        """A deep copy of the model gets an encoder of its own, bound to the copy."""
        model = self._model()
        return LazySentenceEncoder(memo.get(id(model), model))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self._encoder is None:
            from m2d2.text import OfflineTextEncoder

            model = self._model()
            if model is None:
                raise RuntimeError("the model of this sentence encoder no longer exists")
            # a relative encoder path in an export's config belongs to the export's directory, never to the cwd
            self._encoder = OfflineTextEncoder(model.config.text.offline, device=model.logit_scale.device,
                                               base_dir=model.pretrained_root)
        return self._encoder.encode(list(texts))


def attach_text_embedder(model: M2D2) -> M2D2:
    """Let a stage-1 (offline-text) ``model`` embed caption strings with its configured sentence encoder (loaded on
    first use) unless it already has a text embedder; stage-2 models embed strings themselves. Returns ``model``."""
    if model.text_encoder is None and model.text_embedder is None:
        model.set_text_embedder(LazySentenceEncoder(model))
    return model


def load_pretrained(uri: str, map_location: str | torch.device = "cpu") -> M2D2:
    """:meth:`M2D2.from_pretrained` whose ``encode_clap_text`` takes caption strings at every stage."""
    return attach_text_embedder(M2D2.from_pretrained(uri, map_location=map_location))


def _as_clips(audio: AudioInput) -> list[torch.Tensor]:
    """Split any accepted input into 1-D float32 CPU tensors, one per clip."""
    if isinstance(audio, np.ndarray | torch.Tensor):
        tensor = torch.as_tensor(audio)
        if tensor.ndim == 1:
            clips = [tensor]
        elif tensor.ndim == 2:
            clips = list(tensor.unbind(0))
        else:
            raise ValueError(f"expected audio [S] or [B, S], got shape {tuple(tensor.shape)}")
    elif isinstance(audio, str | bytes):
        raise TypeError("pass waveforms, not file names (use m2d2.audio.load_audio first)")
    else:
        clips = [torch.as_tensor(a) for a in audio]
        for i, clip in enumerate(clips):
            if clip.ndim != 1:
                raise ValueError(f"clip {i}: expected a 1-D waveform, got shape {tuple(clip.shape)}")
    if not clips:
        raise ValueError("no audio given")
    out = []
    for i, clip in enumerate(clips):
        if not torch.is_floating_point(clip):
            raise ValueError(f"clip {i}: expected float samples in [-1, 1], got {clip.dtype}")
        if not torch.isfinite(clip).all():
            raise ValueError(f"clip {i} has NaN or infinite samples")
        out.append(clip.detach().to("cpu", torch.float32))
    return out


class Embedder(torch.nn.Module):
    """An exported M2D2 model in eval mode with per-clip, deterministic feature extraction.

    An ``nn.Module`` (holding the model) so that ``.to(device)`` moves it, as HEAR's validator expects.
    """

    def __init__(self, model: M2D2, device: str | torch.device | None = None):
        super().__init__()
        self.model = attach_text_embedder(model).eval()
        if device is not None:
            self.model.to(device)
        self.audio_config = model.frontend.config
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.model.norm_stats.device

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu") -> Embedder:
        """Load a directory (or ``s3://`` prefix) written by ``M2D2.save_pretrained``."""
        return cls(M2D2.from_pretrained(path, map_location=device))

    # ------------------------------------------------------------------ facts
    @property
    def sample_rate(self) -> int:
        return self.audio_config.sample_rate

    @property
    def frame_dim(self) -> int:
        """Width of a frame (and clip) feature: F bands x encoder width (3840 for ViT-B)."""
        return self.model.config.encoder.frame_dim

    @property
    def clap_dim(self) -> int:
        return self.model.config.clap_dim

    @property
    def frame_seconds(self) -> float:
        """Hop between feature frames inside a chunk: 16 log-mel frames of 10 ms = 0.16 s."""
        return self.model.encoder.patch_frames * self.audio_config.hop_length / self.sample_rate

    def timestamps(self, num_samples: int) -> torch.Tensor:
        """Frame-centre times in seconds ``[T]`` for a clip of ``num_samples`` samples (see module docstring)."""
        hop = self.audio_config.hop_length
        patch = self.model.encoder.patch_frames
        starts = frame_starts(self.audio_config.frames_for(num_samples), self.model.encoder.chunk_frames, patch)
        return torch.from_numpy((starts + (patch - 1) / 2) * hop / self.sample_rate)

    # ------------------------------------------------------------------ features
    def _check(self, clip: torch.Tensor, index: int) -> torch.Tensor:
        minimum = self.audio_config.min_samples
        if clip.shape[0] < minimum:
            raise ValueError(f"clip {index} has {clip.shape[0]} samples; the front end needs at least {minimum} "
                             f"({minimum / self.sample_rate * 1000:.1f} ms)")
        return clip[None].to(self.device)

    @torch.inference_mode()
    def frames(self, audio: AudioInput) -> list[FrameFeatures]:
        """Frame features ``[T_i, F*D]`` with frame-centre timestamps, one entry per clip (float32, CPU)."""
        out = []
        for i, clip in enumerate(_as_clips(audio)):
            feats = self.model.encode_frames(self._check(clip, i))[0].float().cpu()
            ts = self.timestamps(clip.shape[0])
            if ts.shape[0] != feats.shape[0]:  # the layout mirror and the encoder must agree
                raise RuntimeError(f"timestamp layout gives {ts.shape[0]} frames, encoder {feats.shape[0]}")
            out.append(FrameFeatures(feats, ts))
        return out

    @torch.inference_mode()
    def clip_features(self, audio: AudioInput) -> torch.Tensor:
        """Clip features ``[N, F*D]``: the time mean of each clip's frame features (float32, CPU)."""
        return torch.stack([
            self.model.encode_clip(self._check(clip, i))[0].float().cpu() for i, clip in enumerate(_as_clips(audio))
        ])

    @torch.inference_mode()
    def clap_audio(self, audio: AudioInput) -> torch.Tensor:
        """CLAP audio embeddings ``[N, D_clap]`` (not normalised; compare with cosine similarity)."""
        return torch.stack([
            self.model.encode_clap_audio(self._check(clip, i))[0].float().cpu()
            for i, clip in enumerate(_as_clips(audio))
        ])

    @torch.inference_mode()
    def clap_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """CLAP text embeddings ``[N, D_clap]``, one caption at a time when ``batch_size`` is 1.

        Captions are padded to the longest in their batch, and the attention mask keeps padding out of the
        result; rounding may still differ in the last bits with the batch composition, so use ``batch_size=1``
        where bit-exactness matters.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("clap_text takes a non-empty list of strings")
        parts = [self.model.encode_clap_text(list(texts[i : i + batch_size])).float().cpu()
                 for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)

    # ------------------------------------------------------------------ log-mel entry points (eval sets)
    @torch.inference_mode()
    def clip_and_clap_audio_lms(self, lms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip features ``[N, F*D]`` and CLAP audio embeddings ``[N, D_clap]`` of raw (un-normalised) log-mels
        ``[n_mels, T]``, one clip at a time, from one encoder pass each."""
        clips, audio = [], []
        for x in lms:
            frames, clap = self.model.encode_frames_and_clap_audio_lms(x[None].to(self.device))
            clips.append(frames.mean(dim=1)[0].float().cpu())
            audio.append(clap[0].float().cpu())
        return torch.stack(clips), torch.stack(audio)

    # ------------------------------------------------------------------ identity
    def audio_fingerprint(self) -> str:
        """SHA-256 of everything CLAP audio embeddings depend on: front-end settings, norm stats, encoder and
        projector weights. Two exports that share them share cached audio embeddings."""
        digest = hashlib.sha256()
        config = self.model.config
        settings = {"frontend": asdict(self.audio_config), "encoder": asdict(config.encoder),
                    "projector": asdict(config.projector)}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            if name == "norm_stats" or name.startswith(("encoder.", "audio_proj.")):
                digest.update(name.encode())
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- HEAR API
class HearModel(Embedder):
    """An :class:`Embedder` with the attributes the HEAR 2021 API requires."""

    @property
    def scene_embedding_size(self) -> int:
        return self.frame_dim

    @property
    def timestamp_embedding_size(self) -> int:
        return self.frame_dim


def load_model(model_file_path: str = "", device: str | torch.device | None = None) -> HearModel:
    """HEAR entry point: ``model_file_path`` is an export directory (HEAR passes one path; ours is a folder)."""
    if not model_file_path:
        raise ValueError("load_model needs the path of a directory written by M2D2.save_pretrained")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return HearModel(M2D2.from_pretrained(model_file_path, map_location=device))


def _hear_audio(audio: torch.Tensor) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor) or audio.ndim != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ValueError(f"HEAR audio must be a tensor [n_sounds, n_samples], got {shape}")
    return audio


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """``[n_sounds, scene_embedding_size]`` clip features, on the audio's device."""
    return model.clip_features(_hear_audio(audio)).to(audio.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n_sounds, n_frames, timestamp_embedding_size], [n_sounds, n_frames] centre times in ms)``."""
    frames = model.frames(_hear_audio(audio))
    embeddings = torch.stack([f.features for f in frames]).to(audio.device)
    timestamps = torch.stack([f.timestamps * 1000.0 for f in frames]).float().to(audio.device)
    return embeddings, timestamps


# ---------------------------------------------------------------------------------------------------- folder search
INDEX_DIR = ".m2d2-index"
INDEX_FILE = "clap_audio.parquet"
INDEX_META = "model.json"
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"})


@dataclass
class SearchResult:
    """Ranked ``(path, cosine score)`` hits, how many files came from the cache, and every skipped file's reason."""

    hits: list[tuple[Path, float]]
    cached: int
    embedded: int
    skipped: list[tuple[Path, str]]


class EmbeddingCache:
    """CLAP audio embeddings keyed by the SHA-256 of the audio file's bytes, one Parquet file per audio model.

    Layout: ``<root>/<model fingerprint[:16]>/clap_audio.parquet`` (columns ``sha256``, ``embedding``) next to
    ``model.json``. Parquet and JSON only: nothing is unpickled, so a shared index cannot run code. Renamed or
    copied files hit the cache; a changed encoder or projector gets a new sub-directory.
    """

    def __init__(self, root: str | Path, fingerprint: str, dim: int):
        self.dir = Path(root) / fingerprint[:16]
        self.fingerprint, self.dim = fingerprint, dim
        self.rows: dict[str, np.ndarray] = {}
        self._dirty = False
        meta_path, table_path = self.dir / INDEX_META, self.dir / INDEX_FILE
        if table_path.exists():
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if meta.get("fingerprint") != fingerprint or meta.get("dim") != dim:
                raise ValueError(f"{self.dir}: index written for another model ({meta}); delete it to rebuild")
            table = pq.read_table(table_path)
            vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32).reshape(-1, dim)
            self.rows = dict(zip(table.column("sha256").to_pylist(), vectors, strict=True))

    def get(self, key: str) -> np.ndarray | None:
        return self.rows.get(key)

    def put(self, key: str, vector: np.ndarray) -> None:
        self.rows[key] = np.asarray(vector, dtype=np.float32).reshape(self.dim)
        self._dirty = True

    def save(self) -> None:
        """Rewrite the table atomically (temporary name, then rename); a crash leaves the previous one."""
        if not self._dirty:
            return
        keys = sorted(self.rows)
        flat = np.stack([self.rows[k] for k in keys]).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), self.dim)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"sha256": pa.array(keys, pa.string()), "embedding": column}), sink)
        io.atomic_write_bytes(self.dir / INDEX_FILE, sink.getvalue().to_pybytes())
        meta = {"fingerprint": self.fingerprint, "dim": self.dim, "format": "m2d2-clap-audio-index/1"}
        io.atomic_write_bytes(self.dir / INDEX_META, json.dumps(meta, indent=2).encode())
        self._dirty = False


def audio_files(folder: str | Path) -> list[Path]:
    """Audio files under ``folder`` by extension, sorted; hidden files and folders (the index) are skipped, and
    so are symbolic links that lead out of ``folder`` (a shared folder must not make search read elsewhere)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    found = []
    for p in root.rglob("*"):
        if not (p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS):
            continue
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if not io.is_within(p, root, resolve=True):
            log.warning("search: %s links outside %s; skipped", p, root)
            continue
        found.append(p)
    return sorted(found)


#: Seconds of each file that search (and the CLI) embed by default: decoding a long file costs memory and time in
#: proportion to its length, and a CLAP embedding of a long file is the mean over its chunks anyway.
SEARCH_MAX_SECONDS = 600.0


def search_folder(
    embedder: Embedder,
    query: str,
    folder: str | Path,
    top: int = 10,
    cache_dir: str | Path | None = None,
    save_every: int = 256,
    *,
    max_seconds: float | None = SEARCH_MAX_SECONDS,
    max_file_mb: float | None = DEFAULT_MAX_FILE_MB,
    max_channels: int | None = DEFAULT_MAX_CHANNELS,
) -> SearchResult:
    """Text-to-audio retrieval over the audio files of ``folder`` by CLAP cosine similarity.

    Each file's embedding is computed once per (file content, audio model) and kept in ``cache_dir``
    (default ``<folder>/.m2d2-index``). Only the first ``max_seconds`` of a file are embedded (``None``: all);
    files over ``max_file_mb`` are not read, and files that cannot be read or decoded, or exceed a decoding limit,
    are listed in ``skipped`` with the reason.
    """
    from m2d2.audio import AudioDecodeError, audio_info, decode_audio, read_audio_file

    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")

    def index_key(data: bytes, digest: str) -> str:
        """The file's sha256, or for a file longer than ``max_seconds`` a key of (sha256, cap): an embedding of
        a shorter prefix must not answer for a search that embeds more."""
        if max_seconds is None:
            return digest
        try:
            info = audio_info(data)
        except AudioDecodeError:
            return digest  # decoding will fail too, with the reason
        if info.frames <= math.ceil(max_seconds * info.sample_rate):
            return digest
        return hashlib.sha256(f"{digest}:first {max_seconds!r} s".encode()).hexdigest()

    cache = EmbeddingCache(cache_dir or Path(folder) / INDEX_DIR, embedder.audio_fingerprint(), embedder.clap_dim)
    paths, vectors, skipped = [], [], []
    cached = embedded = 0
    for path in audio_files(folder):
        try:
            data, digest = read_audio_file(path, max_file_mb)  # size checked before reading; read once
        except AudioDecodeError as exc:
            skipped.append((path, str(exc)))
            continue
        except OSError as exc:
            skipped.append((path, f"cannot read it: {type(exc).__name__}: {exc}"))
            continue
        key = index_key(data, digest)
        vector = cache.get(key)
        if vector is None:
            try:  # decode the bytes that were hashed; the name makes errors cite the file
                wave = decode_audio(data, embedder.sample_rate, max_seconds, name=str(path), max_file_mb=max_file_mb,
                                    max_channels=max_channels).wave
                del data
                vector = embedder.clap_audio([wave])[0].numpy()
            except (AudioDecodeError, ValueError) as exc:
                skipped.append((path, str(exc)))
                continue
            cache.put(key, vector)
            embedded += 1
            if embedded % save_every == 0:
                cache.save()
        else:
            cached += 1
        paths.append(path)
        vectors.append(vector)
    cache.save()
    if not paths:
        return SearchResult([], cached, embedded, skipped)
    audio = torch.nn.functional.normalize(torch.from_numpy(np.stack(vectors)), dim=-1)
    text = torch.nn.functional.normalize(embedder.clap_text([query]), dim=-1)
    scores = (audio @ text[0]).double()
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return SearchResult([(paths[i], float(scores[i])) for i in order.tolist()], cached, embedded, skipped)
