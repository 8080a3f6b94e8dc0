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


def test_orphaned_directories_are_swept_and_a_kill_while_pruning_leaves_nothing_behind(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(str(root), keep_last=2)
    for step in (10, 20):
        manager.save(step, *_state(step), {"train_state": {"step": step}})
    # a kill mid-prune: the marker of step 5 is gone, its files are not; a kill mid-save of step 13; a newer
    # half-written step 40 (the next save of step 40 overwrites it, so it stays)
    for step, files in ((5, ["model.safetensors"]), (13, ["rank-00000.pt"]), (40, ["rank-00000.pt"])):
        (root / f"step-{step:09d}").mkdir()
        for name in files:
            (root / f"step-{step:09d}" / name).write_bytes(b"orphan")
    assert manager.sweep() == [5, 13]
    assert sorted(p.name for p in root.iterdir()) == ["step-000000010", "step-000000020", "step-000000040"]
    (root / "step-000000015").mkdir()  # and after every save, too
    manager.save(30, *_state(30), {"train_state": {"step": 30}})
    assert sorted(p.name for p in root.iterdir()) == ["step-000000020", "step-000000030", "step-000000040"]
    assert not list(root.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_damaged_bytes_after_the_commit_are_not_trusted(tmp_path, caplog):
    from m2d2.train.checkpoint import CheckpointCorruptError

    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3)
    for step in (10, 20):
        manager.save(step, *_state(step), {"train_state": {"step": step}})
    weights = tmp_path / "ckpt" / "step-000000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="model.safetensors"):
        manager.load(20)
    with caplog.at_level("WARNING"):
        assert manager.latest_verified() == 10  # falls back to the previous complete checkpoint
    assert "step 20 is damaged" in caplog.text
    assert manager.load(10).step == 10
    rank_file = tmp_path / "ckpt" / "step-000000010" / "rank-00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:-5])  # truncated
    assert manager.latest_verified() is None
