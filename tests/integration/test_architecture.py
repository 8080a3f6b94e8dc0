"""The package's shape: import contracts (``[tool.importlinter]`` in pyproject.toml), shown to fail on planted
violations, and a core install that serves inference without the training and workflow packages (in child
processes; the install's declared split is checked in tests/unit/test_architecture.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from m2d2.models import M2D2
from tests.helpers import REPO_ROOT as ROOT
from tests.helpers import tiny_bert, tiny_config

TRAINING_AND_WORKFLOW = ("flytekit", "flytekitplugins", "deepspeed", "mlflow")


def lint_imports(config: Path, package_parent: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``config``, analysing the ``m2d2`` found under ``package_parent``."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("lint-imports is not installed: import-linter is a dev extra "
                    "(pip install -c constraints/cpu.txt -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(exe), "--config", str(config), "--no-cache"], cwd=package_parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_import_contracts():
    proc = lint_imports(ROOT / "pyproject.toml", ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
             ["contracts"]]
    assert {"models never imports text, train or eval", "eval never imports train",
            "m2d2 never imports flytekit"} <= set(names)
    assert f"Contracts: {len(names)} kept, 0 broken." in proc.stdout


@pytest.mark.parametrize(("module", "planted", "contracts"), [
    ("models/chunks.py", "import m2d2.train.stages", ["models never imports text, train or eval",
                                                      "m2d2 layers (high to low)"]),
    ("models/model.py", "from m2d2.text import OfflineTextEncoder", ["models never imports text, train or eval"]),
    ("eval/metrics.py", "from m2d2.train.finetune import mixup_batch", ["eval never imports train",
                                                                        "m2d2 layers (high to low)"]),
    ("inference.py", "import flytekit", ["m2d2 never imports flytekit", "the core install's modules never import "
                                                                         "the training or workflow packages"]),
    ("tracking.py", "from m2d2.cli import SUMMARY_FILE", ["m2d2 layers (high to low)"]),
], ids=["models->train", "models->text", "eval->train", "flytekit", "tracking->cli"])
def test_a_planted_violation_breaks_the_contracts(tmp_path, module, planted, contracts):
    """A copy of the package with one forbidden import planted fails ``lint-imports``, naming the contract."""
    shutil.copytree(ROOT / "m2d2", tmp_path / "m2d2", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "m2d2" / module
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}  # noqa\n")
    proc = lint_imports(tmp_path / "pyproject.toml", tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for name in contracts:
        assert f"{name} BROKEN" in out, out
    assert f"m2d2.{module.removesuffix('.py').replace('/', '.')}" in out  # the report names the planted module


# ------------------------------------------------------------------------------------------------ core install
CORE_SCRIPT = """
import importlib.abc, sys

BLOCKED = {blocked!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    '''What a core install looks like: the training and workflow packages are not there.'''

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the core install)", name=name)
        return None


# an installed plugin's *-nspkg.pth creates the empty 'flytekitplugins' namespace at start-up, before any import
preloaded = {{m for m in sys.modules if m.split(".")[0] in BLOCKED}}
sys.meta_path.insert(0, NotInstalled())
import m2d2.convert, m2d2.inference, m2d2.models
from m2d2 import cli

assert cli.main(["embed", {wav!r}, "--model", {stage2!r}, "--kind", "clap"]) == 0
assert cli.main(["embed", {wav!r}, "--model", {stage2!r}, "--kind", "frames"]) == 0
# a stage-1 export embeds text through the sentence encoder the inference API attaches
assert cli.main(["zeroshot", {wav!r}, "--model", {stage1!r}, "--labels", "dog,rain"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and m not in preloaded)
assert not loaded, loaded
print("core ok")
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("core")
    torch.manual_seed(0)
    stage1 = M2D2(tiny_config(text_dim=384, input_frames=72), with_m2d=False)  # MiniLM: 384-d
    stage1.save_pretrained(str(root / "stage1"))
    stage2 = M2D2(tiny_config(input_frames=72), with_m2d=False)
    stage2.start_stage2(tiny_bert(hidden=64))
    stage2.save_pretrained(str(root / "stage2"))
    t = np.arange(16000) / 16000
    sf.write(root / "tone.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    return {"stage1": str(root / "stage1"), "stage2": str(root / "stage2"), "wav": str(root / "tone.wav")}


def test_the_core_install_serves_inference_without_training_packages(exports):
    """models, inference, convert and ``m2d2 embed`` / ``zeroshot`` run with flytekit, its plugins, DeepSpeed and
    MLflow unimportable."""
    script = CORE_SCRIPT.format(blocked=set(TRAINING_AND_WORKFLOW), **exports)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "core ok" in proc.stdout and "clap (" in proc.stdout


def test_the_blocker_really_blocks():
    """The same finder makes the tracking module (MLflow) fail, so the core test above proves something."""
    script = CORE_SCRIPT.split("import m2d2.convert")[0] + "import m2d2.tracking\n"
    proc = subprocess.run([sys.executable, "-c", script.format(blocked=set(TRAINING_AND_WORKFLOW), wav="",
                                                                stage1="", stage2="")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not in the core install" in proc.stderr, proc.stdout + proc.stderr
