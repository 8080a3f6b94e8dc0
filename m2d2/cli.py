"""``m2d2`` command line: embed audio files, zero-shot classify them, search a folder by text, show the last
pipeline summary, import reference checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SUMMARY_FILE = "latest-summary.json"
INDEX_DIR = ".m2d2-index"  # m2d2.inference.INDEX_DIR, repeated so that `m2d2 -h` imports no torch


def _embedder(model_dir: str):
    from m2d2.inference import Embedder

    return Embedder.from_pretrained(model_dir)


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from m2d2.audio import load_audio

    embedder = _embedder(args.model)
    for path in args.files:
        wave = load_audio(path, embedder.sample_rate)
        timestamps = None
        if args.kind == "clap":
            out = embedder.clap_audio([wave])[0]
        elif args.kind == "frames":
            frames = embedder.frames([wave])[0]
            out, timestamps = frames.features, frames.timestamps
        else:
            out = embedder.clip_features([wave])[0]
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
    return 0


def cmd_zeroshot(args: argparse.Namespace) -> int:
    import torch.nn.functional as F

    from m2d2.audio import load_audio
    from m2d2.eval.prompts import PromptRule, class_prompts

    embedder = _embedder(args.model)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    prompts = class_prompts(PromptRule(args.template) if args.template else args.task, labels)
    text = F.normalize(embedder.clap_text(prompts), dim=-1)
    for path in args.files:
        audio = F.normalize(embedder.clap_audio([load_audio(path, embedder.sample_rate)]), dim=-1)
        scores = (audio @ text.T)[0]
        best = scores.argsort(descending=True)[: args.top]
        ranked = ", ".join(f"{labels[i]} ({scores[i]:.3f})" for i in best.tolist())
        print(f"{path}: {ranked}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from m2d2.inference import search_folder

    if not args.model:
        print("m2d2 search: give --model or set M2D2_MODEL", file=sys.stderr)
        return 2
    result = search_folder(_embedder(args.model), args.query, args.dir, top=args.top, cache_dir=args.cache)
    for path, reason in result.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    for rank, (path, score) in enumerate(result.hits, 1):
        print(f"{rank:3d}  {score:+.4f}  {path.relative_to(args.dir)}")
    print(f"{len(result.hits)} shown of {result.cached + result.embedded} files ({result.cached} cached, "
          f"{result.embedded} embedded, {len(result.skipped)} skipped)", file=sys.stderr)
    return 0 if result.hits or not result.skipped else 1


def cmd_summary(args: argparse.Namespace) -> int:
    path = Path(args.data_root) / SUMMARY_FILE
    if not path.exists():
        print(f"no pipeline summary at {path}; run `make demo` first", file=sys.stderr)
        return 1
    summary = json.loads(path.read_text())
    metrics = summary["metrics"]
    print(f"MLflow parent run: {summary['mlflow_parent_run_id']}  (tracking URI {summary.get('tracking_uri')})")
    print(f"cache hits: {', '.join(s for s, hit in summary['cache_hits'].items() if hit) or 'none'}")
    k = int(metrics.get("num_classes", 0))
    print(f"zero-shot accuracy on {int(metrics.get('num_eval_clips', 0))} eval clips, {k} classes "
          f"(chance {1 / k if k else float('nan'):.3f}):")
    for stage, baseline in (("stage1", "stage1"), ("stage2", "stage2"), ("stage21", "stage2")):
        if f"{stage}/zs_acc" not in metrics:
            continue
        base, std = metrics[f"{baseline}_baseline/zs_acc"], metrics.get(f"{baseline}_baseline/zs_acc_std", 0.0)
        print(f"  {stage:8s} {metrics[f'{stage}/zs_acc']:.3f}   random-init baseline {base:.3f} ± {std:.3f}   "
              f"text->audio R@1 {metrics[f'{stage}/t2a_R1']:.3f} "
              f"(baseline {metrics[f'{baseline}_baseline/t2a_R1']:.3f})")
    if "stage11/mAP" in metrics:
        print(f"stage 1.1 tagging mAP {metrics['stage11/mAP']:.3f} (chance {metrics['stage11/mAP_chance']:.3f})")
    models = [summary[k] for k in ("stage1_model", "stage11_model", "stage2_model", "stage21_model") if k in summary]
    print("models: " + "\n        ".join(models))
    if "final/probe_acc" in metrics:
        print(f"final model: linear probe {metrics['final/probe_acc']:.3f}, report {summary.get('report')}")
    if reg := summary.get("registration"):
        state = "is the new champion" if reg["promoted"] else "was not promoted"
        print(f"registered {reg['model_uri']}: {state} ({reg['reason']})")
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
    embed.set_defaults(func=cmd_embed)
    zeroshot = sub.add_parser("zeroshot", help="rank labels for audio files with the CLAP branch")
    zeroshot.add_argument("files", nargs="+")
    zeroshot.add_argument("--model", required=True)
    zeroshot.add_argument("--labels", required=True, help="comma-separated class labels")
    zeroshot.add_argument("--task", default="default",
                          help="caption rule of the paper's Table VI (default, esc50, gtzan, nsynth, cremad, ...)")
    zeroshot.add_argument("--template", help="a caption template with one {} (overrides --task)")
    zeroshot.add_argument("--top", type=int, default=3)
    zeroshot.set_defaults(func=cmd_zeroshot)
    search = sub.add_parser("search", help="rank the audio files of a folder for a text query (CLAP)")
    search.add_argument("dir", type=Path, help="folder searched recursively for audio files")
    search.add_argument("--query", required=True)
    search.add_argument("--model", default=os.environ.get("M2D2_MODEL"),
                        help="exported model directory (default: $M2D2_MODEL)")
    search.add_argument("--top", type=int, default=10)
    search.add_argument("--cache", type=Path, help=f"embedding index (default: DIR/{INDEX_DIR})")
    search.set_defaults(func=cmd_search)
    summary = sub.add_parser("summary", help="headline numbers of the last pipeline execution")
    summary.add_argument("--data-root", default="runs")
    summary.set_defaults(func=cmd_summary)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
