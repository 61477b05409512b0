"""Applying a plan to an exported package: a new package with the same layout, weights quantized.

Blockwise weights come from onnxruntime's own MatMulNBits kernels (``quantize_matmul_4bits`` /
``_8bits``, the ones its MatMulNBitsQuantizer calls), and run in its ``MatMulNBits`` and
``GatherBlockQuantized`` ops. The graph rewrite itself is written here because onnxruntime's
quantizer needs the whole model in memory and a MatMul whose weight is a [K, N] initializer, while
these graphs keep the checkpoint's [N, K] weights (read through a Transpose) under their checkpoint
names, and the PLE table must stay alone in its own file. One quantized copy of the token embedding
serves both the embedding lookup (GatherBlockQuantized) and the tied LM head (MatMulNBits): the two
ops read the same [V, H/block, block] layout.

    x ─MatMul(Transpose(W))─► y          becomes   x ─MatMulNBits(W_q, scales, zero_points)─► y
    ids ─Gather(E)─► e                   becomes   ids ─GatherBlockQuantized(E_q, scales, zero_points)─► e
"""

import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from gemma4_onnx.errors import NotBuiltYet, UsageError
from gemma4_onnx.graphs.domain import ORT_CONTRIB_DOMAIN, import_ort_contrib
from gemma4_onnx.graphs.external_data import PackageWriter, external_entries
from gemma4_onnx.graphs.topk_moe import NBITS
from gemma4_onnx.quantize.blockwise import blockwise
from gemma4_onnx.quantize.calibration import ExpertHessians, Hessians
from gemma4_onnx.quantize.experts import (
    DOWN,
    GATE_UP,
    attach_nbits_function,
    dequantize,
    is_topk_moe,
    nbits_node,
    quantize_experts,
)
from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.quantize.gptq import reused_factors
from gemma4_onnx.quantize.plan import Entry
from gemma4_onnx.quantize.recipe import Decision

# MatMulNBits computes in fp32 at level 1; level 4 rounds the activations to int8 (recipe key
# ``activations = "int8"``): 8-bit weights at level 1 are dequantized on every call by onnxruntime's CPU
# kernel (1024×1024, one token: 2.66 ms, against 0.06 ms at level 4 and 0.14 ms for 4-bit at level 1).
ACCURACY_LEVEL = 1
INT8_ACTIVATIONS_LEVEL = 4
PLAN_KEY = "gemma4_onnx.quantization_plan"


def quantized_names(name: str, decision: Decision) -> list[str]:
    """The initializers a quantized tensor becomes: packed codes, scales, zero points."""
    return [f"{name}.q{decision.bits}", f"{name}.scales", f"{name}.zero_points"]


class _Graph:
    """One graph being rewritten: producers and consumers of values, by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def replace(self, old: onnx.NodeProto, new: onnx.NodeProto) -> None:
        nodes = list(self.graph.node)
        nodes[nodes.index(old)] = new
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def remove(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)


class Quantizer:
    def __init__(self, tensors: FloatTensors, staging: Path, plan: list[Entry], ple_dim: int) -> None:
        self.tensors = tensors
        self.hessians: Hessians = {}  # of the weights being quantized now (``calibration``)
        self.ple_dim = ple_dim
        self.plan = {e.candidate.name: e for e in plan}
        self.writer = PackageWriter(staging)
        self.sources: dict[str, tuple[onnx.TensorProto, str]] = {}  # name → (tensor, its graph dir)
        self.quantized_names: list[str] = []
        self.dequantized: dict[str, np.ndarray] | None = None  # when a dict: each tensor quantized, as it reads back

    def adopt(self, model: onnx.ModelProto, source: onnx.ModelProto, graph_dir: str) -> None:
        """Take over the tensors of a graph an interrupted run already wrote (``resume``) from ``source``:
        later graphs refer to them instead of writing them again."""
        float_names = {t.name for t in source.graph.initializer}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                self.writer.adopt(tensor, graph_dir)
                if tensor.name not in float_names:
                    self.quantized_names.append(tensor.name)

    def _location(self, name: str) -> str:
        tensor, graph_dir = self.sources[name]
        return (Path(graph_dir) / external_entries(tensor)["location"]).as_posix()

    def _quantized(self, name: str) -> tuple[list[str], Decision]:
        """Names of (packed, scales, zero points) of a quantized tensor, written once; [E, N, K] expert
        stacks are quantized one expert at a time."""
        decision = self.plan[name].decision
        names = quantized_names(name, decision)
        if names[0] not in self.writer.written:
            tensor, graph_dir = self.sources[name]
            statistics = self.hessians.get(name)
            if len(tensor.dims) == 3:
                assert statistics is None or isinstance(statistics, ExpertHessians)
                packed, scales, zero_points = quantize_experts(self.tensors.array(tensor, graph_dir), decision,
                                                               statistics)
            else:
                assert statistics is None or isinstance(statistics, np.ndarray)
                packed, scales, zero_points = blockwise_rows(self.tensors.row_chunks(tensor, graph_dir),
                                                             int(tensor.dims[0]), decision, statistics)
            self._write(names, (packed, scales.astype(np.float16), zero_points), self._location(name))
            if self.dequantized is not None:
                self.dequantized[name] = _read_back(packed, scales.astype(np.float16), zero_points, decision,
                                                    int(tensor.dims[-1]))
            if self.plan[name].candidate.kind == "embedding" and decision.bits == 4 and scales.shape[1] % 2:
                self._write([gathered_zero_points(name)], (nibbles_across_rows(zero_points, scales.shape[1]),),
                            self._location(name))
        return names, decision

    def _write(self, names: list[str], arrays: tuple[np.ndarray, ...], location: str) -> None:
        for name, array in zip(names, arrays, strict=True):
            self.writer.add(name, location, functools.partial(np.asarray, array))
            self.quantized_names.append(name)

    def _scales32(self, scales: str) -> str:
        """Scales are stored in fp16 (2 bytes per block); the ops take the activations' fp32."""
        name = f"{scales}.float32"
        if name not in self.casts:
            self.casts[name] = helper.make_node("Cast", [scales], [name], name=f"{scales}.cast",
                                                to=onnx.TensorProto.FLOAT)
        return name

    def rewrite(self, model: onnx.ModelProto, graph_dir: str) -> onnx.ModelProto:
        graph = _Graph(model)
        for tensor in model.graph.initializer:
            self.sources.setdefault(tensor.name, (tensor, graph_dir))
        kept: list[onnx.TensorProto] = []
        self.constants: list[onnx.TensorProto] = []
        self.casts: dict[str, onnx.NodeProto] = {}
        for tensor in list(model.graph.initializer):
            entry = self.plan.get(tensor.name)
            if entry is not None and entry.decision.quantized:
                for node in list(graph.consumers.get(tensor.name, [])):
                    if node.op_type == "Transpose":
                        self._matmul(graph, node, tensor)
                    elif node.op_type == "Gather" and node.input[0] == tensor.name and entry.candidate.kind == "ple":
                        self._gather_slices(graph, node, tensor)
                    elif node.op_type == "Gather" and node.input[0] == tensor.name:
                        self._gather(graph, node, tensor)
                    elif is_topk_moe(node):
                        self._topk_moe(graph, node)
                    else:
                        raise NotBuiltYet(f"quantizing {tensor.name} as used by {node.op_type}")
            elif tensor.data_location == onnx.TensorProto.EXTERNAL:
                self.writer.add(tensor.name, self._location(tensor.name),
                                functools.partial(self.tensors.row_chunks, tensor, graph_dir), tuple(tensor.dims),
                                onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
                kept.append(self.writer.relocated(tensor.name, graph_dir))
            else:
                kept.append(tensor)
        for offset, node in enumerate(self.casts.values()):
            model.graph.node.insert(offset, node)
        if any(is_topk_moe(n) and n.overload == NBITS for n in model.graph.node):
            attach_nbits_function(model)
        used = _inputs(model)
        added = [self.writer.relocated(n, graph_dir) for n in self.quantized_names if n in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept + added + self.constants)
        if any(n.domain == ORT_CONTRIB_DOMAIN for n in model.graph.node):
            import_ort_contrib(model)
        return model

    def _matmul(self, graph: _Graph, transpose: onnx.NodeProto, tensor: onnx.TensorProto) -> None:
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        matmuls = graph.consumers.get(transpose.output[0], [])
        if perm != [1, 0] or not matmuls or any(m.op_type != "MatMul" or m.input[1] != transpose.output[0]
                                               for m in matmuls):
            raise NotBuiltYet(f"quantizing {tensor.name} in this graph pattern")
        (packed, scales, zero_points), decision = self._quantized(tensor.name)
        n, k = tensor.dims
        for matmul in matmuls:
            inputs = [matmul.input[0], packed, self._scales32(scales)] + ([] if decision.symmetric else [zero_points])
            graph.replace(matmul, helper.make_node(
                "MatMulNBits", inputs, list(matmul.output), name=matmul.name + "_nbits", domain=ORT_CONTRIB_DOMAIN,
                K=int(k), N=int(n), bits=decision.bits, block_size=decision.block_size,
                accuracy_level=INT8_ACTIVATIONS_LEVEL if decision.activations == "int8" else ACCURACY_LEVEL))
        graph.remove(transpose)

    def _gather_slices(self, graph: _Graph, gather: onnx.NodeProto, tensor: onnx.TensorProto) -> None:
        """The PLE table [V, L·P] quantized with scales per layer slice: a block never straddles two
        layers' P-wide slices (its block divides P: ``plan.fitted``). Written with standard ops because
        GatherBlockQuantized takes only blocks of 16 … 256 in powers of two, while P may be 8 or 24; only
        the gathered rows are read and dequantized.

            ids ─Gather(codes)─[unpack nibbles]─Cast─Reshape[…, blocks, block]─Sub(Gather(zero_points))
                ─Mul(Gather(scales))─Reshape[…, L·P] ─► per-layer token part
        """
        decision = self.plan[tensor.name].decision
        rows, width = (int(d) for d in tensor.dims)
        block = decision.block_size
        assert self.ple_dim % block == 0 and (decision.bits == 8 or block % 2 == 0), "plan.fitted decides PLE blocks"
        names = quantized_names(tensor.name, decision)
        if names[0] not in self.writer.written:
            source, graph_dir = self.sources[tensor.name]
            scales: list[np.ndarray] = []
            zero_points: list[np.ndarray] = []

            def packed_rows() -> Iterator[np.ndarray]:
                """The codes, written as each chunk of rows is quantized (E2B's table: 2.35 GB at int8)."""
                for chunk in self.tensors.row_chunks(source, graph_dir):
                    packed, chunk_scales, chunk_zeros = blockwise(np.asarray(chunk, dtype=np.float32), decision)
                    if decision.bits == 4:  # one zero point per byte here: the graph gathers them unpacked
                        chunk_zeros = np.stack([chunk_zeros & 15, chunk_zeros >> 4], -1).reshape(len(chunk), -1)
                    scales.append(chunk_scales.astype(np.float16))
                    zero_points.append(chunk_zeros[:, : width // block])
                    yield packed.reshape(len(chunk), -1)

            assert decision.bits is not None
            location = self._location(tensor.name)
            self.writer.add(names[0], location, packed_rows, (rows, width * decision.bits // 8), np.uint8)
            self.quantized_names.append(names[0])
            self._write(names[1:], (np.concatenate(scales), np.concatenate(zero_points)), location)
        out, ids = gather.output[0], gather.input[1]
        p = f"{gather.name or out}.dequant"
        consts: dict[str, np.ndarray] = {f"{p}.blocks_shape": np.array([0, 0, width // block, block], np.int64),
                  f"{p}.row_shape": np.array([0, 0, width], np.int64), f"{p}.last": np.array([-1], np.int64),
                  f"{p}.four": np.array(4, np.uint8), f"{p}.mask": np.array(15, np.uint8)}
        nodes = [helper.make_node("Gather", [names[0], ids], [f"{p}.codes"], axis=0)]
        codes = f"{p}.codes"
        if decision.bits == 4:
            nodes += [
                helper.make_node("BitwiseAnd", [codes, f"{p}.mask"], [f"{p}.low"]),
                helper.make_node("BitShift", [codes, f"{p}.four"], [f"{p}.high"], direction="RIGHT"),
                helper.make_node("Unsqueeze", [f"{p}.low", f"{p}.last"], [f"{p}.low1"]),
                helper.make_node("Unsqueeze", [f"{p}.high", f"{p}.last"], [f"{p}.high1"]),
                helper.make_node("Concat", [f"{p}.low1", f"{p}.high1"], [f"{p}.pairs"], axis=-1),
                helper.make_node("Reshape", [f"{p}.pairs", f"{p}.row_shape"], [f"{p}.unpacked"]),
            ]
            codes = f"{p}.unpacked"
        nodes += [
            helper.make_node("Cast", [codes], [f"{p}.float"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}.float", f"{p}.blocks_shape"], [f"{p}.blocked"]),
            helper.make_node("Gather", [names[2], ids], [f"{p}.zp8"], axis=0),
            helper.make_node("Cast", [f"{p}.zp8"], [f"{p}.zp"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}.zp", f"{p}.last"], [f"{p}.zp1"]),
            helper.make_node("Gather", [names[1], ids], [f"{p}.scale16"], axis=0),
            helper.make_node("Cast", [f"{p}.scale16"], [f"{p}.scale"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}.scale", f"{p}.last"], [f"{p}.scale1"]),
            helper.make_node("Sub", [f"{p}.blocked", f"{p}.zp1"], [f"{p}.centered"]),
            helper.make_node("Mul", [f"{p}.centered", f"{p}.scale1"], [f"{p}.values"]),
            helper.make_node("Reshape", [f"{p}.values", f"{p}.row_shape"], [out]),
        ]
        index = list(graph.graph.node).index(gather)
        graph.remove(gather)
        for offset, node in enumerate(nodes):
            graph.graph.node.insert(index + offset, node)
        self.constants += [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()]

    def _topk_moe(self, graph: _Graph, node: onnx.NodeProto) -> None:
        """Both expert stacks of a TopKMoE node quantized; the node becomes ``TopKMoE:nbits``."""
        if node.overload == NBITS or node not in graph.graph.node:
            return
        gate_up, down = node.input[GATE_UP], node.input[DOWN]
        for name in (gate_up, down):
            if name not in self.plan or not self.plan[name].decision.quantized:
                raise UsageError(f"{gate_up} and {down} must be quantized together or not at all")
            if self.plan[name].decision.activations != "float":
                raise UsageError(f"{name}: activations = \"int8\" applies to linear weights and the LM head, not to "
                                 f"MoE experts (rule {self.plan[name].rule!r})")
        gate_up_names, gate_up_decision = self._quantized(gate_up)
        down_names, down_decision = self._quantized(down)
        shape = tuple(int(d) for d in self.sources[gate_up][0].dims)
        new = nbits_node(node, gate_up_names, down_names, gate_up_decision, down_decision, shape)
        graph.replace(node, new)
        for name in (gate_up, down):
            graph.consumers[name] = [new if c is node else c for c in graph.consumers[name]]

    def _gather(self, graph: _Graph, gather: onnx.NodeProto, tensor: onnx.TensorProto) -> None:
        """GatherBlockQuantized reads the MatMulNBits bytes as [V, H'] 4- or 8-bit elements, H' the width
        padded to whole blocks; padding is sliced off its output (``plan.padding_notes``)."""
        (packed, scales, zero_points), decision = self._quantized(tensor.name)
        rows, width = (int(d) for d in tensor.dims)
        blocks = -(-width // decision.block_size)
        padded = blocks * decision.block_size
        element = onnx.TensorProto.UINT4 if decision.bits == 4 else onnx.TensorProto.UINT8
        data = self.writer.alias(f"{tensor.name}.rows", packed, (rows, padded), element)
        own_zeros = decision.bits == 4 and blocks % 2  # MatMulNBits pads each row's zero points to a byte
        zeros = self.writer.alias(f"{zero_points}.rows", gathered_zero_points(tensor.name) if own_zeros
                                  else zero_points, (rows, blocks), element)
        self.quantized_names += [data.name, zeros.name]
        out = gather.output[0]
        gathered = out if padded == width else f"{out}.padded"
        graph.replace(gather, helper.make_node(
            "GatherBlockQuantized", [data.name, gather.input[1], self._scales32(scales), zeros.name], [gathered],
            name=gather.name + "_quantized", domain=ORT_CONTRIB_DOMAIN, gather_axis=0, quantize_axis=1,
            block_size=decision.block_size, bits=decision.bits))
        if padded != width:
            bounds = {f"{out}.slice_{key}": np.array([value], np.int64)
                      for key, value in (("starts", 0), ("ends", width), ("axes", -1))}
            self.constants += [onnx.numpy_helper.from_array(v, k) for k, v in bounds.items()]
            nodes = list(graph.graph.node)
            graph.graph.node.insert(nodes.index(next(n for n in nodes if gathered in n.output)) + 1,
                                    helper.make_node("Slice", [gathered, *bounds], [out], name=f"{out}.unpad"))


def _read_back(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, decision: Decision,
               k: int) -> np.ndarray:
    """The float values a quantized [N, K] weight (or [E, N, K] expert stack) stands for."""
    assert decision.bits is not None
    if packed.ndim == 4:
        return np.stack([dequantize(*parts, decision.bits, k) for parts in zip(packed, scales, zero_points,
                                                                                strict=True)])
    return dequantize(packed, scales, zero_points, decision.bits, k)


def gathered_zero_points(name: str) -> str:
    """The zero points GatherBlockQuantized reads when MatMulNBits' do not fit it (4 bits, odd blocks)."""
    return f"{name}.zero_points_across_rows"


def nibbles_across_rows(zero_points: np.ndarray, blocks: int) -> np.ndarray:
    """MatMulNBits' 4-bit zero points [N, ⌈blocks/2⌉] (each row padded to a whole byte) → the [N, blocks]
    uint4 layout GatherBlockQuantized reads (packed across rows, low nibble first)."""
    nibbles = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(len(zero_points), -1)[:, :blocks]
    flat = np.pad(nibbles.reshape(-1), (0, nibbles.size % 2))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def blockwise_rows(chunks: Iterable[np.ndarray], rows: int, decision: Decision,
                   hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``blockwise`` over a tensor given as consecutive chunks of rows (rows are independent, GPTQ's too):
    the PLE table of E2B is 9.4 GB in fp32, and only one chunk of it is ever in memory as float. Results
    are filled into preallocated arrays."""
    outputs: list[np.ndarray] = []
    start = 0
    with reused_factors():
        for chunk in chunks:
            parts = blockwise(np.asarray(chunk, dtype=np.float32), decision, hessian)
            if not outputs:
                outputs = [np.empty((rows, *part.shape[1:]), part.dtype) for part in parts]
            for output, part in zip(outputs, parts, strict=True):
                output[start:start + len(part)] = part
            start += len(chunk)
    assert start == rows, f"{start} rows read of {rows}"
    return outputs[0], outputs[1], outputs[2]


def ple_bytes(rows: int, layers: int, ple_dim: int, decision: Decision) -> int:
    """Bytes of the quantized PLE table (codes, fp16 scales, one zero-point byte per block), as written, for
    the plan's (fitted) decision."""
    assert decision.bits is not None
    width = layers * ple_dim
    blocks = width // decision.block_size
    return rows * (width * decision.bits // 8 + blocks * 3)


def _inputs(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node for name in node.input}
