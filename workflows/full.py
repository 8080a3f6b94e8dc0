"""The whole M2D2 pipeline as one typed Flyte DAG: ``pyflyte run workflows/full.py full``.

Thin wiring only: each task calls one step of :mod:`m2d2.pipeline` / :mod:`m2d2.train.stages`. With no
arguments it runs the ``demo`` preset on the local machine (generated corpus, CPU, ``sqlite:///mlflow.db``).
A JSON/YAML file of :class:`~m2d2.pipeline.PipelineConfig` selects other settings::

    pyflyte run workflows/full.py full --cfg my_config.json

Caching: every data/training task is cached by its inputs (``Cache(version=...)``); the MLflow parent run
id is an ignored input, so tracking never busts the cache. Outputs live at stable paths under
``cfg.data_root`` (see :func:`m2d2.pipeline.step_dir`), so a cache hit points at files that still exist.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from flytekit import Cache, FlyteContextManager, Resources, current_context, map_task, task, workflow
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset
from flytekitplugins.kfpytorch import Elastic

from m2d2.pipeline import PipelineConfig

# Launch topology of each training task. Flyte fixes it when a task is defined (registration), and the pod that
# runs the task imports this module again, so it must resolve the same way there: it comes from the stage presets
# named by M2D2_TOPOLOGY (``demo``: 1 process; ``paper``: the paper's GPUs per stage), M2D2_NNODES /
# M2D2_NPROC_PER_NODE override every stage, and the resolved values are put into the task's environment.
TOPOLOGY = os.environ.get("M2D2_TOPOLOGY", "demo")
# Rendezvous: stragglers on a busy cluster need more than torch's 60-s store read timeout (flytekit PR #3419).
RDZV_TIMEOUT_S = int(os.environ.get("M2D2_RDZV_TIMEOUT_S", "1800"))
TRAIN_ENV = {**{"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
             # NCCL: fail a hung collective (e.g. a peer OOM) instead of blocking for the 10-min default + restarts.
             "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "300", "NCCL_DEBUG": "WARN"}


def topology(stage: str) -> tuple[int, int]:
    """``(nnodes, nproc_per_node)`` of ``stage``'s training task, fixed when the task is defined (registration).

    The one mechanism: the ``topology`` section of the stage's config under the preset named by ``M2D2_TOPOLOGY``
    (``m2d2.presets.stage_config(stage, TOPOLOGY).topology``; ``demo``: 1 process, ``paper``: the paper's GPUs per
    stage); ``M2D2_NNODES`` / ``M2D2_NPROC_PER_NODE`` override every stage. ``_training_task`` puts the resolved
    values into the task's environment, so the pod that re-imports this module resolves the same topology.
    """
    from m2d2.presets import stage_config

    preset = stage_config(stage, TOPOLOGY).topology
    return (int(os.environ.get("M2D2_NNODES", preset.nnodes)),
            int(os.environ.get("M2D2_NPROC_PER_NODE", preset.nproc_per_node)))


def _elastic(stage: str) -> Elastic:
    nnodes, nproc = topology(stage)
    return Elastic(nnodes=nnodes, nproc_per_node=nproc, max_restarts=0, increase_shared_mem=False,
                   rdzv_configs={"timeout": RDZV_TIMEOUT_S, "join_timeout": RDZV_TIMEOUT_S,
                                 "read_timeout": RDZV_TIMEOUT_S})


TRACKING = ("parent_run_id",)
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Images by name (containers/): `pyflyte run --remote --image trainer=<ref> --image cpu=<ref> ...`. Local runs
# ignore them. Pods start from the k8s PodTemplates of k8s/base/tasks (non-root, /dev/shm, GPU tolerations).
TRAINER_IMAGE = "{{.image.trainer.fqn}}:{{.image.trainer.version}}"
CPU_IMAGE = "{{.image.cpu.fqn}}:{{.image.cpu.version}}"
GPU_POD_TEMPLATE, CPU_POD_TEMPLATE = "m2d2-gpu", "m2d2-default"
GPU_TYPE = os.environ.get("M2D2_GPU_TYPE", "nvidia-h100")  # the cluster's accelerator label value
USES_GPUS = TOPOLOGY != "demo"  # the demo topology trains on CPU processes


def _resources(kind: str) -> Resources:
    """Requests per CPU task kind (and CPU training in the demo topology)."""
    return {"small": Resources(cpu="1", mem="2Gi"), "corpus": Resources(cpu="2", mem="4Gi"),
            "shard": Resources(cpu="2", mem="8Gi"), "embed": Resources(cpu="8", mem="32Gi"),
            "evaluate": Resources(cpu="8", mem="32Gi"), "train": Resources(cpu="4", mem="16Gi")}[kind]


def _train_resources(stage: str) -> Resources:
    """Per node: the Elastic launcher runs ``nproc_per_node`` ranks, one per GPU, in one pod."""
    if not USES_GPUS:
        return _resources("train")
    _, nproc = topology(stage)
    # Per GPU: 10 CPU cores for the DataLoader workers and 96 GiB of host memory (page cache of the log-mel store,
    # /dev/shm batches); the PodTemplate's /dev/shm counts against the memory request.
    return Resources(cpu=str(10 * nproc), mem=f"{96 * nproc}Gi", gpu=str(nproc))


def cpu_task(kind: str, **kwargs):
    """A task on the CPU image."""
    return task(environment=ENV, container_image=CPU_IMAGE, pod_template_name=CPU_POD_TEMPLATE,
                requests=_resources(kind), **kwargs)


@dataclass
class Corpus:
    audio: FlyteDirectory
    manifest: StructuredDataset


@dataclass
class Artifact:
    """A step's output directory and the MLflow run that produced it (empty when untracked)."""

    path: FlyteDirectory
    mlflow_run_id: str


@dataclass
class StageResult:
    model: FlyteDirectory
    checkpoint: FlyteDirectory
    mlflow_run_id: str
    steps: int
    final_loss: float
    metrics: dict[str, float]  # the stage's own evaluation (stage 1.1: tagging mAP); empty for the others


@dataclass
class EvalResult:
    metrics: dict[str, float]
    mlflow_run_id: str
    report: FlyteDirectory  # report.html + figures of the final model


@dataclass
class Registration:
    """The MLflow model version of this execution's final model, and whether it became the champion."""

    model_uri: str
    version: str
    promoted: bool
    reason: str


def _is_local() -> bool:
    ctx = FlyteContextManager.current_context()
    return not ctx.file_access.is_remote(ctx.file_access.raw_output_prefix)


def _out(path: str | Path) -> FlyteDirectory:
    """Local runs keep the stable path (no copy into a temporary sandbox); remote runs upload it."""
    return FlyteDirectory(str(Path(path).resolve()), remote_directory=False if _is_local() else None)


def _local(directory: FlyteDirectory) -> str:
    path = directory.download()
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path} no longer exists but a cached task output points at it; re-run with "
            "`pyflyte run --overwrite-cache ...` or clear the cache with `pyflyte local-cache clear`"
        )
    return path


@cpu_task("small")
def open_workspace(cfg: PipelineConfig) -> str:
    """The data root as an absolute URI plus its workspace id (created on first use), e.g. ``/abs/runs#3f2a...``.

    Cached tasks take this as an input, so deleting (or moving to) a data root changes their cache keys: a
    cache hit can never point at outputs that were deleted with their workspace.
    """
    from m2d2.pipeline import workspace_token

    return workspace_token(cfg.data_root)


@cpu_task("small")
def start_tracking(cfg: PipelineConfig) -> str:
    """Create the MLflow parent run of this execution (idempotent across retries of this task)."""
    from dataclasses import asdict

    from m2d2.tracking import start_pipeline_run

    execution = current_context().execution_id
    name = execution.name
    if not name or name == "local":  # every local execution is "local": make it unique
        name = f"local-{uuid.uuid4().hex[:12]}"
    return start_pipeline_run(name, experiment=cfg.experiment, params=asdict(cfg),
                              tags={"flyte.project": execution.project, "flyte.domain": execution.domain,
                                    "m2d2.preset": cfg.preset})


@cpu_task("small")
def resolve_corpus(cfg: PipelineConfig) -> str:
    """Which corpus this execution trains on (never cached: ``<prefix>/latest`` moves with new snapshots)."""
    from m2d2.pipeline import resolve_corpus_source

    return resolve_corpus_source(cfg.corpus_source)


@cpu_task("corpus", cache=Cache(version="corpus-2"))
def make_corpus(cfg: PipelineConfig, workspace: str, source: str) -> Corpus:
    """The resolved ``source`` corpus as it is, or (no source) the generated demo corpus."""
    from m2d2 import io
    from m2d2.data.manifest import read_manifest
    from m2d2.pipeline import build_corpus, rooted

    corpus_dir = source or str(build_corpus(rooted(cfg, workspace)))
    manifest = read_manifest(io.join(corpus_dir, "manifest.parquet"))
    audio = _out(corpus_dir) if io.is_local(corpus_dir) else FlyteDirectory(corpus_dir)
    return Corpus(audio=audio, manifest=StructuredDataset(dataframe=manifest))


# Features and caption vectors: a plan task, a map task over its shards (on a cluster one pod per shard, run
# side by side; locally one after the other), a finish task. Shard specs are "<plan uri>#<k>" strings: the plan
# itself stays in the step's directory. Every element is cached; a failed element is retried on its own.
MAP_CONCURRENCY = int(os.environ.get("M2D2_MAP_CONCURRENCY", "64"))


@cpu_task("small", cache=Cache(version="features-plan-1"))
def plan_features(cfg: PipelineConfig, workspace: str, corpus: Corpus) -> tuple[str, list[str]]:
    from m2d2.pipeline import plan_features, rooted

    return plan_features(rooted(cfg, workspace), _local(corpus.audio))


@cpu_task("shard", cache=Cache(version="features-shard-1"), retries=2)
def feature_shard(spec: str) -> str:
    import json

    from m2d2.pipeline import build_feature_shard

    return json.dumps(build_feature_shard(spec))


@cpu_task("small", cache=Cache(version="features-4", ignored_inputs=TRACKING))
def finish_features(plan_uri: str, built: list[str], parent_run_id: str) -> Artifact:
    from m2d2.pipeline import finish_features

    out, run_id = finish_features(plan_uri, parent_run_id or None)
    return Artifact(path=_out(out), mlflow_run_id=run_id or "")


@cpu_task("small", cache=Cache(version="captions-plan-1"))
def plan_captions(cfg: PipelineConfig, workspace: str, corpus: Corpus) -> tuple[str, list[str]]:
    from m2d2.pipeline import plan_captions, rooted

    return plan_captions(rooted(cfg, workspace), _local(corpus.audio))


def _embed_task(**kwargs):
    """Caption-embedding shards: a GPU each on a cluster (the paper's 7-B text encoder), CPU in the demo."""
    if not USES_GPUS:
        return cpu_task("embed", **kwargs)
    return task(environment=ENV, container_image=TRAINER_IMAGE, pod_template_name=GPU_POD_TEMPLATE,
                requests=Resources(cpu="8", mem="64Gi", gpu="1"), accelerator=GPUAccelerator(GPU_TYPE),
                interruptible=True, **kwargs)


@_embed_task(cache=Cache(version="captions-shard-1"), retries=2)
def caption_shard(spec: str) -> int:
    from m2d2.pipeline import embed_caption_shard

    return embed_caption_shard(spec)


@cpu_task("small", cache=Cache(version="embed-3", ignored_inputs=TRACKING))
def finish_captions(plan_uri: str, embedded: list[int], parent_run_id: str) -> Artifact:
    from m2d2.pipeline import finish_captions

    out, run_id = finish_captions(plan_uri, parent_run_id or None)
    return Artifact(path=_out(out.parent), mlflow_run_id=run_id or "")


def _checkpoint_root(cfg: PipelineConfig, workspace: str, stage: str) -> str | None:
    """``<data_root>/checkpoints/<run_key>/<stage>`` when a run key is given (a relaunch with the same key
    resumes); otherwise the stage's own output directory, which is stable for identical inputs."""
    if not cfg.run_key:
        return None
    from m2d2 import io
    from m2d2.pipeline import rooted

    return io.confine(Path(rooted(cfg, workspace).data_root) / "checkpoints", f"{cfg.run_key}/{stage}", "run_key")


def _train(fn, *args, **kwargs):
    """Run a stage; failures worth a retry (lost peer, collective timeout, storage) become Flyte-retryable."""
    from flytekit.exceptions.user import FlyteRecoverableException

    from m2d2.train.engine import RecoverableTrainingError

    try:
        return fn(*args, **kwargs)
    except RecoverableTrainingError as exc:
        raise FlyteRecoverableException(str(exc)) from exc


def _training_task(stage: str, cache_version: str):
    """The decorator shared by every training stage: Elastic launch, spot-friendly retries, long timeout."""
    nnodes, nproc = topology(stage)
    return task(
        task_config=_elastic(stage),
        cache=Cache(version=cache_version, ignored_inputs=TRACKING),
        environment={**TRAIN_ENV, "M2D2_TOPOLOGY": TOPOLOGY, "M2D2_NNODES": str(nnodes),
                     "M2D2_NPROC_PER_NODE": str(nproc)},
        container_image=TRAINER_IMAGE,
        pod_template_name=GPU_POD_TEMPLATE if USES_GPUS else CPU_POD_TEMPLATE,
        requests=_train_resources(stage),
        accelerator=GPUAccelerator(GPU_TYPE) if USES_GPUS else None,
        timeout=timedelta(days=7),
        shared_memory=True,  # /dev/shm for DataLoader workers and NCCL
        interruptible=True,  # spot nodes; the resumable checkpoints make a preemption cost one checkpoint interval
        retries=3,
    )


def _stage_result(output) -> StageResult:
    return StageResult(model=_out(output.export_dir), checkpoint=_out(output.checkpoint_dir),
                       mlflow_run_id=output.mlflow_run_id or "", steps=output.steps,
                       final_loss=float(output.final.get("loss", float("nan"))), metrics=dict(output.metrics))


def _run_stage(name: str, cfg: PipelineConfig, workspace: str, features: Artifact, input_dir: str,
               parent_run_id: str) -> StageResult:
    """Run training stage ``name`` on the feature store and its input (captions or the previous export)."""
    from m2d2.pipeline import STAGE_FIELDS, rooted, step_dir
    from m2d2.train.stages import STAGE_RUNNERS

    stage_cfg = getattr(cfg, next(f for f, stage in STAGE_FIELDS.items() if stage == name))
    run = STAGE_RUNNERS[name]
    feature_dir = _local(features.path)
    out = step_dir(rooted(cfg, workspace), name, stage_cfg, feature_dir, input_dir)
    return _stage_result(_train(run, stage_cfg, feature_dir, input_dir, str(out), parent_run_id or None,
                                _checkpoint_root(cfg, workspace, name)))


@_training_task("stage1", "stage1-3")
def stage1(cfg: PipelineConfig, workspace: str, features: Artifact, captions: Artifact,
           parent_run_id: str) -> StageResult:
    """Stage 1: M2D + CLAP from scratch against the offline caption vectors."""
    caption_file = str(Path(_local(captions.path)) / "captions.parquet")
    return _run_stage("stage1", cfg, workspace, features, caption_file, parent_run_id)


@_training_task("stage1.1", "stage11-1")
def stage11(cfg: PipelineConfig, workspace: str, features: Artifact, stage1_result: StageResult,
            parent_run_id: str) -> StageResult:
    """Stage 1.1: supervised fine-tuning of the stage-1 encoder (608 -> 1001 frames in the paper); optional."""
    if not cfg.stage11.enabled:
        return stage1_result
    return _run_stage("stage1.1", cfg, workspace, features, _local(stage1_result.model), parent_run_id)


@_training_task("stage2", "stage2-3")
def stage2(cfg: PipelineConfig, workspace: str, features: Artifact, stage11_result: StageResult,
           parent_run_id: str) -> StageResult:
    """Stage 2: frozen stage-1.1 encoder, fresh projector, trainable text encoder."""
    return _run_stage("stage2", cfg, workspace, features, _local(stage11_result.model), parent_run_id)


@_training_task("stage2.1", "stage21-1")
def stage21(cfg: PipelineConfig, workspace: str, features: Artifact, stage2_result: StageResult,
            parent_run_id: str) -> StageResult:
    """Stage 2.1: stage 2 continued without masking on the curated subset; optional."""
    if not cfg.stage21.enabled:
        return stage2_result
    return _run_stage("stage2.1", cfg, workspace, features, _local(stage2_result.model), parent_run_id)


@cpu_task("evaluate", cache=Cache(version="evaluate-3", ignored_inputs=TRACKING), enable_deck=True)
def evaluate(cfg: PipelineConfig, workspace: str, features: Artifact, captions: Artifact,
             stage1_result: StageResult, stage11_result: StageResult, stage2_result: StageResult,
             stage21_result: StageResult, parent_run_id: str) -> EvalResult:
    """Every stage's CLAP metrics vs baselines, the final model's full suite, its report (also a Flyte Deck)."""
    from flytekit import Deck

    from m2d2.eval.reports import report_html
    from m2d2.pipeline import evaluate_stages, rooted, step_dir

    exports = [_local(r.model) for r in (stage1_result, stage11_result, stage2_result, stage21_result)]
    report_dir = step_dir(rooted(cfg, workspace), "evaluate", cfg, *exports) / "report"
    metrics, run_id = evaluate_stages(
        cfg, _local(features.path), Path(_local(captions.path)) / "captions.parquet", *exports,
        parent_run_id or None, stage11_metrics=stage11_result.metrics, report_dir=report_dir,
    )
    Deck("evaluation", report_html(report_dir))
    return EvalResult(metrics=metrics, mlflow_run_id=run_id or "", report=_out(report_dir))


@cpu_task("small", cache=Cache(version="register-1", ignored_inputs=TRACKING))
def register(cfg: PipelineConfig, stage21_result: StageResult, evaluation: EvalResult,
             parent_run_id: str) -> Registration:
    """Register the final model; the champion alias moves only if ``cfg.primary_metric`` beats the incumbent.

    Cached by the model and its scores, so re-running an unchanged pipeline adds no duplicate version.
    """
    from m2d2.registry import register_model

    result = register_model(_local(stage21_result.model), cfg.registered_model, evaluation.metrics,
                            cfg.primary_metric, run_id=evaluation.mlflow_run_id or None)
    return Registration(model_uri=result.model_uri, version=str(result.version), promoted=result.promoted,
                        reason=result.reason)


@cpu_task("small")
def finish_tracking(cfg: PipelineConfig, workspace: str, parent_run_id: str, features: Artifact, captions: Artifact,
                    stage1_result: StageResult, stage11_result: StageResult, stage2_result: StageResult,
                    stage21_result: StageResult, evaluation: EvalResult, registration: Registration) -> FlyteFile:
    """Record which stages were cache hits (and the runs that produced them), the headline metrics, and close.

    Writes ``<data_root>/summaries/<parent run>.json`` and ``<data_root>/latest-summary.json`` (``m2d2 summary``),
    credentials masked.
    """
    from m2d2.pipeline import rooted
    from m2d2.tracking import finish_pipeline_run, record_cache_hits, tracking_uri, write_pipeline_summary

    sources = {"features": features.mlflow_run_id, "embed": captions.mlflow_run_id,
               "stage1": stage1_result.mlflow_run_id, "stage1.1": stage11_result.mlflow_run_id,
               "stage2": stage2_result.mlflow_run_id, "stage2.1": stage21_result.mlflow_run_id,
               "evaluate": evaluation.mlflow_run_id}
    hits = record_cache_hits(parent_run_id, sources)
    finish_pipeline_run(parent_run_id, metrics=evaluation.metrics,
                        tags={"m2d2.cache_hits": ",".join(s for s, hit in hits.items() if hit) or "none",
                              "m2d2.registered_model": registration.model_uri,
                              "m2d2.champion": str(registration.promoted).lower(),
                              "m2d2.registration_reason": registration.reason})
    summary = {"mlflow_parent_run_id": parent_run_id, "tracking_uri": tracking_uri(), "cache_hits": hits,
               "metrics": evaluation.metrics, "stage1_model": _local(stage1_result.model),
               "stage11_model": _local(stage11_result.model), "stage2_model": _local(stage2_result.model),
               "stage21_model": _local(stage21_result.model), "report": _local(evaluation.report),
               "registration": {"model_uri": registration.model_uri, "promoted": registration.promoted,
                                "reason": registration.reason}}
    path = write_pipeline_summary(rooted(cfg, workspace).data_root, summary)
    return FlyteFile(str(path.resolve()), remote_path=False if _is_local() else None)


@workflow
def full(cfg: PipelineConfig = PipelineConfig()) -> FlyteFile:  # noqa: B008 (Flyte reads defaults here)
    """corpus -> features + caption embeddings -> stages 1, 1.1, 2, 2.1 -> evaluate -> register -> summary."""
    workspace = open_workspace(cfg=cfg)
    parent = start_tracking(cfg=cfg)
    corpus = make_corpus(cfg=cfg, workspace=workspace, source=resolve_corpus(cfg=cfg))
    feature_plan, feature_shards = plan_features(cfg=cfg, workspace=workspace, corpus=corpus)
    built = map_task(feature_shard, concurrency=MAP_CONCURRENCY)(spec=feature_shards)
    features = finish_features(plan_uri=feature_plan, built=built, parent_run_id=parent)
    caption_plan, caption_shards = plan_captions(cfg=cfg, workspace=workspace, corpus=corpus)
    embedded = map_task(caption_shard, concurrency=MAP_CONCURRENCY)(spec=caption_shards)
    captions = finish_captions(plan_uri=caption_plan, embedded=embedded, parent_run_id=parent)
    s1 = stage1(cfg=cfg, workspace=workspace, features=features, captions=captions, parent_run_id=parent)
    s11 = stage11(cfg=cfg, workspace=workspace, features=features, stage1_result=s1, parent_run_id=parent)
    s2 = stage2(cfg=cfg, workspace=workspace, features=features, stage11_result=s11, parent_run_id=parent)
    s21 = stage21(cfg=cfg, workspace=workspace, features=features, stage2_result=s2, parent_run_id=parent)
    scores = evaluate(cfg=cfg, workspace=workspace, features=features, captions=captions, stage1_result=s1,
                      stage11_result=s11, stage2_result=s2, stage21_result=s21, parent_run_id=parent)
    registration = register(cfg=cfg, stage21_result=s21, evaluation=scores, parent_run_id=parent)
    return finish_tracking(cfg=cfg, workspace=workspace, parent_run_id=parent, features=features, captions=captions,
                           stage1_result=s1, stage11_result=s11, stage2_result=s2, stage21_result=s21,
                           evaluation=scores, registration=registration)
