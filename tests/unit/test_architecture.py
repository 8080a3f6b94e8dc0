"""The package's shape without a child process: the core install and its extras as pyproject.toml declares them
(the import contracts and the core install itself are exercised in tests/integration/test_architecture.py)."""

from __future__ import annotations

import tomllib

from tests.helpers import REPO_ROOT as ROOT


def test_pyproject_splits_the_install_into_core_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs: list[str]) -> set[str]:
        return {s.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for s in specs}

    core, extras = names(project["dependencies"]), project["optional-dependencies"]
    assert {"torch", "transformers", "torchaudio", "s3fs", "pyarrow"} <= core
    assert not core & {"flytekit", "flytekitplugins-kfpytorch", "deepspeed", "mlflow"}
    assert {"deepspeed", "mlflow"} <= names(extras["train"])
    assert {"flytekit", "flytekitplugins-kfpytorch", "m2d2"} <= names(extras["pipeline"])  # m2d2[train] too
    assert "import-linter" in names(extras["dev"])
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[train,pipeline,dev]'" in makefile and "lint-imports" in makefile
