"""Text encoders run offline over captions (stage 1), the caption-embedding cache, and the helpers to locate
local model directories and to pick a clip's caption per training step.

Names are imported on first use, so a process that only reads a cache (``m2d2.text.cache``) does not load
torch, transformers or the model package.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "CaptionEmbeddings": "m2d2.text.cache", "embed_captions": "m2d2.text.cache",
    "choose_caption": "m2d2.text.choice", "clip_weights": "m2d2.text.choice",
    "register_encoder": "m2d2.text.encoders", "caption_key": "m2d2.text.keys", "normalize_caption": "m2d2.text.keys",
    "OfflineTextEncoder": "m2d2.text.offline", "resolve_model_path": "m2d2.io",
    "ShardPlan": "m2d2.text.shards", "embed_shard": "m2d2.text.shards", "merge_shards": "m2d2.text.shards",
    "plan_shards": "m2d2.text.shards",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'm2d2.text' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
