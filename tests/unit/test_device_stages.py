"""The GPU stages benchmark's pieces that decide a verdict, and the capacity model (the CPU rehearsal of the whole
benchmark, in a child process, is in tests/integration/test_device_stages.py).

The capacity model's FLOP and parameter formulas are checked against PyTorch's FLOP counter and the project's models.
The benchmarks are imported as the package ``benchmarks`` (the repository root is on sys.path under pytest).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stages():
    from benchmarks import device_stages as module

    yield module
    from m2d2.text.encoders import ENCODERS

    ENCODERS.pop(module.RANDOM_DECODER, None)  # the benchmark's plug-in kind stays out of other tests


@pytest.fixture(scope="module")
def capacity():
    from benchmarks import capacity_model

    return capacity_model


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
