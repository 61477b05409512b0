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


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """A function: tiny variant or trained fixture name → (checkpoint dir, fp32 package dir), exported
    once per session."""
    from gemma4_onnx.exporter.package import export_package

    from support import TRAINED_FIXTURES, trained_fixture

    root = tmp_path_factory.mktemp("packages")
    made: dict[str, tuple[Path, Path]] = {}

    def get(source: str) -> tuple[Path, Path]:
        if source not in made:
            checkpoint = trained_fixture(source) if source in TRAINED_FIXTURES else tiny_checkpoint(source)
            made[source] = checkpoint, export_package(str(checkpoint), root / source)
        return made[source]

    return get
