"""Training checkpoints for exact resume, on a local path or ``s3://`` alike.

Layout under a stable root (``.../checkpoints/<run key>/<stage>``)::

    step-000001200/model.safetensors   full model state (target and predictor included), rank 0
    step-000001200/rank-00000.pt       that rank's optimizer state + RNG states (tensors/containers only)
    step-000001200/meta.json           train state (step, epoch, counters), configs, rank 0
    step-000001200/COMPLETE            written by rank 0 after every rank has written: the commit marker

A step without ``COMPLETE`` is ignored (and overwritten by the next save), so a crash mid-save never yields a
half checkpoint. Nothing is unpickled: weights are safetensors, the rest is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

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
_STEP = re.compile(r"step-(\d{9})$")


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

    def complete_steps(self) -> list[int]:
        """Steps with a commit marker, oldest first."""
        fs, path = fsspec.core.url_to_fs(self.root)
        if not fs.exists(path):
            return []
        steps = []
        for entry in fs.ls(path, detail=False):
            match = _STEP.search(entry.rstrip("/"))
            if match and fs.exists(f"{entry.rstrip('/')}/{COMPLETE}"):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, model_state: dict[str, torch.Tensor] | None, rank_state: dict[str, Any],
             meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> str:
        """Every rank writes its own state; rank 0 the model and meta, then (after a barrier) the marker."""
        uri = self.step_uri(step)
        io.atomic_write_bytes(io.join(uri, f"rank-{rank:05d}.pt"), tensor_bytes(rank_state))
        if rank == 0:
            if model_state is None:
                raise ValueError("rank 0 must provide the model state")
            state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
            io.atomic_write_bytes(io.join(uri, "model.safetensors"), save_safetensors(state, metadata={"format": "pt"}))
            io.atomic_write_bytes(io.join(uri, "meta.json"), json.dumps({**meta, "step": step}).encode())
        _barrier()
        if rank == 0:
            io.atomic_write_bytes(io.join(uri, COMPLETE), json.dumps({"world_size": world_size}).encode())
            self._prune()
        _barrier()
        return uri

    def load(self, step: int | None = None, rank: int = 0, world_size: int = 1) -> Checkpoint:
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root}")
        uri = self.step_uri(step)
        marker = json.loads(io.read_bytes(io.join(uri, COMPLETE)))
        if marker["world_size"] != world_size:
            raise ValueError(f"checkpoint {uri} was written by {marker['world_size']} ranks, this run has "
                             f"{world_size}: resume with the same world size")
        from m2d2.weights import read_safetensors

        weights, rank_file = io.join(uri, "model.safetensors"), io.join(uri, f"rank-{rank:05d}.pt")
        return Checkpoint(
            step=step,
            model=read_safetensors(io.read_bytes(weights), weights),
            rank_state=load_tensor_bytes(io.read_bytes(rank_file), self.safe_globals, rank_file),
            meta=json.loads(io.read_bytes(io.join(uri, "meta.json"))),
        )

    def load_rank_state(self, step: int, rank: int) -> dict[str, Any]:
        """One rank's state of checkpoint ``step`` (DeepSpeed's sharded optimizers restore from every rank's)."""
        rank_file = io.join(self.step_uri(step), f"rank-{rank:05d}.pt")
        return load_tensor_bytes(io.read_bytes(rank_file), self.safe_globals, rank_file)

    def _prune(self) -> None:
        fs, _ = fsspec.core.url_to_fs(self.root)
        for step in self.complete_steps()[: -self.keep_last]:
            _, path = fsspec.core.url_to_fs(self.step_uri(step))
            # Remove the marker first so a half-deleted directory is never taken for a complete checkpoint.
            fs.rm(f"{path}/{COMPLETE}")
            fs.rm(path, recursive=True)
            log.info("pruned checkpoint step %d", step)
