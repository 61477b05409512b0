"""A graph of a package run by onnxruntime with its float weights fed as inputs, not stored in it: the
in-memory graph stays small whatever the layer's size (protobuf stops at 2 GB), and the weights come
from any ``FloatTensors`` source, read once per session."""

import numpy as np
import onnx
import onnxruntime as ort

from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.runtime.text_model import session_options


def _cut_rows(tensors: FloatTensors, tensor: onnx.TensorProto, graph_dir: str, rows: np.ndarray,
              at: np.ndarray) -> np.ndarray:
    """A table holding only ``rows`` of ``tensor``, row ``rows[i]`` at index ``at[i]`` (the rest zero); the
    table is read a chunk of rows at a time."""
    out: np.ndarray | None = None
    start = 0
    for chunk in tensors.row_chunks(tensor, graph_dir):
        if out is None:
            out = np.zeros((int(at.max()) + 1, *chunk.shape[1:]), chunk.dtype)
        wanted = (rows >= start) & (rows < start + len(chunk))
        out[at[wanted]] = chunk[rows[wanted] - start]
        start += len(chunk)
    assert out is not None
    return out


class WeightFedSession:
    def __init__(self, model: onnx.ModelProto, tensors: FloatTensors, graph_dir: str,
                 cut_tables: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """``cut_tables``: table name → (rows, at): feed only those rows (see ``_cut_rows``)."""
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        graph = self.model.graph
        self.weights: dict[str, np.ndarray] = {}
        kept = []
        for tensor in graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                kept.append(tensor)
                continue
            if cut_tables and tensor.name in cut_tables:
                self.weights[tensor.name] = _cut_rows(tensors, tensor, graph_dir, *cut_tables[tensor.name])
            else:
                self.weights[tensor.name] = tensors.array(tensor, graph_dir)
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, [None] * len(tensor.dims)))
        del graph.initializer[:]
        graph.initializer.extend(kept)
        self._session: ort.InferenceSession | None = None  # made on first use, after ``expose``

    def expose(self, names: list[str]) -> None:
        """Intermediate values also returned by ``run_all``."""
        present = {o.name for o in self.model.graph.output}
        for name in names:
            if name not in present:
                self.model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self._session = None  # made on first use, after ``expose``

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = ort.InferenceSession(self.model.SerializeToString(), session_options(),
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def run(self, names: list[str], feeds: dict[str, np.ndarray],
            replaced: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """``replaced`` stands in for some float weights in this run (a tensor quantized and dequantized)."""
        wanted = {i.name for i in self.session.get_inputs()}
        all_feeds = {**self.weights, **{k: v for k, v in feeds.items() if k in wanted}, **(replaced or {})}
        return list(self.session.run(names, all_feeds))

    def run_all(self, feeds: dict[str, np.ndarray],
                replaced: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.run(names, feeds, replaced), strict=True))


def subgraph(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The nodes of ``model`` that compute ``outputs`` from ``inputs`` (and initializers), as a model."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name: t for t in model.graph.initializer}
    needed: list[onnx.NodeProto] = []
    seen: set[str] = set(inputs)
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen or name in initializers or not name:
            continue
        seen.add(name)
        node = producers[name]
        if node not in needed:
            needed.append(node)
            stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    needed.sort(key=lambda n: order[id(n)])
    used = {name for node in needed for name in node.input}
    graph = onnx.helper.make_graph(
        needed, f"{model.graph.name}.part",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in inputs],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
        [t for name, t in initializers.items() if name in used])
    part = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions))
    part.ir_version = model.ir_version
    return part
