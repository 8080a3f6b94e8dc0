"""Checkpoint manager on a local path (through s3://, on a moto server, in tests/integration/test_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from m2d2.train.checkpoint import CheckpointManager


def _state(seed: int):
    gen = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    opt = torch.optim.AdamW([torch.nn.Parameter(model["w"].clone())])
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 4)
    opt.step()
    return model, {"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def _round_trip(root: str) -> None:
    manager = CheckpointManager(root, keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        model, rank_state = _state(step)
        manager.save(step, model, rank_state, {"train_state": {"step": step}})
    assert manager.complete_steps() == [20, 30]  # keep-last-2 pruned step 10
    ckpt = manager.load()
    model, rank_state = _state(30)
    assert ckpt.step == 30 and ckpt.meta["train_state"]["step"] == 30
    assert all(torch.equal(ckpt.model[k], model[k]) for k in model)
    assert torch.equal(ckpt.rank_state["optimizer"]["state"][0]["exp_avg"], rank_state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(ckpt.rank_state["rng"]["torch"], rank_state["rng"]["torch"])
    with pytest.raises(ValueError, match="same world size"):
        manager.load(world_size=2)


def test_local_round_trip_keep_last_and_incomplete_steps(tmp_path):
    _round_trip(str(tmp_path / "ckpt"))
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    # A crash mid-save leaves a step without its marker: it is invisible to resume.
    (tmp_path / "ckpt" / "step-000000040").mkdir()
    (tmp_path / "ckpt" / "step-000000040" / "rank-00000.pt").write_bytes(b"partial")
    assert manager.latest() == 30
    with pytest.raises(FileNotFoundError):
        CheckpointManager(str(tmp_path / "empty")).load()
