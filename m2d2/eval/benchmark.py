"""The downstream benchmark: models x tasks, each task scored by its protocols, one table.

For every task (:mod:`m2d2.eval.tasks`) the clips are decoded once, cut to the task's length (EVAR's ``unit_sec``:
a longer clip is randomly cropped, a shorter one zero-padded; the crop offset is seeded per clip, so a run is
reproducible) and turned into log-mels; every model then encodes each clip on its own (as :mod:`m2d2.inference`
does, chunked at the encoder's length). A model's clip features and CLAP embeddings of a task are cached under
``cache_dir``, keyed by the model's weights, the task's clip list and the protocol version, so a second run of the
same model reads them back. The protocols, as the paper applies them (Section IV; EVAR ``lineareval.py``,
``zeroshot.py``, ``retr_a2t_t2a.py``):

- ``linear``: the frozen 3840-d clip features, the EVAR probe (:mod:`m2d2.eval.probe`: Adam 3e-5, up to 200
  epochs, early stopping with patience 20); leave-one-fold-out on folded tasks (mean +- std over folds), the
  official train/valid/test split otherwise (mean +- std over ``linear_runs`` seeds);
- ``zero_shot``: one caption per class by the task's Table VI rule, cosine similarity; accuracy on single-label
  tasks, mAP on multi-label ones (AudioSet, FSD50K); the test split, or every fold's clips averaged over folds;
- ``retrieval``: every caption of a clip is a query; R@1/5/10 and mAP@10 in both directions (Table VIII);
- ``tagging``: a fine-tuned tagger's (stage 1.1's) chunk-averaged logits, macro mAP over the classes.

A clip whose audio cannot be decoded is left out of that task and counted by reason (each result's ``skipped``,
in ``suite_results.json``); a task no given model can be scored on is left out with a warning.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io as _io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from m2d2 import io
from m2d2.audio.decode import AudioDecodeError, load_audio
from m2d2.eval.metrics import (
    mean_and_std,
    mean_average_precision,
    retrieval_metrics,
    zero_shot_map,
    zero_shot_predictions,
)
from m2d2.eval.paper import paper_value
from m2d2.eval.probe import LinearProbeConfig, linear_probe, linear_probe_folds
from m2d2.eval.prompts import class_prompts
from m2d2.eval.tasks import LINEAR, RETRIEVAL, TAGGING, ZERO_SHOT, Task, TaskData

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARK_PROTOCOL",
    "BenchmarkResult",
    "BenchmarkSettings",
    "EvalModel",
    "TaskResult",
    "linear_evaluation",
    "retrieval_evaluation",
    "run_benchmark",
    "zero_shot_evaluation",
]

BENCHMARK_PROTOCOL = "m2d2-benchmark/1"  # bump when a protocol changes: cached features and suite digests follow


@dataclass(frozen=True)
class BenchmarkSettings:
    """How the suite runs. ``linear_runs``: seeds averaged on tasks with a fixed split (EVAR's paper numbers are
    a mean over runs); ``max_clips`` > 0 keeps the first clips of each split (a smoke run, never the paper's)."""

    seed: int = 0
    linear_runs: int = 1
    max_clips: int = 0
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def __post_init__(self) -> None:
        if self.linear_runs < 1 or self.max_clips < 0:
            raise ValueError(f"linear_runs must be >= 1 and max_clips >= 0: {self}")


@dataclass
class EvalModel:
    """One model of the table: an :class:`~m2d2.models.M2D2` (clip features, CLAP) and/or a tagger.

    ``text_embedder`` embeds caption strings for zero-shot and retrieval when the model cannot (a stage-1 model's
    offline sentence encoder); ``clap`` False leaves the CLAP protocols out (a model whose projector was never
    trained, e.g. the tagger's encoder), ``linear`` False the linear evaluation. ``tagger`` is
    ``(FineTuneModel, class names)``; its log-mels come from ``model``'s front end.
    """

    name: str
    model: object | None = None
    text_embedder: Callable[[list[str]], torch.Tensor] | None = None
    clap: bool = True
    tagger: tuple[object, list[str]] | None = None
    linear: bool = True

    def protocols(self) -> set[str]:
        out = set()
        if self.model is not None:
            if self.linear:
                out.add(LINEAR)
            if self.clap:
                out |= {ZERO_SHOT, RETRIEVAL}
        if self.tagger is not None:
            out.add(TAGGING)
        return out


@dataclass
class TaskResult:
    """One model on one task: metrics (fractions), clips scored, clips skipped with reasons, wall time."""

    task: str
    model: str
    metrics: dict[str, float]
    clips: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    results: list[TaskResult]
    titles: dict[str, str] = field(default_factory=dict)
    task_seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat ``<model>/<task>/<metric>`` values, and ``<task>/seconds``: what MLflow gets."""
        out = {f"{r.model}/{r.task}/{k}": v for r in self.results for k, v in r.metrics.items()}
        out.update({f"{task}/seconds": s for task, s in self.task_seconds.items()})
        return out

    def rows(self) -> list[dict[str, object]]:
        """The table, one row per (task, metric): the measured value per model and the paper's where it exists."""
        table: dict[tuple[str, str], dict[str, object]] = {}
        for r in self.results:
            for key, value in r.metrics.items():
                if not shown_metric(key):
                    continue
                row = table.setdefault((r.task, key), {"task": r.task, "title": self.titles.get(r.task, r.task),
                                                       "metric": key, "seconds": self.task_seconds.get(r.task)})
                std = r.metrics.get(f"{key}_std")
                row[r.model] = value
                row[f"{r.model} std"] = std
                reference = paper_value(r.task, key, r.model)
                if reference is not None:
                    row[f"{r.model} paper"] = reference
        return list(table.values())

    def write(self, out_dir: str | Path) -> Path:
        """``suite_table.csv``, ``suite_table.md``, ``suite_table.html`` and ``suite_results.json`` in ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        models = list(dict.fromkeys(r.model for r in self.results))
        header = ["task", "metric"] + [c for m in models for c in (m, f"{m} std", f"{m} paper")] + ["seconds"]
        buf = _io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in header])
        io.atomic_write_bytes(str(out / "suite_table.csv"), buf.getvalue().encode())
        io.atomic_write_bytes(str(out / "suite_table.md"), self.markdown().encode())
        io.atomic_write_bytes(str(out / "suite_table.html"), self.html().encode())
        payload = {"protocol": BENCHMARK_PROTOCOL, "results": [asdict(r) for r in self.results],
                   "task_seconds": self.task_seconds}
        io.atomic_write_bytes(str(out / "suite_results.json"), json.dumps(payload, indent=2).encode())
        return out

    def _display(self) -> tuple[list[str], list[list[str]]]:
        models = list(dict.fromkeys(r.model for r in self.results))
        header = ["Task", "Metric"] + models + ["Time"]
        body = []
        for row in self.rows():
            cells = [str(row["title"]), str(row["metric"])]
            for m in models:
                value = row.get(m)
                text = "" if value is None else f"{100 * value:.2f}"
                if value is not None and row.get(f"{m} std") is not None:
                    text += f" ± {100 * row[f'{m} std']:.2f}"
                if row.get(f"{m} paper") is not None:
                    text += f" (paper {100 * row[f'{m} paper']:.2f})"
                cells.append(text)
            seconds = row.get("seconds")
            cells.append("" if seconds is None else f"{seconds:.1f} s")
            body.append(cells)
        return header, body

    def markdown(self) -> str:
        """The table as GitHub markdown; values in %, the paper's in parentheses."""
        header, body = self._display()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The table as a standalone HTML section (the report embeds it)."""
        header, body = self._display()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
        return (f"<section><h2>Downstream tasks (values in %, the paper's in parentheses)</h2>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></section>\n")


def shown_metric(metric: str) -> bool:
    """A figure of the table (fractions); stds go beside their mean, per-fold scores, best epochs and clip counts
    stay in ``suite_results.json``."""
    return not (metric.endswith("_std") or metric == "clips" or "best_epoch" in metric
                or re.search(r"_fold\d+$", metric))


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ------------------------------------------------------------------------------------------------------ protocols
def linear_evaluation(features: np.ndarray, data: TaskData, keep: Sequence[int], config: LinearProbeConfig,
                      runs: int = 1, seed: int = 0) -> dict[str, float]:
    """``probe_acc`` (or ``probe_mAP``) and its std: leave-one-fold-out on folded tasks, else train/valid/test.

    ``keep`` are the clips that could be encoded (``features`` holds one row per kept clip, in that order).
    """
    labels = _label_targets(data, keep)
    splits = np.array([data.splits[i] for i in keep])
    if data.folds:
        fold_ids = np.array([data.folds.index(s) for s in splits])
        return linear_probe_folds(features, labels, fold_ids, config).as_metrics("probe")
    parts = {name: np.flatnonzero(splits == name) for name in ("train", "valid", "test")}
    if not parts["train"].size or not parts["test"].size:
        raise ValueError(f"task {data.name!r}: linear evaluation needs train and test clips, "
                         f"got {', '.join(f'{k} {v.size}' for k, v in parts.items())}")
    valid = parts["valid"] if parts["valid"].size else None
    scores = []
    for run in range(runs):
        cfg = LinearProbeConfig(**{**asdict(config), "seed": config.seed + seed + run})
        result = linear_probe(features[parts["train"]], labels[parts["train"]], features[parts["test"]],
                              labels[parts["test"]], None if valid is None else features[valid],
                              None if valid is None else labels[valid], config=cfg)
        scores.append({f"probe_{result.metric}": result.score})
    return mean_and_std(scores)


def zero_shot_evaluation(audio: torch.Tensor, class_emb: torch.Tensor, data: TaskData,
                         keep: Sequence[int]) -> dict[str, float]:
    """``zs_acc`` (single-label) or ``zs_mAP`` (multi-label) over the test clips, or the mean over folds."""
    splits = [data.splits[i] for i in keep]
    groups = [[f] for f in data.folds] if data.folds else [["test"]]
    targets = _label_targets(data, keep)
    scores = []
    for group in groups:
        rows = [j for j, s in enumerate(splits) if s in group]
        if not rows:
            continue
        if data.multi_label:
            scores.append(zero_shot_map(audio[rows], class_emb, torch.from_numpy(targets[rows])))
        else:
            predictions = zero_shot_predictions(audio[rows], class_emb).numpy()
            scores.append(float((predictions == targets[rows]).mean()))
    if not scores:
        raise ValueError(f"task {data.name!r}: zero-shot needs test clips (or folds)")
    key = "zs_mAP" if data.multi_label else "zs_acc"
    out = {key: float(np.mean(scores))}
    if len(scores) > 1:
        out[f"{key}_std"] = float(np.std(scores, ddof=1))
    return out


def retrieval_evaluation(audio: torch.Tensor, text_emb: torch.Tensor, owners: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 and mAP@10 both ways, every caption a query (keys without ``@``: ``a2t_R1``, ``t2a_mAP10``)."""
    metrics = retrieval_metrics(audio, text_emb, owners, (1, 5, 10))
    return {k.replace("@", ""): v for k, v in metrics.items()}


def _label_targets(data: TaskData, keep: Sequence[int]) -> np.ndarray:
    """Class ids ``[N]`` (single-label) or a multi-hot ``[N, C]`` matrix of the kept clips."""
    index = {c: k for k, c in enumerate(data.classes)}
    if data.multi_label:
        targets = np.zeros((len(keep), len(data.classes)), dtype=np.float32)
        for row, i in enumerate(keep):
            for label in data.labels[i]:
                targets[row, index[label]] = 1.0
        return targets
    bad = [data.audio[i] for i in keep if len(data.labels[i]) != 1]
    if bad:
        raise ValueError(f"task {data.name!r} is single-label but {len(bad)} clips have no or several labels, "
                         f"e.g. {bad[0]}")
    return np.array([index[data.labels[i][0]] for i in keep], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ features
def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _cut(wave: torch.Tensor, samples: int, rng: np.random.Generator) -> torch.Tensor:
    """EVAR's unit length: a random crop of a longer clip, zeros appended to a shorter one."""
    if wave.shape[0] > samples:
        start = int(rng.integers(0, wave.shape[0] - samples + 1))
        return wave[start : start + samples]
    return torch.nn.functional.pad(wave, (0, samples - wave.shape[0]))


def _clip_length(data: TaskData, indices: list[int], duration_s: float, sample_rate: int) -> int:
    """Samples per clip: the task's length, or (0) the mean duration of its clips from their headers."""
    if duration_s > 0:
        return max(1, round(duration_s * sample_rate))
    from m2d2.audio.decode import audio_info

    seconds = []
    for i in indices:
        try:
            info = audio_info(data.audio[i])
        except (AudioDecodeError, OSError):
            continue  # counted when the pass decodes it
        seconds.append(info.frames / info.sample_rate)
    return max(1, round(float(np.mean(seconds)) * sample_rate)) if seconds else sample_rate


@dataclass
class _Pass:
    """One pass over a task's clips: what every model that needs computing made of each clip it could decode."""

    kept: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    clip: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    clap: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _encode_pass(data: TaskData, indices: list[int], samples: int, seed: int, front, featured: list[EvalModel],
                 tagging: list[EvalModel], progress: bool) -> _Pass:
    """Decode each clip once, cut it to ``samples`` (seeded per clip), and run every listed model on it.

    Streaming, so memory holds the features (a few KB per clip and model), never the task's audio.
    """
    from m2d2.eval.tagging import chunked_logits
    from m2d2.inference import Embedder

    embedders = {m.name: Embedder(m.model) for m in featured}
    out = _Pass(clip={m.name: [] for m in featured}, clap={m.name: [] for m in featured},
                logits={m.name: [] for m in tagging})
    sample_rate = front.frontend.config.sample_rate
    for i in tqdm(indices, desc=data.name, unit="clip", disable=not progress):
        try:
            wave = load_audio(data.audio[i], sample_rate)
        except (AudioDecodeError, FileNotFoundError, OSError) as exc:
            out.skipped.append((data.audio[i], f"{getattr(exc, 'kind', type(exc).__name__)}: {exc}"))
            continue
        with torch.inference_mode():
            lms = front.to_log_mel(_cut(wave, samples, np.random.default_rng([seed, i])))[0].cpu()
        for m in featured:
            c, a = embedders[m.name].clip_and_clap_audio_lms([lms])
            out.clip[m.name].append(c[0])
            out.clap[m.name].append(a[0])
        for m in tagging:
            out.logits[m.name].append(chunked_logits(m.tagger[0], [lms])[0])
        out.kept.append(i)
    if not out.kept:
        raise ValueError(f"task {data.name!r}: none of its {len(indices)} clips could be decoded; "
                         f"first: {out.skipped[0][1] if out.skipped else '-'}")
    return out


def _cache_path(cache_dir: str | Path | None, task: str, fingerprint: str, clip_key: str) -> Path | None:
    if cache_dir is None:
        return None
    return Path(cache_dir) / task / f"{fingerprint[:20]}-{clip_key[:20]}.npz"


def _read_cache(path: Path | None):
    if path is None or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return (torch.from_numpy(saved["clip"]), torch.from_numpy(saved["clap"]), saved["kept"].tolist(),
                [tuple(x) for x in saved["skipped"].tolist()])


def _write_cache(path: Path, clip: torch.Tensor, clap: torch.Tensor, kept: list[int],
                 skipped: list[tuple[str, str]]) -> None:
    buf = _io.BytesIO()
    np.savez(buf, clip=clip.numpy(), clap=clap.numpy(), kept=np.array(kept, dtype=np.int64),
             skipped=np.array(skipped, dtype=str).reshape(-1, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    io.atomic_write_bytes(str(path), buf.getvalue())


# ------------------------------------------------------------------------------------------------------ runner
def run_benchmark(
    models: Sequence[EvalModel],
    tasks: Sequence[tuple[Task, TaskData]],
    settings: BenchmarkSettings | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Score every model on every task by the protocols both support; features once per model and task."""
    settings = settings or BenchmarkSettings()
    fronts = {json.dumps(asdict(m.model.frontend.config), sort_keys=True): m.model for m in models if m.model}
    if len(fronts) != 1:
        raise ValueError("the models must share one log-mel front end (and at least one must be given); "
                         "evaluate models with different front ends in separate runs")
    front = next(iter(fronts.values()))
    fingerprints = {}  # every weight of each model hashed once, not once per task
    if cache_dir is not None:
        from m2d2.inference import Embedder

        fingerprints = {m.name: Embedder(m.model).audio_fingerprint() for m in models if m.model is not None}
    results: list[TaskResult] = []
    titles, task_seconds = {}, {}
    for task, data in tqdm(tasks, desc="suite", unit="task", disable=not progress):
        wanted = {m.name: [p for p in task.protocols if p in m.protocols()] for m in models}
        if not any(wanted.values()):
            log.warning("%s: none of the models can be scored by its protocols (%s); left out", task.name,
                        ", ".join(task.protocols))
            continue
        started = time.perf_counter()
        titles[task.name] = task.title
        indices = _selected(data, settings.max_clips)
        samples = _clip_length(data, indices, task.duration_s, front.frontend.config.sample_rate)
        clip_key = _digest(BENCHMARK_PROTOCOL, task.name, samples, settings.seed, [data.audio[i] for i in indices])
        featured = [m for m in models if set(wanted[m.name]) - {TAGGING}]
        tagging = [m for m in models if TAGGING in wanted[m.name]]
        paths = {m.name: _cache_path(cache_dir, task.name, fingerprints.get(m.name, ""), clip_key) for m in featured}
        cached = {m.name: _read_cache(paths[m.name]) for m in featured}
        missing = [m for m in featured if cached[m.name] is None]
        done = _encode_pass(data, indices, samples, settings.seed, front, missing, tagging, progress) \
            if missing or tagging else None
        for m in missing:
            clip, clap = torch.stack(done.clip[m.name]), torch.stack(done.clap[m.name])
            cached[m.name] = (clip, clap, done.kept, done.skipped)
            if paths[m.name] is not None:
                _write_cache(paths[m.name], clip, clap, done.kept, done.skipped)
        for m in models:
            if not wanted[m.name]:
                continue
            t0 = time.perf_counter()
            metrics: dict[str, float] = {}
            kept, skipped = (done.kept, done.skipped) if done is not None else cached[m.name][2:]
            if TAGGING in wanted[m.name]:
                tagger, classes = m.tagger
                if list(classes) != list(data.classes):
                    raise ValueError(f"{m.name}: the tagger's {len(classes)} classes differ from task "
                                     f"{task.name!r}'s {len(data.classes)}")
                logits = torch.stack(done.logits[m.name])
                metrics["tag_mAP"] = mean_average_precision(logits, _label_targets(data, kept))
            if m in featured:
                clip, clap, kept, skipped = cached[m.name]
                if LINEAR in wanted[m.name] and data.labels:
                    metrics.update(linear_evaluation(clip.numpy().astype(np.float64), data, kept, settings.probe,
                                                     settings.linear_runs, settings.seed))
                if ZERO_SHOT in wanted[m.name] and data.labels:
                    class_emb = _embed_text(m, class_prompts(task.prompt, list(data.classes)))
                    metrics.update(zero_shot_evaluation(clap, class_emb, data, kept))
                if RETRIEVAL in wanted[m.name] and data.captions:
                    texts = [c for i in kept for c in data.captions[i]]
                    owners = torch.tensor([row for row, i in enumerate(kept) for _ in data.captions[i]])
                    metrics.update(retrieval_evaluation(clap, _embed_text(m, texts), owners))
            metrics["clips"] = float(len(kept))
            results.append(TaskResult(task.name, m.name, metrics, len(kept), time.perf_counter() - t0,
                                      _reasons(skipped)))
        task_seconds[task.name] = time.perf_counter() - started
        skipped = done.skipped if done is not None else next(iter(cached.values()))[3]
        if skipped:
            log.warning("%s: %d clips skipped (%s)", task.name, len(skipped), _reasons(skipped))
    return BenchmarkResult(results, titles, task_seconds)


def _selected(data: TaskData, max_clips: int) -> list[int]:
    if max_clips <= 0:
        return list(range(len(data.audio)))
    chosen: list[int] = []
    for split in dict.fromkeys(data.splits):
        chosen += data.indices(split)[:max_clips]
    return sorted(chosen)


def _reasons(skipped: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, reason in skipped:
        kind = reason.split(":", 1)[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def _embed_text(entry: EvalModel, texts: list[str]) -> torch.Tensor:
    from m2d2.eval.clap import embed_text

    return embed_text(entry.model, texts, entry.text_embedder)


# ------------------------------------------------------------------------------------------------------ suites
CORPUS = "corpus"  # in a pipeline suite: the execution's own evaluation split (m2d2.pipeline.evaluation)


def parse_task(spec: str, tasks_root: str = "") -> tuple[Task, str]:
    """``name`` -> the registered task and its folder under ``tasks_root``; ``name=FOLDER`` -> a custom task."""
    from m2d2.eval.tasks import custom_task, task

    if "=" in spec:
        name, folder = (part.strip() for part in spec.split("=", 1))
        if not folder:
            raise ValueError(f"task {spec!r}: give the folder after '='")
        if name in _registered():
            raise ValueError(f"task {spec!r}: {name!r} is a registered task; give a custom task another name")
        return custom_task(name, folder, protocols=(LINEAR, ZERO_SHOT, RETRIEVAL)), folder
    found = task(spec.strip())
    if not tasks_root:
        raise ValueError(f"task {spec!r} needs a data root holding its dataset ({found.layout or found.folder}): "
                         "set tasks_root / --data-root")
    return found, io.join(tasks_root, found.folder)


def _registered() -> set[str]:
    from m2d2.eval.tasks import TASKS

    return set(TASKS)


def check_suite(suite: Sequence[str], tasks_root: str) -> None:
    """Refuse a suite that cannot run: unknown names, duplicates, downstream tasks without ``tasks_root``."""
    names = [spec.split("=", 1)[0].strip() for spec in suite]
    if len(set(names)) != len(names):
        raise ValueError(f"suite: {list(suite)} names a task twice")
    registered = _registered()
    for spec in suite:
        if spec == CORPUS:
            continue
        if "=" in spec:
            parse_task(spec)
        elif spec not in registered:
            raise ValueError(f"suite: unknown task {spec!r}; known: {CORPUS}, {', '.join(sorted(registered))}, "
                             "or NAME=FOLDER for a folder with a labels.csv")
        elif not tasks_root:
            raise ValueError(f"suite: task {spec!r} needs tasks_root, the folder (local or s3://) holding each "
                             "task's dataset in its published layout")


def task_digest(task: Task, data: TaskData) -> str:
    """What a score on this task depends on besides the model: protocol, clip length, the clip list with labels,
    splits and captions (not the audio bytes, which would mean reading every file)."""
    return _digest(BENCHMARK_PROTOCOL, task.name, sorted(task.protocols), task.duration_s, task.prompt,
                   list(data.audio), [list(x) for x in data.labels], list(data.splits),
                   [list(x) for x in data.captions], list(data.classes))


def headline(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """The figure each protocol is read by: probe accuracy (or mAP), zero-shot accuracy (or mAP), text-to-audio
    R@1, tagging mAP. ``suite_mean`` averages these over a model's tasks."""
    keys = ("probe_acc", "probe_mAP", "zs_acc", "zs_mAP", "t2a_R1", "tag_mAP")
    return {f"{task}/{k}": metrics[k] for k in keys if k in metrics}
