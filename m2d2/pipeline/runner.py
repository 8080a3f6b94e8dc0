"""The pipeline in one process, and the pieces the Flyte tasks share with it.

:func:`run` executes the whole DAG (corpus -> features + caption vectors -> the stages of
:data:`~m2d2.pipeline.registry.STAGES` that the configured model variants need -> evaluation -> one registered
model per variant -> summary) with the same step directories and outputs as ``workflows/full.py``. Each step
records what it produced (``step.json``) next to its outputs, so running again with the same inputs reuses them —
and their MLflow runs — instead of recomputing: the same "cache hit" a Flyte execution sees, and one that can never
outlive the files it points at, since the record lives with them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2d2 import io
from m2d2.pipeline import registry
from m2d2.pipeline.config import (
    CaptionSettings,
    EvaluationSettings,
    FeatureSettings,
    PipelineConfig,
    RegistrationSettings,
    ViewSettings,
    step_settings,
)
from m2d2.pipeline.registry import CAPTIONS, Stage
from m2d2.pipeline.workspace import root_of, rooted, step_key, workspace_token

log = logging.getLogger(__name__)

STEP_RECORD = "step.json"  # written last into a finished step's directory: what it produced
CAPTION_FILE = "captions.parquet"


@dataclass
class StepOutput:
    """What a step produced: its directory, the MLflow run that produced it, and what it measured."""

    path: str
    mlflow_run_id: str = ""
    steps: int = 0
    final_loss: float | None = None  # None: not a training stage
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # a stage that no configured variant needs: ``path`` is its input, untouched

    def source(self) -> str:
        """What a stage that trains on this output reads: the caption file of a caption cache, else the export."""
        caption_file = Path(self.path) / CAPTION_FILE
        return str(caption_file) if caption_file.is_file() else self.path


def _record(directory: Path, output: StepOutput) -> None:
    io.atomic_write_bytes(directory / STEP_RECORD, json.dumps(dataclasses.asdict(output), indent=2).encode())


def recorded(directory: str | Path, must_exist: tuple[str, ...] = ()) -> StepOutput | None:
    """The record of a finished step in ``directory``, if it and the files it names are all still there."""
    path = Path(directory) / STEP_RECORD
    if not path.is_file():
        return None
    output = StepOutput(**json.loads(path.read_text()))
    if not Path(output.path).exists() or any(not (Path(directory) / name).exists() for name in must_exist):
        return None
    return output


def checkpoint_root(data_root: str, run_key: str, stage: str) -> str | None:
    """``<data_root>/checkpoints/<run_key>/<stage>`` when a run key is given (a relaunch with the same key resumes);
    otherwise None: the stage's own output directory, which is stable for identical inputs."""
    if not run_key:
        return None
    return io.confine(Path(data_root) / "checkpoints", f"{run_key}/{stage}", "run_key")


def stage_dir(data_root: str, stage: Stage, section: Any, feature_dir: str, source: str) -> Path:
    """Where ``stage`` writes for these settings and inputs (content-keyed, see :mod:`m2d2.pipeline.workspace`)."""
    return Path(data_root) / stage.name / step_key(section, feature_dir, source)


def run_stage(stage: Stage, section: Any, workspace: str, feature_dir: str, source: StepOutput,
              parent_run_id: str | None = None, run_key: str = "", trains: bool = True) -> StepOutput:
    """Train ``stage`` on ``source``, reusing a finished run of the same settings and inputs. What every caller of a
    stage does, Flyte task or :func:`run`. ``trains=False`` (no configured variant needs the stage) returns at once,
    marked skipped: the Flyte workflow's shape is fixed, so the task of an unneeded stage still runs."""
    if not trains:
        log.info("%s: no configured model variant needs it; skipped", stage.name)
        return StepOutput(path=source.path, skipped=True)
    if source.skipped:
        raise ValueError(f"{stage.name} trains on {stage.trains_on}, which was skipped")
    data_root = root_of(workspace)
    out = stage_dir(data_root, stage, section, feature_dir, source.source())
    done = recorded(out, must_exist=("model/config.json",))
    if done is not None:
        log.info("%s: reusing the finished run in %s", stage.name, out)
        return done
    result = stage.load_runner()(section, feature_dir, source.source(), str(out), parent_run_id,
                                 checkpoint_root(data_root, run_key, stage.name), name=stage.name)
    output = StepOutput(path=str(Path(result.export_dir).resolve()), mlflow_run_id=result.mlflow_run_id or "",
                        steps=result.steps, final_loss=result.final.get("loss"),
                        metrics=dict(result.metrics))
    if _is_rank0():
        _record(out, output)
    return output


def _is_rank0() -> bool:
    from m2d2.tracking import is_main_process

    return is_main_process()


# ------------------------------------------------------------------------------------------------ data steps
def features_step(settings: FeatureSettings, data_root: str, corpus_dir: str,
                  parent_run_id: str | None) -> StepOutput:
    """The corpus's log-mel store (plan -> shards -> finish), reused when it is complete for these settings."""
    from m2d2.pipeline.data import build_features, features_dir

    def make() -> StepOutput:
        path, run_id = build_features(settings, data_root, corpus_dir, parent_run_id)
        return StepOutput(path=str(Path(path).resolve()), mlflow_run_id=run_id or "")

    return _reuse_or_run(features_dir(settings, data_root, corpus_dir), ("stats.json",), make)


def captions_step(settings: CaptionSettings, data_root: str, corpus_dir: str,
                  parent_run_id: str | None) -> StepOutput:
    """The caption vectors of the stage-1 text encoder, reused when complete for these settings."""
    from m2d2.pipeline.data import build_caption_cache, captions_dir

    def make() -> StepOutput:
        path, run_id = build_caption_cache(settings, data_root, corpus_dir, parent_run_id)
        return StepOutput(path=str(Path(path).parent.resolve()), mlflow_run_id=run_id or "")

    return _reuse_or_run(captions_dir(settings, data_root, corpus_dir), (CAPTION_FILE,), make)


def views_step(settings: dict[str, ViewSettings], data_root: str, features: StepOutput,
               parent_run_id: str | None) -> StepOutput:
    """Resolve every enabled stage's view of the corpus before any stage trains (:mod:`m2d2.data.views`): an empty
    or too-small view fails here, in one message. Writes ``views.json`` (clips per stage and source, removals by
    reason) and ``removed.parquet`` (each clip a stage may not see, and why), both logged to MLflow as the
    ``views`` run with the counts as metrics (``stage1/clips``, ``stage1/removed_origin``, ...)."""
    import pyarrow as pa

    from m2d2.data.shards import parquet_bytes
    from m2d2.data.views import ViewRule, check_views
    from m2d2.pipeline.workspace import _tracked, step_dir

    directory = step_dir(data_root, "views", sorted((k, dataclasses.asdict(v)) for k, v in settings.items()),
                         features.path)

    def make() -> StepOutput:
        rules = {stage: (ViewRule(tuple(v.sources), tuple(v.exclude_overlap_with), v.min_captions, v.min_clips),
                         v.global_batch, v.samples_per_epoch) for stage, v in settings.items()}
        views = check_views(features.path, rules)
        metrics = {f"{stage}/{k}": v for stage, view in views.items() for k, v in view.metrics().items()}
        removed = [view.removed.append_column("stage", pa.array([stage] * view.removed.num_rows, pa.string()))
                   for stage, view in views.items()]
        directory.mkdir(parents=True, exist_ok=True)
        if not removed:
            from m2d2.data.leakage import REMOVED_SCHEMA

            removed = [pa.Table.from_pylist([], schema=REMOVED_SCHEMA.append(pa.field("stage", pa.string())))]
        io.atomic_write_bytes(directory / "removed.parquet", parquet_bytes(pa.concat_tables(removed)))
        io.atomic_write_bytes(directory / "views.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
        for stage, view in views.items():
            log.info("%s: %d training clips (%s), %d removed as overlapping", stage, len(view.clips),
                     ", ".join(f"{s} {n}" for s, n in sorted(view.by_source.items())), view.removed.num_rows)
        run = _tracked(parent_run_id, "views", params={"features": features.path})
        run_id = ""
        if run is not None:
            with run:
                run.log_metrics(metrics, step=0)
                run.log_artifact(str(directory / "views.json"))
                run.log_artifact(str(directory / "removed.parquet"))
                run_id = run.run_id or ""
        return StepOutput(path=str(directory.resolve()), mlflow_run_id=run_id, metrics=metrics)

    return _reuse_or_run(directory, ("views.json",), make)


def _reuse_or_run(directory: Path, must_exist: tuple[str, ...], make) -> StepOutput:
    done = recorded(directory, must_exist)
    if done is not None:
        return done
    output = make()
    _record(directory, output)
    return output


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_step(settings: EvaluationSettings, data_root: str, features: StepOutput, captions: StepOutput,
                  stages: dict[str, StepOutput], parent_run_id: str | None) -> tuple[StepOutput, Path]:
    """Every trained stage's metrics against its baseline, and each variant's full suite and report
    (``report/<variant>``); reused when nothing changed."""
    from m2d2.pipeline.evaluation import evaluate_stages

    trained = registry.needed_stages(settings.variants)
    exports = {s.name: stages[s.name].path for s in trained}
    directory = Path(data_root) / "evaluate" / step_key(
        settings.baseline_inits, settings.prompt_template, settings.variants,
        [(s.name, settings.models[s.name], exports[s.name]) for s in trained],
        settings.suite, settings.tasks_root, settings.linear_runs)
    report_dir = directory / "report"

    def make() -> StepOutput:
        metrics, run_id = evaluate_stages(
            settings, features.path, Path(captions.path) / CAPTION_FILE, exports, parent_run_id,
            stage_metrics={name: out.metrics for name, out in stages.items()}, report_dir=report_dir,
            cache_dir=Path(data_root) / "evaluate" / "features")
        return StepOutput(path=str(report_dir.resolve()), mlflow_run_id=run_id or "", metrics=metrics)

    return _reuse_or_run(directory, ("report",), make), report_dir


@dataclass
class Registration:
    """The MLflow model version of one variant's export, and whether it became that model's champion."""

    model_uri: str
    version: str
    promoted: bool
    reason: str
    variant: str = ""
    mlflow_run_id: str = ""  # the variant's run: its metrics and its export under model/


def variant_metrics(evaluation: dict[str, float], variant_name: str) -> dict[str, float]:
    """The metrics of one variant's model, without the stage prefix: its final stage's (``zs_acc``, ``a2t_R1`` ...),
    its gain over its baseline (``zs_gain``) and its suite's (``probe_acc`` ...)."""
    final = registry.variant(variant_name).final
    out = {key.split("/", 1)[1]: value for key, value in evaluation.items() if key.startswith(f"{final}/")}
    if f"{final}_zs_gain" in evaluation:
        out["zs_gain"] = evaluation[f"{final}_zs_gain"]
    out.update({key.split("/", 1)[1]: value for key, value in evaluation.items()
                if key.startswith(f"{variant_name}/")})
    return out


def register_step(settings: RegistrationSettings, data_root: str, stages: dict[str, StepOutput],
                  evaluation: StepOutput, parent_run_id: str | None = None,
                  inputs: dict[str, StepOutput] | None = None) -> dict[str, Registration]:
    """Register each variant's export as a version of its own registered model
    (:func:`m2d2.pipeline.registry.registered_name`), once per (export, scores): re-running an unchanged pipeline
    adds no version. Each variant gets an MLflow run under its name (its metrics, its datasets, its export as an
    MLflow model) that the version points at. Versions record the evaluation's suite digest (a champion evaluated
    on other data is not compared) and their lineage (:mod:`m2d2.pipeline.lineage`), and carry a description;
    every export gets its model card (``README.md``). ``inputs``: the ``features`` and ``embed`` steps' outputs."""
    from m2d2.pipeline import lineage
    from m2d2.pipeline.card import description, model_card
    from m2d2.pipeline.evaluation import SUITE_FILE
    from m2d2.registry import MODEL_CARD, register_model
    from m2d2.tracking import CONFIG_DIGEST_TAG, StageRun
    from m2d2.tracking import client as tracking_client

    suite_file = Path(evaluation.path) / SUITE_FILE
    suite = json.loads(suite_file.read_text())["digest"] if suite_file.is_file() else None
    inputs = inputs or {}
    features = inputs.get("features")
    snapshot = lineage.snapshot(features.path) if features else None
    found = lineage.datasets(features.path, Path(inputs["embed"].path) / CAPTION_FILE if "embed" in inputs else None) \
        if features else []
    out: dict[str, Registration] = {}
    finals = {registry.variant(name).final: name for name in settings.variants}
    digest = tracking_client().get_run(parent_run_id).data.tags.get(CONFIG_DIGEST_TAG) if parent_run_id else None
    for stage_name, output in stages.items():  # every export carries its card; a variant's names its figures
        if output.skipped:
            continue
        card = model_card(finals.get(stage_name), stage_name, evaluation.metrics, snapshot, digest, output.metrics)
        io.atomic_write_bytes(Path(output.path) / MODEL_CARD, card.encode())
    for name in settings.variants:
        variant = registry.variant(name)
        final = stages[variant.final]
        metrics = variant_metrics(evaluation.metrics, name)
        model_name = registry.registered_name(settings.registered_model, name)
        directory = Path(data_root) / "register" / step_key(model_name, settings.primary_metric, final.path,
                                                             sorted(metrics.items()))
        record = directory / "registration.json"
        if record.is_file():
            out[name] = Registration(**json.loads(record.read_text()))
            continue
        tags = {"m2d2.variant": name, "m2d2.final_stage": variant.final}
        if features:
            tags.update(lineage.version_tags(name, {s: o.mlflow_run_id for s, o in stages.items()}, features.path,
                                             parent_run_id))
        run_id = None
        if parent_run_id:
            with StageRun(parent_run_id, name, params={"export": final.path, "registered_model": model_name,
                                                       "description": variant.description}, tags=tags) as run:
                run.log_metrics(metrics, step=0)
                run_id = run.run_id
            lineage.log_datasets(run_id, found)
        text = description(name, evaluation.metrics, snapshot, tags.get(CONFIG_DIGEST_TAG))
        result = register_model(final.path, model_name, metrics, settings.primary_metric, run_id=run_id,
                                version_tags=tags, suite=suite, description=text)
        out[name] = Registration(model_uri=result.model_uri, version=str(result.version), promoted=result.promoted,
                                 reason=result.reason, variant=name, mlflow_run_id=result.run_id)
        io.atomic_write_bytes(record, json.dumps(dataclasses.asdict(out[name])).encode())
    return out


# ------------------------------------------------------------------------------------------------ summary
def finish(data_root: str, parent_run_id: str, outputs: dict[str, StepOutput], evaluation: StepOutput,
           registrations: dict[str, Registration]) -> Path:
    """Record which steps were reused (and the runs that produced them), log the headline metrics, close the
    parent run and write the summary ``m2d2 summary`` prints. Returns the summary's path."""
    from m2d2.tracking import finish_pipeline_run, record_cache_hits, tracking_uri, write_pipeline_summary

    trained = {name: out for name, out in outputs.items() if not out.skipped}
    sources = {name: out.mlflow_run_id for name, out in trained.items()}
    sources["evaluate"] = evaluation.mlflow_run_id
    hits = record_cache_hits(parent_run_id, sources)
    tags = {"m2d2.cache_hits": ",".join(s for s, hit in hits.items() if hit) or "none",
            "m2d2.variants": ",".join(registrations)}
    for name, registration in registrations.items():
        tags[f"m2d2.registered.{name}"] = registration.model_uri
        tags[f"m2d2.champion.{name}"] = str(registration.promoted).lower()
    tags["mlflow.note.content"] = headline_note(evaluation.metrics, registrations)
    if "features" in outputs:  # the data every stage trained on, as MLflow datasets (the runs table's Datasets)
        from m2d2.pipeline import lineage

        embed = outputs.get("embed")
        found = lineage.datasets(outputs["features"].path, Path(embed.path) / CAPTION_FILE if embed else None)
        stage_names = {s.name for s in registry.STAGES}
        for run_id in [parent_run_id, *(o.mlflow_run_id for n, o in trained.items() if n in stage_names)]:
            lineage.log_datasets(run_id, found)
    finish_pipeline_run(parent_run_id, metrics=evaluation.metrics, tags=tags)
    variants = {}
    for name, registration in registrations.items():
        variant = registry.variant(name)
        variants[name] = {"title": variant.title, "stage": variant.final, "model": outputs[variant.final].path,
                          "metrics": variant_metrics(evaluation.metrics, name),
                          "registration": dataclasses.asdict(registration)}
    summary = {"mlflow_parent_run_id": parent_run_id, "tracking_uri": tracking_uri(), "cache_hits": hits,
               "metrics": evaluation.metrics,
               **{f"{s.name}_model": trained[s.name].path for s in registry.STAGES if s.name in trained},
               "report": evaluation.path, "variants": variants}
    return write_pipeline_summary(data_root, summary)


def headline_note(evaluation: dict[str, float], registrations: dict[str, Registration]) -> str:
    """The parent run's note (``mlflow.note.content``, shown on its page): one row per model with its headline
    figures against its baseline and what became of its registration."""
    rows = ["| Model | Zero-shot | Baseline | Gain | Linear probe | Registered | Champion |", "|---|---|---|---|---|---|---|"]
    for name, registration in registrations.items():
        variant = registry.variant(name)
        final = registry.stage(variant.final)
        mine = variant_metrics(evaluation, name)
        base = evaluation.get(f"{final.baseline}_baseline/zs_acc") if final.baseline else None
        cells = [f"{variant.title} (`{name}`)", _fmt(mine.get("zs_acc")), _fmt(base), _fmt(mine.get("zs_gain")),
                 _fmt(mine.get("probe_acc")), registration.model_uri,
                 "yes" if registration.promoted else f"no: {registration.reason}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "### This execution\n\n" + "\n".join(rows) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


@dataclass
class PipelineResult:
    """Everything one execution produced."""

    outputs: dict[str, StepOutput]  # "features", "embed", "views" and every trained stage, by name
    evaluation: StepOutput
    registrations: dict[str, Registration]  # by variant name
    summary: Path
    parent_run_id: str


def run(cfg: PipelineConfig, execution: str | None = None) -> PipelineResult:
    """Execute the pipeline of ``cfg`` in this process (stages in their own processes only if their topology asks
    for more than one rank). Steps whose outputs already exist for the same inputs are reused."""
    from m2d2.pipeline.data import build_corpus
    from m2d2.pipeline.workspace import resolve_corpus_source
    from m2d2.tracking import start_pipeline_run

    workspace = workspace_token(cfg.data_root)
    cfg = rooted(cfg, workspace)
    parent = start_pipeline_run(execution or f"local-{uuid.uuid4().hex[:12]}", experiment=cfg.experiment,
                                params=dataclasses.asdict(cfg), tags={"m2d2.preset": cfg.preset,
                                                                      "m2d2.driver": "m2d2.pipeline.run"})
    settings = step_settings(cfg)
    source = resolve_corpus_source(cfg.corpus_source)
    corpus_dir = source or str(build_corpus(settings.corpus, cfg.data_root))
    outputs: dict[str, StepOutput] = {
        "features": features_step(settings.features, cfg.data_root, corpus_dir, parent),
        "embed": captions_step(settings.captions, cfg.data_root, corpus_dir, parent),
    }
    outputs["views"] = views_step(settings.views, cfg.data_root, outputs["features"], parent)
    for stage in registry.needed_stages(cfg.variants):
        upstream = outputs["embed"] if stage.trains_on == CAPTIONS else outputs[stage.trains_on]
        outputs[stage.name] = run_stage(stage, cfg.stages[stage.name], workspace, outputs["features"].path,
                                        upstream, parent, cfg.run_key)
    stages = {s.name: outputs[s.name] for s in registry.needed_stages(cfg.variants)}
    evaluation, _ = evaluate_step(settings.evaluation, cfg.data_root, outputs["features"], outputs["embed"], stages,
                                  parent)
    registrations = register_step(settings.registration, cfg.data_root, stages, evaluation, parent,
                                  inputs={"features": outputs["features"], "embed": outputs["embed"]})
    summary = finish(cfg.data_root, parent, outputs, evaluation, registrations)
    return PipelineResult(outputs, evaluation, registrations, summary, parent)
