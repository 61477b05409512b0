"""onnxruntime sessions that open no file by path.

Given a path, onnxruntime opens the graph and its external data files again, after the package gate
checked them: a file swapped in meanwhile (a hard link to a file outside the package, a graph never
checked) would be read. Here the graph's bytes are read once through no link and must still have the
manifest's sha256, and every external initializer is handed to onnxruntime as a view of a data file this
module opened (through no link, one hard link, the listed size) and memory-mapped
(``SessionOptions.add_external_initializers``): onnxruntime reads only what was checked.
"""

import mmap
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from gemma4_onnx.errors import PackageError
from gemma4_onnx.graphs.external_data import external_entries
from gemma4_onnx.runtime.package_files import contained_file, read_side_file, safe_relative, tensor_bytes

# ONNX types numpy has no dtype for, stored in bytes of this numpy type (onnxruntime reinterprets them)
SUB_BYTE = {TensorProto.UINT4: 2, TensorProto.INT4: 2}


def checked_graph(directory: Path, manifest: dict[str, Any], graph_file: str) -> onnx.ModelProto:
    """A graph of a package that passed the gate, parsed (without data) from bytes that still have the
    manifest's sha256, not reread by path."""
    data = read_side_file(Path(directory), manifest, graph_file)
    if data is None:
        raise PackageError(f"{directory}: graph {graph_file} is not listed in the manifest")
    return onnx.load_from_string(data)


def checked_session(directory: Path, manifest: dict[str, Any], graph_file: str, options: ort.SessionOptions,
                    providers: list[str] | None = None) -> ort.InferenceSession:
    """A session over ``graph_file`` of a package that passed the gate, holding the maps it reads."""
    data = read_side_file(Path(directory), manifest, graph_file)
    if data is None:
        raise PackageError(f"{directory}: graph {graph_file} is not listed in the manifest")
    if graph_file.endswith(".ort"):  # the ORT format (mobile packages) carries its weights
        options.add_session_config_entry("session.load_model_format", "ORT")
        return ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
    views = _ExternalViews(Path(directory), manifest, graph_file)
    model = onnx.load_from_string(data)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    values = [views.value(t) for t in external]
    if external:
        options.add_external_initializers([t.name for t in external], values)
    session = ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
    session.gemma4_views = (views, values)  # onnxruntime reads these buffers for as long as the session lives
    return session


class _ExternalViews:
    """Initializers as views of the package's data files, each opened and mapped once."""

    def __init__(self, directory: Path, manifest: dict[str, Any], graph_file: str) -> None:
        self.directory, self.manifest, self.graph_file = directory, manifest, graph_file
        self._maps: dict[str, mmap.mmap] = {}

    def value(self, tensor: TensorProto) -> ort.OrtValue:
        entries = external_entries(tensor)
        location = (PurePosixPath(self.graph_file).parent / entries["location"]).as_posix()
        if location not in self._maps:
            self._maps[location] = map_listed_file(self.directory, self.manifest, location)
        mapped = self._maps[location]
        offset, length = int(entries.get("offset", 0)), tensor_bytes(tensor)
        shape = tuple(int(d) for d in tensor.dims)
        if tensor.data_type in SUB_BYTE:
            count = int(np.prod(shape, dtype=np.int64))
            packed = np.frombuffer(mapped, dtype=np.uint8, count=length, offset=offset)
            holder = np.zeros(count, dtype=np.uint8)  # onnxruntime reads its first ceil(count/2) bytes
            holder[:length] = packed
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(holder.reshape(shape), tensor.data_type)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = np.frombuffer(mapped, dtype=dtype, count=length // dtype.itemsize, offset=offset).reshape(shape)
        return ort.OrtValue.ortvalue_from_numpy(array)


def map_listed_file(directory: Path, manifest: dict[str, Any], name: str) -> mmap.mmap:
    """A listed data file of the package, memory-mapped from a descriptor opened through no link: the file
    the gate checked at that name (one hard link, the listed size), or a one-line error."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise PackageError(f"{directory}: data file {name} is not listed in the manifest")
    info = contained_file(directory, safe_relative(directory, name, "data file"), f"package file {name}")
    fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        opened = os.fstat(fd)
        if ((opened.st_ino, opened.st_dev) != (info.st_ino, info.st_dev) or not stat.S_ISREG(opened.st_mode)
                or opened.st_nlink != 1 or opened.st_size != entry["bytes"]):
            raise PackageError(f"{directory}: package file {name} changed while it was read")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if opened.st_size else mmap.mmap(-1, 1)
    finally:
        os.close(fd)
