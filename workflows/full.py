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
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from flytekit import Cache, FlyteContextManager, Resources, current_context, map_task, task, workflow
from flytekit.extras.accelerators import GPUAccelerator
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset
from flytekitplugins.kfpytorch import Elastic

from m2d2.pipeline import (
    CaptionSettings,
    CorpusSettings,
    EvaluationSettings,
    FeatureSettings,
    PipelineConfig,
    RegistrationSettings,
    StepSettings,
    ViewSettings,
)
from m2d2.pipeline.registry import identifier
from m2d2.pipeline.runner import Registration  # a task output as the library returns it
from m2d2.shards import ShardRef
from m2d2.train.config import TrainStageConfig

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
    """A step's output directory, the MLflow run that produced it (empty when untracked) and what it measured:
    the features, the caption vectors and every stage's export (:class:`m2d2.pipeline.runner.StepOutput`)."""

    path: FlyteDirectory
    mlflow_run_id: str
    steps: int = 0
    final_loss: float | None = None  # None: not a training stage
    metrics: dict[str, float] = field(default_factory=dict)  # the stage's own evaluation (stage 1.1: tagging mAP)
    skipped: bool = False  # a stage no configured model variant needs: path is its input


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


@cpu_task("small")
def split_settings(cfg: PipelineConfig) -> StepSettings:
    """What each non-training step reads (:func:`m2d2.pipeline.step_settings`). Not cached (it is instant); the
    cached tasks downstream take only their part, so their cache keys change only with what they read."""
    from m2d2.pipeline import step_settings

    return step_settings(cfg)


@cpu_task("corpus", cache=Cache(version="corpus-3"))
def make_corpus(settings: CorpusSettings, workspace: str, source: str) -> Corpus:
    """The resolved ``source`` corpus as it is, or (no source) the generated demo corpus."""
    from m2d2 import io
    from m2d2.data.manifest import read_manifest
    from m2d2.pipeline import build_corpus, root_of

    corpus_dir = source or str(build_corpus(settings, root_of(workspace)))
    manifest = read_manifest(io.join(corpus_dir, "manifest.parquet"))
    audio = _out(corpus_dir) if io.is_local(corpus_dir) else FlyteDirectory(corpus_dir)
    return Corpus(audio=audio, manifest=StructuredDataset(dataframe=manifest))


# Features and caption vectors: a plan task, a map task over its shards (on a cluster one pod per shard, run
# side by side; locally one after the other), a finish task. Shards travel as ShardRefs (the plan's URI, the
# shard's number, the workspace token as a cache-key salt): the plan itself stays in the step's directory. Every
# element is cached; a failed element is retried on its own.
MAP_CONCURRENCY = int(os.environ.get("M2D2_MAP_CONCURRENCY", "64"))


@cpu_task("small", cache=Cache(version="features-plan-3"))
def plan_features(settings: FeatureSettings, workspace: str, corpus: Corpus) -> list[ShardRef]:
    from m2d2.pipeline import plan_features, root_of

    return plan_features(settings, root_of(workspace), _local(corpus.audio), workspace)


@cpu_task("shard", cache=Cache(version="features-shard-2"), retries=2)
def feature_shard(ref: ShardRef) -> str:
    import json

    from m2d2.pipeline import build_feature_shard

    return json.dumps(_recoverable(build_feature_shard, ref))


@cpu_task("small", cache=Cache(version="features-5", ignored_inputs=TRACKING))
def finish_features(shards: list[ShardRef], built: list[str], parent_run_id: str) -> Artifact:
    from m2d2.pipeline import finish_features
    from m2d2.shards import plan_of

    out, run_id = _recoverable(finish_features, plan_of(shards), parent_run_id or None)
    return Artifact(path=_out(out), mlflow_run_id=run_id or "")


@cpu_task("small", cache=Cache(version="captions-plan-3"))
def plan_captions(settings: CaptionSettings, workspace: str, corpus: Corpus) -> list[ShardRef]:
    from m2d2.pipeline import plan_captions, root_of

    return plan_captions(settings, root_of(workspace), _local(corpus.audio), workspace)


def _embed_task(**kwargs):
    """Caption-embedding shards: a GPU each on a cluster (the paper's 7-B text encoder), CPU in the demo."""
    if not USES_GPUS:
        return cpu_task("embed", **kwargs)
    return task(environment=ENV, container_image=TRAINER_IMAGE, pod_template_name=GPU_POD_TEMPLATE,
                requests=Resources(cpu="8", mem="64Gi", gpu="1"), accelerator=GPUAccelerator(GPU_TYPE),
                interruptible=True, **kwargs)


@_embed_task(cache=Cache(version="captions-shard-2"), retries=2)
def caption_shard(ref: ShardRef) -> int:
    from m2d2.pipeline import embed_caption_shard

    return _recoverable(embed_caption_shard, ref)


@cpu_task("small", cache=Cache(version="embed-4", ignored_inputs=TRACKING))
def finish_captions(shards: list[ShardRef], embedded: list[int], parent_run_id: str) -> Artifact:
    from m2d2.pipeline import finish_captions
    from m2d2.shards import plan_of

    out, run_id = _recoverable(finish_captions, plan_of(shards), parent_run_id or None)
    return Artifact(path=_out(out.parent), mlflow_run_id=run_id or "")


@cpu_task("small", cache=Cache(version="views-1", ignored_inputs=TRACKING))
def check_views(settings: dict[str, ViewSettings], workspace: str, features: Artifact, parent_run_id: str) -> Artifact:
    """Every stage's view of the corpus, resolved before any stage trains: a view too small to train on fails here
    with one plain message (not inside an Elastic launch hours later). Counts and removals go to MLflow."""
    from m2d2.pipeline import root_of
    from m2d2.pipeline.runner import views_step

    return _artifact(views_step(settings, root_of(workspace), _step(features), parent_run_id or None))


def _recoverable(fn, *args, **kwargs):
    """Run a step; failures worth a retry (lost peer, collective timeout, an object store that kept failing) become
    Flyte-retryable, so they use the task's retries and not its budget of user errors."""
    from flytekit.exceptions.user import FlyteRecoverableException

    from m2d2.io import StorageError
    from m2d2.train.engine import RecoverableTrainingError

    try:
        return fn(*args, **kwargs)
    except (RecoverableTrainingError, StorageError) as exc:
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


def _step(artifact: Artifact):
    from m2d2.pipeline.runner import StepOutput

    return StepOutput(path=_local(artifact.path), mlflow_run_id=artifact.mlflow_run_id, steps=artifact.steps,
                      final_loss=artifact.final_loss, metrics=dict(artifact.metrics), skipped=artifact.skipped)


def _artifact(output) -> Artifact:
    return Artifact(path=_out(output.path), mlflow_run_id=output.mlflow_run_id, steps=output.steps,
                    final_loss=output.final_loss, metrics=dict(output.metrics), skipped=output.skipped)


def _run_stage(name: str, section: TrainStageConfig, trains: bool, workspace: str, features: Artifact,
               source: Artifact, run_key: str, parent_run_id: str) -> Artifact:
    """Stage ``name`` of the registry through the library's one entry point (output roots, skipping a stage no
    configured variant needs, reuse of a finished run): the task only converts Flyte types."""
    from m2d2.pipeline.registry import stage
    from m2d2.pipeline.runner import run_stage

    return _artifact(_recoverable(run_stage, stage(name), section, workspace, _local(features.path), _step(source),
                            parent_run_id or None, run_key, trains))


# One task per stage of m2d2.pipeline.registry.STAGES. Flyte needs each task as a module-level function of its own,
# fixed at registration with its own Elastic topology and resources, so a new stage adds its three lines here too,
# named by m2d2.pipeline.registry.identifier (Python names hold no dot or dash: stage2_1_as runs stage2.1-as)
# (tests/integration/test_flyte_entities.py checks that every registered stage has its task). The workflow below
# walks the registry; the tasks take only their own config section, so changing one stage's settings re-runs that
# stage and what follows it, and is a cache hit for everything before it. ``trains`` is False for a stage that no
# configured model variant needs: its task returns at once (a Flyte workflow's shape is fixed at registration).
@_training_task("stage1", "stage1-5")
def stage1(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
           run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage1", section, trains, workspace, features, source, run_key, parent_run_id)


@_training_task("stage1.1", "stage1.1-3")
def stage1_1(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
             run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage1.1", section, trains, workspace, features, source, run_key, parent_run_id)


@_training_task("stage2", "stage2-5")
def stage2(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
           run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage2", section, trains, workspace, features, source, run_key, parent_run_id)


@_training_task("stage2.1", "stage2.1-3")
def stage2_1(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
             run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage2.1", section, trains, workspace, features, source, run_key, parent_run_id)


@_training_task("stage2", "stage2-as-1")  # stage 2's recipe, topology and resources
def stage2_as(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
              run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage2-as", section, trains, workspace, features, source, run_key, parent_run_id)


@_training_task("stage2.1", "stage2.1-as-1")
def stage2_1_as(section: TrainStageConfig, trains: bool, workspace: str, features: Artifact, source: Artifact,
                run_key: str, parent_run_id: str) -> Artifact:
    return _run_stage("stage2.1-as", section, trains, workspace, features, source, run_key, parent_run_id)


STAGE_TASKS = {"stage1": stage1, "stage1.1": stage1_1, "stage2": stage2, "stage2.1": stage2_1, "stage2-as": stage2_as,
               "stage2.1-as": stage2_1_as}


def stage_task(name: str):
    """The Flyte task of registered stage ``name``."""
    if name not in STAGE_TASKS:
        raise KeyError(f"stage {name!r} is in m2d2.pipeline.registry.STAGES but workflows/full.py has no task for "
                       f"it: add one like `stage2`, named {identifier(name)} (Flyte runs only module-level tasks, each "
                       "with its own topology)")
    return STAGE_TASKS[name]


@cpu_task("evaluate", cache=Cache(version="evaluate-6", ignored_inputs=TRACKING), enable_deck=True)
def evaluate(settings: EvaluationSettings, workspace: str, features: Artifact, captions: Artifact,
             stages: dict[str, Artifact], parent_run_id: str) -> Artifact:
    """Every trained stage's CLAP metrics vs baselines; each model variant's full suite and report (a Flyte Deck
    each)."""
    from flytekit import Deck

    from m2d2.eval.reports import report_html
    from m2d2.pipeline import root_of
    from m2d2.pipeline.runner import evaluate_step

    output, report_dir = evaluate_step(settings, root_of(workspace), _step(features), _step(captions),
                                       {name: _step(a) for name, a in stages.items()}, parent_run_id or None)
    for variant in settings.variants:
        Deck(variant, report_html(report_dir / variant))
    return _artifact(output)


@cpu_task("small", cache=Cache(version="register-5", ignored_inputs=TRACKING))
def register(settings: RegistrationSettings, workspace: str, stages: dict[str, Artifact], evaluation: Artifact,
             parent_run_id: str, features: Artifact, captions: Artifact) -> dict[str, Registration]:
    """Register each model variant as its own MLflow model; a champion alias moves only if
    ``settings.primary_metric`` beats that model's incumbent.

    Cached by the models and their scores, so re-running an unchanged pipeline adds no duplicate version.
    ``features`` and ``captions`` are the data the versions' lineage names.
    """
    from m2d2.pipeline import root_of
    from m2d2.pipeline.runner import register_step

    return register_step(settings, root_of(workspace), {name: _step(a) for name, a in stages.items()},
                         _step(evaluation), parent_run_id or None,
                         inputs={"features": _step(features), "embed": _step(captions)})


@cpu_task("small")
def finish_tracking(workspace: str, parent_run_id: str, outputs: dict[str, Artifact],
                    evaluation: Artifact, registrations: dict[str, Registration]) -> FlyteFile:
    """Record which steps were cache hits (and the runs that produced them), the headline metrics, and close.

    Writes ``<data_root>/summaries/<parent run>.json`` and ``<data_root>/latest-summary.json`` (``m2d2 summary``),
    credentials masked.
    """
    from m2d2.pipeline import root_of
    from m2d2.pipeline.runner import finish

    path = finish(root_of(workspace), parent_run_id, {k: _step(v) for k, v in outputs.items()},
                  _step(evaluation), registrations)
    return FlyteFile(str(path.resolve()), remote_path=False if _is_local() else None)


@workflow
def full(cfg: PipelineConfig = PipelineConfig()) -> FlyteFile:  # noqa: B008 (Flyte reads defaults here)
    """corpus -> features + caption embeddings -> the registry's stages -> evaluate -> register -> summary.

    Every stage's task is in the graph; those that no variant of ``cfg.variants`` needs return at once."""
    from m2d2.pipeline.registry import CAPTIONS, STAGES

    workspace = open_workspace(cfg=cfg)
    parent = start_tracking(cfg=cfg)
    settings = split_settings(cfg=cfg)
    corpus = make_corpus(settings=settings.corpus, workspace=workspace, source=resolve_corpus(cfg=cfg))
    feature_shards = plan_features(settings=settings.features, workspace=workspace, corpus=corpus)
    built = map_task(feature_shard, concurrency=MAP_CONCURRENCY)(ref=feature_shards)
    features = finish_features(shards=feature_shards, built=built, parent_run_id=parent)
    caption_shards = plan_captions(settings=settings.captions, workspace=workspace, corpus=corpus)
    embedded = map_task(caption_shard, concurrency=MAP_CONCURRENCY)(ref=caption_shards)
    captions = finish_captions(shards=caption_shards, embedded=embedded, parent_run_id=parent)
    views = check_views(settings=settings.views, workspace=workspace, features=features, parent_run_id=parent)
    outputs = {"features": features, "embed": captions, "views": views}
    for stage in STAGES:
        source = captions if stage.trains_on == CAPTIONS else outputs[stage.trains_on]
        outputs[stage.name] = stage_task(stage.name)(section=cfg.stages[stage.name], trains=settings.trains[stage.name],
                                                      workspace=workspace, features=features, source=source,
                                                      run_key=cfg.run_key, parent_run_id=parent)
        if stage.trains_on == CAPTIONS:
            views >> outputs[stage.name]  # no stage starts before every view is checked
    stages = {stage.name: outputs[stage.name] for stage in STAGES}
    scores = evaluate(settings=settings.evaluation, workspace=workspace, features=features, captions=captions,
                      stages=stages, parent_run_id=parent)
    registrations = register(settings=settings.registration, workspace=workspace, stages=stages, evaluation=scores,
                             parent_run_id=parent, features=features, captions=captions)
    return finish_tracking(workspace=workspace, parent_run_id=parent, outputs=outputs, evaluation=scores,
                           registrations=registrations)
