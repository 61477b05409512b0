"""Where quantization reads float weights: an exported float package (its data files, memory-mapped), or
an export in progress (``export --recipe``: each tensor produced from the checkpoint, or the variant's
random weights, when quantization asks for it, and never written in float).

Both hand out the same float32 values in the same pieces (``ROW_CHUNK`` rows at a time), so a package
quantized after its export and one quantized while exporting hold identical bytes.
"""

import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from gemma4_onnx.graphs.external_data import LoaderEntry
from gemma4_onnx.runtime.checked_session import data_file, map_listed_file, tensor_view

ROW_CHUNK = 4096


class FloatTensors(Protocol):
    def array(self, tensor: onnx.TensorProto, graph_dir: str) -> np.ndarray:
        """The whole tensor (one layer's weights, an expert stack), in its stored type."""
        ...

    def row_chunks(self, tensor: onnx.TensorProto, graph_dir: str) -> Iterator[np.ndarray]:
        """The tensor ``ROW_CHUNK`` rows at a time (the last chunk shorter), only one chunk in memory."""
        ...


def _regrouped(chunks: Iterable[np.ndarray], row_shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """Consecutive chunks of whole rows (any lengths) as chunks of exactly ``ROW_CHUNK`` rows."""
    pending: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        rows = np.asarray(chunk, dtype=dtype).reshape(-1, *row_shape)
        while len(rows):
            take = rows[:ROW_CHUNK - held]
            pending.append(take)
            held += len(take)
            rows = rows[len(take):]
            if held == ROW_CHUNK:
                yield np.concatenate(pending)
                pending, held = [], 0
    if pending:
        yield np.concatenate(pending)


class PackageTensors:
    """The initializers of a float package's graphs, read from its data files through descriptors opened
    here (``map_listed_file``: no link, the file the gate checked), one map per read."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    def _map(self, tensor: onnx.TensorProto, graph_dir: str) -> mmap.mmap:
        return map_listed_file(self.root, self.manifest, data_file(graph_dir, tensor))

    def array(self, tensor: onnx.TensorProto, graph_dir: str) -> np.ndarray:
        mapped = self._map(tensor, graph_dir)
        copy = np.array(tensor_view(mapped, tensor))
        mapped.close()
        return copy

    def row_chunks(self, tensor: onnx.TensorProto, graph_dir: str) -> Iterator[np.ndarray]:
        """Pages of the map that were read stay resident, and count, until the process drops them: each
        chunk's pages are let go once it is copied (E2B's PLE table is 9.4 GB in fp32)."""
        mapped = self._map(tensor, graph_dir)
        view = tensor_view(mapped, tensor)
        if view.ndim == 0:
            yield np.array(view)
            return
        for start in range(0, len(view), ROW_CHUNK):
            chunk = np.array(view[start:start + ROW_CHUNK])
            mapped.madvise(mmap.MADV_DONTNEED)
            yield chunk


class StreamedTensors:
    """The initializers of an export in progress, by name: each read from the export's source (through the
    loader the export's writer was given) every time it is asked for."""

    def __init__(self, loaders: dict[str, LoaderEntry]) -> None:
        self.loaders = loaders

    def _chunks(self, name: str) -> Iterator[np.ndarray]:
        loaded = self.loaders[name][0]()
        return iter([loaded]) if isinstance(loaded, np.ndarray) else loaded

    def array(self, tensor: onnx.TensorProto, graph_dir: str) -> np.ndarray:
        _, shape, dtype = self.loaders[tensor.name]
        return np.concatenate([np.asarray(c, dtype=dtype).reshape(-1) for c in self._chunks(tensor.name)]
                              ).reshape(shape)

    def row_chunks(self, tensor: onnx.TensorProto, graph_dir: str) -> Iterator[np.ndarray]:
        _, shape, dtype = self.loaders[tensor.name]
        if not shape:
            return iter([self.array(tensor, graph_dir)])
        return _regrouped(self._chunks(tensor.name), shape[1:], dtype)
