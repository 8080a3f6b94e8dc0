"""Fixtures shared by the unit tier's inference and CLI tests."""

from __future__ import annotations

import pytest

from m2d2.inference import Embedder


@pytest.fixture(scope="module")
def export(tiny_stage2_export) -> str:
    """The tiny stage-2 export (tests/conftest.py) the inference and CLI tests load."""
    return tiny_stage2_export


@pytest.fixture(scope="module")
def embedder(export) -> Embedder:
    return Embedder.from_pretrained(export)
