"""Text encoders run offline over captions (stage 1) and the helpers to locate local model directories."""

from m2d2.io import resolve_model_path
from m2d2.text.offline import OfflineTextEncoder

__all__ = ["OfflineTextEncoder", "resolve_model_path"]
