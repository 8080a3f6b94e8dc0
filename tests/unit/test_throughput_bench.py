"""The stage-1 throughput benchmark's CPU smoke preset: it runs, reports every figure, and its loss-trajectory check
tells the project's step from an independent plain-PyTorch step that differs in one semantic detail."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bench():
    from benchmarks import stage1_throughput

    return stage1_throughput


def test_cpu_smoke_reports_figures_and_matching_trajectories(tmp_path):
    out = tmp_path / "bench.json"
    report = _bench().main(["--preset", "cpu-smoke", "--check-steps", "12", "--steps", "2", "--out", str(out)])
    assert json.loads(out.read_text())["speedup"] == pytest.approx(report["speedup"])
    assert report["gflop_per_sample"] > 0 and report["gemm_ceiling_tflops"] > 0
    for result in report["results"]:
        assert result["samples_per_s"] > 0 and result["ms_per_step"] > 0 and result["peak_memory_gib"] > 0
        assert 0 < result["fraction_of_ceiling"] < 1
        assert len(result["losses"]) == 12
    # Same weights, batches, masks and schedule, fp32 on CPU: the engine's step is the plain step.
    assert report["max_rel_loss_diff"] < 1e-5
    ref = report["results"][0]["losses"]
    assert ref[-1] < ref[0]  # it trains


def test_trajectory_check_catches_a_target_that_never_moves(tmp_path, monkeypatch):
    """What a bf16 EMA target would do (updates below bf16 resolution): the trajectories must part."""
    from m2d2.models.m2d import TargetEncoder

    monkeypatch.setattr(TargetEncoder, "ema_update", lambda self, *args, **kwargs: None)
    report = _bench().main(["--preset", "cpu-smoke", "--check-steps", "12", "--steps", "1", "--warmup", "0",
                            "--out", str(tmp_path / "bench.json")])
    assert report["max_rel_loss_diff"] > 1e-4
