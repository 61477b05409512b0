"""Where an export reads its weights: a checkpoint directory, or a variant name whose weights are
generated on demand, tensor by tensor, exactly as ``init-checkpoint`` would write them (bf16
rounding included), so exporting ``e2b`` equals exporting ``init-checkpoint e2b``'s output."""

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.geometry import TextGeometry, text_geometry
from gemma4_onnx.exporter.hf_model import expected_tensors
from gemma4_onnx.exporter.init_checkpoint import CHUNK_VALUES, DTYPES, random_chunks
from gemma4_onnx.exporter.variants import REGISTRY, get_variant


class WeightSource(Protocol):
    config: dict[str, Any]
    geometry: TextGeometry

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def chunks(self, name: str) -> Iterator[np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class RandomWeights:
    def __init__(self, variant: str, seed: int = 0, dtype: str = "bfloat16") -> None:
        self.variant = variant
        self.seed = seed
        self.dtype = dtype
        self.config = get_variant(variant).config | {"dtype": dtype}
        self.geometry = text_geometry(self.config)
        self.shapes = {name: shape for name, (shape, _) in expected_tensors(self.config).items()}

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        value = torch.empty(math.prod(shape), dtype=DTYPES[self.dtype])
        start = 0
        for chunk in random_chunks(name, shape, self.seed):
            value[start:start + chunk.numel()] = chunk
            start += chunk.numel()
        value = value.reshape(shape)
        return value if dtype is None else value.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor's float32 values in consecutive chunks of whole rows, equal to ``tensor(name, float32)``."""
        for chunk in random_chunks(name, self.shapes[name], self.seed):
            yield chunk.to(DTYPES[self.dtype]).to(torch.float32).numpy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "variant": self.variant, "seed": self.seed, "dtype": self.dtype}


class CheckpointWeights:
    def __init__(self, directory: Path) -> None:
        self.checkpoint = Checkpoint.open(directory)
        self.config = self.checkpoint.config
        self.geometry = self.checkpoint.geometry

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.checkpoint.tensor(name, dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.checkpoint.entries[name].shape

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        for chunk in self.checkpoint.row_chunks(name, CHUNK_VALUES, torch.float32):
            yield chunk.numpy()

    def describe(self) -> dict[str, Any]:
        return {"kind": "checkpoint", "path": str(self.checkpoint.directory.resolve())}


def example_weights(weights: WeightSource, names: dict[str, str], structure_only: bool) -> dict[str, torch.Tensor]:
    """What a block is traced with: its weights by local name (``names``: local → source name), real in
    float32, or zeros of the right shape for a structure-only export."""
    return {local: torch.zeros(weights.shape(name)) if structure_only else weights.tensor(name, torch.float32)
            for local, name in names.items()}


def open_source(source: str) -> WeightSource:
    """A checkpoint directory, or a variant name (random weights); anything else is refused."""
    path = Path(source)
    if path.is_dir():
        return CheckpointWeights(path)
    if source.lower() in REGISTRY:
        return RandomWeights(source.lower())
    if path.exists() or "/" in source:
        raise UsageError(f"source {source} is not a checkpoint directory")
    get_variant(source)  # raises with the nearest variant names
    raise AssertionError
