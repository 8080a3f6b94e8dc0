"""The pipeline in one process (m2d2.pipeline.run): same steps and outputs as the Flyte workflow, reuse of finished
steps, re-running only what a changed section affects, and the smoke pipeline's exports against golden digests.

The golden file pins the bytes every stage exports on the smoke preset. A change that moves them is a change of
behaviour: if it is deliberate, regenerate the file in the same commit (``M2D2_UPDATE_GOLDEN=1 pytest
tests/integration/test_pipeline_runner.py``) and say why in the commit message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from m2d2.pipeline import STAGES, registry, run
from m2d2.pipeline.registry import Stage, Variant
from m2d2.presets import pipeline_config
from tests.helpers import GOLDEN as GOLDEN_DIR
from tests.helpers import write_tone_folder

GOLDEN = GOLDEN_DIR / "smoke_exports.json"


def copy_stage(cfg, feature_dir, source, out_dir, parent_run_id=None, checkpoint_root=None, name=None):
    """The runner of a stage added by a test: re-exports its input (a real stage would train here)."""
    from m2d2.models import M2D2
    from m2d2.train.stages import StageOutput

    export = Path(out_dir) / "model"
    M2D2.from_pretrained(source).save_pretrained(str(export))
    return StageOutput(export_dir=str(export), checkpoint_dir=str(out_dir), mlflow_run_id=None, steps=0)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _platform() -> dict[str, str]:
    """What the exact bytes depend on besides the code: float kernels differ across torch builds and CPUs. The CPU's
    name is not enough: two "AMD EPYC" generations run torch's AVX2 or its AVX-512 kernels, whose sums round
    differently (the demo's stage-2 zero-shot figure moved from 0.383 to 0.371 between two such machines, same
    commit), so the kernel family torch picked is part of the key."""
    return {"torch": torch.__version__, "cpu": _cpu(), "machine": platform.machine(),
            "kernels": torch.backends.cpu.get_cpu_capability()}


def _digests(result) -> dict[str, str]:
    return {s.name: hashlib.sha256((Path(result.outputs[s.name].path) / "model.safetensors").read_bytes()).hexdigest()
            for s in STAGES}


@pytest.mark.slow
def test_smoke_pipeline_in_process_matches_golden_and_reruns_only_what_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # the suite: the execution's own evaluation split and a downstream task from a folder with a labels.csv
    tones = write_tone_folder(tmp_path / "tones")
    cfg = pipeline_config("smoke", data_root=str(tmp_path / "data"), experiment="runner",
                          suite=["corpus", f"tones={tones}"])
    first = run(cfg)
    digests = _digests(first)
    if os.environ.get("M2D2_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"platform": _platform(), "exports": digests}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if golden["platform"] != _platform():
        pytest.skip(f"golden digests were recorded on {golden['platform']}, this is {_platform()}: exact bytes are "
                    "only comparable on the same torch build and CPU")
    assert digests == golden["exports"], "the smoke pipeline's exports changed: a change of behaviour (see docstring)"
    summary = json.loads(first.summary.read_text())
    assert not any(summary["cache_hits"].values())
    # one execution, four models, each registered under its own name and the first champion of it
    assert {name: r.model_uri for name, r in first.registrations.items()} == {
        "m2d2-minus": "models:/m2d2-minus/1", "m2d2": "models:/m2d2/1", "m2d2-plus": "models:/m2d2-plus/1",
        "m2d2-as-plus": "models:/m2d2-as-plus/1"}
    assert all(r.promoted for r in first.registrations.values())
    # each version records the digest of the evaluation its metrics come from (m2d2.eval.clap.suite_digest)
    from mlflow import MlflowClient

    suite = json.loads((Path(first.evaluation.path) / "suite.json").read_text())["digest"]
    assert MlflowClient().get_model_version("m2d2-plus", "1").tags["m2d2.eval_suite"] == suite
    # the suite table: the corpus and the downstream task, a column per model, the task's figures as metrics
    table = (Path(first.evaluation.path) / "suite_table.md").read_text()
    assert "| Evaluation split (this execution) | zs_acc |" in table and "| tones | probe_acc |" in table
    assert "stage1 baseline" in table.splitlines()[0]
    metrics = first.evaluation.metrics
    for name in registry.VARIANT_NAMES:
        assert 0.0 <= metrics[f"{name}/tones/probe_acc"] <= 1.0 and 0.0 <= metrics[f"{name}/tones/zs_acc"] <= 1.0
        assert metrics[f"{name}/suite_mean"] > 0.0
    assert json.loads((Path(first.evaluation.path) / "suite.json").read_text())["tasks"].keys() == {"corpus",
                                                                                                     "tones"}
    assert "Downstream tasks" in (Path(first.evaluation.path) / "m2d2" / "report.html").read_text()
    _check_mlflow_as_users_see_it(first, tmp_path)
    assert {name: v["stage"] for name, v in summary["variants"].items()} == {
        "m2d2-minus": "stage1", "m2d2": "stage2", "m2d2-plus": "stage2.1", "m2d2-as-plus": "stage2.1-as"}
    # every stage's view was checked first and its clip count logged (the smoke corpus: 20 training clips, 10 with
    # 3 captions for stage 2.1 on either line; its evaluation clips share no recording with them)
    views = first.outputs["views"].metrics
    assert views["stage1/clips"] == 20 and views["stage2.1/clips"] == views["stage2.1-as/clips"] == 10
    assert views["stage1/removed"] == 0

    # The same config again: every step is reused, with the run that produced it.
    again = run(cfg)
    hits = json.loads(again.summary.read_text())["cache_hits"]
    assert all(hits.values()) and set(hits) == {"features", "embed", "views", "evaluate", *(s.name for s in STAGES)}
    assert again.outputs["stage2"].mlflow_run_id == first.outputs["stage2"].mlflow_run_id

    # Stage 2.1's settings changed: it and what follows it run again; everything before it is reused, and so is
    # the other line (stage2-as, stage2.1-as).
    changed = dataclasses.replace(cfg, stages={**cfg.stages, "stage2.1": cfg.stages["stage2.1"].replace(seed=1)})
    third = run(changed)
    hits = json.loads(third.summary.read_text())["cache_hits"]
    assert hits == {"features": True, "embed": True, "views": True, "stage1": True, "stage1.1": True, "stage2": True,
                    "stage2.1": False, "stage2-as": True, "stage2.1-as": True, "evaluate": False}
    assert third.outputs["stage2.1"].path != first.outputs["stage2.1"].path
    # M2D2⁺ is a new model, a new version of its registered model; the other three are unchanged and add none
    assert third.registrations["m2d2-plus"].model_uri == "models:/m2d2-plus/2"
    assert {n: r.model_uri for n, r in third.registrations.items() if n != "m2d2-plus"} == {
        n: r.model_uri for n, r in first.registrations.items() if n != "m2d2-plus"}

    # (Only the models a config lists are made: tests/integration/test_pipeline_e2e.py makes M2D2⁻ alone.)

    # Adding a stage: one declaration in the registry plus its runner (and, if it is a model of its own, a variant);
    # the in-process driver, evaluation and registration walk them.
    added = Stage("stage2.2", trains_on="stage2.1", runner="tests.integration.test_pipeline_runner:copy_stage",
                  baseline="stage2", title="stage 2.2", recipe="stage2.1")
    monkeypatch.setattr(registry, "STAGES", (*STAGES, added))
    monkeypatch.setattr(registry, "VARIANTS", (*registry.VARIANTS, Variant("m2d2-plus-plus", "M2D2⁺⁺", "stage2.2")))
    monkeypatch.setattr(registry, "VARIANT_NAMES", (*registry.VARIANT_NAMES, "m2d2-plus-plus"))
    # ... and its settings under its name (a preset gives them to every registered stage)
    fourth = run(dataclasses.replace(changed, stages={**changed.stages, "stage2.2": changed.stages["stage2.1"]},
                                     variants=["m2d2-plus-plus"]))
    assert fourth.registrations["m2d2-plus-plus"].model_uri == "models:/m2d2-plus-plus/1"
    hits = json.loads(fourth.summary.read_text())["cache_hits"]
    assert hits["stage2.1"] and not hits.get("stage2.2") and not hits["evaluate"]  # an untracked runner has no run
    metrics = fourth.evaluation.metrics
    assert metrics["stage2.2/zs_acc"] == metrics["stage2.1/zs_acc"]  # the same weights, re-exported
    assert "stage2.2_zs_gain" in metrics and fourth.outputs["stage2.2"].path.startswith(str(tmp_path / "data"))
    # The Flyte workflow needs that stage's task (Flyte's third place) and says so.
    import workflows.full as wf

    with pytest.raises(KeyError, match="has no task for it"):
        wf.stage_task("stage2.2")


def _check_mlflow_as_users_see_it(result, tmp_path):
    """Experiment kind, lineage, a readable registry, the served champion, figures and the parent's note."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from fastapi.testclient import TestClient
    from mlflow import MlflowClient
    from mlflow.pyfunc import scoring_server

    from m2d2.cli import main

    client = MlflowClient()
    experiment = client.get_experiment_by_name("runner")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    parent = client.get_run(result.parent_run_id)
    assert len(parent.data.tags["m2d2.config_digest"]) == 64 and "mlflow.source.git.commit" in parent.data.tags
    assert "| M2D2⁺ (`m2d2-plus`) |" in parent.data.tags["mlflow.note.content"]
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"corpus", "log-mel features", "caption vectors"}
    stage1 = client.get_run(result.outputs["stage1"].mlflow_run_id)
    assert {d.dataset.name for d in stage1.inputs.dataset_inputs} == {"corpus", "log-mel features", "caption vectors"}
    evaluation = client.get_run(result.evaluation.mlflow_run_id)
    images = {a.path for a in client.list_artifacts(evaluation.info.run_id, "images")}
    assert any("confusion" in p for p in images) and any("tsne" in p for p in images)

    version = client.get_model_version_by_alias("m2d2-plus", "champion")
    assert len(version.tags) <= 16 and not [t for t in version.tags if t.startswith("m2d2.metric.")
                                            and t != "m2d2.metric.zs_acc"]
    assert version.description.startswith("**M2D2⁺** (`m2d2-plus`): stage1 → stage2 → stage2.1.")
    assert "| zs_acc |" in version.description and "**Promoted** to `champion`" in version.description
    assert version.tags["m2d2.pipeline_run"] == result.parent_run_id
    assert version.tags["m2d2.stage_runs"].startswith(f"stage1={result.outputs['stage1'].mlflow_run_id},")
    card = (Path(result.outputs["stage2.1"].path) / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0") and "## Evaluation" in card and "## Limitations" in card
    assert (Path(result.outputs["stage1.1"].path) / "README.md").is_file()  # every export, not only the variants'
    assert main(["lineage", "models:/m2d2-plus@champion"]) == 0

    # the champion as an MLflow model: loaded by URI, and served (the scoring server, in process)
    model = mlflow.pyfunc.load_model("models:/m2d2-plus@champion")
    wave = (0.1 * np.sin(np.arange(16000) / 7.0)).tolist()
    audio = model.predict(pd.DataFrame({"audio": [wave]}))
    text = model.predict(pd.DataFrame({"text": ["a siren"]}))
    assert len(audio["embedding"][0]) == len(text["embedding"][0]) > 0
    server = TestClient(scoring_server.init(model))
    ok = server.post("/invocations", json={"dataframe_records": [{"audio": wave}], "params": {"output": "clip"}})
    assert ok.status_code == 200 and len(ok.json()["predictions"][0]["embedding"]) > 0
    for bad, message in (({"audio": wave, "sample_rate": 44100}, "resample"), ({"audio": []}, "non-empty"),
                         ({"path": str(tmp_path / "tones" / "labels.csv")}, "M2D2_SERVING_AUDIO_ROOT")):
        answer = server.post("/invocations", json={"dataframe_records": [bad]})
        assert answer.status_code == 400 and message in answer.json()["message"], answer.text


def test_a_stage_whose_view_is_too_small_fails_before_any_training(tmp_path, monkeypatch, capsys):
    """A corpus with one caption per clip under a stage-2.1 rule of >= 3 captions: `m2d2 run` stops after the data
    steps with one plain message naming the stage, the rule, the corpus and the setting — no stage has started."""
    from m2d2.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stages:\n  stage2.1:\n    data:\n      min_captions: 9\n")
    data_root = tmp_path / "data"
    assert main(["run", "--preset", "smoke", "--cfg", str(cfg), "--data-root", str(data_root)]) == 2
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("m2d2 run:")]
    assert len(message) == 1, message  # one line, after the data steps' progress bars
    assert message[0].startswith("m2d2 run: stage2.1: its training view has 0 clips, it needs at least 8 (one "
                                 "global batch) (rule: sources=any, >= 9 captions; 0 clips match before leakage "
                                 "removal)."), message
    assert message[0].endswith("Change data.min_captions (no clip has more than 3 captions) in stages.stage2.1.")
    assert (data_root / "features").is_dir() and not any((data_root / s.name).exists() for s in STAGES)
