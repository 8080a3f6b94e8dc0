"""Lineage in MLflow's own terms: what data every run and registered version was made from, and the chain back
from a registered version to its code, configuration and data.

- The corpus snapshot (its ``manifest.parquet``: URI, sha256, clips per split), the log-mel feature store (the
  digest of its commit marker, which lists every shard's sha256) and the caption vectors (their index file, with
  the sentence encoder's identity) become MLflow datasets (``log_inputs``): the Datasets column of the runs table.
- Code version and the resolved configuration's digest are tags of every run (:func:`m2d2.tracking.code_version`,
  :data:`m2d2.tracking.CONFIG_DIGEST_TAG`), the configuration itself an artefact of the pipeline run.
- A registered version records its variant, data snapshot, config digest, pipeline run and the run of every stage
  of its line (:func:`version_tags`); ``m2d2 lineage models:/<name>@champion`` prints the chain (:func:`describe`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag

from m2d2 import io, tracking
from m2d2.pipeline import registry

__all__ = ["Snapshot", "datasets", "describe", "log_datasets", "snapshot", "version_tags"]

DATA_SNAPSHOT_TAG = "m2d2.data_snapshot"  # the corpus manifest's URI
DATA_DIGEST_TAG = "m2d2.data_digest"  # its sha256
PIPELINE_RUN_TAG = "m2d2.pipeline_run"
STAGE_RUNS_TAG = "m2d2.stage_runs"  # "stage1=<run id>,stage2=<run id>,...": the runs that trained the line
_DIGEST = 32  # MLflow keeps at most 36 characters of a dataset digest


@dataclass(frozen=True)
class Snapshot:
    """The corpus snapshot a feature store was built from."""

    uri: str
    sha256: str
    splits: dict[str, int]

    @property
    def clips(self) -> int:
        return sum(self.splits.values())

    def __str__(self) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in sorted(self.splits.items()))
        return f"{self.uri} (sha256 {self.sha256[:12]}, {self.clips} clips: {splits})"


def snapshot(feature_dir: str | Path) -> Snapshot:
    """The corpus snapshot of a feature store, from the plan it was built by (the plan records the manifest's
    URI and sha256)."""
    plan = json.loads(io.read_bytes(io.join(str(feature_dir), "plan.json")))
    return Snapshot(plan["manifest_uri"], plan["manifest_sha256"], dict(plan.get("split_sizes", {})))


def datasets(feature_dir: str | Path, caption_file: str | Path | None = None) -> list[Dataset]:
    """The corpus, the feature store and (given) the caption vectors as MLflow datasets."""
    snap = snapshot(feature_dir)
    scheme = "s3" if str(snap.uri).startswith("s3://") else "local"
    out = [Dataset("corpus", snap.sha256[:_DIGEST], scheme, json.dumps({"uri": snap.uri}),
                   profile=json.dumps({"num_rows": snap.clips, "splits": snap.splits}))]
    marker = io.read_bytes(io.join(str(feature_dir), "_COMPLETE.json"))
    store = json.loads(marker)
    out.append(Dataset("log-mel features", hashlib.sha256(marker).hexdigest()[:_DIGEST], "local",
                       json.dumps({"uri": str(feature_dir)}),
                       profile=json.dumps({"num_rows": snap.clips, "n_mels": store.get("n_mels"),
                                           "dtype": store.get("dtype"), "shards": len(store.get("shards", []))})))
    if caption_file is not None and io.exists(str(caption_file)):
        from m2d2.text.cache import CaptionEmbeddings

        cache = CaptionEmbeddings(caption_file)
        encoder = cache.encoder
        digest = hashlib.sha256(io.read_bytes(str(caption_file))).hexdigest()
        out.append(Dataset("caption vectors", digest[:_DIGEST], "local", json.dumps({"uri": str(caption_file)}),
                           profile=json.dumps({"num_rows": len(cache), "encoder": encoder})))
        cache.close()
    return out


def log_datasets(run_id: str | None, found: list[Dataset], context: str = "training") -> None:
    """Record ``found`` as inputs of ``run_id`` (MLflow keeps one entry per dataset and run: safe to repeat)."""
    if not run_id or not found:
        return
    tags = [InputTag("mlflow.data.context", context)]
    tracking.client().log_inputs(run_id, [DatasetInput(d, tags) for d in found])


def version_tags(variant_name: str, stages: dict[str, str], feature_dir: str | Path,
                 parent_run_id: str | None) -> dict[str, str]:
    """The lineage tags of a variant's registered version: data snapshot, config digest, pipeline and stage runs."""
    snap = snapshot(feature_dir)
    tags = {DATA_SNAPSHOT_TAG: snap.uri, DATA_DIGEST_TAG: snap.sha256}
    line = registry.line(registry.variant(variant_name).final)
    tags[STAGE_RUNS_TAG] = ",".join(f"{s.name}={stages.get(s.name) or '-'}" for s in line)
    if parent_run_id:
        tags[PIPELINE_RUN_TAG] = parent_run_id
        parent = tracking.client().get_run(parent_run_id)
        if tracking.CONFIG_DIGEST_TAG in parent.data.tags:
            tags[tracking.CONFIG_DIGEST_TAG] = parent.data.tags[tracking.CONFIG_DIGEST_TAG]
    return tags


def describe(model_uri: str) -> list[str]:
    """The chain behind a registered version (``models:/<name>@<alias>`` or ``models:/<name>/<version>``): the
    version and its promotion, the variant and its stages' runs, the pipeline run with its code and config, the
    data; one line each."""
    client = tracking.client()
    if not model_uri.startswith("models:/"):
        raise ValueError(f"{model_uri!r}: give models:/<name>@<alias> or models:/<name>/<version>")
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        raise ValueError(f"{model_uri!r}: name a version or an alias")
    tags = version.tags
    lines = [f"{model_uri} -> {version.name} v{version.version} ({tags.get('m2d2.promotion', '?')}: "
             f"{tags.get('m2d2.promotion_reason', '')})"]
    variant = tags.get("m2d2.variant")
    if variant:
        title = registry.variant(variant).title if variant in registry.VARIANT_NAMES else variant
        lines.append(f"  variant     {title} ({variant})")
    lines.append(f"  model run   {version.run_id} (source {version.source})")
    stage_runs = [part.split("=", 1) for part in tags.get(STAGE_RUNS_TAG, "").split(",") if "=" in part]
    if stage_runs:
        lines.append("  stages      " + " -> ".join(f"{stage} [{run}]" for stage, run in stage_runs))
    parent_id = tags.get(PIPELINE_RUN_TAG)
    if parent_id:
        parent = client.get_run(parent_id).data.tags
        dirty = parent.get(tracking.GIT_DIRTY_TAG)
        lines.append(f"  pipeline    run {parent_id}, m2d2 {parent.get(tracking.VERSION_TAG, '?')}, commit "
                     f"{parent.get(tracking.GIT_COMMIT_TAG, 'unknown')}"
                     + (f" ({'with uncommitted changes' if dirty == 'true' else 'clean'})" if dirty else ""))
    lines.append(f"  config      sha256 {tags.get(tracking.CONFIG_DIGEST_TAG, 'unrecorded')}"
                 + (f" (artefact {tracking.CONFIG_ARTIFACT} of run {parent_id})" if parent_id else ""))
    if DATA_SNAPSHOT_TAG in tags:
        lines.append(f"  data        {tags[DATA_SNAPSHOT_TAG]} (sha256 {tags.get(DATA_DIGEST_TAG, '?')})")
    run = client.get_run(version.run_id)
    for entry in run.inputs.dataset_inputs if run.inputs else []:
        d = entry.dataset
        lines.append(f"  dataset     {d.name}: digest {d.digest}, {d.source_type} {json.loads(d.source).get('uri')}"
                     + (f", {json.loads(d.profile).get('num_rows')} rows" if d.profile else ""))
    if "m2d2.eval_suite" in tags:
        lines.append(f"  evaluation  suite {tags['m2d2.eval_suite']}")
    return lines
