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
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from gemma4_onnx.errors import PackageError
from gemma4_onnx.graphs.external_data import external_entries
from gemma4_onnx.runtime.package_files import (
    SUB_BYTE_BITS,
    graph_dir,
    open_listed_file,
    read_side_file,
    tensor_bytes,
)


def checked_graph(directory: Path, manifest: dict[str, Any], graph_file: str) -> onnx.ModelProto:
    """A graph of a package that passed the gate, parsed (without data) from bytes that still have the
    manifest's sha256, not reread by path."""
    return onnx.load_from_string(_graph_bytes(Path(directory), manifest, graph_file))


def checked_session(directory: Path, manifest: dict[str, Any], graph_file: str, options: ort.SessionOptions,
                    providers: list[str] | None = None) -> ort.InferenceSession:
    """A session over ``graph_file`` of a package that passed the gate, holding the maps it reads."""
    directory = Path(directory)
    data = _graph_bytes(directory, manifest, graph_file)
    providers = providers or ["CPUExecutionProvider"]
    if graph_file.endswith(".ort"):  # the ORT format (mobile packages) carries its weights
        options.add_session_config_entry("session.load_model_format", "ORT")
        return ort.InferenceSession(data, options, providers=providers)
    model = onnx.load_from_string(data)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    maps: dict[str, mmap.mmap] = {}
    values = [_value(directory, manifest, graph_file, t, maps) for t in external]
    if external:
        options.add_external_initializers([t.name for t in external], values)
    session = ort.InferenceSession(data, options, providers=providers)
    session.gemma4_views = (maps, values)  # onnxruntime reads these buffers for as long as the session lives
    return session


def _graph_bytes(directory: Path, manifest: dict[str, Any], graph_file: str) -> bytes:
    data = read_side_file(directory, manifest, graph_file)
    if data is None:
        raise PackageError(f"{directory}: graph {graph_file} is not listed in the manifest")
    return data


def _value(directory: Path, manifest: dict[str, Any], graph_file: str, tensor: TensorProto,
           maps: dict[str, mmap.mmap]) -> ort.OrtValue:
    """An external initializer as an OrtValue over its data file's map (each file mapped once, in ``maps``)."""
    location = data_file(graph_dir(graph_file), tensor)
    if location not in maps:
        maps[location] = map_listed_file(directory, manifest, location)
    if tensor.data_type in SUB_BYTE_BITS:  # no numpy dtype: bytes that onnxruntime reinterprets
        length, offset = tensor_bytes(tensor), int(external_entries(tensor).get("offset", 0))
        holder = np.zeros(tuple(tensor.dims), dtype=np.uint8)  # it reads the first `length` bytes
        holder.reshape(-1)[:length] = np.frombuffer(maps[location], dtype=np.uint8, count=length, offset=offset)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(holder, tensor.data_type)
    return ort.OrtValue.ortvalue_from_numpy(tensor_view(maps[location], tensor))


def data_file(graph_directory: str, tensor: TensorProto) -> str:
    """The package file an external tensor of a graph in ``graph_directory`` lies in."""
    return (PurePosixPath(graph_directory) / external_entries(tensor)["location"]).as_posix()


def tensor_view(mapped: mmap.mmap, tensor: TensorProto) -> np.ndarray:
    """An external tensor of a numpy type, as a view of its data file's map."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    offset = int(external_entries(tensor).get("offset", 0))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(tuple(tensor.dims))


def map_listed_file(directory: Path, manifest: dict[str, Any], name: str) -> mmap.mmap:
    """A listed data file of the package, memory-mapped from a descriptor opened through no link
    (``open_listed_file``), or a one-line error."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise PackageError(f"{directory}: data file {name} is not listed in the manifest")
    fd = open_listed_file(directory, name, entry)
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if entry["bytes"] else mmap.mmap(-1, 1)
    finally:
        os.close(fd)
