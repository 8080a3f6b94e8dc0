"""Data steps: the corpus, its log-mel store and its caption vectors, each as plan -> shards -> finish.

A plan step stores its plan and returns one :class:`~m2d2.shards.ShardRef` per shard; a shard step builds one
(idempotent, committed by a marker written last, see :mod:`m2d2.shards`); a finish step takes the plan's URI.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from m2d2 import io
from m2d2.data.demo import DemoCorpusConfig, generate_demo_corpus
from m2d2.data.shards import FeatureConfig, build_shard, finish_store, plan_store, read_plan
from m2d2.pipeline.config import (
    CAPTION_BATCH,
    CAPTION_TOKENS_PER_ROW,
    CaptionSettings,
    CorpusSettings,
    FeatureSettings,
)
from m2d2.pipeline.workspace import _tracked, step_dir
from m2d2.presets import model_config
from m2d2.shards import ShardRef, plan_of, shard_refs


def build_corpus(settings: CorpusSettings, data_root: str | Path) -> Path:
    """The generated demo corpus of ``settings`` under ``<data_root>/corpus/<key>``."""
    corpus = DemoCorpusConfig(seed=settings.seed, train_per_class=settings.train_per_class,
                              eval_per_class=settings.eval_per_class)
    out = step_dir(data_root, "corpus", corpus)
    generate_demo_corpus(out, corpus)
    return out


def feature_config(settings: FeatureSettings) -> FeatureConfig:
    return FeatureConfig(norm_crop_frames=settings.norm_crop_frames, norm_samples=settings.norm_samples,
                         seed=settings.seed, shard_mb=settings.shard_mb, audio_roots=tuple(settings.audio_roots),
                         min_seconds=settings.min_seconds)


def features_dir(settings: FeatureSettings, data_root: str | Path, corpus_dir: str | Path) -> Path:
    """Where the log-mel store of ``corpus_dir`` under ``settings`` lives (content-keyed)."""
    return step_dir(data_root, "features", feature_config(settings), corpus_dir)


def plan_features(settings: FeatureSettings, data_root: str | Path, corpus_dir: str | Path,
                  workspace: str = "") -> list[ShardRef]:
    """Plan the log-mel store of ``corpus_dir``: one ref per shard (``workspace``: the refs' cache-key salt).

    The store goes to a content-keyed directory under ``data_root``; shard tasks (:func:`build_feature_shard`, a
    Flyte map task on a cluster) read the plan by URI, so nothing large crosses a task boundary."""
    plan = plan_store(io.join(str(corpus_dir), "manifest.parquet"), str(features_dir(settings, data_root, corpus_dir)),
                      str(corpus_dir), feature_config(settings), ("train", "eval"))
    return plan.refs(workspace)


def build_feature_shard(ref: ShardRef) -> dict[str, Any]:
    """Build (or find committed) the log-mel shard ``ref``; what it did, for the logs."""
    return dataclasses.asdict(build_shard(read_plan(ref.plan), ref.index, progress=False))


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


def build_features(settings: FeatureSettings, data_root: str | Path, corpus_dir: str | Path,
                   parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """Log-mel store of every clip + normalisation stats from training crops of the stage-1 length, in one process:
    :func:`plan_features`, every :func:`build_feature_shard`, :func:`finish_features`."""
    shards = plan_features(settings, data_root, corpus_dir)
    for ref in tqdm(shards, desc="log-mel shards", unit="shard", leave=False):
        build_feature_shard(ref)
    return finish_features(plan_of(shards), parent_run_id)


def captions_dir(settings: CaptionSettings, data_root: str | Path, corpus_dir: str | Path) -> Path:
    """Where the caption vectors of ``corpus_dir`` under ``settings`` live (keyed by the encoder, corpus, prompt;
    not by the number of shards, which does not change the vectors)."""
    text = model_config(settings.model).text.offline
    return step_dir(data_root, "captions", text, corpus_dir, settings.prompt_template)


def plan_captions(settings: CaptionSettings, data_root: str | Path, corpus_dir: str | Path,
                  workspace: str = "") -> list[ShardRef]:
    """Plan the caption cache: every unique caption of every split plus the zero-shot prompts, cut into
    ``settings.shards`` shards for the stage-1 text encoder. Returns one ref per shard (for
    :func:`embed_caption_shard`, a map task on a cluster; ``workspace``: the refs' cache-key salt)."""
    from m2d2.text.cache import default_workdir
    from m2d2.text.encoders import RemoteCodePolicy
    from m2d2.text.shards import plan_shards

    text = model_config(settings.model).text.offline
    out = captions_dir(settings, data_root, corpus_dir) / "captions.parquet"
    manifest = pq.read_table(Path(corpus_dir) / "manifest.parquet", columns=["captions", "labels"]).to_pydict()
    captions = {c for caps in manifest["captions"] for c in caps}
    prompts = {settings.prompt_template.format(label.replace("_", " "))
               for labels in manifest["labels"] for label in labels}
    # bucket=False: text-ordered batches keep the demo's vectors bit-identical (see m2d2.text.cache.embed_captions);
    # the token budget splits only a batch that one very long caption would pad out.
    plan = plan_shards(captions | prompts, settings.shards, text, bucket=False,
                       max_tokens=CAPTION_BATCH * CAPTION_TOKENS_PER_ROW,
                       remote_code=RemoteCodePolicy(settings.trust_remote_code, settings.remote_code_sha256))
    return shard_refs(plan.save(default_workdir(out)), plan.n_shards, workspace)


def _caption_plan(plan_uri: str):
    """The caption plan at ``plan_uri``, its work directory (where it lies) and the cache ``<work>.parquet``."""
    from m2d2.text.shards import plan_workdir, read_plan

    work = plan_workdir(plan_uri)
    return read_plan(plan_uri), work, Path(work).with_suffix(".parquet")


def embed_caption_shard(ref: ShardRef) -> int:
    """Embed the caption shard ``ref`` on this machine's GPU (else CPU); rows embedded now (0: already done)."""
    from m2d2.text.cache import is_current
    from m2d2.text.shards import embed_shard

    plan, work, out = _caption_plan(ref.plan)
    if is_current(out, plan):
        return 0
    result = embed_shard(plan, ref.index, work, device="cuda" if torch.cuda.is_available() else "cpu")
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


def build_caption_cache(settings: CaptionSettings, data_root: str | Path, corpus_dir: str | Path,
                        parent_run_id: str | None = None) -> tuple[Path, str | None]:
    """The caption cache in one process: :func:`plan_captions`, every :func:`embed_caption_shard`,
    :func:`finish_captions`."""
    shards = plan_captions(settings, data_root, corpus_dir)
    for ref in shards:
        embed_caption_shard(ref)
    return finish_captions(plan_of(shards), parent_run_id)
