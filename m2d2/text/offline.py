"""Offline sentence encoders: run once over unique captions, never during training.

Models are loaded only from local directories (or a directory shipped inside a Python package, written
``package:<module>``), never fetched from a hub at run time.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from m2d2.io import resolve_model_path
from m2d2.models.config import OfflineTextConfig

KINDS = ("hf-mean-pool", "hf-cls", "nv-embed-v2")


class OfflineTextEncoder:
    """Sentence embeddings from a local transformers model.

    ``hf-mean-pool``: mean over the attention mask (sentence-transformers / GTE recipe); ``hf-cls``: the CLS
    token; ``nv-embed-v2``: the model's own ``encode`` (remote code from the local directory). Outputs are
    float32 and not L2-normalised unless ``config.normalize`` is set.
    """

    def __init__(self, config: OfflineTextConfig, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if config.kind not in KINDS:
            raise ValueError(f"unknown offline text encoder kind {config.kind!r}; choose one of {KINDS}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.config = config
        self.device = torch.device(device)
        path = resolve_model_path(config.path)
        remote = config.kind == "nv-embed-v2"
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=remote).to(self.device).eval()

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``[len(texts), dim]`` float32 on CPU, in input order."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            out.append(self._encode_batch(batch).float().cpu())
        emb = torch.cat(out) if out else torch.empty(0, self.config.dim)
        if emb.shape[-1] != self.config.dim:
            raise ValueError(f"encoder {self.config.path!r} gives {emb.shape[-1]}-d vectors, config says {self.config.dim}")
        return F.normalize(emb, dim=-1) if self.config.normalize else emb

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        if self.config.kind == "nv-embed-v2":
            return torch.as_tensor(self.model.encode(texts, instruction="", max_length=self.config.max_length))
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state
        if self.config.kind == "hf-cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
