"""Evaluation reports: metric tables, zero-shot confusion matrix, t-SNE of clip features, projector attention maps.

:func:`build_report` writes ``report.html`` and one PNG per figure into a directory. The HTML embeds the figures
as data URIs, so the one file renders on its own: in a Flyte Deck (``Deck(name, report_html(dir))``), in the
MLflow artefact viewer (which shows HTML in a sandboxed frame that cannot follow relative links), or opened from
disk. :func:`log_report` uploads the directory to an MLflow run.

Plots use matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so building a report
never needs a display and never changes the caller's matplotlib state. Every text in a figure is drawn as it is:
class names and clip titles come from datasets, and matplotlib would otherwise parse ``$...$`` in them as
mathtext (a label like ``50% $$`` or ``$x^$`` raised and lost the whole report).
"""

from __future__ import annotations

import base64
import functools
import html
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

from m2d2.models.chunks import frame_starts

__all__ = [
    "AttentionMap",
    "ReportFigure",
    "attention_weights",
    "build_report",
    "log_report",
    "plot_attention",
    "plot_confusion",
    "plot_tsne",
    "projector_attention",
    "add_section",
    "report_html",
    "tsne_embedding",
]

REPORT_FILE = "report.html"


# ----------------------------------------------------------------------------------------------------- attention
def attention_weights(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, heads, N, N]`` of a timm ``Block``'s self-attention for its input ``x [B, N, D]``.

    Recomputed from the block's own layers (``norm1``, ``attn.qkv``, ``q_norm``/``k_norm``, ``scale``) because
    the fused kernel the block runs never materialises the weights.
    """
    attn = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@dataclass
class AttentionMap:
    """Where the projector's semantic token looks: weights over the ``F x T`` patch grid of one clip.

    ``weights[f, c]`` is the (head-averaged) attention of the semantic token, in the projector's last block, on
    the patch of frequency band ``f`` and feature frame ``c``; ``starts[c]`` is that frame's first log-mel frame
    (chunks of 1001 frames leave gaps). ``self_weight`` is what the token gives itself (the rest sums to
    ``1 - self_weight``).
    """

    lms: np.ndarray  # [n_mels, T] raw log-mel
    weights: np.ndarray  # [F, T_cols]
    starts: np.ndarray  # [T_cols]
    patch_size: tuple[int, int]
    self_weight: float
    title: str = ""

    def frame_image(self) -> np.ndarray:
        """The weights spread over the log-mel grid ``[n_mels, T]`` (NaN where no patch was encoded)."""
        pf, pt = self.patch_size
        image = np.full(self.lms.shape, np.nan)
        for c, start in enumerate(self.starts):
            stop = min(start + pt, self.lms.shape[1])
            for f in range(self.weights.shape[0]):
                image[f * pf : (f + 1) * pf, start:stop] = self.weights[f, c]
        return image


@torch.inference_mode()
def projector_attention(model: nn.Module, lms: torch.Tensor, title: str = "") -> AttentionMap:
    """The semantic token's attention over the patches of one raw log-mel clip ``[n_mels, T]`` (paper Fig. 7).

    Runs the encoder as CLAP inference does (chunked, no mask), then the projector blocks; the last block's
    attention row of the semantic token is split back into chunks and reshaped frequency-major to ``F x t``.
    """
    if lms.ndim != 2:
        raise ValueError(f"expected one raw log-mel [n_mels, T], got shape {tuple(lms.shape)}")
    encoder, proj = model.encoder, model.audio_proj
    x_in = lms[None].to(model.norm_stats.device)
    chunks = encoder.encode_chunks(model.normalize(x_in))
    x = torch.cat([proj.sem_token.expand(1, -1, -1), torch.cat(chunks, dim=1).to(proj.sem_token.dtype)], dim=1)
    for block in proj.sem_blocks[:-1]:
        x = block(x)
    row = attention_weights(proj.sem_blocks[-1], x)[0, :, 0].mean(dim=0).cpu().double()  # [1 + N]
    bands = encoder.grid[0]
    grids, offset = [], 1
    for chunk in chunks:
        n = chunk.shape[1]
        grids.append(row[offset : offset + n].reshape(bands, n // bands))
        offset += n
    weights = torch.cat(grids, dim=1).numpy()
    starts = frame_starts(lms.shape[-1], encoder.chunk_frames, encoder.patch_frames)
    return AttentionMap(lms.detach().cpu().float().numpy(), weights, starts, tuple(encoder.config.patch_size),
                        float(row[0]), title)


# ----------------------------------------------------------------------------------------------------- figures
@dataclass
class ReportFigure:
    """A PNG written next to the report, with the caption the HTML shows under it."""

    path: Path
    caption: str


_P = ParamSpec("_P")
_R = TypeVar("_R")

# Applied while a figure is built and drawn: Text objects read these when they are created (tick labels, titles,
# legends, annotations alike), and TeX would choke on the same characters. rc_context restores the caller's values.
_PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def _plain_text(plot: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a plotting function with every label rendered literally (no mathtext, no TeX)."""

    @functools.wraps(plot)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from matplotlib import rc_context

        with rc_context(_PLAIN_TEXT):
            return plot(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


@_plain_text
def plot_attention(maps: Sequence[AttentionMap], path: str | Path, hop_seconds: float = 0.01) -> Path:
    """Each clip's log-mel (grey) with the semantic token's attention (colour) over the patches it covers."""
    if not maps:
        raise ValueError("no attention maps to plot")
    fig = _figure(9.0, 2.4 * len(maps))
    axes = fig.subplots(len(maps), 1, squeeze=False)[:, 0]
    for ax, amap in zip(axes, maps):
        extent = (0.0, amap.lms.shape[1] * hop_seconds, 0, amap.lms.shape[0])
        ax.imshow(amap.lms, origin="lower", aspect="auto", cmap="gray", extent=extent)
        image = ax.imshow(np.ma.masked_invalid(amap.frame_image()), origin="lower", aspect="auto", cmap="inferno",
                          alpha=0.55, extent=extent)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="attention")
        ax.set_ylabel("mel bin")
        ax.set_title(f"{amap.title}  (semantic token on itself: {amap.self_weight:.2f})", fontsize=9)
    axes[-1].set_xlabel("time (s)")
    return _save(fig, Path(path))


@_plain_text
def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) with the counts written in the cells."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    if matrix.shape != (k, k):
        raise ValueError(f"confusion matrix {matrix.shape} does not match {k} class names")
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * k + 2.0)
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k), labels=class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, Path(path))


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``[N, D]`` features (standardised per dimension; PCA init; perplexity min(30, (N-1)/3))."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"t-SNE needs [N >= 4, D] features, got shape {x.shape}")
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    perplexity = min(30.0, (x.shape[0] - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


@_plain_text
def plot_tsne(features: np.ndarray, labels: Sequence[int], class_names: Sequence[str], path: str | Path,
              seed: int = 0, title: str = "") -> Path:
    """t-SNE of clip features, one colour per class."""
    points = tsne_embedding(features, seed)
    labels = np.asarray(labels)
    fig = _figure(7.0, 5.5)
    ax = fig.subplots()
    cmap = _class_colours(len(class_names))
    for k, name in enumerate(class_names):
        mask = labels == k
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=14, color=cmap[k], label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, Path(path))


def _class_colours(k: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if k > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(k)]


# ----------------------------------------------------------------------------------------------------- report
@dataclass
class _Table:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def build_report(
    out_dir: str | Path,
    title: str,
    tables: Mapping[str, Mapping[str, object]],
    *,
    confusion: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    clip_features: np.ndarray | torch.Tensor | None = None,
    clip_labels: Sequence[int] | None = None,
    attention: Sequence[AttentionMap] = (),
    notes: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Write ``report.html`` (self-contained) and its PNGs into ``out_dir``; returns ``out_dir``.

    ``tables`` maps a section title to ``{metric: value}``. A confusion matrix needs ``class_names``; the
    t-SNE plot needs ``clip_labels`` (class indices into ``class_names``) and at least 4 clips.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [_Table(name, [(k, _fmt(v)) for k, v in rows.items()]) for name, rows in tables.items()]
    figures: list[ReportFigure] = []
    if confusion is not None:
        if class_names is None:
            raise ValueError("a confusion matrix needs class_names")
        matrix = np.asarray(confusion)
        figures.append(ReportFigure(plot_confusion(matrix, class_names, out / "confusion.png"),
                                    "Zero-shot confusion matrix (rows: true class; colour: row fraction)."))
        recall = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
        sections.append(_Table("Zero-shot recall per class",
                               [(name, f"{r:.3f} ({int(matrix[i].sum())} clips)")
                                for i, (name, r) in enumerate(zip(class_names, recall))]))
    if clip_features is not None:
        if clip_labels is None or class_names is None:
            raise ValueError("a t-SNE plot needs clip_labels and class_names")
        features = clip_features.numpy() if isinstance(clip_features, torch.Tensor) else np.asarray(clip_features)
        figures.append(ReportFigure(plot_tsne(features, clip_labels, class_names, out / "tsne.png", seed),
                                    f"t-SNE of {features.shape[0]} clip features ({features.shape[1]}-d, "
                                    "time-averaged frame features), coloured by class."))
    if attention:
        figures.append(ReportFigure(plot_attention(attention, out / "attention.png"),
                                    "Audio-projector attention: the semantic token's weights over the patch "
                                    "tokens (last projector block, heads averaged) on the log-mel."))
    (out / REPORT_FILE).write_text(_render(title, sections, figures, notes))
    return out


def _render(title: str, tables: Sequence[_Table], figures: Sequence[ReportFigure], notes: Sequence[str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:70em}"
        "table{border-collapse:collapse;margin:0 0 1.2em 0}"
        "td,th{border:1px solid #ccc;padding:2px 10px;text-align:left;font-size:0.9em}"
        "td.v{text-align:right;font-family:monospace}figure{margin:0 0 1.5em 0}img{max-width:100%}"
        "figcaption{font-size:0.85em;color:#444}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    parts += [f"<p>{e(note)}</p>" for note in notes]
    for table in tables:
        parts.append(f"<h2>{e(table.title)}</h2><table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td>{e(k)}</td><td class='v'>{e(v)}</td></tr>" for k, v in table.rows]
        parts.append("</table>")
    for fig in figures:
        data = base64.b64encode(fig.path.read_bytes()).decode()
        parts.append(f"<figure><img alt='{e(fig.path.name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(fig.caption)} ({e(fig.path.name)})</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def add_section(report_dir: str | Path, section_html: str) -> None:
    """Insert a ready-made HTML section (e.g. the suite table) at the end of an existing report."""
    path = Path(report_dir) / REPORT_FILE
    text = path.read_text()
    if "</body>" not in text:
        raise ValueError(f"{path} is not a report written by build_report")
    path.write_text(text.replace("</body>", section_html + "</body>", 1))


def report_html(report_dir: str | Path) -> str:
    """The report's HTML, for ``flytekit.Deck(name, report_html(dir))`` in the workflow."""
    return (Path(report_dir) / REPORT_FILE).read_text()


def log_report(report_dir: str | Path, run_id: str, artifact_path: str = "report") -> None:
    """Upload the report directory (HTML + PNGs) to ``run_id`` under ``artifact_path`` (client API, explicit run)."""
    from m2d2 import tracking

    path = Path(report_dir)
    if not (path / REPORT_FILE).is_file():
        raise FileNotFoundError(f"{path} holds no {REPORT_FILE}; build the report first")
    tracking.client().log_artifacts(run_id, os.fspath(path), artifact_path)
