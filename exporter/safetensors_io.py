"""safetensors headers read and written by hand, so files are checked before any tensor is touched
and written tensor by tensor without holding a shard in memory.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets relative
to the first byte after the header), then the raw little-endian data.
"""

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gemma4_onnx.errors import CheckpointError
from gemma4_onnx.exporter.config_schema import shown, shown_value
from gemma4_onnx.schema import loads_json

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


MAX_RANK = 8
MAX_DIMENSION = 1 << 40  # the bytes check against the file's size bounds every tensor; this bounds the product
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (readers disagree on which value wins)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for ``json.loads`` that refuses duplicate keys."""
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"key {shown(key)} appears twice")
        seen[key] = value
    return seen


class _HeaderProblem(ValueError):
    """What is wrong with a header, before the file's name is added."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: object, data_start: int, size: int, path: Path) -> TensorEntry:
    """One header entry, checked: its keys, dtype, shape and byte range, within the file."""
    if not isinstance(info, dict) or set(info) != ENTRY_KEYS:
        raise _HeaderProblem(f"entry of tensor {shown(name)} must be an object with exactly dtype, shape, "
                             "data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _HeaderProblem(f"tensor {shown(name)} has unsupported dtype {shown_value(dtype, 40)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(_is_int(d) and 0 <= d <= MAX_DIMENSION for d in shape)):
        raise _HeaderProblem(f"tensor {shown(name)}: shape {shown_value(shape, 60)} is not a list of at most "
                             f"{MAX_RANK} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise _HeaderProblem(f"tensor {shown(name)}: data_offsets {shown_value(offsets, 60)} is not a list of two "
                             "integers")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if begin < 0 or end - begin != expected:
        raise _HeaderProblem(f"tensor {shown(name)} declares bytes {begin}..{end} for shape {shape} {dtype} "
                             f"({expected} bytes expected)")
    if data_start + end > size:
        raise _HeaderProblem(f"truncated: tensor {shown(name)} ends at byte {data_start + end}, file has {size}")
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(entries: dict[str, TensorEntry]) -> None:
    previous: TensorEntry | None = None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise _HeaderProblem(f"tensors {shown(previous.name)} and {shown(entry.name)} overlap (bytes "
                                 f"{previous.begin}..{previous.end} and {entry.begin}..{entry.end})")
        if entry.end > entry.begin:
            previous = entry


def _raw_header(path: Path, f: BinaryIO) -> tuple[bytes, int, int]:
    """The header's bytes, where the data starts, and the file's size."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path.name}: corrupt safetensors header (declares {n} header bytes, file has {size})")
    return f.read(n), 8 + n, size


def read_header(path: Path, f: BinaryIO | None = None) -> dict[str, TensorEntry]:
    """Every tensor entry of one safetensors file (read from ``f`` when given, an already opened ``path``),
    checked: a JSON object without duplicate keys, known dtypes, integer shapes and offsets, each tensor's
    bytes within the file and no two tensors overlapping."""
    try:
        if f is None:
            with path.open("rb") as opened:
                raw, data_start, size = _raw_header(path, opened)
        else:
            raw, data_start, size = _raw_header(path, f)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read: {exc.strerror}") from None
    try:
        header = loads_json(raw, object_pairs_hook=unique_keys)
    except DuplicateKeyError as exc:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({exc})") from None
    except ValueError as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON: {reason})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not an object)")
    try:
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _HeaderProblem("__metadata__ must be an object of strings")
        entries = {name: _entry(name, info, data_start, size, path) for name, info in header.items()}
        _check_no_overlap(entries)
    except _HeaderProblem as exc:
        message = str(exc)
        raise CheckpointError(f"{path.name}: " + (message if message.startswith("truncated") else
                                                  f"corrupt safetensors header ({message})")) from None
    return entries


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype, and a callable yielding its data in row chunks."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterator[torch.Tensor]]


def write_streaming(path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file; only one chunk of one tensor is in memory at a time."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            _write_tensor(f, t)


def _write_tensor(f: BinaryIO, t: PlannedTensor) -> None:
    written = 0
    for chunk in t.chunks():
        data = chunk.to(t.dtype).contiguous().reshape(-1)
        f.write(data.view(torch.uint8).numpy().data)
        written += data.numel()
    if written != math.prod(t.shape):
        raise RuntimeError(f"{t.name}: wrote {written} values for shape {list(t.shape)}")
