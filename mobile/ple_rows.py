"""Per-layer embeddings kept out of the embed graph, so that no runtime can load the table into RAM.

Gemma 4's E-models look up a second table, [V, L·P], by the same ids as the token embedding (E2B: 262144 ×
35·256, 9.4 GB in fp32). An ``.ort`` file stores every initializer inside itself, so a table left in the
embed graph would come back into the model file and into memory. Instead every Gather that reads from the
PLE file becomes a graph input holding the gathered rows, and the app reads just those rows from the
row file (``ple.data``, unchanged from the package: each table contiguous, row-major, at a known offset):

    before:  ids ─► Gather(table) ─► rows ─► dequantize / scale ─► per_layer_inputs
    after:   app: rows = table_in_file[ids]  ─► input "ple_rows.<table>" ─► dequantize / scale ─► per_layer_inputs

The ids the graph gathered with are ``input_ids`` after replacing multimodal placeholder ids by the pad id
(``exporter/embed.py``); the manifest's ``ple.remap`` says which.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.external_data import external_entries

ROWS_PREFIX = "ple_rows."


@dataclass(frozen=True)
class RowTable:
    """One table in the row file: graph input ``input`` takes ``table[ids]`` of shape [batch, sequence, *row]."""

    input: str
    tensor: str
    file: str
    offset: int
    rows: int
    row: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.input, "tensor": self.tensor, "file": self.file, "offset": self.offset,
                "rows": self.rows, "row_shape": list(self.row), "dtype": self.dtype, "row_bytes": self.row_bytes}


def split_ple(model: onnx.ModelProto, ple_file: str) -> tuple[onnx.ModelProto, list[RowTable]]:
    """``model`` (functions inlined) with each PLE Gather replaced by an input of gathered rows."""
    graph = model.graph
    tables = {t.name: t for t in graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL and external_entries(t).get("location") == ple_file}
    if not tables:
        return model, []
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and n.input[0] in tables]
    for node in graph.node:
        for name in node.input:
            if name in tables and node not in gathers:
                raise UsageError(f"{name} is read by {node.op_type} {node.name!r}, not only gathered: it cannot "
                                 "stay out of the embed graph")
    if any(a.name == "axis" and a.i != 0 for n in gathers for a in n.attribute):
        raise UsageError("a per-layer embedding table is gathered along an axis other than 0")
    renamed: dict[str, str] = {}
    out: list[RowTable] = []
    for node in gathers:
        tensor = tables[node.input[0]]
        name = ROWS_PREFIX + tensor.name
        renamed[node.output[0]] = name
        if any(t.input == name for t in out):
            continue
        entries = external_entries(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        out.append(RowTable(name, tensor.name, ple_file, int(entries.get("offset", 0)), int(tensor.dims[0]),
                            tuple(int(d) for d in tensor.dims[1:]), np.dtype(dtype).name))
        graph.input.append(onnx.helper.make_tensor_value_info(
            name, tensor.data_type, ["batch", "sequence", *(int(d) for d in tensor.dims[1:])]))
    kept = [n for n in graph.node if n not in gathers]
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    kept_inits = [t for t in graph.initializer if t.name not in tables]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    return model, out


def open_rows(directory: Path, table: RowTable) -> np.ndarray:
    """The table as a read-only memory map: indexing it reads only the rows asked for."""
    return np.memmap(directory / table.file, dtype=table.dtype, mode="r", offset=table.offset,
                     shape=(table.rows, *table.row))


def table_from_dict(entry: dict[str, Any]) -> RowTable:
    return RowTable(entry["input"], entry["tensor"], entry["file"], int(entry["offset"]), int(entry["rows"]),
                    tuple(entry["row_shape"]), entry["dtype"])
