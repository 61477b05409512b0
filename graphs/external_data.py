"""External-data files written by hand, tensor by tensor, in a layout this project chooses.

onnx's own ``save_model(..., save_as_external_data=True)`` needs every tensor in memory at once, puts
all of them in one file, and appends to an existing file. Gemma 4's per-layer embedding table must
instead live alone in ``ple.data`` so a device can memory-map it and touch only the rows of the tokens
in use; every other weight goes to other files. Large tensors start on 64 KiB boundaries (the
allocation granularity onnxruntime needs to memory-map them on every OS); files are always written
fresh, never appended to.
"""

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import onnx
from onnx import TensorProto

Loader = Callable[[], np.ndarray | Iterator[np.ndarray]]  # an array, or consecutive chunks of it
LoaderEntry = tuple[Loader, tuple[int, ...], np.dtype]  # a tensor's loader, shape and dtype
PAGE = 1 << 16  # 64 KiB: mmap granularity on Windows, a multiple of the 4 KiB page elsewhere
SMALL_ALIGN = 64
LARGE_TENSOR_BYTES = 1 << 20


class DataFile:
    """One external-data file being written; ``add`` returns an initializer that points into it."""

    def __init__(self, directory: Path, location: str, write: bool = True) -> None:
        self.location = location
        self.path = directory / location
        self._file = None
        if write:  # without writing, only the layout is computed (structure-only exports)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("xb")  # fresh, never appended to
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        data = np.ascontiguousarray(array)
        return self._place(name, data.shape, data.dtype, [data])

    def add_chunks(self, name: str, shape: tuple[int, ...], dtype: np.dtype,
                   chunks: Iterable[np.ndarray]) -> TensorProto:
        """A tensor written from consecutive chunks of its flattened values (one chunk in memory at a time)."""
        return self._place(name, shape, np.dtype(dtype), chunks)

    def reserve(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> TensorProto:
        """The initializer ``add`` would return, without data."""
        return self._place(name, shape, np.dtype(dtype), None)

    def _place(self, name: str, shape: tuple[int, ...], dtype: np.dtype,
               chunks: Iterable[np.ndarray] | None) -> TensorProto:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        align = PAGE if nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGN
        pad = -self.offset % align
        if self._file is not None:
            self._file.write(b"\0" * pad)
            assert chunks is not None
            written = 0
            for chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype=dtype)
                self._file.write(memoryview(data.reshape(-1).view(np.uint8).data))
                written += data.nbytes
            if written != nbytes:
                raise ValueError(f"{name}: {written} bytes written for shape {list(shape)} ({nbytes} expected)")
        self.offset += pad
        tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += nbytes
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "DataFile":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def external_entries(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


class PackageWriter:
    """Writes a package's initializers into its data files, each tensor once: graphs in subfolders
    (``blocks/``) and at the root share the same bytes through relocated references."""

    def __init__(self, root: Path, structure_only: bool = False) -> None:
        self.root = root
        self.structure_only = structure_only
        self.files: dict[str, DataFile] = {}
        self.written: dict[str, TensorProto] = {}
        # structure only: what would have been written, for a later reader (``export --recipe``)
        self.loaders: dict[str, LoaderEntry] = {}

    def add(self, name: str, location: str, load: Loader,
            shape: tuple[int, ...] | None = None, dtype: np.dtype | type = np.float32) -> TensorProto:
        """Write ``load()`` (or, structure only, reserve ``shape``) under ``name`` into ``location``.
        ``load`` returns the array, or an iterator of consecutive chunks of it (``shape`` then required)."""
        if name not in self.written:
            if location not in self.files:
                self.files[location] = DataFile(self.root, location, write=not self.structure_only)
            if self.structure_only:
                if shape is None:
                    loaded = load()
                    assert isinstance(loaded, np.ndarray)
                    shape, dtype = loaded.shape, loaded.dtype
                self.written[name] = self.files[location].reserve(name, shape, np.dtype(dtype))
                self.loaders[name] = (load, tuple(shape), np.dtype(dtype))
            else:
                loaded = load()
                if isinstance(loaded, np.ndarray):
                    self.written[name] = self.files[location].add(name, loaded)
                else:
                    assert shape is not None
                    self.written[name] = self.files[location].add_chunks(name, shape, np.dtype(dtype), loaded)
        return self.written[name]

    def alias(self, name: str, of: str, dims: tuple[int, ...], data_type: int) -> TensorProto:
        """A second view of already written bytes, with other dims and element type (no copy)."""
        if name not in self.written:
            tensor = TensorProto()
            tensor.CopyFrom(self.written[of])
            tensor.name = name
            del tensor.dims[:]
            tensor.dims.extend(dims)
            tensor.data_type = data_type
            self.written[name] = tensor
        return self.written[name]

    def adopt(self, tensor: TensorProto, graph_dir: str) -> None:
        """A tensor already in a finished file (seen from a graph in ``graph_dir``), known from now on."""
        if tensor.name not in self.written:
            adopted = TensorProto()
            adopted.CopyFrom(tensor)
            for entry in adopted.external_data:
                if entry.key == "location" and graph_dir:
                    entry.value = (Path(graph_dir) / entry.value).as_posix()
            self.written[tensor.name] = adopted

    def finish(self, location: str) -> None:
        """Close ``location`` and put its bytes on disk: nothing more is written to it."""
        data = self.files.get(location)
        if data is not None and data._file is not None:
            data._file.flush()
            os.fsync(data._file.fileno())
            data.close()

    def relocated(self, name: str, graph_dir: str) -> TensorProto:
        """The initializer as seen from a graph in ``graph_dir`` (a subfolder of the package, or "")."""
        tensor = TensorProto()
        tensor.CopyFrom(self.written[name])
        for entry in tensor.external_data:
            if entry.key == "location" and graph_dir:
                entry.value = Path(entry.value).relative_to(graph_dir).as_posix()
        return tensor

    def close(self) -> None:
        for f in self.files.values():
            f.close()
