"""The GPU stages benchmark rehearsed on CPU at tiny shapes, its pieces that decide a verdict, and the capacity model.

The rehearsal runs ``benchmarks/device_stages.py --preset cpu-smoke`` as the device script would (every section, the
kill-and-resume and caption-embedding ones included, with an injected out-of-memory to exercise the back-off) and
checks that the JSON holds every section with sane values. The capacity model's FLOP and parameter formulas are
checked against PyTorch's FLOP counter and the project's models.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stages():
    module = _load("device_stages")
    yield module
    from m2d2.text.encoders import ENCODERS

    ENCODERS.pop(module.RANDOM_DECODER, None)  # the benchmark's plug-in kind stays out of other tests


@pytest.fixture(scope="module")
def capacity():
    return _load("capacity_model")


# ---------------------------------------------------------------------------------------------------- rehearsal
@pytest.mark.slow
def test_cpu_smoke_rehearsal_writes_every_section(tmp_path):
    out = tmp_path / "device_stages.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "device_stages.py"), "--preset", "cpu-smoke", "--out", str(out),
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


# ---------------------------------------------------------------------------------------------------- pieces
def test_export_check_tells_fp32_masters_from_bf16_roundings(stages):
    gen = torch.Generator().manual_seed(0)
    masters = {"w": torch.randn(64, 64, generator=gen)}
    frozen = {"norm_stats": torch.tensor([-7.26178, 4.35115])}
    good = {"w": masters["w"].clone(), "norm_stats": frozen["norm_stats"].clone()}
    assert stages.check_export(masters, frozen, good)["export_fp32_masters"]
    rounded = {**good, "w": masters["w"].bfloat16().float()}
    result = stages.check_export(masters, frozen, rounded)
    assert not result["export_fp32_masters"] and result["not_bf16_representable"] == 0
    assert not stages.check_export(masters, frozen, {**good, "w": masters["w"].bfloat16()})["export_fp32_masters"]
    moved = {**good, "norm_stats": frozen["norm_stats"].bfloat16().float()}
    assert not stages.check_export(masters, frozen, moved)["export_fp32_masters"]
    assert not stages.check_export({}, frozen, good)["export_fp32_masters"]  # nothing checked is no pass


def test_micro_batch_back_off_sizes(stages):
    assert stages.micro_candidates(512)[:6] == [512, 384, 256, 192, 128, 96]
    assert stages.micro_candidates(8) == [8, 6, 4, 3, 2, 1]
    assert stages.micro_candidates(1) == [1]


def test_overfit_summary_needs_finite_falling_losses(stages):
    assert stages.overfit_summary([3.0, 2.5, 2.0, 1.0, 0.5, 0.4])["losses_fall"]
    assert not stages.overfit_summary([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])["losses_fall"]
    assert not stages.overfit_summary([3.0, 2.0, math.nan, 1.0, 0.5, 0.4])["losses_fall"]


def test_fallback_tokenizer_is_word_piece_with_bert_special_tokens(stages, tmp_path):
    """The device image may lack tokenizer files: the fallback must load as a transformers tokenizer, frame each
    caption with [CLS] ... [SEP] (stage 2 pools the CLS token) and stay inside BERT's and Mistral's vocabularies."""
    from transformers import AutoTokenizer

    stages._train_wordpiece(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tokenizer(["a dog barks loudly while rain falls", "The sound of Speech"], padding=True)["input_ids"]
    assert all(row[0] == tokenizer.cls_token_id for row in ids)
    assert tokenizer.sep_token_id in ids[0] and max(max(row) for row in ids) < len(tokenizer) <= 8000
    assert 4 < sum(i != tokenizer.pad_token_id for i in ids[0]) < 16  # about a token per word


# ---------------------------------------------------------------------------------------------------- capacity model
def test_capacity_model_runs_and_doubling_gpus_about_halves_wall_time(capacity):
    text = capacity.main([])
    for heading in ("Step time", "all-reduce", "Loader", "Object store", "Checkpoints and preemption",
                    "Caption embedding", "whole `paper` execution"):
        assert heading in text
    a, m = capacity.Assumptions(), capacity.Measured()
    facts = capacity.model_facts()
    for stage in ("stage1", "stage2"):
        four, eight = (capacity.stage_row(stage, n, a, facts, m)["wall_h"] for n in (4, 8))
        assert 0.45 < eight / four < 0.6, (stage, four, eight)
    # across nodes the all-reduce stops being free
    assert capacity.stage_row("stage1", 32, a, facts, m)["comm_ms"] > 5 * capacity.stage_row(
        "stage1", 8, a, facts, m)["comm_ms"]
    # the paper preset checkpoints only at the end: a preemption costs far more than at Young's interval
    pre = capacity.preemption("stage1", 4, a, facts, m)
    assert pre["preset_interval_steps"] is None and pre["preset_expected_loss_h"] > 5 * pre["young_expected_loss_h"]
    e4, e32 = capacity.execution(4, a, facts, m), capacity.execution(32, a, facts, m)
    assert e32["wall_h"] < e4["wall_h"] and e32["gpu_h"] > e4["gpu_h"]


def test_capacity_model_flops_match_pytorchs_flop_counter(capacity):
    """Stage 1's analytic FLOPs against torch.utils.flop_counter over the project's forward and backward (math
    attention, which the counter counts); 86.0 GFLOP/sample for the paper model was counted the same way."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from m2d2.models import M2D2
    from m2d2.presets import model_config

    for name in ("smoke", "demo"):
        cfg = model_config(name)
        torch.manual_seed(0)
        model = M2D2(cfg)
        model.set_stage("stage1")
        lms, text = torch.randn(2, 80, cfg.encoder.input_frames) * 4 - 7, torch.randn(2, cfg.text.offline.dim)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(lms, text, generator=torch.Generator().manual_seed(0))["loss"].backward()
        counted = counter.get_total_flops() / 2 / 1e9
        assert capacity.model_facts(cfg=cfg)["gflop_per_sample"]["stage1"] == pytest.approx(counted, rel=1e-3)
    assert capacity.model_facts()["gflop_per_sample"]["stage1"] == pytest.approx(86.0, rel=0.01)


def test_capacity_model_parameter_counts_match_the_models(capacity):
    from transformers import AutoConfig, AutoModel

    from m2d2.models import M2D2
    from m2d2.presets import model_config

    facts = capacity.model_facts()
    model = M2D2(model_config("paper"))
    model.set_stage("stage1")
    counts = {name: sum(p.numel() for p in part) for name, part in model.parameter_groups().items()}
    assert facts["params"]["encoder"] == counts["encoder"] and facts["params"]["predictor"] == counts["predictor"]
    assert facts["params"]["projector"] == counts["audio_proj"] and facts["params"]["text_map"] == counts["text_proj"]
    assert facts["trainable"]["stage1"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert facts["frozen"]["stage1"] == sum(p.numel() for p in model.target.parameters())
    tiny_bert = {**capacity.BERT_BASE, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 128}
    tiny_decoder = {**capacity.MISTRAL_7B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 1000}
    small = capacity.model_facts(bert=tiny_bert, decoder=tiny_decoder)["params"]
    for fields, expected in ((tiny_bert, small["bert"]), (tiny_decoder, small["decoder"])):
        kind = fields["model_type"]
        built = AutoModel.from_config(AutoConfig.for_model(kind, **{k: v for k, v in fields.items()
                                                                     if k != "model_type"}))
        pooler = getattr(built, "pooler", None)
        assert expected == sum(p.numel() for p in built.parameters()) - (
            sum(p.numel() for p in pooler.parameters()) if pooler is not None else 0)


def test_capacity_model_uses_gpu_measurements_only(capacity, tmp_path):
    def device_json(device: str) -> str:
        section = {"status": "ok", "samples_per_s": 5000.0, "micro_batch": 256, "checkpoint_bytes": 2e9,
                   "checkpoint_write_s": 3.0}
        path = tmp_path / f"{device}.json"
        path.write_text(json.dumps({"device": device, "date": "d", "sections": {"stage1": section}}))
        return str(path)

    a, facts = capacity.Assumptions(), capacity.model_facts()
    gpu = capacity.read_measured(device_json("cuda"), None)
    row = capacity.stage_row("stage1", 8, a, facts, gpu)
    assert row["rate_source"].startswith("measured") and row["micro"] == 256 and row["accum"] == 1
    assert row["compute_ms"] == pytest.approx(256 / 5000 * 1e3)
    assert capacity.stage_row("stage1", 4, a, facts, gpu)["accum"] == 2  # 512 per GPU did not fit: accumulate
    cpu = capacity.read_measured(device_json("cpu"), None)
    assert capacity.stage_row("stage1", 8, a, facts, cpu)["rate_source"].startswith("assumed") and cpu.cpu


def test_caption_shards_assumption_is_the_paper_preset(capacity):
    from m2d2.presets import pipeline_config

    assert capacity.Assumptions().caption_shards == pipeline_config("paper").caption_shards
