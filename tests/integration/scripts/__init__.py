"""Entry points the integration tests run in child processes, as modules (``python -m tests.integration.scripts.X``;
:func:`tests.helpers.subprocess_env` puts the repository root on the child's PYTHONPATH)."""
