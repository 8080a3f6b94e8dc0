"""Evaluation step: every trained stage's CLAP metrics against random-initialisation baselines, and each model
variant's suite and report."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m2d2.data.features import LogMelStore
from m2d2.eval.benchmark import (
    BENCHMARK_PROTOCOL,
    CORPUS,
    BenchmarkResult,
    BenchmarkSettings,
    EvalModel,
    TaskResult,
    headline,
    parse_task,
    run_benchmark,
    task_digest,
)
from m2d2.eval.clap import EVAL_PROTOCOL, ClapEvalSet, evaluate_clap, suite_digest
from m2d2.eval.metrics import mean_and_std
from m2d2.eval.reports import add_section
from m2d2.models import M2D2
from m2d2.pipeline import registry
from m2d2.pipeline.config import PROMPT_TEMPLATE, EvaluationSettings
from m2d2.presets import model_config
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun

SUITE_FILE = "suite.json"  # in the report directory: the evaluation's digest, which registration records


def eval_set(feature_dir: str | Path, prompt_template: str = PROMPT_TEMPLATE) -> ClapEvalSet:
    store = LogMelStore(feature_dir, "eval")
    labels = [lab[0] for lab in store.labels]
    return ClapEvalSet(lms=[torch.from_numpy(store[i]) for i in range(len(store))], labels=labels,
                       captions=store.captions, class_names=sorted(set(labels)), prompt_template=prompt_template)


def evaluate_stages(
    settings: EvaluationSettings,
    feature_dir: str | Path,
    caption_cache: str | Path,
    exports: dict[str, str],
    parent_run_id: str | None = None,
    stage_metrics: dict[str, dict[str, float]] | None = None,
    report_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, float], str | None]:
    """Every trained stage's model scored as the registry says: CLAP stages by zero-shot and retrieval against
    their random-initialisation baseline, tagging stages by the metrics they measured themselves (``stage_metrics``).

    ``exports`` maps each trained stage's name to its export. Baselines keep the text side their stage starts from:
    a stage trained on the caption vectors is compared with a random audio encoder, projector and text map over the
    same vectors; a stage that starts from another stage's export (stage 2 on stage 1's or stage 1.1's encoder)
    with that frozen encoder, a fresh projector and the untouched pretrained text encoder. Each is averaged over
    ``settings.baseline_inits`` seeds. With ``report_dir``, each variant's model (``settings.variants``) also gets
    the full suite (:func:`m2d2.eval.suite.evaluate_suite`: linear probe, R@50, confusion matrix, t-SNE, projector
    attention) under ``<variant>/`` keys and its HTML report in ``report_dir/<variant>``, logged to MLflow.

    ``settings.suite`` says what else runs: ``corpus`` is the above (the execution's evaluation split); every other
    entry is a downstream task (:mod:`m2d2.eval.benchmark`) scored for each variant's model (and stage 1.1's
    tagger on tagging tasks), its metrics under ``<variant>/<task>/<metric>``, with features cached in
    ``cache_dir``. Each variant also gets ``suite_mean``, and ``report_dir`` the suite table (``suite_table.*``).
    """
    stages = tuple(s for s in registry.STAGES if s.name in exports)
    data = eval_set(feature_dir, settings.prompt_template)
    cache = CaptionEmbeddings(caption_cache)

    def offline_text(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(cache.lookup(texts).astype(np.float32))

    results: dict[str, float] = {}
    models: dict[str, M2D2] = {}
    memo = EncoderMemo()  # frozen encoders are shared along each line: encode the evaluation set once per encoder
    for stage in stages:
        prefix = stage.name
        if stage.evaluation == "tagging":
            _put(results, prefix, (stage_metrics or {}).get(stage.name, {}))
            continue
        model = models[stage.name] = memo.attach(M2D2.from_pretrained(str(exports[stage.name])))
        if stage.trains_on == registry.CAPTIONS:
            cache.check_encoder(model.config.text.offline)
            _put(results, prefix, evaluate_clap(model, data, text_embedder=offline_text))
        else:
            _put(results, prefix, evaluate_clap(model, data))
    for name in dict.fromkeys(s.baseline for s in stages if s.evaluation == "clap" and s.baseline):
        _put(results, f"{name}_baseline",
             _baseline(settings, registry.stage(name), models[name], exports, data, offline_text, memo))
    results["num_classes"] = float(len(data.class_names))
    results["num_eval_clips"] = float(len(data.labels))
    for stage in stages:
        if stage.evaluation == "clap" and stage.baseline:
            results[f"{stage.name}_zs_gain"] = (results[f"{stage.name}/zs_acc"]
                                                 - results[f"{stage.baseline}_baseline/zs_acc"])
    suites = []
    table: list = []  # the suite table's rows (m2d2.eval.benchmark.TaskResult): the corpus, then downstream tasks
    task_seconds: dict[str, float] = {}
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
    if report_dir is not None and CORPUS in settings.suite:
        from m2d2.eval.suite import evaluate_suite

        started = time.perf_counter()
        for name in settings.variants:
            variant = registry.variant(name)
            final = registry.stage(variant.final)
            embedder = offline_text if final.trains_on == registry.CAPTIONS else None
            result = evaluate_suite(models[final.name], data, Path(report_dir) / name, text_embedder=embedder,
                                    title=f"{variant.title} ({name}): {final.title or final.name}")
            _put(results, name, {k: v for k, v in result.metrics.items()
                                 if k.startswith(("probe_", "a2t_R50", "t2a_R50", "zs_"))})
            suites.append((name, result))
            table.append(TaskResult(CORPUS, name, _corpus_row(results, final.name, result.metrics),
                                    len(data.labels), 0.0))
        for stage in dict.fromkeys(s.baseline for s in stages if s.evaluation == "clap" and s.baseline):
            table.append(TaskResult(CORPUS, f"{stage} baseline", {k.split("/", 1)[1]: v for k, v in results.items()
                                    if k.startswith(f"{stage}_baseline/")
                                    and k.split("/", 1)[1].removesuffix("_std") in _CORPUS_KEYS},
                                    len(data.labels), 0.0))
        task_seconds[CORPUS] = time.perf_counter() - started
    downstream = [spec for spec in settings.suite if spec != CORPUS]
    digests = {CORPUS: suite_digest(data)}  # what the registry compares versions by
    if downstream:
        bench = _downstream(settings, downstream, models, exports, cache_dir)
        table += bench.results
        task_seconds.update(bench.task_seconds)
        digests.update(bench.digests)
        for r in bench.results:  # a variant's (or stage 1.1's) figures on each task
            _put(results, r.model, {f"{r.task}/{k}": v for k, v in r.metrics.items()})
    suite = digests[CORPUS] if len(digests) == 1 else hashlib.sha256(
        json.dumps(digests, sort_keys=True).encode()).hexdigest()
    for name in settings.variants:
        heads = [v for r in table if r.model == name for v in headline(r.task, r.metrics).values()]
        if heads:
            results[f"{name}/suite_mean"] = float(np.mean(heads))
    summary = BenchmarkResult(table, {CORPUS: "Evaluation split (this execution)", **bench_titles(table)},
                              task_seconds)
    if report_dir is not None:
        (Path(report_dir) / SUITE_FILE).write_text(json.dumps({"digest": suite, "protocol": EVAL_PROTOCOL,
                                                               "benchmark_protocol": BENCHMARK_PROTOCOL,
                                                               "clips": len(data.labels), "tasks": digests}))
        if table:
            summary.write(report_dir)
            for _, result in suites:
                add_section(result.report_dir, summary.html())
    run_id = None
    if parent_run_id:
        params = {"baseline_inits": settings.baseline_inits, "prompt_template": settings.prompt_template,
                  "variants": ",".join(settings.variants), **{s.name: str(exports[s.name]) for s in stages}}
        with StageRun(parent_run_id, "evaluate", params=params, tags={"m2d2.eval_suite": suite}) as run:
            run.log_metrics(results, step=0)
            run.log_dict(results, "metrics.json")
            run_id = run.run_id
            if run_id is not None:
                from m2d2.eval.reports import log_report

                for name, result in suites:
                    log_report(result.report_dir, run_id, f"report/{name}")
                    _log_figures(run_id, name, result.report_dir)
                for path in sorted(Path(report_dir).glob("suite_*")):
                    run.log_artifact(path, "report")
                if table:
                    _log_table(run_id, summary)
    return results, run_id


def _log_figures(run_id: str, variant: str, report_dir: Path) -> None:
    """The report's figures as MLflow images of the evaluation run (its page shows them next to the metrics)."""
    import numpy as np
    from PIL import Image

    from m2d2.tracking import client

    mlflow = client()
    for png in sorted(Path(report_dir).glob("*.png")):
        with Image.open(png) as image:
            mlflow.log_image(run_id, np.asarray(image.convert("RGB")), key=f"{variant}/{png.stem}", step=0)


def _log_table(run_id: str, result: BenchmarkResult) -> None:
    """The suite table as an MLflow table artefact (the UI renders it), one row per task, metric and model."""
    from m2d2.tracking import client

    rows = [(r.task, key, r.model, value) for r in result.results for key, value in r.metrics.items()
            if not key.endswith("_std") and key != "clips"]
    client().log_table(run_id, {"task": [r[0] for r in rows], "metric": [r[1] for r in rows],
                                "model": [r[2] for r in rows], "value": [r[3] for r in rows]},
                       "report/suite_table.json")


_CORPUS_KEYS = ("zs_acc", "probe_acc", "a2t_R1", "a2t_R5", "a2t_R10", "a2t_mAP10", "t2a_R1", "t2a_R5", "t2a_R10",
                "t2a_mAP10")


def _corpus_row(results: dict[str, float], final: str, suite_metrics: dict[str, float]) -> dict[str, float]:
    """The corpus task's row of one model: its stage metrics (zero-shot, retrieval) and its suite's probe."""
    row = {k: results[f"{final}/{k}"] for k in _CORPUS_KEYS if f"{final}/{k}" in results}
    row.update({k: float(v) for k, v in suite_metrics.items() if k in ("probe_acc", "probe_acc_std")})
    return row


def bench_titles(table: list[TaskResult]) -> dict[str, str]:
    from m2d2.eval.tasks import TASKS

    return {r.task: TASKS[r.task].title for r in table if r.task in TASKS}


@dataclass
class _Downstream:
    results: list[TaskResult]
    task_seconds: dict[str, float]
    digests: dict[str, str]


def _downstream(settings: EvaluationSettings, specs: list[str], models: dict[str, M2D2], exports: dict[str, str],
                cache_dir: str | Path | None) -> _Downstream:
    """Each variant's model (and stage 1.1's tagger, for tagging tasks) on the suite's downstream tasks."""
    from m2d2.eval.tagging import load_tagger
    from m2d2.eval.tasks import TAGGING
    from m2d2.inference import attach_text_embedder

    tasks = []
    for spec in specs:
        task, root = parse_task(spec, settings.tasks_root)
        tasks.append((task, task.read(root)))
    entries = []
    for name in settings.variants:
        final = registry.variant(name).final
        entries.append(EvalModel(name, attach_text_embedder(models[final])))
    if any(TAGGING in task.protocols for task, _ in tasks):
        for stage in registry.STAGES:
            if stage.evaluation == "tagging" and stage.name in exports:
                base, tagger, classes = load_tagger(str(exports[stage.name]))
                entries.append(EvalModel(stage.name, base, clap=False, linear=False, tagger=(tagger, classes)))
    bench = run_benchmark(entries, tasks, BenchmarkSettings(linear_runs=settings.linear_runs), cache_dir=cache_dir)
    return _Downstream(bench.results, bench.task_seconds, {t.name: task_digest(t, d) for t, d in tasks})


def _baseline(settings: EvaluationSettings, stage: registry.Stage, trained: M2D2, exports: dict[str, str],
              data: ClapEvalSet, offline_text, memo: EncoderMemo) -> dict[str, float]:
    """Mean and std over ``settings.baseline_inits`` seeds of the random-initialisation baseline of ``stage``."""
    baselines = []
    if stage.trains_on == registry.CAPTIONS:
        for k in range(settings.baseline_inits):
            torch.manual_seed(10_000 + k)
            baselines.append(evaluate_clap(M2D2(trained.config, with_m2d=False), data, text_embedder=offline_text))
        return mean_and_std(baselines)
    # Only the fresh projector differs between seeds: the frozen encoder and the untouched pretrained text encoder
    # are the same for every seed, so the text vectors are computed once and each seed re-draws the projector.
    fresh = memo.attach(M2D2.from_pretrained(str(exports[stage.trains_on])))
    fresh.start_stage2(model_config(settings.models[stage.name]).text.encoder)
    texts = sorted({c for caps in data.captions for c in caps} | set(data.prompts()))
    with torch.inference_mode():
        raw = torch.cat([fresh.text_encoder(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    row = {t: i for i, t in enumerate(texts)}

    def pretrained_text(batch: list[str]) -> torch.Tensor:
        return raw[[row[t] for t in batch]]

    for k in range(settings.baseline_inits):
        torch.manual_seed(20_000 + k)
        fresh.audio_proj.reset_parameters()
        baselines.append(evaluate_clap(fresh, data, text_embedder=pretrained_text))
    return mean_and_std(baselines)


class EncoderMemo:
    """Encoder outputs shared by the models of one evaluation whose encoders hold the same weights (and each
    model's caption embeddings, which its stage metrics and its suite both compute).

    Stage 2 freezes the encoder it starts from, so M2D2⁻, M2D2 and M2D2⁺ (and stage 2's baseline) share stage 1's,
    and the AS+ line shares stage 1.1's: without this, each model, baseline seed and suite would encode the whole
    evaluation set again and get the same tokens. Outputs are keyed by the encoder's weights and the exact input, so
    a hit returns what the call would have computed; the memo stops storing at ``budget_bytes`` (a paper-size
    evaluation set would not fit in memory) and then only computes.
    """

    def __init__(self, budget_bytes: int = 2 << 30):
        self.budget, self.used, self.done = budget_bytes, 0, {}

    def attach(self, model: M2D2) -> M2D2:
        encoder = model.encoder
        weights = hashlib.blake2b(digest_size=16)
        for name, tensor in encoder.state_dict().items():
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        fingerprint, encode = weights.digest(), encoder.encode_chunks

        def encode_once(x: torch.Tensor) -> list[torch.Tensor]:
            key = (fingerprint, tuple(x.shape), str(x.dtype),
                   hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest())
            hit = self.done.get(key)
            if hit is not None:
                return hit
            out = encode(x)
            size = sum(t.numel() * t.element_size() for t in out)
            if self.used + size <= self.budget:
                self.done[key], self.used = out, self.used + size
            return out

        encoder.encode_chunks = encode_once
        texts_done: dict[tuple[str, ...], torch.Tensor] = {}
        encode_text = model.encode_clap_text

        def encode_text_once(text):  # the stage's metrics and its variant's suite embed the same captions
            if isinstance(text, (torch.Tensor, str)):
                return encode_text(text)
            key = tuple(text)
            if key not in texts_done:
                texts_done[key] = encode_text(text)
            return texts_done[key]

        model.encode_clap_text = encode_text_once
        return model


def _put(results: dict[str, float], prefix: str, metrics: dict[str, float]) -> None:
    """Prefix keys with the model; MLflow metric names cannot hold ``@`` (``a2t_R@1`` becomes ``a2t_R1``)."""
    results.update({f"{prefix}/{k.replace('@', '')}": float(v) for k, v in metrics.items()})
