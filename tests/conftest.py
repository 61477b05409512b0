"""Shared test fixtures: tiny random checkpoints written once per session, and the trained fixtures in
../shared/fixtures (tests that need them skip, with the reason, where ../shared is absent)."""

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A function: variant name → directory of its random float32 checkpoint (written once, seed 0)."""
    from gemma4_onnx.exporter.init_checkpoint import init_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            made[variant] = init_checkpoint(variant, root / variant, seed=0, dtype="float32")
        return made[variant]

    return make
