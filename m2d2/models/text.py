"""Trainable transformers text encoder for CLAP stage 2 (CLS token, no projector)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from m2d2.io import resolve_model_path
from m2d2.models.config import TransformersTextConfig


def _build_transformer(config: TransformersTextConfig, root: str | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    if config.config is not None:
        fields = dict(config.config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError("a transformers text config needs a 'model_type' (e.g. 'bert')")
        return AutoModel.from_config(AutoConfig.for_model(model_type, **fields))
    if config.path is None:
        raise ValueError("a transformers text encoder needs either 'path' or 'config'")
    return AutoModel.from_pretrained(resolve_model_path(config.path, root), trust_remote_code=False)


class TransformersTextEncoder(nn.Module):
    """Tokenises raw captions and returns the last layer's CLS vector.

    Any pooler head is removed: it is unused by CLS pooling and would hold parameters without gradients.
    Long captions are truncated at ``max_length`` (the reference's ``truncation=False`` fails on them).
    """

    def __init__(self, config: TransformersTextConfig, tokenizer_root: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.config = config
        self.model = _build_transformer(config, tokenizer_root)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
        tokenizer_path = config.tokenizer_path or config.path
        if tokenizer_path is None:
            raise ValueError("a transformers text encoder needs a tokenizer: set 'tokenizer_path' or 'path'")
        # An export's relative paths resolve inside the export (tokenizer_root) and may not leave it.
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_path, tokenizer_root),
                                                       trust_remote_code=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.config.max_length, return_tensors="pt"
        ).to(device)
        return self.model(**tokens).last_hidden_state[:, 0]

    def portable_config(self) -> dict[str, Any]:
        """The transformers config as a plain dict, so a saved model rebuilds without the original path."""
        data = self.model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype"):
            data.pop(key, None)
        return data
