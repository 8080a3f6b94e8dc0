"""Contrastive gradient accumulation and the 2-process DeepSpeed step equal the single-process full batch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from tests.helpers import subprocess_env
from tests.integration.scripts import ds_grads


def _close(result, reference) -> None:
    loss, grads = result
    ref_loss, ref_grads = reference
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    assert set(grads) == set(ref_grads) and grads
    for name, grad in ref_grads.items():
        # float32 (DeepSpeed reduces no float64). The zero-initialised semantic token's gradient reaches |g| ~ 125
        # (LayerNorm of a zero vector amplifies by 1/sqrt(eps)), and summation rounding scales with the tensor's
        # largest entries (one float32 ulp at 125 is 7.6e-6), so the bound is atol 1e-5 plus 2e-6 of the tensor's
        # max magnitude: every other tensor is held to ~1e-5.
        worst, scale = float((grads[name] - grad).abs().max()), float(grad.abs().max())
        assert worst <= 1e-5 + 2e-6 * scale, (name, worst, scale)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_accumulated_step_equals_full_batch(stage):
    reference = ds_grads.run(stage, torch.float32, accum=1)
    assert "logit_scale" in reference[1]
    for accum in (2, 4):
        _close(ds_grads.run(stage, torch.float32, accum=accum), reference)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_process_deepspeed_equals_single_process(tmp_path, stage):
    reference = ds_grads.run(stage, torch.float32, accum=1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "grads.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "-m", "tests.integration.scripts.ds_grads", stage, str(out), "float32", "2"],
        env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=True)
    _close((saved["loss"], saved["grads"]), reference)  # 2 ranks x 2 micro-batches vs 1 x 8
