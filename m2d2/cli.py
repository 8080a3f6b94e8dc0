"""``m2d2`` command line: embed audio files, zero-shot classify them, search a folder by text, evaluate models on
downstream tasks, trace a registered model's lineage, show the last pipeline summary or the effective configuration,
import reference checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from m2d2.summary import SUMMARY_FILE

INDEX_DIR = ".m2d2-index"  # m2d2.inference.INDEX_DIR, repeated so that `m2d2 -h` imports no torch
# Decoding limits of the audio commands, repeated for the same reason: m2d2.inference.SEARCH_MAX_SECONDS,
# m2d2.audio.decode.DEFAULT_MAX_CHANNELS and DEFAULT_MAX_FILE_MB.
MAX_SECONDS = 600.0
MAX_CHANNELS = 8
MAX_FILE_MB = 512.0


def _embedder(model_dir: str):
    from m2d2.inference import Embedder

    return Embedder.from_pretrained(model_dir)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a text encoder that ships Python code (NV-Embed-v2) to run it; needs "
                             "--remote-code-sha256 (also: M2D2_TRUST_REMOTE_CODE=1)")
    parser.add_argument("--remote-code-sha256", metavar="DIGEST",
                        help="digest of the code files you reviewed (also: M2D2_REMOTE_CODE_SHA256); a refusal "
                             "prints the digest it found")


def _apply_model_options(args: argparse.Namespace) -> None:
    """The user's permission for remote code reaches the text encoder through the environment it reads."""
    if getattr(args, "trust_remote_code", False):
        os.environ["M2D2_TRUST_REMOTE_CODE"] = "1"
    if getattr(args, "remote_code_sha256", None):
        os.environ["M2D2_REMOTE_CODE_SHA256"] = args.remote_code_sha256


def _add_decode_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS,
                        help="use only the first N seconds of each file (0: all of it; default %(default)g)")
    parser.add_argument("--max-channels", type=int, default=MAX_CHANNELS,
                        help="skip files with more channels (default %(default)d)")
    parser.add_argument("--max-file-mb", type=float, default=MAX_FILE_MB,
                        help="skip larger files without reading them (default %(default)g MiB)")


def _limits(args: argparse.Namespace) -> dict:
    return {"max_seconds": args.max_seconds if args.max_seconds > 0 else None, "max_file_mb": args.max_file_mb,
            "max_channels": args.max_channels}


def _skip(path: str, reason: str) -> None:
    print(f"skipped {path}: {reason}", file=sys.stderr)


def _load_or_skip(path: str, sample_rate: int, args: argparse.Namespace):
    """The file's mono waveform, or None after one ``skipped <path>: <reason>`` line on stderr: a missing,
    unreadable, undecodable or oversized file is bad input, reported without a traceback."""
    from m2d2.audio import AudioDecodeError, decode_audio

    limits = _limits(args)
    try:
        decoded = decode_audio(path, sample_rate, **limits)
    except (AudioDecodeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            _skip(path, "not a regular file" if os.path.exists(path) else "no such file")
        else:
            _skip(path, str(exc) if isinstance(exc, AudioDecodeError) else f"cannot read it: {exc.strerror or exc}")
        return None
    if decoded.capped:
        print(f"note: {path}: only the first {limits['max_seconds']:g} s of {decoded.duration_s:.1f} s are used "
              "(--max-seconds)", file=sys.stderr)
    return decoded.wave


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    embedder = _embedder(args.model)
    failed = 0
    for path in args.files:
        wave = _load_or_skip(path, embedder.sample_rate, args)
        if wave is None:
            failed += 1
            continue
        timestamps = None
        try:
            if args.kind == "clap":
                out = embedder.clap_audio([wave])[0]
            elif args.kind == "frames":
                frames = embedder.frames([wave])[0]
                out, timestamps = frames.features, frames.timestamps
            else:
                out = embedder.clip_features([wave])[0]
        except ValueError as exc:  # e.g. shorter than one analysis window
            _skip(path, str(exc))
            failed += 1
            continue
        array = out.numpy()
        if args.out:
            target = Path(args.out) / (Path(path).stem + f".{args.kind}.npy")
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, array)
            if timestamps is not None:  # frame-centre times in seconds, one per row
                np.save(target.with_name(Path(path).stem + ".timestamps.npy"), timestamps.numpy())
            print(f"{path}: {args.kind} {tuple(array.shape)} -> {target}")
        else:
            print(f"{path}: {args.kind} {tuple(array.shape)}")
    return 1 if failed else 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from m2d2.eval.prompts import PromptRule, class_prompts

    embedder = _embedder(args.model)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    prompts = class_prompts(PromptRule(args.template) if args.template else args.task, labels)
    text = F.normalize(embedder.clap_text(prompts), dim=-1)
    failed = 0
    for path in args.files:
        wave = _load_or_skip(path, embedder.sample_rate, args)
        if wave is None:
            failed += 1
            continue
        try:
            audio = F.normalize(embedder.clap_audio([wave]), dim=-1)
        except ValueError as exc:  # e.g. shorter than one analysis window
            _skip(path, str(exc))
            failed += 1
            continue
        scores = (audio @ text.T)[0]
        best = scores.argsort(descending=True)[: args.top]
        ranked = ", ".join(f"{labels[i]} ({scores[i]:.3f})" for i in best.tolist())
        print(f"{path}: {ranked}")
    return 1 if failed else 0


def _eval_model(spec: str):
    """``[NAME=]DIR`` -> an EvalModel: a tagging export (stage 1.1: ``classifier/`` beside it) is scored by tagging
    and linear evaluation; any other export by linear evaluation, zero-shot and retrieval."""
    from m2d2 import io
    from m2d2.eval.benchmark import EvalModel
    from m2d2.eval.tagging import load_tagger
    from m2d2.inference import load_pretrained
    from m2d2.models.tagger import CLASSES_FILE, CLASSIFIER_DIR

    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    parts = [p for p in path.rstrip("/").split("/") if p]
    name = name or (parts[-2] if len(parts) > 1 and parts[-1] in ("model", "export") else parts[-1])
    classifier = io.join(path.rstrip("/").rsplit("/", 1)[0], CLASSIFIER_DIR, CLASSES_FILE) if "/" in path else ""
    if classifier and io.exists(classifier):
        base, tagger, classes = load_tagger(path)
        return EvalModel(name, base, clap=False, tagger=(tagger, classes))
    return EvalModel(name, load_pretrained(path))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from m2d2.eval.benchmark import BenchmarkSettings, parse_task, run_benchmark, task_digest
    from m2d2.eval.tasks import TASKS, TaskFormatError

    if args.list:
        for task in TASKS.values():
            print(f"{task.name:10s} {task.title:38s} {','.join(task.protocols):22s} {task.duration_s:g} s  "
                  f"{task.layout}")
        return 0
    if not args.model or not args.tasks:
        print("m2d2 evaluate: give --model and --tasks (m2d2 evaluate --list shows the tasks)", file=sys.stderr)
        return 2
    try:
        tasks = []
        for spec in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            task, root = parse_task(spec, args.data_root)
            tasks.append((task, task.read(root)))
    except (TaskFormatError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"m2d2 evaluate: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    models = [_eval_model(spec) for spec in args.model]
    out = Path(args.out)
    settings = BenchmarkSettings(linear_runs=args.linear_runs, max_clips=args.max_clips)
    result = run_benchmark(models, tasks, settings, cache_dir=args.cache or out / "features")
    result.write(out)
    digests = {task.name: task_digest(task, data) for task, data in tasks}
    (out / "suite.json").write_text(json.dumps({"tasks": digests, "models": [m.name for m in models]}, indent=2))
    print(result.markdown())
    for task, data in tasks:
        excluded = ", ".join(f"{n} {why}" for why, n in data.excluded.items())
        skipped = {k: v for r in result.results if r.task == task.name for k, v in r.skipped.items()}
        print(f"{task.name}: {result.task_seconds.get(task.name, 0.0):.1f} s"
              + (f"; excluded by its split: {excluded}" if excluded else "")
              + (f"; undecodable clips skipped: {skipped}" if skipped else ""))
    print(f"Table: {out / 'suite_table.md'} (also .csv, .html); results: {out / 'suite_results.json'}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from m2d2.pipeline.lineage import describe

    try:
        lines = describe(args.model_uri)
    except (MlflowException, ValueError) as exc:
        print(f"m2d2 lineage: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from m2d2.inference import search_folder

    if not args.model:
        print("m2d2 search: give --model or set M2D2_MODEL", file=sys.stderr)
        return 2
    if not args.dir.is_dir():
        print(f"m2d2 search: {args.dir} is not a directory", file=sys.stderr)
        return 2
    result = search_folder(_embedder(args.model), args.query, args.dir, top=args.top, cache_dir=args.cache,
                           **_limits(args))
    for path, reason in result.skipped:
        _skip(str(path), reason)
    for rank, (path, score) in enumerate(result.hits, 1):
        print(f"{rank:3d}  {score:+.4f}  {path.relative_to(args.dir)}")
    print(f"{len(result.hits)} shown of {result.cached + result.embedded} files ({result.cached} cached, "
          f"{result.embedded} embedded, {len(result.skipped)} skipped)", file=sys.stderr)
    return 1 if result.skipped else 0


def _pipeline_config(args: argparse.Namespace):
    """The configuration ``--preset`` / ``--cfg`` name: the preset (default demo), overlaid by the file's keys."""
    from m2d2.config import load
    from m2d2.pipeline import PipelineConfig
    from m2d2.presets import pipeline_config

    base = pipeline_config(args.preset) if args.preset else None
    if args.cfg:
        return load(args.cfg, PipelineConfig, base=base)
    return base or pipeline_config("demo")


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline in this process (the same steps, directories and cache keys as the Flyte workflow)."""
    import dataclasses
    import logging

    import yaml

    from m2d2.pipeline import run

    try:
        cfg = _pipeline_config(args)
        if args.data_root:
            cfg = dataclasses.replace(cfg, data_root=args.data_root)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"m2d2 run: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from m2d2.data.views import ViewError

    try:
        result = run(cfg)
    except ViewError as exc:  # a stage's data would not do: say so plainly, before any training
        print(f"m2d2 run: {exc}", file=sys.stderr)
        return 2
    print(f"summary: {result.summary}  (m2d2 summary --data-root {cfg.data_root})")
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    """``m2d2 corpus``: audio on disk + metadata -> a validated corpus snapshot (:mod:`m2d2.data.corpus`)."""
    import logging

    import yaml

    from m2d2.data.corpus import CorpusSpecError, SourceSpec, build_snapshot
    from m2d2.data.manifest import ManifestError
    from m2d2.data.sources import SourceFormatError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = []
        if args.spec:
            data = yaml.safe_load(Path(args.spec).read_text()) or {}
            if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
                raise CorpusSpecError(f"{args.spec}: expected 'sources:' with a list of sources")
            unknown = sorted(set(data) - {"sources"})
            if unknown:
                raise CorpusSpecError(f"{args.spec}: unknown key(s) {', '.join(unknown)}; known: sources")
            specs += [SourceSpec.from_dict(s, f"{args.spec}: sources[{k}]") for k, s in enumerate(data["sources"])]
        if args.folder:
            folder = {"audio_root": args.folder, "source": args.source, "split": "train"}
            if args.captions:
                folder["csv_path"] = args.captions
            if args.eval_fraction:
                folder["eval_fraction"] = args.eval_fraction
            specs.append(SourceSpec.from_dict({"kind": "folder", **folder}, "--folder"))
        snapshot = build_snapshot(specs, args.out, name=args.name, probe=not args.no_probe, workers=args.workers)
    except (CorpusSpecError, SourceFormatError, ManifestError, FileExistsError, FileNotFoundError, OSError,
            yaml.YAMLError, ValueError) as exc:
        print(f"m2d2 corpus: {exc}", file=sys.stderr)
        return 2
    print(snapshot.describe())
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    path = Path(args.data_root) / SUMMARY_FILE
    if not path.exists():
        print(f"no pipeline summary at {path}; run `make demo` first", file=sys.stderr)
        return 1
    from m2d2.redaction import redact

    summary = redact(json.loads(path.read_text()))  # a file written before masking may still hold a password
    metrics = summary["metrics"]
    print(f"MLflow parent run: {summary['mlflow_parent_run_id']}  (tracking URI {summary.get('tracking_uri')})")
    print(f"cache hits: {', '.join(s for s, hit in summary['cache_hits'].items() if hit) or 'none'}")
    k = int(metrics.get("num_classes", 0))
    print(f"zero-shot accuracy on {int(metrics.get('num_eval_clips', 0))} eval clips, {k} classes "
          f"(chance {1 / k if k else float('nan'):.3f}):")
    from m2d2.pipeline.registry import STAGES, stage

    for name, variant in summary.get("variants", {}).items():
        m, baseline = variant["metrics"], stage(variant["stage"]).baseline
        base, std = metrics[f"{baseline}_baseline/zs_acc"], metrics.get(f"{baseline}_baseline/zs_acc_std", 0.0)
        probe = f"   linear probe {m['probe_acc']:.3f}" if "probe_acc" in m else ""
        print(f"  {variant['title']:9s} {name:13s} ({variant['stage']:11s}) {m['zs_acc']:.3f}   random-init baseline "
              f"{base:.3f} ± {std:.3f}   text->audio R@1 {m['t2a_R1']:.3f} "
              f"(baseline {metrics[f'{baseline}_baseline/t2a_R1']:.3f}){probe}")
    for s in STAGES:
        if f"{s.name}/mAP" in metrics:
            print(f"{s.title or s.name} tagging mAP {metrics[f'{s.name}/mAP']:.3f} "
                  f"(chance {metrics[f'{s.name}/mAP_chance']:.3f})")
    models = [f"{s.name}: {summary[f'{s.name}_model']}" for s in STAGES if f"{s.name}_model" in summary]
    print("stage exports: " + "\n               ".join(models))
    print(f"reports: {summary.get('report')}/<variant>/report.html")
    for variant in summary.get("variants", {}).values():
        reg = variant["registration"]
        state = "is the new champion" if reg["promoted"] else "was not promoted"
        print(f"registered {reg['model_uri']} ({variant['title']}): {state} ({reg['reason']})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``m2d2 config show``: the effective :class:`~m2d2.pipeline.PipelineConfig`, every stage and section spelled out.

    ``--cfg FILE`` alone gives what ``pyflyte run workflows/full.py full --cfg FILE`` runs (keys missing from FILE
    take the defaults, i.e. the ``demo`` preset); with ``--preset`` the file overlays that preset instead. The output
    is itself a valid ``--cfg`` file."""
    import yaml

    from m2d2.config import dumps

    try:
        cfg = _pipeline_config(args)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        where = f"{args.cfg}: " if args.cfg and not isinstance(exc, OSError) else ""
        print(f"m2d2 config: {where}{exc}".replace("\n", " "), file=sys.stderr)
        return 2
    sys.stdout.write(dumps(cfg, args.format))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # its own parser (m2d2 convert -h), imported only when used
        from m2d2.convert import main_convert

        return main_convert(argv[1:])
    parser = argparse.ArgumentParser(prog="m2d2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("convert", help="import a released reference checkpoint (m2d2 convert -h)")
    embed = sub.add_parser("embed", help="features of audio files from an exported model")
    embed.add_argument("files", nargs="+")
    embed.add_argument("--model", required=True, help="directory (or s3:// prefix) written by save_pretrained")
    embed.add_argument("--kind", choices=["clip", "frames", "clap"], default="clip")
    embed.add_argument("--out", help="write <stem>.<kind>.npy files here")
    _add_decode_limits(embed)
    _add_model_options(embed)
    embed.set_defaults(func=cmd_embed)
    zeroshot = sub.add_parser("zeroshot", help="rank labels for audio files with the CLAP branch")
    zeroshot.add_argument("files", nargs="+")
    zeroshot.add_argument("--model", required=True)
    zeroshot.add_argument("--labels", required=True, help="comma-separated class labels")
    zeroshot.add_argument("--task", default="default",
                          help="caption rule of the paper's Table VI (default, esc50, gtzan, nsynth, cremad, ...)")
    zeroshot.add_argument("--template", help="a caption template with one {} (overrides --task)")
    zeroshot.add_argument("--top", type=int, default=3)
    _add_decode_limits(zeroshot)
    _add_model_options(zeroshot)
    zeroshot.set_defaults(func=cmd_zeroshot)
    search = sub.add_parser("search", help="rank the audio files of a folder for a text query (CLAP)")
    search.add_argument("dir", type=Path, help="folder searched recursively for audio files")
    search.add_argument("--query", required=True)
    search.add_argument("--model", default=os.environ.get("M2D2_MODEL"),
                        help="exported model directory (default: $M2D2_MODEL)")
    search.add_argument("--top", type=int, default=10)
    search.add_argument("--cache", type=Path, help=f"embedding index (default: DIR/{INDEX_DIR})")
    _add_decode_limits(search)
    _add_model_options(search)
    search.set_defaults(func=cmd_search)
    evaluate = sub.add_parser("evaluate", help="score exported models on downstream tasks (the paper's or a folder)")
    evaluate.add_argument("--model", action="append", metavar="[NAME=]DIR",
                          help="an exported model directory (repeatable; a column each). A stage-1.1 export "
                               "(classifier/ beside it) is scored by tagging and linear evaluation")
    evaluate.add_argument("--tasks", help="comma-separated task names (m2d2 evaluate --list), or NAME=FOLDER for "
                                          "a folder with a labels.csv (file_name, label, split or fold)")
    evaluate.add_argument("--data-root", default="", help="folder (local or s3://) holding each task's dataset "
                                                          "in a sub-folder named after it, in its published layout")
    evaluate.add_argument("--out", default="report", help="where the table and results go (default ./report)")
    evaluate.add_argument("--cache", help="feature cache, reused across runs (default OUT/features)")
    evaluate.add_argument("--linear-runs", type=int, default=1,
                          help="linear-evaluation seeds averaged on tasks with a fixed split (default 1)")
    evaluate.add_argument("--max-clips", type=int, default=0,
                          help="keep the first N clips of each split (a quick look, not the paper's protocol)")
    evaluate.add_argument("--list", action="store_true", help="list the registered tasks and exit")
    _add_model_options(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    lineage = sub.add_parser("lineage", help="what a registered model was made from: runs, code, config, data")
    lineage.add_argument("model_uri", help="models:/<name>@<alias> or models:/<name>/<version> (MLFLOW_TRACKING_URI, "
                                           "default sqlite:///mlflow.db)")
    lineage.set_defaults(func=cmd_lineage)
    run = sub.add_parser("run", help="run the whole pipeline in this process (no Flyte): corpus to registered model")
    run.add_argument("--preset", choices=["demo", "smoke", "paper"], help="named preset (default demo)")
    run.add_argument("--cfg", help="JSON/YAML PipelineConfig; its keys overlay the preset")
    run.add_argument("--data-root", help="where every step writes (default: the preset's, ./runs)")
    run.set_defaults(func=cmd_run)
    corpus = sub.add_parser("corpus", help="audio on disk + metadata -> a validated corpus snapshot to train on")
    corpus.add_argument("--out", required=True, help="snapshot prefix (local or s3://); the snapshot goes to OUT/NAME")
    corpus.add_argument("--name", help="snapshot name (default: the UTC time, e.g. 2026-12-06T101500Z)")
    corpus.add_argument("--folder", help="a folder of audio files (with --captions: a CSV describing them)")
    corpus.add_argument("--captions", help="CSV: file_name, caption or caption_1..N, labels (';'), split, origin")
    corpus.add_argument("--source", default="custom", help="source name of the folder's clips (default custom)")
    corpus.add_argument("--eval-fraction", type=float, default=0.0,
                        help="hold out this share of the folder's clips for evaluation (by clip-id hash)")
    corpus.add_argument("--spec", help="YAML: sources: [{kind: audiocaps|clotho|wavcaps|audioset|vggsound|esc50|"
                                       "us8k|folder, audio_root: ..., <the adapter's arguments>}]")
    corpus.add_argument("--no-probe", action="store_true", help="skip reading every file (no hashes, no quarantine)")
    corpus.add_argument("--workers", type=int, default=8, help="files probed in parallel")
    corpus.set_defaults(func=cmd_corpus)
    summary = sub.add_parser("summary", help="headline numbers of the last pipeline execution")
    summary.add_argument("--data-root", default="runs")
    summary.set_defaults(func=cmd_summary)
    config = sub.add_parser("config", help="the effective pipeline configuration")
    config_sub = config.add_subparsers(dest="action", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration (a valid --cfg file)")
    show.add_argument("--preset", choices=["paper", "demo", "smoke"], help="start from this preset (default: demo)")
    show.add_argument("--cfg", help="a .json/.yaml/.yml file of PipelineConfig keys, checked strictly")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml")
    show.set_defaults(func=cmd_config)
    args = parser.parse_args(argv)
    _apply_model_options(args)
    try:
        return args.func(args)
    except (PermissionError, ValueError) as exc:
        # A model the user pointed at that cannot be used as it is (remote code not allowed, a path leaving the
        # export, damaged weights): one line, not a traceback. Other errors are bugs and keep theirs.
        from m2d2.io import UnsafePathError
        from m2d2.text.encoders import RemoteCodeRefused
        from m2d2.weights import CheckpointFormatError

        if not isinstance(exc, RemoteCodeRefused | UnsafePathError | CheckpointFormatError):
            raise
        from m2d2.redaction import redact_url

        print(f"m2d2 {args.command}: {redact_url(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
