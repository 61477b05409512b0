"""Reading a Hugging Face Gemma 4 checkpoint directory, streaming and checked.

Every file is checked from its header before a tensor is read (truncation, corrupt headers, absent
shards), every tensor is checked against the shapes the config implies, and tensors are read one at
a time through memory-mapped safetensors when a block needs them. The released E2B/E4B checkpoints
carry k/v projections for KV-shared layers that the reference drops: they are ignored here too.
"""

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gemma4_onnx.errors import CheckpointError, ConfigError
from gemma4_onnx.exporter.geometry import TextGeometry, text_geometry
from gemma4_onnx.exporter.hf_model import expected_tensors, ignorable_tensors
from gemma4_onnx.exporter.safetensors_io import DTYPES, TensorEntry, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# ClippableLinear bounds are ±inf when a layer does not clip; every other tensor must be finite.
READ_CHUNK_BYTES = 1 << 30  # one pread returns at most ~2 GiB on Linux: E2B's PLE table is 4.7 GB in bf16
INFINITE_ALLOWED = ("input_min", "input_max", "output_min", "output_max")


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "gemma4" and "Gemma4ForConditionalGeneration" not in architectures:
        raise ConfigError(f"{path}: model_type {model_type!r} / architectures {architectures} is not Gemma 4 "
                          "(expected model_type 'gemma4', Gemma4ForConditionalGeneration)")
    return config


def _describe(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more)"


class Checkpoint:
    """An opened, header-checked checkpoint. Tensors are read on demand, never all at once."""

    def __init__(self, directory: Path, config: dict[str, Any], entries: dict[str, TensorEntry]) -> None:
        self.directory = directory
        self.config = config
        self.entries = entries
        self.geometry: TextGeometry = text_geometry(config)
        self._files: dict[Path, BinaryIO] = {}

    @classmethod
    def open(cls, directory: str | Path, validate: bool = True) -> "Checkpoint":
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        config = read_config(directory)
        checkpoint = cls(directory, config, _read_entries(directory))
        if validate:
            checkpoint.validate()
        return checkpoint

    @property
    def tokenizer_file(self) -> Path | None:
        path = self.directory / "tokenizer.json"
        return path if path.is_file() else None

    def validate(self) -> None:
        """Names, shapes and dtypes against what the config implies; the tokenizer against the vocabulary."""
        from gemma4_onnx.runtime.package_files import tokenizer_problem

        if self.tokenizer_file and (problem := tokenizer_problem(self.tokenizer_file, self.geometry.vocab_size)):
            raise CheckpointError(f"{self.directory}: {problem}")
        expected = expected_tensors(self.config)
        ignorable = ignorable_tensors(self.config)
        missing = [n for n in expected if n not in self.entries]
        if missing:
            raise CheckpointError(f"{self.directory}: missing tensor {_describe(missing)}")
        unexpected = [n for n in self.entries if n not in expected and n not in ignorable]
        if unexpected:
            raise CheckpointError(f"{self.directory}: unexpected tensor {_describe(unexpected)} "
                                  "(not part of the model config.json describes)")
        for name, (shape, _) in expected.items():
            entry = self.entries[name]
            if entry.shape != shape:
                raise CheckpointError(f"tensor {name} has shape {list(entry.shape)}, but config.json implies "
                                      f"{list(shape)}")
            if entry.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name} has dtype {entry.dtype}; expected one of "
                                      f"{', '.join(FLOAT_DTYPES)}")

    def _read(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read from its file with ``pread``: no memory map, so pages already
        read never count towards this process's memory (full-size checkpoints are 10-60 GB)."""
        if entry.file not in self._files:
            self._files[entry.file] = entry.file.open("rb")
        dtype = DTYPES[entry.dtype]
        row_bytes = math.prod(entry.shape[1:]) * dtype.itemsize
        rows = stop - start if entry.shape else 1
        data = bytearray(rows * row_bytes)
        view, offset, done = memoryview(data), entry.begin + start * row_bytes, 0
        while done < len(data):
            read = os.preadv(self._files[entry.file].fileno(), [view[done:done + READ_CHUNK_BYTES]], offset + done)
            if read == 0:
                raise CheckpointError(f"{entry.file.name}: truncated while reading tensor {entry.name}")
            done += read
        value = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return value.reshape(rows, *entry.shape[1:]) if entry.shape else value.reshape(())

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from its file and checked for NaN/Inf."""
        entry = self._entry(name)
        value = self._read(entry, 0, entry.shape[0] if entry.shape else 1)
        _check_finite(name, *_non_finite(value))
        return value if dtype is None else value.to(dtype)

    def row_chunks(self, name: str, max_values: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The tensor in chunks of whole rows (at most ``max_values`` values each, at least one row), read
        from the file as they are needed; the NaN/Inf check covers the whole tensor and fails after the
        last chunk, counting every bad value."""
        entry = self._entry(name)
        if not entry.shape:
            yield self.tensor(name, dtype)
            return
        step = max(1, max_values // max(1, math.prod(entry.shape[1:])))
        bad = nan = 0
        for start in range(0, entry.shape[0], step):
            value = self._read(entry, start, min(start + step, entry.shape[0]))
            chunk_bad, chunk_nan = _non_finite(value)
            bad, nan = bad + chunk_bad, nan + chunk_nan
            yield value.to(dtype)
        _check_finite(name, bad, nan)

    def _entry(self, name: str) -> TensorEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"{self.directory}: missing tensor {name}")
        return entry

    def tensors(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (one block's weights), keyed without the prefix."""
        return {n[len(prefix):]: self.tensor(n, dtype) for n in self.entries if n.startswith(prefix)}

    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries.values())


def _non_finite(value: torch.Tensor) -> tuple[int, int]:
    """(non-finite values, of which NaN) in ``value``."""
    if not value.is_floating_point() or value.numel() == 0:
        return 0, 0
    if bool(value.abs().amax() < math.inf):  # NaN fails this too; a quarter of isfinite's time on bf16
        return 0, 0
    finite = torch.isfinite(value)
    if bool(finite.all()):
        return 0, 0
    bad = value[~finite]
    return bad.numel(), int(torch.isnan(bad).sum())


def _check_finite(name: str, bad: int, nan: int) -> None:
    if bad and not (name.endswith(INFINITE_ALLOWED) and nan == 0):
        raise CheckpointError(f"tensor {name} has {bad} non-finite values ({nan} NaN, {bad - nan} Inf)")


def _read_entries(directory: Path) -> dict[str, TensorEntry]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"shard {file} named in {INDEX_FILE} is missing from {directory}")
    elif (directory / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_header(directory / file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name} is stored twice ({entries[name].file.name}, {file})")
            entries[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in entries or entries[name].file.name != file:
                raise CheckpointError(f"missing tensor {name} ({INDEX_FILE} places it in {file}, which does not "
                                      "hold it)")
    return entries
