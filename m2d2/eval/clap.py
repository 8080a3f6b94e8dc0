"""CLAP evaluation of an M2D2 model: zero-shot classification and audio-text retrieval on one eval set.

Model-facing but workflow-free: it takes log-mel clips and strings and returns a flat ``dict[str, float]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from m2d2.eval.metrics import retrieval_metrics, zero_shot_accuracy
from m2d2.models.model import TextEmbedder
from m2d2.text.prompt import PROMPT_TEMPLATE


@dataclass
class ClapEvalSet:
    """Clips of one evaluation set with what both CLAP evaluations need.

    ``lms`` are raw (un-normalised) log-mels ``[n_mels, T]`` of any length; the model normalises them.
    ``labels[i]`` is the class of clip ``i`` (one of ``class_names``) and ``captions[i]`` its instance
    captions (may be empty). Zero-shot is skipped when ``class_names`` is empty (then ``labels`` may be
    empty too); retrieval is skipped when no clip has a caption.
    """

    lms: list[torch.Tensor]
    labels: list[str]
    captions: list[list[str]]
    class_names: list[str]
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        n = len(self.lms)
        if n == 0:
            raise ValueError("an eval set needs at least one clip")
        if len(self.captions) != n:
            raise ValueError(f"captions must hold one list per clip: {len(self.captions)} lists for {n} clips")
        if self.class_names:
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names has duplicates")
            if len(self.labels) != n:
                raise ValueError(f"labels must hold one label per clip: {len(self.labels)} for {n} clips")
            unknown = sorted(set(self.labels) - set(self.class_names))
            if unknown:
                raise ValueError(f"labels not in class_names: {unknown[:5]}")
            if "{}" not in self.prompt_template:
                raise ValueError(f"prompt_template needs a '{{}}' for the class name: {self.prompt_template!r}")
        elif not any(self.captions):
            raise ValueError("nothing to evaluate: no class_names (zero-shot) and no captions (retrieval)")

    def prompts(self) -> list[str]:
        """One prompt per class; ``_`` becomes a space, as the reference ``zeroshot.py`` does with labels."""
        return [self.prompt_template.format(name.replace("_", " ")) for name in self.class_names]

    def label_indices(self) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.class_names)}
        return torch.tensor([index[label] for label in self.labels], dtype=torch.long)

    def caption_pairs(self) -> tuple[list[str], torch.Tensor]:
        """All captions flattened, and the clip each one describes (``text_to_audio``)."""
        texts = [text for caps in self.captions for text in caps]
        owners = [i for i, caps in enumerate(self.captions) for _ in caps]
        return texts, torch.tensor(owners, dtype=torch.long)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then every submodule gets back its own train/eval flag.

    Restoring per submodule (not ``model.train(was)``) keeps mixed states such as a frozen encoder held
    in eval mode during stage-2 training.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


#: What the metrics of :func:`evaluate_clap` and the suite mean; bump it when that changes (metric definitions, prompt
#: rule, chunking), so that versions scored before and after are never ranked against each other.
EVAL_PROTOCOL = "m2d2-clap-eval/1"


def suite_digest(data: ClapEvalSet) -> str:
    """SHA-256 of everything an evaluation's numbers depend on besides the model: the protocol version, the prompt,
    the classes, and every clip's log-mel bytes, label and captions. The registry ranks two versions only when their
    digests match (:func:`m2d2.registry.register_model`): a model evaluated on a user's folder is never compared
    with one evaluated on the demo corpus."""
    digest = hashlib.sha256(json.dumps(
        {"protocol": EVAL_PROTOCOL, "prompt": data.prompt_template, "classes": list(data.class_names),
         "labels": list(data.labels), "captions": [list(c) for c in data.captions]}, sort_keys=True).encode())
    for lms in data.lms:
        digest.update(f"{tuple(lms.shape)}|{lms.dtype}|".encode())
        digest.update(lms.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    reference = model.norm_stats if hasattr(model, "norm_stats") else next(model.parameters())
    return reference.device, reference.dtype


def embed_audio(model: nn.Module, lms_list: Sequence[torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """CLAP audio embeddings ``[N, D]`` (float32, CPU) of raw log-mels ``[n_mels, T]``, in input order.

    Clips are batched only with clips of the same length, so no clip is padded with values it does not
    have (the model's own chunking pads each clip the same way whether it is batched or not).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(lms_list) == 0:
        raise ValueError("embed_audio needs at least one clip")
    n_mels = model.config.encoder.n_mels
    by_length: dict[int, list[int]] = {}
    for i, lms in enumerate(lms_list):
        if not isinstance(lms, torch.Tensor) or lms.ndim != 2 or lms.shape[0] != n_mels or lms.shape[1] == 0:
            shape = tuple(lms.shape) if isinstance(lms, torch.Tensor) else type(lms).__name__
            raise ValueError(f"clip {i}: expected a raw log-mel [{n_mels}, T>0], got {shape}")
        by_length.setdefault(lms.shape[1], []).append(i)
    device, dtype = _device_dtype(model)
    parts: list[torch.Tensor] = []
    order: list[int] = []
    with eval_mode(model), torch.inference_mode():
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                batch = torch.stack([lms_list[i] for i in chunk]).to(device=device, dtype=dtype)
                parts.append(model.encode_clap_audio_lms(batch).float().cpu())
                order.extend(chunk)
        embeddings = torch.cat(parts)
        out = torch.empty_like(embeddings)
        out[torch.tensor(order)] = embeddings
    return out


def embed_text(
    model: nn.Module,
    texts: Sequence[str],
    text_embedder: TextEmbedder | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """CLAP text embeddings ``[N, D]`` (float32, CPU) of ``texts``, in chunks of ``batch_size``.

    Without ``text_embedder`` the model embeds the strings itself. With it, ``text_embedder(chunk)``
    returns the raw sentence vectors (e.g. an offline cache lookup) and only the model's text map is
    applied, so a stage-1 model can be scored without loading its sentence encoder.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("embed_text needs a non-empty list of strings")
    parts: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            if text_embedder is None:
                emb = model.encode_clap_text(chunk)
            else:
                raw = torch.as_tensor(text_embedder(chunk))
                if raw.ndim != 2 or raw.shape[0] != len(chunk):
                    raise ValueError(f"text_embedder returned {tuple(raw.shape)} for {len(chunk)} strings")
                emb = model.encode_clap_text(raw)
            parts.append(emb.float().cpu())
    return torch.cat(parts)


def evaluate_clap(
    model: nn.Module,
    eval_set: ClapEvalSet,
    text_embedder: TextEmbedder | None = None,
    *,
    audio_batch_size: int = 32,
    text_batch_size: int = 64,
) -> dict[str, float]:
    """Zero-shot accuracy (``zs_acc``) and retrieval metrics (``a2t_*``, ``t2a_*``) of ``model``.

    Zero-shot scores every clip against one prompt per class; retrieval ranks all instance captions of the
    set against all clips (each clip embedded once). The model's train/eval flags are left as found.
    """
    results: dict[str, float] = {}
    with eval_mode(model):
        audio = embed_audio(model, eval_set.lms, audio_batch_size)
        if eval_set.class_names:
            class_emb = embed_text(model, eval_set.prompts(), text_embedder, text_batch_size)
            results["zs_acc"] = zero_shot_accuracy(audio, class_emb, eval_set.label_indices())
        texts, text_to_audio = eval_set.caption_pairs()
        if texts:
            text_emb = embed_text(model, texts, text_embedder, text_batch_size)
            results.update(retrieval_metrics(audio, text_emb, text_to_audio))
    return results
