"""Tests that start processes or servers: pyflyte, torchrun/DeepSpeed ranks, moto and MLflow servers, the CLI in a
subprocess, and the offline deployment checks (``make test`` runs them with the unit tier)."""
