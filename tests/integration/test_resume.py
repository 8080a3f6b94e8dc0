"""Exact resume: a run killed after step k and resumed ends bitwise-identical to an uninterrupted run."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m2d2.train.engine import FAULT_EXIT_CODE
from tests.helpers import subprocess_env

SCRIPT = "tests.integration.scripts.train_stage"  # run as a module: subprocess_env puts the repository on PYTHONPATH


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train(stage: str, features, inputs, out_dir: Path, overrides: dict, nproc: int = 1,
           fault_at: int | None = None) -> subprocess.CompletedProcess:
    env = subprocess_env(OMP_NUM_THREADS="1")
    if fault_at is not None:
        env["M2D2_FAULT_AT_STEP"] = str(fault_at)
    args = ["-m", SCRIPT, stage, str(features), str(inputs), str(out_dir), json.dumps(overrides)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _final_state(out_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted((out_dir / "checkpoints").glob("step-*"))
    return load_file(str(steps[-1] / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "zero_stage", "precision"), [(2, 2, "auto"), (1, 0, "bf16")])
def test_killed_and_resumed_run_is_bitwise_identical(tmp_path, smoke_data, nproc, zero_stage, precision):
    """Two processes run under ZeRO-2: each rank's optimiser partition comes back from its own file. bf16 is the GPU
    path (DeepSpeed's bf16 weights with fp32 masters, fp32 EMA target), run here on CPU. (One process in fp32: the
    chaos drill below, killed at random moments.)"""
    _, features, captions = smoke_data
    overrides = {"schedule": {"max_steps": 6, "global_batch": 4}, "checkpoint": {"every": 2}, "log_every": 1,
                 "topology": {"zero_stage": zero_stage, "precision": precision}}
    straight = _train("stage1", features, captions, tmp_path / "straight", overrides, nproc)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _train("stage1", features, captions, tmp_path / "resumed", overrides, nproc, fault_at=3)
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "model").exists()
    if nproc == 1:
        assert crashed.returncode == FAULT_EXIT_CODE
    # Died after step 3: step 2 is the newest complete checkpoint, so the resumed run redoes step 3.
    assert [p.name for p in sorted((tmp_path / "resumed" / "checkpoints").glob("step-*"))] == ["step-000000002"]
    resumed = _train("stage1", features, captions, tmp_path / "resumed", overrides, nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("target.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    exported_a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    exported_b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)
    if precision == "bf16":  # checkpoints hold the bf16 weights (masters are in the optimiser files), the export fp32
        weight = "encoder.blocks.0.attn.qkv.weight"
        assert a[weight].dtype == torch.bfloat16 and a["target.norm.weight"].dtype == torch.float32
        assert exported_a[weight].dtype == torch.float32
        assert not torch.equal(exported_a[weight], exported_a[weight].bfloat16().float())  # not a bf16 rounding
    # keep-last-k pruned the older checkpoints of the straight run (every 2 steps: 2, 4, final 6 -> keep 3).
    assert len(list((tmp_path / "straight" / "checkpoints").glob("step-*"))) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "trained"), [("stage2", "text_encoder."), ("stage1.1", "head.")])
def test_stage2_and_stage11_resume_is_bitwise_identical(tmp_path, smoke_data, stage, trained):
    """Stage 2 (text encoder dropout) and stage 1.1 (mixup, SpecAugment, patch-out, BatchNorm statistics)."""
    _, features, _ = smoke_data
    from m2d2.data.features import load_norm_stats
    from m2d2.models import M2D2
    from m2d2.presets import model_config

    torch.manual_seed(0)  # an untrained stage-1 export is enough to exercise stage 2's resume
    model = M2D2(model_config("smoke"), with_m2d=False)
    stats = load_norm_stats(features)
    model.set_norm_stats(stats.mean, stats.std)
    stage1 = tmp_path / "s1"
    model.save_pretrained(str(stage1))
    overrides = {"schedule": {"max_steps": 4, "global_batch": 4}, "checkpoint": {"every": 1}}
    straight = _train(stage, features, stage1, tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    crashed = _train(stage, features, stage1, tmp_path / "resumed", overrides, fault_at=2)
    assert crashed.returncode == FAULT_EXIT_CODE
    resumed = _train(stage, features, stage1, tmp_path / "resumed", overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith(trained) for k in a)


@pytest.mark.slow
def test_chaos_sigkills_at_random_moments_change_nothing(tmp_path, smoke_data):
    """The drill: a smoke stage with a checkpoint every step, SIGKILLed 10 times at seeded random wall-clock
    moments (start-up, mid-step, mid-save, mid-prune), restarted after each, ends with final weights and export
    bitwise equal to an uninterrupted run's, no temporary files and no incomplete checkpoint directory."""
    import os
    import random
    import signal

    _, features, captions = smoke_data
    overrides = {"schedule": {"max_steps": 24, "global_batch": 4}, "checkpoint": {"every": 1, "keep": 2},
                 "log_every": 1}
    straight = _train("stage1", features, captions, tmp_path / "straight", overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "chaos"
    args = [sys.executable, "-m", SCRIPT, "stage1", str(features), str(captions), str(out), json.dumps(overrides)]
    env = subprocess_env(OMP_NUM_THREADS="1")
    rng = random.Random(20261206)
    kills, finished, log = 0, None, []
    while finished is None:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if kills < 10:
            delay = rng.uniform(2.5, 7.0)  # imports take ~3 s: most kills land in training, some in start-up
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                done = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if out.exists() else []
                log.append(f"kill {kills} at {delay:.2f} s: {done}")
                continue
        else:
            proc.wait(timeout=300)
        output = proc.stdout.read().decode()
        assert proc.returncode == 0, "\n".join(log) + output[-3000:]
        finished = output
    assert kills == 10, log
    print("\n".join(log))  # where each kill landed (pytest -s shows it)
    a, b = _final_state(tmp_path / "straight"), _final_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported_a = (tmp_path / "straight" / "model" / "model.safetensors").read_bytes()
    assert (out / "model" / "model.safetensors").read_bytes() == exported_a  # the export, byte for byte
    assert not [p for p in out.rglob("*.tmp")], "temporary files left behind"
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert steps and all((p / "COMPLETE").is_file() for p in steps), [p.name for p in steps]
