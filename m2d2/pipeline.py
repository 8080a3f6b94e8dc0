"""The pipeline's steps as plain Python: what each Flyte task of ``workflows/full.py`` calls.

Every step writes under ``<data_root>/<step>/<key>``, where ``key`` hashes the step's configuration and
inputs: a re-run with the same inputs lands in the same place (so a Flyte cache hit never points at a path
that a later run moved), and a changed setting never overwrites another run's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from m2d2 import io
from m2d2.data.demo import DemoCorpusConfig, generate_demo_corpus
from m2d2.data.features import FeatureConfig, LogMelStore, finish_store, plan_store, read_plan, store_plan_uri
from m2d2.data.shards import build_shard
from m2d2.eval.clap import ClapEvalSet, evaluate_clap
from m2d2.eval.metrics import mean_and_std
from m2d2.models import M2D2, M2D2Config
from m2d2.text.cache import CaptionEmbeddings
from m2d2.tracking import StageRun
from m2d2.train.config import TrainStageConfig, stage_preset

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "{} can be heard"
CAPTION_BATCH = 64  # captions per embedding batch (plan_shards' default)
CAPTION_TOKENS_PER_ROW = 512  # padded tokens per caption that a batch may average: the embedding batch's budget


@dataclass
class CorpusSettings:
    """Size and seed of the generated demo corpus (see :class:`m2d2.data.demo.DemoCorpusConfig`)."""

    seed: int = 0
    train_per_class: int = 48
    eval_per_class: int = 24


@dataclass
class PipelineConfig:
    """One pipeline execution: corpus, model/stage presets, where data goes, evaluation settings."""

    preset: str = "demo"
    data_root: str = "runs"
    # "" = generate the demo corpus; else a directory (local or s3://) holding manifest.parquet with audio paths
    # relative to it, or "<prefix>/latest": the newest snapshot directory under <prefix> (names sort by date).
    corpus_source: str = ""
    run_key: str = ""  # stable key of the training checkpoints; a relaunch with the same key resumes
    experiment: str = "m2d2"
    baseline_inits: int = 5  # random initialisations averaged for each baseline
    registered_model: str = "m2d2"  # MLflow registered model of the final (stage 2.1) export
    primary_metric: str = "stage21/zs_acc"  # the "champion" alias moves only when this beats the incumbent
    prompt_template: str = PROMPT_TEMPLATE
    norm_samples: int = 5000
    feature_shard_mb: float = 256.0  # log-mel shard size: the unit of the feature map task and of S3 fetches
    caption_shards: int = 1  # caption-embedding shards: the elements of the embedding map task (one GPU each)
    # Absolute audio_uri values of the corpus must lie under the corpus directory or under one of these roots
    # (local paths or s3:// prefixes); see m2d2.data.manifest.AudioAccess.
    audio_roots: list[str] = field(default_factory=list)
    # Run the caption encoder's own Python code (NV-Embed-v2 ships its model as remote code). Off unless the user
    # sets it; then the code files must match remote_code_sha256 (see m2d2.text.encoders.RemoteCodePolicy).
    trust_remote_code: bool = False
    remote_code_sha256: str = ""
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    stage1: TrainStageConfig = field(default_factory=lambda: stage_preset("stage1", "demo"))
    stage11: TrainStageConfig = field(default_factory=lambda: stage_preset("stage1.1", "demo"))
    stage2: TrainStageConfig = field(default_factory=lambda: stage_preset("stage2", "demo"))
    stage21: TrainStageConfig = field(default_factory=lambda: stage_preset("stage2.1", "demo"))

    def __post_init__(self) -> None:
        if not io.is_local(self.data_root):
            # Steps address their outputs as paths under data_root (content-keyed directories, memory-mapped caption
            # vectors, reports); an object-store root would be mangled into a local path.
            raise ValueError(f"data_root={self.data_root!r}: it must be a filesystem path that every task can read "
                             "and write (on a cluster, the shared volume the PodTemplates mount at /data, e.g. "
                             "/data/m2d2/runs; see k8s/README.md). Object-store URIs work for corpus_source, not "
                             "yet for data_root.")
        if self.run_key:  # it names a directory under data_root; checkpoints there are pruned
            io.check_token(self.run_key, "run_key")
        if self.feature_shard_mb <= 0 or self.caption_shards < 1:
            raise ValueError(f"need feature_shard_mb > 0 and caption_shards >= 1, got {self.feature_shard_mb}, "
                             f"{self.caption_shards}")

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> PipelineConfig:
        """``demo`` (the default: minutes on a 2-core CPU), ``smoke`` (seconds per stage, for tests) or ``paper``
        (the published settings of every stage; give it a ``data_root`` and a ``corpus_source``)."""
        if name == "demo":
            cfg = cls()
        elif name == "paper":
            # 16 caption shards: ~2.5 M unique captions through a 7-B encoder, one GPU pod per shard
            cfg = cls(preset="paper", caption_shards=16,
                      **{f: stage_preset(stage, "paper") for f, stage in STAGE_FIELDS.items()})
        elif name == "smoke":
            # small shards, so the feature and caption map tasks have several elements even on the smoke corpus
            cfg = cls(preset="smoke", baseline_inits=2, norm_samples=200, feature_shard_mb=4.0, caption_shards=2,
                      corpus=CorpusSettings(train_per_class=2, eval_per_class=20),
                      **{f: stage_preset(stage, "smoke") for f, stage in STAGE_FIELDS.items()})
        else:
            raise ValueError(f"unknown pipeline preset {name!r}; choose 'demo', 'smoke' or 'paper'")
        return dataclasses.replace(cfg, **changes)


#: PipelineConfig field -> training stage, in pipeline order.
STAGE_FIELDS = {"stage1": "stage1", "stage11": "stage1.1", "stage2": "stage2", "stage21": "stage2.1"}

WORKSPACE_FILE = ".m2d2-workspace"


def workspace_token(data_root: str) -> str:
    """``<absolute data root>#<workspace id>``; the id is created once per data root and kept in a file there.

    A deleted (or new) data root gets a new id, so anything keyed by the token — Flyte cache entries —
    cannot outlive the outputs it points at.
    """
    import uuid

    root = str(Path(data_root).resolve()) if io.is_local(data_root) else data_root.rstrip("/")
    marker = io.join(root, WORKSPACE_FILE)
    if not io.exists(marker):
        io.atomic_write_bytes(marker, uuid.uuid4().hex.encode())
    return f"{root}#{io.read_bytes(marker).decode().strip()}"


def rooted(cfg: PipelineConfig, workspace: str) -> PipelineConfig:
    """``cfg`` with ``data_root`` set to the workspace's absolute root."""
    return dataclasses.replace(cfg, data_root=workspace.rsplit("#", 1)[0])


def step_key(*parts: Any) -> str:
    """Short content key of a step's settings and inputs (dataclasses and paths alike)."""
    def plain(obj: Any) -> Any:
        return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def step_dir(cfg: PipelineConfig, step: str, *parts: Any) -> Path:
    return Path(cfg.data_root) / step / step_key(*parts)


def _tracked(parent_run_id: str | None, stage: str, **kwargs: Any) -> StageRun | None:
    return StageRun(parent_run_id, stage, **kwargs) if parent_run_id else None


# ----------------------------------------------------------------------------------------------------- data
LATEST = "latest"


def resolve_corpus_source(source: str) -> str:
    """The corpus directory ``source`` names ("" stays "": the demo corpus is generated).

    ``<prefix>/latest`` picks the newest snapshot under ``<prefix>`` that holds a ``manifest.parquet`` (snapshot
    names must sort by time, e.g. ``2026-11-26``); anything else must itself hold a ``manifest.parquet``.
    """
    if not source:
        return ""
    source = source.rstrip("/")
    if source.rsplit("/", 1)[-1] == LATEST:
        import fsspec

        prefix = source.rsplit("/", 1)[0]
        fs, path = fsspec.core.url_to_fs(prefix)
        if not fs.isdir(path):
            raise FileNotFoundError(f"corpus snapshot prefix {prefix} does not exist")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
        complete = [n for n in names if fs.exists(f"{path}/{n}/manifest.parquet")]
        if not complete:
            raise FileNotFoundError(f"no snapshot with a manifest.parquet under {prefix} (found {names[:5]})")
        source = io.join(prefix, complete[-1])
    elif not io.exists(io.join(source, "manifest.parquet")):
        raise FileNotFoundError(f"corpus source {source} has no manifest.parquet")
    return str(Path(source).resolve()) if io.is_local(source) else source


def build_corpus(cfg: PipelineConfig) -> Path:
    corpus = DemoCorpusConfig(seed=cfg.corpus.seed, train_per_class=cfg.corpus.train_per_class,
                              eval_per_class=cfg.corpus.eval_per_class)
    out = step_dir(cfg, "corpus", corpus)
    generate_demo_corpus(out, corpus)
    return out


def _feature_config(cfg: PipelineConfig) -> FeatureConfig:
    crop = cfg.stage1.crop_frames or M2D2Config.preset(cfg.stage1.model_preset).encoder.input_frames
    return FeatureConfig(norm_crop_frames=crop, norm_samples=cfg.norm_samples, seed=cfg.corpus.seed,
                         shard_mb=cfg.feature_shard_mb, audio_roots=tuple(cfg.audio_roots))


def plan_features(cfg: PipelineConfig, corpus_dir: str | Path) -> tuple[str, list[str]]:
    """Plan the log-mel store of ``corpus_dir``: the plan's URI and one task spec per shard (``<plan>#<k>``).

    The store goes to a content-keyed directory under ``data_root``; shard tasks (:func:`build_feature_shard`, a
    Flyte map task on a cluster) read the plan by URI, so nothing large crosses a task boundary."""
    features = _feature_config(cfg)
    out = step_dir(cfg, "features", features, corpus_dir)
    plan = plan_store(io.join(str(corpus_dir), "manifest.parquet"), corpus_dir, out, features)
    uri = store_plan_uri(out)
    return uri, [f"{uri}#{k}" for k in range(len(plan))]


def build_feature_shard(spec: str) -> dict[str, Any]:
    """Build (or find committed) shard ``<plan>#<k>``; what it did, for the logs."""
    plan_uri, k = spec.rsplit("#", 1)
    return dataclasses.asdict(build_shard(read_plan(plan_uri), int(k), progress=False))


def finish_features(plan_uri: str, parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """Finalise the store once every shard is committed (stats, indexes, quarantine); tracked as ``features``."""
    plan = read_plan(plan_uri)
    out = Path(plan.store_uri)
    run = _tracked(parent_run_id, "features", params={"features": plan.config, "corpus": plan.audio_root,
                                                      "shards": len(plan)})
    with run or nullcontext():
        report = finish_store(plan)
        if run:
            run.log_metrics(report.metrics(), step=0)
            run.log_artifact(str(out / "stats.json"))
            run.log_artifact(str(out / "quarantine.parquet"))
    return out, (run.run_id if run else None)


def build_features(cfg: PipelineConfig, corpus_dir: str | Path,
                   parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """Log-mel store of every clip + normalisation stats from training crops of the stage-1 length, in one process:
    :func:`plan_features`, every :func:`build_feature_shard`, :func:`finish_features`."""
    plan_uri, shards = plan_features(cfg, corpus_dir)
    for spec in tqdm(shards, desc="log-mel shards", unit="shard", leave=False):
        build_feature_shard(spec)
    return finish_features(plan_uri, parent_run_id)


def plan_captions(cfg: PipelineConfig, corpus_dir: str | Path) -> tuple[str, list[str]]:
    """Plan the caption cache: every unique caption of every split plus the zero-shot prompts, cut into
    ``cfg.caption_shards`` shards for the stage-1 text encoder. Returns the plan's URI and one spec per shard
    (``<plan>#<k>``, for :func:`embed_caption_shard`, a map task on a cluster). The vectors do not depend on the
    number of shards, so it is not part of the cache's key."""
    from m2d2.text.cache import default_workdir
    from m2d2.text.encoders import RemoteCodePolicy
    from m2d2.text.shards import plan_shards

    text = M2D2Config.preset(cfg.stage1.model_preset).text.offline
    out = step_dir(cfg, "captions", text, corpus_dir, cfg.prompt_template) / "captions.parquet"
    manifest = pq.read_table(Path(corpus_dir) / "manifest.parquet", columns=["captions", "labels"]).to_pydict()
    captions = {c for caps in manifest["captions"] for c in caps}
    prompts = {cfg.prompt_template.format(label.replace("_", " ")) for labels in manifest["labels"] for label in labels}
    # bucket=False: text-ordered batches keep the demo's vectors bit-identical (see m2d2.text.cache.embed_captions);
    # the token budget splits only a batch that one very long caption would pad out.
    plan = plan_shards(captions | prompts, cfg.caption_shards, text, bucket=False,
                       max_tokens=CAPTION_BATCH * CAPTION_TOKENS_PER_ROW,
                       remote_code=RemoteCodePolicy(cfg.trust_remote_code, cfg.remote_code_sha256.strip().lower()))
    plan_uri = str(plan.save(default_workdir(out)))
    return plan_uri, [f"{plan_uri}#{k}" for k in range(plan.n_shards)]


def _caption_plan(plan_uri: str):
    from m2d2.text.shards import ShardPlan

    work = Path(plan_uri).parent
    return ShardPlan.load(work), work, work.with_suffix(".parquet")


def embed_caption_shard(spec: str) -> int:
    """Embed shard ``<plan>#<k>`` on this machine's GPU (else CPU); rows embedded now (0: already done)."""
    from m2d2.text.cache import is_current
    from m2d2.text.shards import embed_shard

    plan_uri, k = spec.rsplit("#", 1)
    plan, work, out = _caption_plan(plan_uri)
    if is_current(out, plan):
        return 0
    result = embed_shard(plan, int(k), work, device="cuda" if torch.cuda.is_available() else "cpu")
    return 0 if result.skipped else result.rows


def finish_captions(plan_uri: str, parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """Merge the committed shards into the cache (index written last), drop the shards; tracked as ``embed``."""
    from m2d2.text.cache import is_current
    from m2d2.text.shards import merge_shards, remove_workdir

    plan, work, out = _caption_plan(plan_uri)
    run = _tracked(parent_run_id, "embed", params={"text_encoder": plan.config, "shards": plan.n_shards})
    with run or nullcontext():
        rows = plan.rows if is_current(out, plan) else merge_shards(plan, work, out)
        remove_workdir(work)
        if run:
            run.log_metrics({"input_captions": plan.n_input, "rows": rows}, step=0)
    return out, (run.run_id if run else None)


def build_caption_cache(cfg: PipelineConfig, corpus_dir: str | Path,
                        parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """The caption cache in one process: :func:`plan_captions`, every :func:`embed_caption_shard`,
    :func:`finish_captions`."""
    plan_uri, shards = plan_captions(cfg, corpus_dir)
    for spec in shards:
        embed_caption_shard(spec)
    return finish_captions(plan_uri, parent_run_id)


# ----------------------------------------------------------------------------------------------------- evaluation
def eval_set(feature_dir: str | Path, prompt_template: str = PROMPT_TEMPLATE) -> ClapEvalSet:
    store = LogMelStore(feature_dir, "eval")
    labels = [lab[0] for lab in store.labels]
    return ClapEvalSet(lms=[torch.from_numpy(store[i]) for i in range(len(store))], labels=labels,
                       captions=store.captions, class_names=sorted(set(labels)), prompt_template=prompt_template)


def evaluate_stages(
    cfg: PipelineConfig,
    feature_dir: str | Path,
    caption_cache: str | Path,
    stage1_export: str | Path,
    stage11_export: str | Path,
    stage2_export: str | Path,
    stage21_export: str | Path,
    parent_run_id: str | None = None,
    stage11_metrics: dict[str, float] | None = None,
    report_dir: str | Path | None = None,
) -> tuple[dict[str, float], str | None]:
    """Zero-shot and retrieval of the CLAP models of stages 1, 2 and 2.1 against random-init baselines.

    Baselines keep the text side each stage starts from: stage 1 — random audio encoder, projector and text
    map with the same offline caption vectors; stage 2 (and 2.1, which continues it) — the frozen stage-1.1
    encoder with a fresh projector and the untouched pretrained text encoder. Each is averaged over
    ``baseline_inits`` seeds. Stage 1.1's tagging mAP (measured by the stage itself) is passed through.
    With ``report_dir``, the final model also gets the full suite (:func:`m2d2.eval.suite.evaluate_suite`:
    linear probe, R@50, confusion matrix, t-SNE, projector attention) and its HTML report, logged to MLflow.
    """
    data = eval_set(feature_dir, cfg.prompt_template)
    cache = CaptionEmbeddings(caption_cache)

    def offline_text(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(cache.lookup(texts).astype(np.float32))

    results: dict[str, float] = {}
    stage1 = M2D2.from_pretrained(str(stage1_export))
    cache.check_encoder(stage1.config.text.offline)
    _put(results, "stage1", evaluate_clap(stage1, data, text_embedder=offline_text))
    baselines = []
    for k in range(cfg.baseline_inits):
        torch.manual_seed(10_000 + k)
        random_model = M2D2(stage1.config, with_m2d=False)
        baselines.append(evaluate_clap(random_model, data, text_embedder=offline_text))
    _put(results, "stage1_baseline", mean_and_std(baselines))
    _put(results, "stage11", stage11_metrics or {})
    _put(results, "stage2", evaluate_clap(M2D2.from_pretrained(str(stage2_export)), data))
    final = M2D2.from_pretrained(str(stage21_export))
    _put(results, "stage21", evaluate_clap(final, data))
    # Stage-2 baselines differ only in the fresh projector: the frozen encoder and the untouched pretrained text
    # encoder are the same for every seed, so the text vectors are computed once and each seed re-draws the projector.
    fresh = M2D2.from_pretrained(str(stage11_export))
    fresh.start_stage2(M2D2Config.preset(cfg.stage2.model_preset).text.encoder)
    texts = sorted({c for caps in data.captions for c in caps} | set(data.prompts()))
    with torch.inference_mode():
        raw = torch.cat([fresh.text_encoder(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    row = {t: i for i, t in enumerate(texts)}

    def pretrained_text(batch: list[str]) -> torch.Tensor:
        return raw[[row[t] for t in batch]]

    baselines = []
    for k in range(cfg.baseline_inits):
        torch.manual_seed(20_000 + k)
        fresh.audio_proj.reset_parameters()
        baselines.append(evaluate_clap(fresh, data, text_embedder=pretrained_text))
    _put(results, "stage2_baseline", mean_and_std(baselines))
    results["num_classes"] = float(len(data.class_names))
    results["num_eval_clips"] = float(len(data.labels))
    for stage, baseline in (("stage1", "stage1"), ("stage2", "stage2"), ("stage21", "stage2")):
        results[f"{stage}_zs_gain"] = results[f"{stage}/zs_acc"] - results[f"{baseline}_baseline/zs_acc"]
    suite = None
    if report_dir is not None:
        from m2d2.eval.suite import evaluate_suite

        suite = evaluate_suite(final, data, report_dir,
                               title="M2D2 final model (stage 2.1)")
        _put(results, "final", {k: v for k, v in suite.metrics.items() if k.startswith(("probe_", "a2t_R50",
                                                                                        "t2a_R50", "zs_"))})
    run_id = None
    if parent_run_id:
        with StageRun(parent_run_id, "evaluate", params={"baseline_inits": cfg.baseline_inits,
                                                         "prompt_template": cfg.prompt_template,
                                                         "stage1": str(stage1_export),
                                                         "stage1.1": str(stage11_export),
                                                         "stage2": str(stage2_export),
                                                         "stage2.1": str(stage21_export)}) as run:
            run.log_metrics(results, step=0)
            run.log_dict(results, "metrics.json")
            run_id = run.run_id
            if suite is not None and run_id is not None:
                from m2d2.eval.reports import log_report

                log_report(suite.report_dir, run_id, "report")
    return results, run_id


def _put(results: dict[str, float], prefix: str, metrics: dict[str, float]) -> None:
    """Prefix keys with the model; MLflow metric names cannot hold ``@`` (``a2t_R@1`` becomes ``a2t_R1``)."""
    results.update({f"{prefix}/{k.replace('@', '')}": float(v) for k, v in metrics.items()})
