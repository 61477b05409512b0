"""Reading a Hugging Face Gemma 4 checkpoint directory, streaming and checked.

Every file is checked from its header before a tensor is read (truncation, corrupt headers, absent
shards), every tensor is checked against the shapes the config implies, and tensors are read one at
a time through memory-mapped safetensors when a block needs them. The released E2B/E4B checkpoints
carry k/v projections for KV-shared layers that the reference drops: they are ignored here too.
"""

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import torch

from gemma4_onnx.errors import CheckpointError, ConfigError, PackageError
from gemma4_onnx.exporter.config_schema import shown, shown_value, validate_config
from gemma4_onnx.exporter.geometry import TextGeometry, text_geometry
from gemma4_onnx.exporter.hf_model import expected_tensors, ignorable_tensors
from gemma4_onnx.exporter.safetensors_io import DTYPES, TensorEntry, read_header, unique_keys
from gemma4_onnx.runtime.package_files import SIDE_FILES, contained_file, safe_relative
from gemma4_onnx.schema import loads_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# ClippableLinear bounds are ±inf when a layer does not clip; every other tensor must be finite.
READ_CHUNK_BYTES = 1 << 30  # one pread returns at most ~2 GiB on Linux: E2B's PLE table is 4.7 GB in bf16
INFINITE_ALLOWED = ("input_min", "input_max", "output_min", "output_max")
MAX_JSON_BYTES = 64 << 20  # config.json and the index: a few KB and a few MB in the released checkpoints
MAX_SHARDS = 512  # each shard stays open while the checkpoint is; released ones have 2 to 30


def _checkpoint_error(exc: PackageError) -> CheckpointError:
    """``package_files``' containment message, worded for a checkpoint."""
    message = str(exc)
    for package_words, checkpoint_words in (("the package directory", "the checkpoint directory"),
                                            ("a package holds plain files only", "a checkpoint is read from "
                                             "plain files only: copy it without links"),
                                            ("outside the package)", "outside the checkpoint)")):
        message = message.replace(package_words, checkpoint_words)
    return CheckpointError(message)


def hub_blob(directory: Path, name: str) -> Path | None:
    """Where Hugging Face's cache keeps ``name`` when ``directory`` is one of its snapshots: the cache writes
    ``<repo>/snapshots/<revision>/<file>`` as a link to ``<repo>/blobs/<hash>``, so the repo folder holds
    both. None for anything else (a plain file, or a link that leads anywhere but that blobs folder)."""
    path = directory / name
    if directory.parent.name != "snapshots" or "/" in name or not path.is_symlink():
        return None
    blobs = directory.parent.parent / "blobs"
    try:
        target = path.resolve(strict=True)
        inside = blobs.is_dir() and not blobs.is_symlink() and target.parent == blobs.resolve()
    except (OSError, RuntimeError):
        return None
    return target if inside else None


def located(directory: Path, name: str, what: str, listed_as: str = "file") -> tuple[Path, os.stat_result]:
    """The path to open for checkpoint file ``name`` and its lstat: a relative path inside ``directory``,
    reached through no symbolic link (but a Hugging Face cache snapshot's link into its own blobs folder), a
    regular file with one hard link (``runtime.package_files``' rules for packages). ``what`` names the file
    in errors, ``listed_as`` where its name came from."""
    try:
        relative = safe_relative(directory, name, listed_as)
        if (blob := hub_blob(directory, name)) is not None:
            return blob, contained_file(blob.parent, PurePosixPath(blob.name), what)
        return directory / relative, contained_file(directory, relative, what)
    except PackageError as exc:
        raise _checkpoint_error(exc) from None


def contained(directory: Path, name: str, what: str, listed_as: str = "file") -> os.stat_result:
    """lstat of checkpoint file ``name`` after the checks of ``located``."""
    return located(directory, name, what, listed_as)[1]


def open_contained(directory: Path, name: str, what: str) -> BinaryIO:
    """``name`` opened for reading after ``located`` passed, without following a link, and checked to be
    the file that was checked."""
    path, info = located(directory, name, what)
    try:  # O_NONBLOCK: a FIFO swapped in after the check cannot block the open
        f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb")
    except OSError as exc:
        raise CheckpointError(f"{directory}: {what} cannot be opened ({exc.strerror})") from None
    opened = os.fstat(f.fileno())
    if (opened.st_ino, opened.st_dev) != (info.st_ino, info.st_dev):
        f.close()
        raise CheckpointError(f"{directory}: {what} changed while it was opened")
    return f


def _read_json(directory: Path, name: str, what: str) -> Any:
    """A contained JSON file of at most ``MAX_JSON_BYTES``, duplicate keys refused; ValueError on bad JSON."""
    with open_contained(directory, name, what) as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"more than {MAX_JSON_BYTES} bytes")
    try:
        return loads_json(raw, object_pairs_hook=unique_keys)
    except ValueError as exc:
        raise ValueError(str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__) from None


def read_config(directory: Path) -> dict[str, Any]:
    """config.json, contained and checked against ``config_schema`` before any field is used."""
    path = directory / "config.json"
    if not os.path.lexists(path):
        raise ConfigError(f"{directory}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = _read_json(directory, "config.json", "config.json")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if model_type != "gemma4" and not (isinstance(architectures, list)
                                       and "Gemma4ForConditionalGeneration" in architectures):
        raise ConfigError(f"{path}: model_type {shown_value(model_type, 60)} / architectures "
                          f"{shown_value(architectures, 80)} is not Gemma 4 (expected model_type 'gemma4', "
                          "Gemma4ForConditionalGeneration)")
    validate_config(config, str(path))
    return config


def check_side_files(directory: Path) -> None:
    """The files an export copies beside the weights (tokenizer, its config, the chat template) are plain
    files inside the checkpoint, refused before anything reads or copies them."""
    for name in SIDE_FILES:
        if os.path.lexists(directory / name):
            contained(directory, name, name)


def _describe(names: list[str]) -> str:
    return shown(names[0]) if len(names) == 1 else f"{shown(names[0])} (and {len(names) - 1} more)"


class Checkpoint:
    """An opened, header-checked checkpoint. Tensors are read on demand, never all at once."""

    def __init__(self, directory: Path, config: dict[str, Any], entries: dict[str, TensorEntry],
                 files: dict[Path, BinaryIO] | None = None) -> None:
        self.directory = directory
        self.config = config
        self.entries = entries
        self.geometry: TextGeometry = text_geometry(config)
        self._files: dict[Path, BinaryIO] = files or {}  # opened once, contained, at open()

    @classmethod
    def open(cls, directory: str | Path, validate: bool = True) -> "Checkpoint":
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        config = read_config(directory)
        check_side_files(directory)
        checkpoint = cls(directory, config, *_read_entries(directory))
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


def _weight_map(directory: Path) -> dict[str, str]:
    """The index's tensor → shard table, checked to be an object of strings naming contained files."""
    index = directory / INDEX_FILE
    try:
        content = _read_json(directory, INDEX_FILE, INDEX_FILE)
    except ValueError as exc:
        raise CheckpointError(f"{index}: corrupt index ({exc})") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: corrupt index (weight_map must be an object of tensor name → shard file)")
    return weight_map


def _read_entries(directory: Path) -> tuple[dict[str, TensorEntry], dict[Path, BinaryIO]]:
    """Every tensor entry of the checkpoint, and its shards, opened (contained) once for all later reads."""
    weight_map: dict[str, str] | None = None
    if os.path.lexists(directory / INDEX_FILE):
        weight_map = _weight_map(directory)
        files = sorted(set(weight_map.values()))
    elif os.path.lexists(directory / SINGLE_FILE):
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    if len(files) > MAX_SHARDS:
        raise CheckpointError(f"{directory / INDEX_FILE}: names {len(files)} shards (at most {MAX_SHARDS})")
    for file in files:  # every name checked before any shard is opened
        if weight_map is None:
            contained(directory, file, SINGLE_FILE)
        else:
            contained(directory, file, f"shard {shown(file)} named in {INDEX_FILE}", f"shard named in {INDEX_FILE}")
    opened: dict[Path, BinaryIO] = {}
    try:
        entries: dict[str, TensorEntry] = {}
        for file in files:
            path = directory / file
            opened[path] = open_contained(directory, file, f"shard {shown(file)}")
            for name, entry in read_header(path, opened[path]).items():
                if name in entries:
                    raise CheckpointError(f"tensor {shown(name)} is stored twice ({entries[name].file.name}, "
                                          f"{shown(file)})")
                entries[name] = entry
        for name, file in (weight_map or {}).items():
            if name not in entries or entries[name].file != directory / file:
                raise CheckpointError(f"missing tensor {shown(name)} ({INDEX_FILE} places it in {shown(file)}, "
                                      "which does not hold it)")
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return entries, opened
