"""Offline sentence-encoder plug-ins: how each kind of local model turns a batch of captions into vectors.

Every plug-in loads from a local or mounted directory (or ``package:<module>``, see
:func:`m2d2.io.resolve_model_path`) with ``HF_HUB_OFFLINE=1``; nothing is ever downloaded. A new kind is a new
class registered with :func:`register_encoder`, not a new branch in the embedding loop, which only calls
:meth:`TextEncoderPlugin.encode_batch`.

Built-in kinds:

- ``hf-mean-pool`` / ``hf-cls`` / ``hf-last-token``: a transformers ``AutoModel`` pooled over its last hidden
  state (mean over the attention mask = the sentence-transformers/GTE recipe; the CLS token; the last real
  token, for decoder embedders);
- ``sentence-transformers``: a sentence-transformers model directory run by its own module stack (its pooling
  and any Normalize layer included);
- ``nv-embed-v2``: a remote-code model with its own ``encode(texts, instruction=..., max_length=...)``
  (NV-Embed-v2, 4096-d), called exactly as the reference caches stage-1 captions: un-normalised.

Remote code is Python from the model directory, so it runs only by the user's explicit choice
(:class:`RemoteCodePolicy`: ``--trust-remote-code``, ``M2D2_TRUST_REMOTE_CODE=1`` or the pipeline setting), and
only when the directory's code matches the digest the user pinned. Nothing read from an export or a corpus can
turn it on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2d2.io import resolve_model_path
from m2d2.models.config import OfflineTextConfig

log = logging.getLogger(__name__)

ENCODERS: dict[str, type[TextEncoderPlugin]] = {}
REMOTE_CODE_KINDS = {"nv-embed-v2"}
TRUST_ENV, DIGEST_ENV = "M2D2_TRUST_REMOTE_CODE", "M2D2_REMOTE_CODE_SHA256"


class RemoteCodeRefused(PermissionError):
    """A model directory needs its own Python code and the user has not allowed that code."""


def remote_code_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 over every ``*.py`` file of ``model_dir`` (relative name and bytes, sorted) and the ``auto_map`` of
    its ``config.json``: what ``trust_remote_code`` would import. Pin it after reviewing the files."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    config = root / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map") if config.is_file() else None
    digest.update(json.dumps(auto_map, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RemoteCodePolicy:
    """The user's permission to run a model directory's own code: ``trust`` plus the ``sha256`` of the code
    they reviewed (:func:`remote_code_digest`). Both come from the user (CLI flag, environment, pipeline
    setting), never from a model export, a corpus or a plan file."""

    trust: bool = False
    sha256: str = ""

    @classmethod
    def from_env(cls) -> RemoteCodePolicy:
        trust = os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")
        return cls(trust=trust, sha256=os.environ.get(DIGEST_ENV, "").strip().lower())

    def check(self, model_dir: str | os.PathLike, kind: str) -> None:
        """Raise :class:`RemoteCodeRefused` unless the user allowed exactly the code in ``model_dir``."""
        digest = remote_code_digest(model_dir)
        how = (f"allow it with --trust-remote-code (or {TRUST_ENV}=1, or the pipeline setting trust_remote_code) "
               f"and pin the code you reviewed with {DIGEST_ENV}={digest} (or remote_code_sha256)")
        if not self.trust:
            raise RemoteCodeRefused(f"text encoder kind {kind!r} runs Python code shipped in {model_dir}; it is not "
                                    f"run unless you allow it: {how}")
        if not self.sha256:
            raise RemoteCodeRefused(f"remote code of {model_dir} is allowed but not pinned: {how}")
        if digest != self.sha256:
            raise RemoteCodeRefused(f"remote code of {model_dir} has digest {digest}, not the pinned "
                                    f"{self.sha256}: the files changed since they were reviewed; refusing to run them")


def register_encoder(*kinds: str) -> Callable[[type[TextEncoderPlugin]], type[TextEncoderPlugin]]:
    """Class decorator: make a plug-in available under ``OfflineTextConfig.kind`` names ``kinds``."""

    def add(cls: type[TextEncoderPlugin]) -> type[TextEncoderPlugin]:
        for kind in kinds:
            ENCODERS[kind] = cls
        return cls

    return add


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: float32 on CPU (exact, and what the demo's vectors were made with); bf16 on a GPU that
    supports it, else fp16. Vectors are stored as float16 either way."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {sorted(names)}")
    return names[dtype]


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56 and ``torch_dtype`` before."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class TextEncoderPlugin(ABC):
    """One loaded sentence encoder. ``instruction`` is prefixed to every caption (NV-Embed style task prompt);
    the empty default is what the reference uses for captions."""

    def __init__(self, config: OfflineTextConfig, device: torch.device, dtype: torch.dtype, instruction: str = "",
                 base_dir: str | None = None, remote_code: RemoteCodePolicy | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.instruction = instruction
        self.path = resolve_model_path(config.path, base_dir)
        self.remote_code = remote_code or RemoteCodePolicy.from_env()

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), dim]`` vectors (any float dtype, any device) from one forward pass."""


@register_encoder("hf-mean-pool", "hf-cls", "hf-last-token")
class PooledTransformer(TextEncoderPlugin):
    """A transformers ``AutoModel`` + tokenizer, pooled as ``config.kind`` says (pooling runs in float32)."""

    def __init__(self, config: OfflineTextConfig, device: torch.device, dtype: torch.dtype, instruction: str = "",
                 **where):
        from transformers import AutoModel, AutoTokenizer

        super().__init__(config, device, dtype, instruction, **where)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        if self.tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(self.path, trust_remote_code=False, **_dtype_kwargs(dtype))
        self.model = self.model.to(device).eval()

    @torch.inference_mode()
    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        if self.instruction:
            texts = [self.instruction + t for t in texts]
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"]
        if self.config.kind == "hf-cls":
            return hidden[:, 0]
        if self.config.kind == "hf-last-token":
            if self.tokenizer.padding_side == "left":
                return hidden[:, -1]
            last = mask.sum(dim=1) - 1
            return hidden[torch.arange(len(texts), device=hidden.device), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@register_encoder("sentence-transformers")
class SentenceTransformerEncoder(TextEncoderPlugin):
    """A sentence-transformers directory, run by its own modules; ``instruction`` becomes its ``prompt``."""

    def __init__(self, config: OfflineTextConfig, device: torch.device, dtype: torch.dtype, instruction: str = "",
                 **where):
        from sentence_transformers import SentenceTransformer

        super().__init__(config, device, dtype, instruction, **where)
        kwargs = {} if dtype == torch.float32 else {"model_kwargs": _dtype_kwargs(dtype)}
        self.model = SentenceTransformer(str(self.path), device=str(device), local_files_only=True, **kwargs)
        self.model.max_seq_length = min(self.model.max_seq_length or config.max_length, config.max_length)

    @torch.inference_mode()
    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=max(len(texts), 1), convert_to_tensor=True,
                                 show_progress_bar=False, prompt=self.instruction or None)


@register_encoder("nv-embed-v2")
class RemoteCodeEncoder(TextEncoderPlugin):
    """A remote-code model from the local directory that embeds with its own ``encode`` (NV-Embed-v2 API)."""

    def __init__(self, config: OfflineTextConfig, device: torch.device, dtype: torch.dtype, instruction: str = "",
                 **where):
        from transformers import AutoModel

        super().__init__(config, device, dtype, instruction, **where)
        self.remote_code.check(self.path, config.kind)  # before anything of the directory is imported
        self.model = AutoModel.from_pretrained(self.path, trust_remote_code=True, **_dtype_kwargs(dtype))
        self.model = self.model.to(device).eval()

    @torch.inference_mode()
    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(texts, instruction=self.instruction, max_length=self.config.max_length)
        return torch.as_tensor(out)


def load_encoder(config: OfflineTextConfig, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 instruction: str | None = None, *, base_dir: str | None = None,
                 remote_code: RemoteCodePolicy | None = None) -> TextEncoderPlugin:
    """The plug-in of ``config.kind`` loaded on ``device``; ``instruction`` defaults to ``config.instruction``
    when the config has that field, else "" (the reference's choice for captions).

    ``base_dir``: the directory a relative ``config.path`` belongs to (a model export's); ``remote_code``: the
    user's permission for code-shipping kinds (default: from the environment, see :class:`RemoteCodePolicy`).
    """
    if config.kind not in ENCODERS:
        raise ValueError(f"unknown offline text encoder kind {config.kind!r}; choose one of {sorted(ENCODERS)}")
    device = torch.device(device)
    if instruction is None:
        instruction = getattr(config, "instruction", "")
    return ENCODERS[config.kind](config, device, resolve_dtype(dtype, device), instruction, base_dir=base_dir,
                                 remote_code=remote_code)


def token_lengths(texts: Sequence[str], config: OfflineTextConfig, chunk: int = 8192) -> np.ndarray:
    """Token count of every caption (truncated at ``config.max_length``), used only to bucket batches.

    Uses the tokenizer files of the model directory, never its remote code (lengths need no custom tokenizer); a
    directory without a loadable tokenizer falls back to UTF-8 byte length, which orders captions about as well.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.path), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no tokenizer in %s (%s): bucketing by UTF-8 length instead", config.path, exc)
        return np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    out = np.empty(len(texts), dtype=np.int64)
    for start in tqdm(range(0, len(texts), chunk), desc="token lengths", unit="chunk", leave=False,
                      disable=len(texts) <= chunk):
        ids = tokenizer(list(texts[start : start + chunk]), truncation=True, max_length=config.max_length)["input_ids"]
        out[start : start + len(ids)] = [len(i) for i in ids]
    return out
