"""Sharded caption embedding: :func:`plan_shards` -> :func:`embed_shard` per shard -> :func:`merge_shards`.

The three steps are separate so that shards can run as a Flyte ``map_task`` (one GPU each) over a work
directory every task can see: a shared volume or an ``s3://`` prefix. The merge writes the final cache to a local
file (it is memory-mapped by its readers)::

    plan = plan_shards(captions, n_shards, config); uri = plan.save(workdir)     # one task
    embed_shard(read_plan(uri), shard, workdir, device="cuda")                   # map_task over shards
    merge_shards(read_plan(uri), workdir, out_path)                              # one task

Bit-identity: the plan fixes every batch (its captions, hence its padding) for the whole caption set before any
shard runs, and a shard is a contiguous run of whole batches. The vectors therefore do not depend on the number
of shards, on which process ran which shard, or on a crash and resume in between (on the same hardware and
software: GPU kernels may differ between GPU models).

Crash safety: the commit protocol of :mod:`m2d2.shards`. A shard is ``<workdir>/rows-<start>-<end>.npy`` (float16
``[rows, dim]``) and its marker ``rows-<start>-<end>.done.json``, written last with the shard's fingerprint (plan id
and row range) and the file's sha256 and size. Only a shard whose marker matches the plan is skipped on a re-run;
anything else is redone.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2d2 import io
from m2d2.models.config import OfflineTextConfig
from m2d2.shards import Shard, ShardCorruptError, ShardWriter, build, npy_header, read_markers
from m2d2.text.encoders import RemoteCodePolicy
from m2d2.text.index import KEY, matrix_name, npy_layout, write_index
from m2d2.text.keys import NORMALIZATION, unique_captions

if TYPE_CHECKING:
    from m2d2.text.offline import OfflineTextEncoder

log = logging.getLogger(__name__)

PLAN_FILE = "plan.parquet"
VECTORS = "npy"  # suffix of a shard's vectors file
COPY_BYTES = 16 << 20  # merge streams shards through a buffer of this size, whatever their size


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """Every unique caption's row, every batch and every shard, fixed before anything is embedded.

    Rows are ordered by (token length, text) when ``bucket`` (so each batch pads little), else by text (the
    order the pre-shard cache used, which keeps its vectors bit-identical). ``plan_id`` (sha256) hashes everything
    that decides the output (encoder config, batching, captions) but not the number of shards.
    """

    config: OfflineTextConfig
    batch_size: int
    max_tokens: int | None
    bucket: bool
    dtype: str
    captions: list[str]  # the text embedded for each row (row order)
    keys: np.ndarray  # [rows] 16-byte caption keys (row order)
    lengths: np.ndarray  # [rows] token lengths (0 when not bucketed)
    batch_starts: np.ndarray  # [batches + 1] first row of each batch
    shard_batches: np.ndarray  # [shards + 1] first batch of each shard
    n_input: int  # captions given, repeats included
    plan_id: str
    # The user's permission for a code-shipping encoder, carried to the shard tasks from the pipeline settings;
    # not part of plan_id (it does not change a vector).
    remote_code: RemoteCodePolicy = RemoteCodePolicy()

    @property
    def rows(self) -> int:
        return len(self.captions)

    @property
    def n_shards(self) -> int:
        return len(self.shard_batches) - 1

    @property
    def n_batches(self) -> int:
        return len(self.batch_starts) - 1

    def shard_rows(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range: the plan has {self.n_shards} shards")
        first, last = self.shard_batches[shard], self.shard_batches[shard + 1]
        return int(self.batch_starts[first]), int(self.batch_starts[last])

    def fingerprint(self, shard: int) -> str:
        """Identity of ``shard``'s vectors: the plan id and the row range (not the shard's number, so a plan with
        another shard count reuses the shards whose rows coincide)."""
        start, end = self.shard_rows(shard)
        return hashlib.sha256(json.dumps({"plan_id": self.plan_id, "rows": [start, end]}).encode()).hexdigest()

    def shard(self, workdir: str | Path, shard: int) -> Shard:
        """Where ``shard`` goes in ``workdir`` (``rows-<start>-<end>.npy`` and its marker), and its fingerprint."""
        start, end = self.shard_rows(shard)
        return Shard(str(workdir), f"rows-{start:010d}-{end:010d}", self.fingerprint(shard))

    def settings(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "batch_size": self.batch_size, "max_tokens": self.max_tokens,
                "bucket": self.bucket, "dtype": self.dtype, "normalization": NORMALIZATION}

    def save(self, workdir: str | Path) -> str:
        """Write the plan to ``<workdir>/plan.parquet`` (atomic; local or ``s3://``) for the shard and merge tasks;
        its URI."""
        table = pa.table({
            "caption": pa.array(self.captions, type=pa.string()),
            "caption_key": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), self.rows,
                                                                [None, pa.py_buffer(self.keys.tobytes())]),
            "length": pa.array(self.lengths, type=pa.int64()),
        })
        meta = {**self.settings(), "batch_starts": self.batch_starts.tolist(),
                "shard_batches": self.shard_batches.tolist(), "n_input": self.n_input, "plan_id": self.plan_id,
                "remote_code": asdict(self.remote_code)}
        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({b"m2d2.shard_plan": json.dumps(meta)}), sink)
        uri = io.join(str(workdir), PLAN_FILE)
        io.atomic_write_bytes(uri, sink.getvalue().to_pybytes())
        return uri


def read_plan(uri: str) -> ShardPlan:
    """The plan :meth:`ShardPlan.save` stored at ``uri``; its id is recomputed, so a damaged or hand-edited plan is
    refused."""
    table = pq.read_table(_io.BytesIO(io.read_bytes(uri)))
    meta = json.loads(table.schema.metadata[b"m2d2.shard_plan"])
    known = {f.name for f in fields(OfflineTextConfig)}
    if set(meta["config"]) - known:
        raise ValueError(f"{uri}: encoder config fields {sorted(set(meta['config']) - known)} are unknown here")
    column = table.column("caption_key").combine_chunks()
    keys = np.frombuffer(column.buffers()[1], dtype=KEY, count=len(column), offset=column.offset * 16).copy()
    plan = _build(OfflineTextConfig(**meta["config"]), meta["batch_size"], meta["max_tokens"], meta["bucket"],
                  meta["dtype"], table.column("caption").to_pylist(), keys, table.column("length").to_numpy(),
                  np.asarray(meta["batch_starts"], dtype=np.int64), np.asarray(meta["shard_batches"], dtype=np.int64),
                  meta["n_input"])
    if plan.plan_id != meta["plan_id"]:
        raise ValueError(f"{uri}: content does not match its plan id (damaged file?)")
    return replace(plan, remote_code=RemoteCodePolicy(**meta.get("remote_code", {})))


def plan_workdir(uri: str) -> str:
    """The work directory of the plan stored at ``uri``: its shards go beside it."""
    return str(uri).rsplit("/", 1)[0] if "/" in str(uri) else "."


def _plan_id(settings: dict[str, Any], captions: list[str], keys: np.ndarray, batch_starts: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(keys, dtype=KEY).tobytes())
    digest.update(np.asarray(batch_starts, dtype="<i8").tobytes())
    for text in captions:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _build(config: OfflineTextConfig, batch_size: int, max_tokens: int | None, bucket: bool, dtype: str,
           captions: list[str], keys: np.ndarray, lengths: np.ndarray, batch_starts: np.ndarray,
           shard_batches: np.ndarray, n_input: int) -> ShardPlan:
    plan = ShardPlan(config, batch_size, max_tokens, bucket, dtype, captions, keys, lengths, batch_starts,
                     shard_batches, n_input, plan_id="")
    object.__setattr__(plan, "plan_id", _plan_id(plan.settings(), captions, keys, batch_starts))
    return plan


def _batch_starts(lengths: np.ndarray, batch_size: int, max_tokens: int | None) -> np.ndarray:
    """Cut rows (already in plan order) into batches of at most ``batch_size`` captions and, when
    ``max_tokens`` is set, at most ``max_tokens`` padded tokens (long captions get smaller batches)."""
    starts, count, longest = [0], 0, 0
    for row, length in enumerate(lengths.tolist()):
        wider = max(longest, length)
        if count and (count >= batch_size or (max_tokens and (count + 1) * wider > max_tokens)):
            starts.append(row)
            count, wider = 0, length
        count, longest = count + 1, wider
    starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)


def _shard_batches(costs: np.ndarray, n_shards: int) -> np.ndarray:
    """Contiguous runs of batches with about equal cost (padded tokens) each; trailing shards may be empty
    when there are fewer batches than shards."""
    cumulative = np.cumsum(costs, dtype=np.float64)
    total = cumulative[-1] if len(cumulative) else 0.0
    bounds = [0] + [int(np.searchsorted(cumulative, total * k / n_shards, side="right")) for k in range(1, n_shards)]
    bounds.append(len(costs))
    return np.maximum.accumulate(np.asarray(bounds, dtype=np.int64))


def plan_shards(captions: Iterable[str], n_shards: int, config: OfflineTextConfig, *, batch_size: int = 64,
                max_tokens: int | None = None, bucket: bool = True, dtype: str = "auto",
                remote_code: RemoteCodePolicy | None = None) -> ShardPlan:
    """Deduplicate ``captions`` (see :mod:`m2d2.text.keys`), order them, cut batches and split them into
    ``n_shards`` contiguous shards. A pure function of its arguments (it loads only the tokenizer, to bucket)."""
    if n_shards < 1 or batch_size < 1:
        raise ValueError(f"need n_shards >= 1 and batch_size >= 1, got {n_shards}, {batch_size}")
    n_input = 0

    def counted(texts: Iterable[str]) -> Iterable[str]:
        nonlocal n_input
        for text in texts:
            n_input += 1
            yield text

    unique = unique_captions(counted(captions))
    if not unique:
        raise ValueError("no captions to embed")
    keys = list(unique)
    texts = [unique[k] for k in keys]
    if bucket or max_tokens:
        from m2d2.text.encoders import token_lengths

        lengths = token_lengths(texts, config)
    else:
        lengths = np.zeros(len(texts), dtype=np.int64)
    if bucket:
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], texts[i]))
    else:
        order = sorted(range(len(texts)), key=texts.__getitem__)
    texts = [texts[i] for i in order]
    key_array = np.asarray([keys[i] for i in order], dtype=KEY)
    lengths = np.asarray(lengths, dtype=np.int64)[order]
    # max_tokens bounds every batch's padded tokens, bucketed or not: one very long caption gets a small batch
    # instead of padding 63 others to its length.
    starts = _batch_starts(lengths, batch_size, max_tokens)
    sizes = np.diff(starts)
    costs = sizes * np.maximum.reduceat(lengths, starts[:-1]) if bucket or max_tokens else sizes
    plan = _build(config, batch_size, max_tokens, bucket, dtype, texts, key_array, lengths, starts,
                  _shard_batches(costs, n_shards), n_input)
    if remote_code is not None:
        plan = replace(plan, remote_code=remote_code)
    log.info("caption plan %s: %d captions -> %d unique (%.1f%% repeats), %d batches, %d shards", plan.plan_id[:12],
             n_input, plan.rows, 100.0 * (1 - plan.rows / n_input), plan.n_batches, n_shards)
    return plan


# ------------------------------------------------------------------------------------------------------ shards
@dataclass(frozen=True)
class ShardResult:
    """What one :func:`embed_shard` call did; ``skipped`` when the shard was already complete."""

    shard: int
    rows: int
    seconds: float
    skipped: bool
    padded_tokens: int = 0
    tokens: int = 0

    @property
    def captions_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def check_encoder_matches(plan: ShardPlan, encoder: OfflineTextEncoder) -> None:
    """A reused encoder must be the plan's encoder at the plan's precision, or the shards would mix models."""
    from m2d2.text.encoders import resolve_dtype

    if asdict(encoder.config) != asdict(plan.config):
        raise ValueError(f"encoder config {asdict(encoder.config)} is not the plan's {asdict(plan.config)}")
    if resolve_dtype(plan.dtype, encoder.device) != encoder.dtype:
        raise ValueError(f"encoder computes in {encoder.dtype}, the plan asks for {plan.dtype!r}")


def embed_shard(plan: ShardPlan, shard: int, workdir: str | Path, *, device: str = "cpu",
                encoder: OfflineTextEncoder | None = None) -> ShardResult:
    """Embed the rows of ``shard`` and commit them to ``workdir`` (local or ``s3://``; skipped when already
    committed).

    Pass ``encoder`` to reuse a loaded model across shards in one process; otherwise one is loaded on ``device``
    at the plan's precision. The vectors appear whole or not at all, and the marker is written last (see
    :func:`m2d2.shards.build`).
    """
    start, end = plan.shard_rows(shard)
    measured: dict[str, Any] = {}

    def make(out: ShardWriter) -> dict[str, Any]:
        nonlocal encoder
        if encoder is None:
            from m2d2.text.offline import OfflineTextEncoder

            encoder = OfflineTextEncoder(plan.config, device=device, dtype=plan.dtype, remote_code=plan.remote_code)
        check_encoder_matches(plan, encoder)
        measured.update(_embed_rows(plan, shard, encoder, out))
        return {"plan_id": plan.plan_id, "rows": [start, end], "dim": plan.config.dim, **measured,
                "device": str(encoder.device), "dtype": str(encoder.dtype).removeprefix("torch.")}

    done = build(plan.shard(workdir, shard), make)
    if not done.built:
        log.info("caption shard %d (rows %d-%d) already complete: skipped", shard, start, end)
        return ShardResult(shard, end - start, 0.0, skipped=True)
    result = ShardResult(shard, end - start, measured["seconds"], skipped=False,
                         padded_tokens=measured["padded_tokens"], tokens=measured["tokens"])
    log.info("caption shard %d: %d captions in %.1f s = %.1f captions/s%s", shard, result.rows, result.seconds,
             result.captions_per_s,
             f" (padding {100 * (1 - result.tokens / result.padded_tokens):.0f}% of tokens)" if result.padded_tokens
             else "")
    return result


def _embed_rows(plan: ShardPlan, shard: int, encoder: OfflineTextEncoder, out: ShardWriter) -> dict[str, Any]:
    """Stream ``shard``'s float16 vectors, batch by batch as the plan cut them, into its ``.npy``."""
    from tqdm import tqdm

    start, end = plan.shard_rows(shard)
    first, last = int(plan.shard_batches[shard]), int(plan.shard_batches[shard + 1])
    padded = tokens = 0
    began = time.perf_counter()
    with out.open(VECTORS) as sink:
        sink.write(npy_header((end - start, plan.config.dim)))
        bar = tqdm(range(first, last), desc=f"embed shard {shard}", unit="batch", leave=False)
        for batch in bar:
            lo, hi = int(plan.batch_starts[batch]), int(plan.batch_starts[batch + 1])
            vectors = encoder.encode_batch(plan.captions[lo:hi]).numpy().astype(np.float16)
            bad = ~np.isfinite(vectors).all(axis=1)
            if bad.any():
                raise ValueError(f"caption {plan.captions[lo + int(np.argmax(bad))]!r} gives a non-finite "
                                 f"float16 vector (overflow above 65504?) with encoder {plan.config.path!r}")
            sink.write(vectors.tobytes())
            padded += (hi - lo) * int(plan.lengths[lo:hi].max())
            tokens += int(plan.lengths[lo:hi].sum())
            bar.set_postfix(captions_per_s=f"{(hi - start) / (time.perf_counter() - began):.0f}", refresh=False)
    return {"seconds": time.perf_counter() - began, "padded_tokens": padded, "tokens": tokens}


def merge_shards(plan: ShardPlan, workdir: str | Path, out_path: str | Path) -> int:
    """Concatenate the committed shards of ``workdir`` (local or ``s3://``) into the local matrix
    ``<out>.<plan id>.f16.npy`` and write the index ``out_path`` (a local file: readers memory-map the matrix) last.

    Each shard's sha256 is checked while copying; the index records the whole matrix's sha256. Matrices of earlier
    plans beside ``out_path`` are removed once the new index is in place. Returns the number of rows.
    """
    out_path = Path(out_path)
    shards = [plan.shard(workdir, shard) for shard in range(plan.n_shards)]
    markers = read_markers(shards)
    missing = [shard for shard, marker in enumerate(markers) if marker is None]
    if missing:
        raise RuntimeError(f"{len(missing)} of {plan.n_shards} caption shards are not complete in {workdir}: "
                           f"{missing[:10]}; run embed_shard for them first")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    matrix = out_path.parent / matrix_name(out_path, plan.plan_id)
    tmp = matrix.with_name(f".{matrix.name}.{os.getpid()}.tmp")
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            header = npy_header((plan.rows, plan.config.dim))
            out.write(header)
            whole.update(header)
            for k, (shard, marker) in enumerate(zip(shards, markers, strict=True)):  # contiguous rows, in order
                whole = _copy_shard(plan, k, shard, marker["files"][VECTORS]["sha256"], out, whole)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, matrix)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    compute = sorted({f"{m['info']['device']}/{m['info']['dtype']}" for m in markers if m})
    write_index(out_path, plan.keys, np.arange(plan.rows), plan.captions, asdict(plan.config), {
        "matrix": matrix.name, "rows": plan.rows, "dim": plan.config.dim, "dtype": "float16",
        "plan_id": plan.plan_id, "sha256": whole.hexdigest(), "normalization": NORMALIZATION,
        "batch_size": plan.batch_size, "max_tokens": plan.max_tokens, "bucket": plan.bucket, "compute": compute,
        "input_captions": plan.n_input,
    })
    for old in out_path.parent.glob(f"{out_path.stem}.*.f16.npy"):
        if old.name != matrix.name:
            old.unlink(missing_ok=True)
    return plan.rows


def _copy_shard(plan: ShardPlan, k: int, shard: Shard, sha256: str, out: Any, whole: Any) -> Any:
    """:func:`_copy_vectors`, retried from the shard's first byte on a transient store fault (``out`` and the
    running hash ``whole`` are rewound); returns the hash. A shard whose bytes do not match its marker loses the
    marker, so running the embedding step again rebuilds it, and raises :class:`ShardCorruptError`."""
    position, before = out.tell(), whole.copy()

    def copy() -> Any:
        out.seek(position)
        out.truncate()
        running = before.copy()
        _copy_vectors(plan, k, shard, sha256, out, running)
        return running

    try:
        return io.retrying(copy, shard.uri(VECTORS), "copy caption shard")
    except ShardCorruptError:
        io.remove(shard.marker_uri)
        raise


def _copy_vectors(plan: ShardPlan, k: int, shard: Shard, sha256: str, out: Any, whole: Any) -> None:
    """Append shard ``k``'s vectors (its data, not its header) to ``out``, checking its header and sha256."""
    start, end = plan.shard_rows(k)
    part = hashlib.sha256()
    with io.open_binary(shard.uri(VECTORS)) as handle:
        shape, dtype, offset = npy_layout(handle)
        if shape != (end - start, plan.config.dim) or dtype != np.float16:
            raise ValueError(f"caption shard {k} in {shard.root} holds {shape} {dtype}, the plan says "
                             f"({end - start}, {plan.config.dim}) float16")
        handle.seek(0)
        part.update(handle.read(offset))
        while chunk := handle.read(COPY_BYTES):
            part.update(chunk)
            whole.update(chunk)
            out.write(chunk)
    if part.hexdigest() != sha256:
        raise ShardCorruptError(f"caption shard {k} in {shard.root} does not match the sha256 in its marker: its "
                                "bytes were damaged after it was written; its marker is removed, run the embedding "
                                "step again to rebuild it")


def remove_workdir(workdir: str | Path) -> None:
    """Remove a work directory (local or ``s3://``) and its shards."""
    io.remove_tree(str(workdir))
