"""Training checkpoints for exact resume, on a local path or ``s3://`` alike.

Layout under a stable root (``.../checkpoints/<run key>/<stage>``)::

    step-000001200/model.safetensors   full model state (target and predictor included), rank 0
    step-000001200/rank-00000.pt       that rank's optimizer state + RNG states (tensors/containers only)
    step-000001200/meta.json           train state (step, epoch, counters), configs, rank 0
    step-000001200/rank-00000.sha256   that rank's file digest, written right after it
    step-000001200/COMPLETE            written by rank 0 after every rank has written: the commit marker, listing
                                       every file's sha256 and size

A step without ``COMPLETE`` is ignored (and overwritten by the next save), so a crash mid-save never yields a
half checkpoint. Nothing is unpickled: weights are safetensors, the rest is read with
``torch.load(weights_only=True)``.

**No orphans.** Pruning removes a step's marker before its files, so a kill at any moment leaves either a complete
checkpoint or an incomplete directory; incomplete directories older than the newest complete checkpoint are removed
when a run starts (:meth:`CheckpointManager.sweep`) and after every save.

**Integrity.** Bytes damaged after the commit (a bad disk, a truncated copy, a bucket's bit rot) are not trusted:
loading checks each file against the marker's sha256 and size, and :meth:`CheckpointManager.latest_verified` falls
back to the newest checkpoint that checks out, with a warning. A save that runs out of space fails with
:class:`CheckpointWriteError` naming the checkpoint, removes its partial files and leaves the previous checkpoint as
it was.
"""

from __future__ import annotations

import errno
import hashlib
import io as _io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors

from m2d2 import io

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP = re.compile(r"step-(\d{9})")


class CheckpointCorruptError(ValueError):
    """A committed checkpoint file whose bytes no longer match the digest its marker recorded."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, ...); the previous checkpoint is untouched."""


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    rank_state: dict[str, Any]
    meta: dict[str, Any]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tensor_bytes(obj: Any) -> bytes:
    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_tensor_bytes(data: bytes, safe_globals: list | None = None, name: str = "<bytes>") -> Any:
    """``torch.load(weights_only=True)``; ``safe_globals`` allow-lists extra plain classes (e.g. DeepSpeed's).

    A damaged or unsafe blob raises :class:`m2d2.weights.CheckpointFormatError` naming ``name``.
    """
    from m2d2.weights import torch_load_weights

    return torch_load_weights(data, name, safe_globals or [])


class CheckpointManager:
    """Save, find and load complete checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str, keep_last: int = 3, safe_globals: list | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = str(root).rstrip("/")
        self.keep_last = keep_last
        self.safe_globals = safe_globals or []

    def step_uri(self, step: int) -> str:
        return io.join(self.root, f"step-{step:09d}")

    def _steps(self) -> tuple[list[int], list[int]]:
        """(complete, incomplete) step numbers, oldest first, from one recursive listing (one request per 1000
        keys on an object store), retried whole on a transient fault: a listing that failed half-way must never
        make a complete checkpoint look incomplete."""
        fs, path = fsspec.core.url_to_fs(self.root)
        path = path.rstrip("/")

        def listing() -> tuple[list[int], list[int]]:
            fs.invalidate_cache(path)
            try:
                entries = fs.find(path, withdirs=True)
            except FileNotFoundError:
                return [], []
            steps, complete = set(), set()
            for entry in entries:
                parts = entry[len(path):].strip("/").split("/")
                match = _STEP.fullmatch(parts[0])
                if match and entry.startswith(path + "/"):
                    steps.add(int(match.group(1)))
                    if parts[1:] == [COMPLETE]:
                        complete.add(int(match.group(1)))
            return sorted(complete), sorted(steps - complete)

        return io.retrying(listing, self.root, "list checkpoints")

    def complete_steps(self) -> list[int]:
        """Steps with a commit marker, oldest first."""
        return self._steps()[0]

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def latest_verified(self) -> int | None:
        """The newest complete checkpoint whose every file matches its marker; a damaged one is skipped with a
        warning (every rank reads the same bytes, so every rank picks the same step)."""
        for step in reversed(self.complete_steps()):
            try:
                self.verify(step)
                return step
            except (CheckpointCorruptError, FileNotFoundError) as exc:
                log.warning("checkpoint step %d is damaged, falling back to an older one: %s", step, exc)
        return None

    def verify(self, step: int) -> None:
        """Check every file the marker of ``step`` lists (markers of older versions list none: nothing to check)."""
        for name in self._marker(step).get("files", {}):
            self._read(step, name)

    def _marker(self, step: int) -> dict[str, Any]:
        return json.loads(io.read_bytes(io.join(self.step_uri(step), COMPLETE)))

    def _read(self, step: int, name: str, marker: dict[str, Any] | None = None) -> bytes:
        """A file of checkpoint ``step``, checked against its marker's digest when the marker has one."""
        uri = io.join(self.step_uri(step), name)
        data = io.read_bytes(uri)
        expected = (marker or self._marker(step)).get("files", {}).get(name)
        if expected is not None and _digest(data) != expected:
            raise CheckpointCorruptError(f"{uri}: {len(data)} bytes, sha256 {_digest(data)['sha256'][:12]}; its "
                                         f"commit marker recorded {expected['bytes']} bytes, sha256 "
                                         f"{expected['sha256'][:12]}")
        return data

    def sweep(self) -> list[int]:
        """Remove incomplete step directories older than the newest complete checkpoint (a kill mid-save or
        mid-prune leaves them, and no later save reuses their step numbers); returns the steps removed."""
        complete, incomplete = self._steps()
        if not complete:
            return []
        removed = [step for step in incomplete if step < complete[-1]]
        for step in removed:
            io.remove_tree(self.step_uri(step))
            log.info("removed incomplete checkpoint directory of step %d", step)
        return removed

    def save(self, step: int, model_state: dict[str, torch.Tensor] | None, rank_state: dict[str, Any],
             meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> str:
        """Every rank writes its own state and its digest; rank 0 the model and meta, then (after a barrier) the
        marker listing every file's digest, then prunes and sweeps."""
        uri = self.step_uri(step)
        try:
            data = tensor_bytes(rank_state)
            self._write(uri, f"rank-{rank:05d}.pt", data)
            self._write(uri, f"rank-{rank:05d}.sha256", json.dumps(_digest(data)).encode())
            if rank == 0:
                if model_state is None:
                    raise ValueError("rank 0 must provide the model state")
                state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
                weights = save_safetensors(state, metadata={"format": "pt"})
                meta_bytes = json.dumps({**meta, "step": step}).encode()
                self._write(uri, "model.safetensors", weights)
                self._write(uri, "meta.json", meta_bytes)
        except OSError as exc:
            self._discard(step)
            try:
                previous = self.latest()
                held = f"step {previous}" if previous is not None else "none"
            except OSError:  # the store that failed the write may fail the listing too
                held = "whichever is the newest"
            raise CheckpointWriteError(
                exc.errno or errno.EIO,
                f"checkpoint step {step} could not be written to {uri} ({exc.strerror or exc}); its partial files "
                f"were removed and the previous checkpoint ({held}) is untouched") from exc
        _barrier()
        if rank == 0:
            files = {"model.safetensors": _digest(weights), "meta.json": _digest(meta_bytes)}
            for r in range(world_size):
                files[f"rank-{r:05d}.pt"] = json.loads(io.read_bytes(io.join(uri, f"rank-{r:05d}.sha256")))
            self._write(uri, COMPLETE, json.dumps({"world_size": world_size, "files": files}).encode())
            self._prune()
            self.sweep()
        _barrier()
        return uri

    @staticmethod
    def _write(uri: str, name: str, data: bytes) -> None:
        """Atomic write of one file; a temporary file of the same name that a killed earlier save of this step
        left behind goes first (each rank clears only its own files' leftovers, so ranks never race)."""
        if io.is_local(uri):
            for stale in io.local_path(uri).glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        io.atomic_write_bytes(io.join(uri, name), data)

    def _discard(self, step: int) -> None:
        """Remove what a failed save of ``step`` wrote (best effort: the disk may still be full)."""
        uri = self.step_uri(step)
        try:
            if not io.exists(io.join(uri, COMPLETE)):
                io.remove_tree(uri)
        except OSError as exc:
            log.warning("could not remove the partial checkpoint %s: %s", uri, exc)

    def load(self, step: int | None = None, rank: int = 0, world_size: int = 1) -> Checkpoint:
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        uri = self.step_uri(step)
        marker = self._marker(step)
        if marker["world_size"] != world_size:
            raise ValueError(f"checkpoint {uri} was written by {marker['world_size']} ranks, this run has "
                             f"{world_size}: resume with the same world size")
        from m2d2.weights import read_safetensors

        weights, rank_file = io.join(uri, "model.safetensors"), io.join(uri, f"rank-{rank:05d}.pt")
        return Checkpoint(
            step=step,
            model=read_safetensors(self._read(step, "model.safetensors", marker), weights),
            rank_state=load_tensor_bytes(self._read(step, f"rank-{rank:05d}.pt", marker), self.safe_globals,
                                         rank_file),
            meta=json.loads(self._read(step, "meta.json", marker)),
        )

    def load_rank_state(self, step: int, rank: int) -> dict[str, Any]:
        """One rank's state of checkpoint ``step`` (DeepSpeed's sharded optimizers restore from every rank's)."""
        rank_file = io.join(self.step_uri(step), f"rank-{rank:05d}.pt")
        return load_tensor_bytes(self._read(step, f"rank-{rank:05d}.pt"), self.safe_globals, rank_file)

    def _prune(self) -> None:
        for step in self.complete_steps()[: -self.keep_last]:
            uri = self.step_uri(step)
            # Remove the marker first so a half-deleted directory is never taken for a complete checkpoint.
            io.remove(io.join(uri, COMPLETE))
            io.remove_tree(uri)
            log.info("pruned checkpoint step %d", step)
