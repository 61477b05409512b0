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


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]
        file.flush()
        os.fsync(file.fileno())


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
        walk, done = self.dir / "walk.npz", self.dir / "done.json"
        if walk.is_file():
            with np.load(walk) as arrays:
                return int(arrays["next_layer"])
        return int(json.loads(done.read_text())["next_layer"]) if done.is_file() else 0

    def save_walk(self, walk: BlockWalk) -> None:
        """The activations after the last completed block, and its index, in one file replaced at once:
        a block counts as done only when they are on disk."""
        arrays = {f"hidden.{i}": h for i, h in enumerate(walk.hidden)}
        for layer, pairs in walk.published.items():
            for i, (key, value) in enumerate(pairs):
                arrays[f"published.{layer}.{i}.key"], arrays[f"published.{layer}.{i}.value"] = key, value
        arrays["next_layer"] = np.array(walk.next_layer)
        arrays["published"] = np.array(sorted(walk.published), dtype=np.int64)
        _replace(self.dir / "walk.npz", lambda p: _save(p, arrays))

    def mark_done(self, next_layer: int) -> None:
        """Blocks before ``next_layer`` are complete (recipes that calibrate nothing carry no activations)."""
        _replace(self.dir / "done.json", lambda p: p.write_text(json.dumps({"next_layer": next_layer})))

    def restore_walk(self, walk: BlockWalk) -> None:
        with np.load(self.dir / "walk.npz") as arrays:
            windows = len(walk.hidden)
            walk.hidden = [arrays[f"hidden.{i}"] for i in range(windows)]
            walk.published = {int(layer): [(arrays[f"published.{layer}.{i}.key"],
                                            arrays[f"published.{layer}.{i}.value"]) for i in range(windows)]
                              for layer in arrays["published"]}
            walk.next_layer = int(arrays["next_layer"])

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
