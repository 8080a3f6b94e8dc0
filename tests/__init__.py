"""m2d2's tests: ``tests/unit`` (fast, in-process) and ``tests/integration`` (subprocesses, servers, pyflyte,
multi-process training, deployment checks). Shared helpers live in :mod:`tests.helpers`, fixtures in conftest.py.

Importing the package sets the offline environment, before any test, conftest or child-process script
(``python -m tests.integration.scripts.X``) loads m2d2, transformers or DeepSpeed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
