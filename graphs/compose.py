"""Assembling package graphs from traced block functions.

A package graph is first written as calls of block functions (one call per layer, each on its own
initializers), then those calls are inlined, so every weight is an initializer with its checkpoint
name feeding the node that uses it (which quantizers need), while the ``ai.gemma4`` custom ops stay
as named function nodes.
"""

from collections.abc import Sequence

import onnx
from onnx import helper
from onnx.inliner import inline_selected_functions

BLOCK_DOMAIN = "ai.gemma4.blocks"
IR_VERSION = 10


def tensor_info(name: str, elem_type: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def call(function: onnx.FunctionProto, inputs: Sequence[str], outputs: Sequence[str], name: str) -> onnx.NodeProto:
    return helper.make_node(function.name, list(inputs), list(outputs), name=name, domain=function.domain)


def unique_functions(functions: Sequence[onnx.FunctionProto]) -> list[onnx.FunctionProto]:
    seen: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for fn in functions:
        key = (fn.domain, fn.name, fn.overload)
        if key in seen and seen[key].SerializeToString() != fn.SerializeToString():
            raise ValueError(f"two different functions named {fn.domain}::{fn.name}")
        seen.setdefault(key, fn)
    return list(seen.values())


def merged_opsets(functions: Sequence[onnx.FunctionProto]) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for fn in functions:
        for opset in fn.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
        versions.setdefault(fn.domain, 1)
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def build_model(name: str, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
                nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto],
                functions: Sequence[onnx.FunctionProto], metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """A model of block-function calls, with the block functions inlined and custom ops kept."""
    functions = unique_functions(functions)
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=merged_opsets(functions), functions=functions,
                              producer_name="gemma4-onnx")
    model.ir_version = IR_VERSION
    blocks = [(fn.domain, fn.name) for fn in functions if fn.domain == BLOCK_DOMAIN]
    model = inline_selected_functions(model, blocks)
    kept = [fn for fn in model.functions if fn.domain != BLOCK_DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    kept_opsets = [o for o in model.opset_import if o.domain != BLOCK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept_opsets)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model
