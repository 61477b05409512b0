"""Paths and helpers shared by the tests (importable as ``support``: tests/ is on pytest's path)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
TRAINED_FIXTURES = ["e2b-mini", "moe-mini"]


def trained_fixture(name: str) -> Path:
    """The trained checkpoint ``name`` from ../shared/fixtures, or a skip saying it is absent."""
    path = SHARED_FIXTURES / name
    if not (path / "config.json").is_file():
        pytest.skip(f"trained fixture {name} not found at {path} (../shared is absent)")
    return path
