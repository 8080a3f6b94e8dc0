"""Offline sentence encoders: run once over unique captions, never during training.

Models are loaded only from local directories (or a directory shipped inside a Python package, written
``package:<module>``), never fetched from a hub at run time. The kinds are plug-ins (:mod:`m2d2.text.encoders`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m2d2.models.config import OfflineTextConfig
from m2d2.text.encoders import ENCODERS, RemoteCodePolicy, TextEncoderPlugin, load_encoder

KINDS = tuple(ENCODERS)  # the built-in kinds; register_encoder adds more


class OfflineTextEncoder:
    """Sentence embeddings from a local model of kind ``config.kind``, checked against ``config.dim``.

    Outputs are float32 on CPU and not L2-normalised unless ``config.normalize`` is set (the reference stores
    raw vectors). ``dtype`` (``auto``: float32 on CPU, bf16/fp16 on GPU) is the compute precision.
    """

    def __init__(self, config: OfflineTextConfig, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, instruction: str | None = None, *,
                 base_dir: str | None = None, remote_code: RemoteCodePolicy | None = None):
        self.config = config
        self.device = torch.device(device)
        self.plugin: TextEncoderPlugin = load_encoder(config, self.device, dtype, instruction, base_dir=base_dir,
                                                      remote_code=remote_code)

    @property
    def dtype(self) -> torch.dtype:
        return self.plugin.dtype

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """One forward pass: ``[len(texts), dim]`` float32 on CPU. Batch composition is the caller's choice
        (it fixes padding, hence the last bits of each vector)."""
        emb = self.plugin.encode_batch(list(texts)).float().cpu()
        if emb.ndim != 2 or emb.shape[-1] != self.config.dim:
            raise ValueError(f"encoder {self.config.path!r} gives vectors of shape {tuple(emb.shape[1:])}, "
                             f"config says {self.config.dim}")
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``[len(texts), dim]`` float32 on CPU, in input order, in consecutive batches of ``batch_size``."""
        out = [self.encode_batch(list(texts[start : start + batch_size])) for start in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.dim)
