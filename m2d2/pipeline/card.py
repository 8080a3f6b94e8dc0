"""What a registered model says about itself: the model card in its export directory (``README.md``, the Hugging
Face model-card layout) and the short markdown description of its MLflow model version."""

from __future__ import annotations

from m2d2.pipeline import registry
from m2d2.pipeline.lineage import Snapshot

__all__ = ["description", "evaluation_rows", "model_card"]

# The figures a reader looks at first, in this order: zero-shot and its gain, retrieval, the linear probe.
_LICENSES = {"apache-2.0": "Apache-2.0"}  # the front matter's SPDX id (lower case) -> its usual spelling
HEADLINE = ("zs_acc", "zs_gain", "a2t_R1", "t2a_R1", "t2a_mAP10", "probe_acc", "suite_mean")


def evaluation_rows(variant_name: str, evaluation: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """``(metric, this model, random-init baseline, paper)`` rows: headline metrics on the execution's evaluation
    split, then every downstream task's figures (``<task>/<metric>``) with the paper's number where it has one."""
    from m2d2.eval.benchmark import shown_metric
    from m2d2.eval.paper import paper_value
    from m2d2.pipeline.runner import variant_metrics

    final = registry.stage(registry.variant(variant_name).final)
    mine = variant_metrics(evaluation, variant_name)
    base = f"{final.baseline}_baseline/" if final.baseline else None
    rows = []
    for key in HEADLINE:
        if key not in mine:
            continue
        baseline = ""
        if base and f"{base}{key}" in evaluation:
            baseline = f"{evaluation[base + key]:.3f}"
            if f"{base}{key}_std" in evaluation:
                baseline += f" ± {evaluation[f'{base}{key}_std']:.3f}"
        rows.append((key, f"{mine[key]:.3f}", baseline, ""))
    for key in sorted(k for k in mine if "/" in k and shown_metric(k.split("/", 1)[1])):
        task, metric = key.split("/", 1)
        paper = paper_value(task, metric, variant_name)
        rows.append((key, f"{mine[key]:.3f}", "", "" if paper is None else f"{paper:.3f}"))
    return rows


def _table(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| Metric | This model | Random-init baseline | Paper (M2D2 family) |", "|---|---|---|---|"]
    lines += [f"| {m} | {v} | {b or '—'} | {p or '—'} |" for m, v, b, p in rows]
    return "\n".join(lines)


def description(variant_name: str, evaluation: dict[str, float], snapshot: Snapshot | None,
                config_digest: str | None) -> str:
    """The version's description in the registry: what it is, what it was trained on, its headline figures."""
    variant = registry.variant(variant_name)
    line = " → ".join(s.name for s in registry.line(variant.final))
    parts = [f"**{variant.title}** (`{variant_name}`): {line}. {variant.description}".strip()]
    if snapshot is not None:
        parts.append(f"Data snapshot: `{snapshot.uri}` (sha256 `{snapshot.sha256[:12]}`, {snapshot.clips} clips).")
    if config_digest:
        parts.append(f"Config digest: `{config_digest[:12]}`.")
    rows = [r for r in evaluation_rows(variant_name, evaluation) if "/" not in r[0]]
    if rows:
        parts.append(_table(rows))
    return "\n\n".join(parts)


def model_card(variant_name: str | None, stage_name: str, evaluation: dict[str, float], snapshot: Snapshot | None,
               config_digest: str | None, stage_metrics: dict[str, float] | None = None,
               license_: str = "apache-2.0") -> str:
    """The ``README.md`` of an export: what the model is, how to load it, what it was trained on, how it scored,
    its limits and licenses."""
    stage = registry.stage(stage_name)
    if variant_name:
        variant = registry.variant(variant_name)
        title, what = f"{variant.title} (`{variant_name}`)", variant.description
    else:
        title, what = f"{stage.title or stage.name} (`{stage.name}`)", "An intermediate stage of the M2D2 family."
    line = " → ".join(s.name for s in registry.line(stage_name))
    out = [
        "---",
        f"license: {license_}",
        "library_name: m2d2",
        "tags: [audio, audio-language, clap, m2d2, self-supervised]",
        "pipeline_tag: feature-extraction",
        "---",
        "",
        f"# {title}",
        "",
        f"{what} A general-purpose audio-language representation of the M2D2 family (Niizumi et al., \"M2D2: "
        "Exploring General-purpose Audio-Language Representations Beyond CLAP\"): frame and clip features of "
        "audio (3840-d for ViT-B) and CLAP embeddings of audio and text in one space.",
        "",
        "## How to use",
        "",
        "```python",
        "from m2d2.inference import Embedder",
        "model = Embedder.from_pretrained(\"<this directory>\")",
        "clap = model.clap_audio(waves)  # 16-kHz mono waveforms; model.clap_text([...]), model.clip_features(waves)",
        "```",
        "",
        "From the MLflow registry: `mlflow.pyfunc.load_model(\"models:/<name>@champion\")` (audio, file paths or "
        "text in; CLAP embeddings, clip or frame features out).",
        "",
        "## Training",
        "",
        f"- Stages: {line} (paper, Section III).",
    ]
    if snapshot is not None:
        out.append(f"- Data snapshot: `{snapshot.uri}` (manifest sha256 `{snapshot.sha256}`, {snapshot.clips} "
                   f"clips: " + ", ".join(f"{k} {v}" for k, v in sorted(snapshot.splits.items())) + ").")
    if config_digest:
        out.append(f"- Configuration digest: `{config_digest}` (the pipeline run's `config.json`).")
    out += ["", "## Evaluation", ""]
    if variant_name:
        out += ["On the execution's held-out evaluation split (and the downstream tasks of its suite). Values are "
                "fractions; the paper's numbers come from the paper-scale model and are the reference, not a "
                "target for a small run.", "", _table(evaluation_rows(variant_name, evaluation))]
    elif stage_metrics:
        out += ["| Metric | Value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in sorted(stage_metrics.items())]
    out += [
        "",
        "## Limitations",
        "",
        "- The figures hold for the evaluation data named above; a model trained on a small or generated corpus "
        "(the demo) learns that corpus, not general audio.",
        "- Audio is resampled to 16 kHz mono; long clips are encoded in chunks of the encoder's length.",
        "- The CLAP side inherits the biases of its captions and of the sentence encoder.",
        "",
        "## License",
        "",
        f"Code: {_LICENSES.get(license_, license_)}. Weights: trained on the data "
        "snapshot above, whose terms apply to them (the demo corpus is generated by this package and carries no "
        "third-party terms; AudioSet, VGGSound and WavCaps each have their own).",
        "",
    ]
    return "\n".join(out)
