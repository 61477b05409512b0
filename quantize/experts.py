"""MoE experts quantized inside ``ai.gemma4::TopKMoE``: the node becomes its ``nbits`` overload.

Each expert's matrix ([2I, H] gate/up, [H, I] down) is quantized on its own, in MatMulNBits' layout,
and the slices are stacked on a leading expert axis, so the op's Loop gathers the packed bytes of the
experts it hits and nothing else::

    gate_up_proj [E, 2I, H] float  →  gate_up_proj.q4 [E, 2I, H/b, b/2], .scales [E, 2I, H/b] fp16,
                                      .zero_points [E, 2I, ⌈H/2b⌉]

GPTQ statistics come per expert from the tokens routed to it (``calibration.ExpertHessians``); an
expert that no calibration token reached has no statistics and is rounded to nearest.
"""

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from gemma4_onnx.graphs.domain import DOMAIN, functions, import_ort_contrib
from gemma4_onnx.graphs.topk_moe import NBITS, OP_TYPE
from gemma4_onnx.quantize.blockwise import blockwise, pack
from gemma4_onnx.quantize.gptq import gptq
from gemma4_onnx.quantize.recipe import Decision

if TYPE_CHECKING:
    from gemma4_onnx.quantize.calibration import ExpertHessians

GATE_UP, DOWN = 5, 6  # TopKMoE's inputs
EXPERT_GROUP = 8  # experts GPTQ solves together: 8 × 2816² floats of H on 26B-A4B, 0.25 GB


def is_topk_moe(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def quantize_experts(weight: np.ndarray, decision: Decision,
                     hessians: "ExpertHessians | None") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[E, N, K] → stacked (codes, scales, zero points), one MatMulNBits slice per expert; GPTQ solves
    the experts calibration reached, ``EXPERT_GROUP`` at a time, the others are rounded to nearest."""
    experts = weight.shape[0]
    slices: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if hessians is not None and decision.algorithm == "gptq":
        assert decision.bits is not None
        for start in range(0, len(hessians.reached), EXPERT_GROUP):
            group = hessians.reached[start:start + EXPERT_GROUP]
            codes, scales, zeros = gptq(weight[group], hessians[group], decision.bits,
                                        decision.block_size, decision.symmetric)
            for i, expert in enumerate(group):
                slices[expert] = pack(codes[i], scales[i], zeros[i], decision)
    nearest = replace(decision, algorithm="rtn")
    for expert in range(experts):
        if expert not in slices:
            slices[expert] = blockwise(weight[expert].astype(np.float32), nearest, None)
    stacked = [np.stack(parts) for parts in zip(*(slices[e] for e in range(experts)), strict=True)]
    return stacked[0], stacked[1], stacked[2]


def dequantize(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, k: int) -> np.ndarray:
    """One MatMulNBits weight back to float [N, K] (the reference the quantized op is tested against)."""
    n, blocks, _ = codes.shape
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    values = np.stack([(codes >> (bits * j)) & mask for j in range(per_byte)], axis=-1).reshape(n, blocks, -1)
    zeros = zero_points.reshape(n, -1)
    if bits == 4:
        zeros = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(n, -1)
    zeros = zeros[:, :blocks].astype(np.float32)
    weight = (values.astype(np.float32) - zeros[..., None]) * scales.reshape(n, blocks, 1).astype(np.float32)
    return weight.reshape(n, -1)[:, :k]


def nbits_node(node: onnx.NodeProto, gate_up: list[str], down: list[str], gate_up_decision: Decision,
               down_decision: Decision, gate_up_shape: tuple[int, ...]) -> onnx.NodeProto:
    """The ``TopKMoE:nbits`` node replacing a float ``TopKMoE`` node (same router inputs and attributes)."""
    _, rows, hidden = gate_up_shape
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    new = helper.make_node(
        OP_TYPE, [*node.input[:GATE_UP], *gate_up, *down], list(node.output), name=node.name, domain=DOMAIN,
        **attributes, hidden_size=int(hidden), intermediate_size=int(rows) // 2, gate_up_rows=int(rows),
        gate_up_bits=gate_up_decision.bits, gate_up_block_size=gate_up_decision.block_size,
        down_bits=down_decision.bits, down_block_size=down_decision.block_size)
    new.overload = NBITS
    return new


def attach_nbits_function(model: onnx.ModelProto) -> None:
    """Add the ``TopKMoE:nbits`` function the rewritten nodes call and drop the float one if unused."""
    called = {(n.domain, n.op_type, n.overload) for n in model.graph.node}
    kept = [f for f in model.functions if (f.domain, f.name, f.overload) in called or f.domain != DOMAIN
            or f.name != OP_TYPE]
    if (DOMAIN, OP_TYPE, NBITS) in called and not any(f.overload == NBITS and f.name == OP_TYPE for f in kept):
        kept.append(ir.serde.serialize_function(functions()[(DOMAIN, OP_TYPE, NBITS)]))
    del model.functions[:]
    model.functions.extend(kept)
    import_ort_contrib(model)
