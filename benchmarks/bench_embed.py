"""Caption embedding throughput (dedup + length bucketing vs naive batching) and loader memory at paper scale.

Part 1, with the shipped MiniLM on CPU, one loaded model and the same threads for every method: a synthetic
caption set (default 3000) where 40% are AudioSet-style "The sound of <labels>" captions (Zipf-distributed label
sets, so they repeat massively, some with case/space variants) and 60% free-text captions of 3-60 words.

- naive: every caption in input order, fixed batches of 64 (duplicates embedded again, padding to each batch's
  longest caption);
- dedup + bucketing: :func:`m2d2.text.cache.embed_captions` with ``bucket=True`` (each normalised caption once,
  batches of similar token length);
- with ``--ablation`` also dedup alone (text-ordered batches, ``embed_captions``'s default).

Rates are input captions per second of wall time (planning, tokenising, writing and merging included).

Part 2: a 2.5 M x 4096 float16 matrix (20 GB, a sparse file made with ``truncate``: no data is written) behind
a real index; random caption lookups through :class:`m2d2.text.cache.CaptionEmbeddings`, printing resident
memory (psutil RSS) of a fresh process, which must stay <= 1 GB, and the same without the periodic page release
for comparison (that run finds the page cache warm, so its rows/s is not comparable).

    python benchmarks/bench_embed.py [--quick] [--captions 2000] [--threads 1] [--lookups 200000] [--ablation]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from m2d2.models import OfflineTextConfig
from m2d2.text.cache import CaptionEmbeddings, embed_captions
from m2d2.text.index import write_index, write_sparse_npy
from m2d2.text.keys import NORMALIZATION, caption_key
from m2d2.text.offline import OfflineTextEncoder

LABELS = ("Speech", "Music", "Vehicle", "Dog", "Bird", "Rain", "Wind", "Engine", "Water", "Door", "Siren", "Bell",
          "Guitar", "Piano", "Drum", "Laughter", "Crowd", "Applause", "Footsteps", "Train", "Aircraft", "Cat",
          "Insect", "Thunder", "Typing", "Telephone", "Clock", "Alarm", "Singing", "Whistling")
WORDS = ("a", "the", "dog", "barks", "loudly", "while", "rain", "falls", "steadily", "on", "metal", "roof", "and",
         "several", "cars", "pass", "by", "in", "distance", "birds", "chirp", "woman", "speaks", "softly", "over",
         "background", "music", "engine", "idles", "then", "accelerates", "away", "people", "talk", "crowd",
         "cheers", "door", "creaks", "open", "footsteps", "echo", "hallway", "wind", "blows", "through", "trees")
GB = 1 << 30


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """40% AudioSet-style label captions (a few hundred label sets at most, Zipf-distributed, so they repeat
    massively; some with case/space variants) and 60% free text of 3-60 words (mean ~17)."""
    rng = np.random.default_rng(seed)
    label_sets = [", ".join(rng.choice(LABELS, size=int(rng.choice([1, 1, 2, 3])), replace=False))
                  for _ in range(max(20, n // 20))]
    zipf = 1.0 / np.arange(1, len(label_sets) + 1) ** 1.1
    out = []
    for _ in range(n):
        if rng.random() < 0.4:
            text = "The sound of " + label_sets[int(rng.choice(len(label_sets), p=zipf / zipf.sum()))]
            variant = rng.random()
            out.append(text.lower() if variant < 0.15 else text.replace(" of ", " of  ") if variant < 0.2 else text)
        else:
            out.append(" ".join(rng.choice(WORDS, size=int(min(60, 3 + rng.exponential(14))))).capitalize())
    return out


def embedding_rates(n: int, workdir: Path, ablation: bool) -> None:
    captions = synthetic_captions(n)
    config = OfflineTextConfig()  # the shipped MiniLM, the default
    encoder = OfflineTextEncoder(config)
    encoder.encode(captions[:8])  # warm-up
    unique = len({caption_key(c) for c in captions})
    print(f"[embed] {n} captions, {unique} unique after normalisation ({100 * (1 - unique / n):.0f}% repeats), "
          f"MiniLM on CPU, {torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    naive = encoder.encode(captions, batch_size=64).numpy()
    naive_rate = n / (time.perf_counter() - start)
    print(f"[embed] naive: input order, fixed batches of 64:  {naive_rate:8.1f} captions/s")
    methods = (("dedup + length bucketing", True),) + ((("dedup, text-ordered batches", False),) if ablation else ())
    for name, bucket in methods:
        out = workdir / f"bucket{int(bucket)}" / "captions.parquet"
        start = time.perf_counter()
        embed_captions(captions, config, out, batch_size=64, bucket=bucket, encoder=encoder)
        rate = n / (time.perf_counter() - start)
        diff = float(np.abs(CaptionEmbeddings(out).lookup(captions).astype(np.float32) - naive).max())
        print(f"[embed] {name + ':':42s}{rate:8.1f} captions/s   ratio vs naive {rate / naive_rate:5.2f}x   "
              f"max |vector diff| {diff:.1e}")


def _lookups(index: str, rows: int, lookups: int, release: int) -> None:
    """Runs in a fresh process that, like a training rank or DataLoader worker, has torch and the model code
    loaded; the RSS it prints is that whole process."""
    import m2d2.models  # noqa: F401 (torch, timm: what a training process holds anyway)
    from m2d2.text.cache import CaptionEmbeddings

    process = psutil.Process()
    base = process.memory_info().rss
    cache = CaptionEmbeddings(index, release_bytes=release)
    opened = peak = process.memory_info().rss
    picks = np.random.default_rng(0).integers(0, rows, size=lookups)
    start = time.perf_counter()
    for lo in range(0, lookups, 256):
        batch = cache.lookup([f"clip {i:07d}" for i in picks[lo : lo + 256]])
        assert batch.shape == (len(picks[lo : lo + 256]), cache.dim)
        peak = max(peak, process.memory_info().rss)
    rate = lookups / (time.perf_counter() - start)
    label = f"page release every {release >> 20} MiB" if release else "no page release (comparison)"
    verdict = f"  -> {'OK' if peak <= GB else 'OVER'} (<= 1 GiB)" if release else ""
    print(f"[loader] {label:32s} RSS {base / GB:.2f} GiB at start (python, torch, model code), "
          f"{opened / GB:.2f} after opening the index, peak {peak / GB:.2f} GiB over {lookups} random lookups ({rate:,.0f} rows/s){verdict}", flush=True)


def loader_memory(rows: int, dim: int, lookups: int, workdir: Path) -> None:
    start = time.perf_counter()
    names = [f"clip {i:07d}" for i in range(rows)]
    keys = np.asarray([caption_key(t) for t in names], dtype="S16")
    write_sparse_npy(workdir / "big.f16.npy", (rows, dim))
    write_index(workdir / "big.parquet", keys, np.arange(rows), names,
                {"kind": "nv-embed-v2", "path": "/models/nv-embed-v2", "dim": dim},
                {"matrix": "big.f16.npy", "rows": rows, "dim": dim, "normalization": NORMALIZATION})
    del keys, names
    stat = (workdir / "big.f16.npy").stat()
    print(f"[loader] {rows} x {dim} float16 matrix: {stat.st_size / GB:.1f} GiB apparent, "
          f"{stat.st_blocks * 512 / GB:.3f} GiB on disk (sparse); index of {rows} keys built in "
          f"{time.perf_counter() - start:.1f} s")
    spawn = multiprocessing.get_context("spawn")
    for release in (CaptionEmbeddings(workdir / "big.parquet").release_bytes, 0):
        child = spawn.Process(target=_lookups, args=(str(workdir / "big.parquet"), rows, lookups, release))
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"lookup process failed with exit code {child.exitcode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 captions, 50k lookups (about a minute)")
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--ablation", action="store_true", help="also time dedup without bucketing")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=2_500_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on 2 shared cores, spinning OpenMP threads are much slower)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.captions, args.lookups = min(args.captions, 600), min(args.lookups, 50_000)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        if not args.skip_embed:
            embedding_rates(args.captions, Path(tmp), args.ablation)
        if not args.skip_loader:
            loader_memory(args.rows, args.dim, args.lookups, Path(tmp))


if __name__ == "__main__":
    main()
