"""safetensors headers read and written by hand, so files are checked before any tensor is touched
and written tensor by tensor without holding a shard in memory.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets relative
to the first byte after the header), then the raw little-endian data.
"""

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gemma4_onnx.errors import CheckpointError

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


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor entry of one safetensors file, with truncation and overlap checked."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path.name}: corrupt safetensors header (declares {n} header bytes, "
                                      f"file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not an object)")
    entries = {}
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name} declares {end - begin} bytes for shape "
                                  f"{list(shape)} {dtype} ({expected} expected)")
        if data_start + end > size:
            raise CheckpointError(f"{path.name}: truncated: tensor {name} ends at byte {data_start + end}, "
                                  f"file has {size}")
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
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
