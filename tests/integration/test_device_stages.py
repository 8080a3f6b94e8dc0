"""The GPU stages benchmark rehearsed on CPU at tiny shapes, in a child process.

The rehearsal runs ``python -m benchmarks.device_stages --preset cpu-smoke`` as the device script would (every
section, the kill-and-resume and caption-embedding ones included, with an injected out-of-memory to exercise the
back-off) and checks that the JSON holds every section with sane values (its pieces and the capacity model are in
tests/unit/test_device_stages.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------------- rehearsal
@pytest.mark.slow
def test_cpu_smoke_rehearsal_writes_every_section(tmp_path):
    out = tmp_path / "device_stages.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_stages", "--preset", "cpu-smoke", "--out", str(out),
         "--workdir", str(tmp_path / "work"), "--oom-above", "6"],
        env=subprocess_env(OMP_NUM_THREADS="1"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    failed = {k: v.get("error") for k, v in sections.items() if v["status"] != "ok"}
    assert list(sections) == ["stage1", "stage1.1", "stage2", "stage2.1", "inference", "captions", "resume"]
    assert not failed, failed

    starts = {"stage1": "fresh", "stage1.1": "stage1 export", "stage2": "stage1.1 export", "stage2.1": "stage2 export"}
    for stage, start in starts.items():
        r = sections[stage]
        assert r["start"] == start  # each stage trains on from the previous stage's export
        # --oom-above 6: micro-batch 8 "ran out of memory", 6 is the largest that fits
        assert (r["requested_micro_batch"], r["micro_batch"], r["fits_requested"]) == (8, 6, False)
        assert [o["micro_batch"] for o in r["out_of_memory"]] == [8] and "does not fit" in r["note"]
        assert r["steps_done"] == len(r["losses"]) == 30 and r["skipped_steps"] == 0
        assert r["losses_finite"] and r["losses_fall"], (stage, r["losses"])
        assert r["ms_per_step"] > 0 and r["samples_per_s"] == pytest.approx(6e3 / r["ms_per_step"])
        assert r["peak_memory_gib"] > 0 and r["checkpoint_bytes"] > r["checkpoint_model_bytes"] > 0
        # the export holds the fp32 masters: all of them, none a bf16 rounding; frozen parts and buffers unchanged
        assert r["export_fp32_masters"] and r["export_dtypes"] == ["float32"]
        assert r["equal_to_fp32_master"] == r["trained_tensors_checked"] > 0 and r["not_bf16_representable"] > 0
        assert r["frozen_unchanged"] == r["frozen_tensors_checked"] > 0
    assert sections["stage2"]["frozen_tensors_checked"] > sections["stage1"]["frozen_tensors_checked"]  # the encoder

    inference = sections["inference"]
    for kind in ("frames", "clap_audio"):
        parity = inference["bf16_vs_fp32"][kind]
        assert 0 < parity["rel_error_max"] < 0.05 and parity["cosine_min"] > 0.99  # bf16 did run, and stays close
    assert inference["frames_per_10s_clip"] > 0
    for precision in ("fp32", "bf16"):
        assert inference["batch_independence"][precision] == {"clap_bitwise_equal": True, "frames_bitwise_equal": True}
    assert all(v > 0 for v in inference["throughput_10s_clips"].values())

    captions = sections["captions"]
    naive, bucketed = captions["variants"]
    assert naive["captions_per_s"] > 0 and bucketed["captions_per_s"] > 0
    assert bucketed["padding_fraction"] < naive["padding_fraction"]  # length bucketing pads less
    assert bucketed["vs_naive_rel_diff_max"] < 0.05  # the same vectors, up to bf16 and float16 rounding
    assert captions["parameters"] > 1e6 and captions["paper_caption_shards"] == 16
    assert captions["implied_gpu_hours"] == pytest.approx(2.5e6 / captions["best_captions_per_s"] / 3600)

    resume = sections["resume"]
    assert resume["micro_batch"] == 6  # stage 1's fitted micro-batch
    assert resume["killed_exit_code"] == 75 and resume["resumed_from_checkpoint"]
    assert resume["weights_bitwise_equal"] and resume["tensors_compared"] > 0 and resume["differing_tensors"] == 0
    assert len(resume["losses_killed_run"]) == 3 and resume["before_kill_bitwise_equal"]
    # killed after step 3, newest checkpoint at step 2: the resumed run redoes step 3 and ends with the straight run
    assert resume["losses_resumed_run"] == resume["losses_straight"][2:]
    assert resume["after_resume_max_rel_loss_diff"] == 0.0
    assert isinstance(resume["nondeterminism"]["flagged_ops"], list)
    assert "stage1" in proc.stdout and "written:" in proc.stdout
