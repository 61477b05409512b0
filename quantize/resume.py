"""What an interrupted ``export --recipe`` keeps in its partial output to restart from the last completed
block: the measured sensitivities, and the calibration activations after that block (``BlockWalk``).
Completed blocks' graphs and data files stay as written; the rest is written again."""

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gemma4_onnx.atomic import RESUME_STATE
from gemma4_onnx.quantize.calibration import BlockWalk


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    temporary = path.with_name(path.name + ".new")
    write(temporary)
    os.replace(temporary, path)


class ResumeState:
    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.dir = staging / RESUME_STATE

    def sensitivity(self) -> dict[str, float] | None:
        path = self.dir / "sensitivity.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_sensitivity(self, sensitivity: dict[str, float]) -> None:
        _replace(self.dir / "sensitivity.json", lambda p: p.write_text(json.dumps(sensitivity)))

    def layers_done(self) -> int:
        path = self.dir / "walk.json"
        return int(json.loads(path.read_text())["next_layer"]) if path.is_file() else 0

    def save_walk(self, walk: BlockWalk) -> None:
        """The activations after the last completed block; written before that block counts as done."""
        arrays = {f"hidden.{i}": h for i, h in enumerate(walk.hidden)}
        for layer, pairs in walk.published.items():
            for i, (key, value) in enumerate(pairs):
                arrays[f"published.{layer}.{i}.key"], arrays[f"published.{layer}.{i}.value"] = key, value
        _replace(self.dir / "walk.npz", lambda p: np.savez(p.open("wb"), **arrays))  # type: ignore[arg-type]
        _replace(self.dir / "walk.json", lambda p: p.write_text(json.dumps(
            {"next_layer": walk.next_layer, "published": sorted(walk.published)})))

    def mark_done(self, next_layer: int) -> None:
        """Blocks before ``next_layer`` are complete (recipes that calibrate nothing carry no activations)."""
        _replace(self.dir / "walk.json", lambda p: p.write_text(json.dumps({"next_layer": next_layer,
                                                                             "published": []})))

    def restore_walk(self, walk: BlockWalk) -> None:
        state = json.loads((self.dir / "walk.json").read_text())
        with np.load(self.dir / "walk.npz") as arrays:
            walk.hidden = [arrays[f"hidden.{i}"] for i in range(len(walk.hidden))]
            walk.published = {layer: [(arrays[f"published.{layer}.{i}.key"], arrays[f"published.{layer}.{i}.value"])
                                      for i in range(len(walk.hidden))] for layer in state["published"]}
        walk.next_layer = int(state["next_layer"])

    def finish(self) -> None:
        shutil.rmtree(self.dir)

    def clear_unfinished(self, finished: set[str]) -> None:
        """Remove whatever an interrupted run wrote beyond the completed blocks (``finished`` files)."""
        for path in sorted(self.staging.rglob("*"), reverse=True):
            relative = path.relative_to(self.staging).as_posix()
            if relative.startswith(RESUME_STATE) or relative in finished:
                continue
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            else:
                path.unlink()
