"""Configs in child processes: the layering of the preset registry (what a fresh interpreter imports) and
`m2d2 config show` on the command line."""

from __future__ import annotations

import subprocess
import sys

from m2d2 import presets
from m2d2.config import loads
from m2d2.pipeline import PipelineConfig
from tests.helpers import REPO_ROOT as ROOT
from tests.helpers import subprocess_env


def test_layers_models_and_train_never_import_the_registry():
    """m2d2.models and m2d2.train.config sit below the registry; the registry loads m2d2.pipeline (MLflow) only when
    a pipeline config is asked for, so a bare training image can resolve models and stages."""
    code = ("import sys, m2d2.models, m2d2.train.config, m2d2.train.engine; assert 'm2d2.presets' not in sys.modules; "
            "import m2d2.presets; assert 'm2d2.pipeline' not in sys.modules and 'mlflow' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m2d2.cli", "config", "show", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def _show(capsys, *args: str) -> subprocess.CompletedProcess:
    """``m2d2 config show`` in this process (the entry point itself is run as a child once, above)."""
    from m2d2.cli import main

    capsys.readouterr()
    code = main(["config", "show", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_config_show_prints_the_effective_config(tmp_path, capsys):
    shown = _cli("--preset", "paper")  # the installed entry point, in a fresh interpreter
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert loads(shown.stdout, PipelineConfig) == presets.pipeline_config("paper")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("experiment: tuned\nstages:\n  stage2:\n    optim:\n      base_lr: 1.0e-5\n")
    shown = _show(capsys, "--preset", "smoke", "--cfg", str(overlay), "--format", "json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    expected = presets.pipeline_config("smoke", experiment="tuned", stages={"stage2": {"optim": {"base_lr": 1e-5}}})
    assert PipelineConfig.from_json(shown.stdout) == expected
    alone = _show(capsys, "--cfg", str(overlay))  # what pyflyte runs with this file: the defaults (demo) overlaid
    assert loads(alone.stdout, PipelineConfig) == presets.pipeline_config(
        "demo", experiment="tuned", stages={"stage2": {"optim": {"base_lr": 1e-5}}})
    overlay.write_text("stages:\n  stage2:\n    optim:\n      lrr: 1.0e-5\n")
    failed = _show(capsys, "--cfg", str(overlay))
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.strip().startswith(f"m2d2 config: {overlay}: stages.stage2.optim.lrr: unknown key; known: name,")
