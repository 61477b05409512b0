"""Tracing a block once per kind, as an ONNX function of (activations, weights).

A Gemma 4 decoder has few distinct layer kinds (sliding / full, cache owner / KV-shared consumer,
dense / MoE) but up to 60 layers. Each kind is traced once with ``torch.onnx.export(dynamo=True)``,
with its weights passed as *inputs* (``torch.func.functional_call``), and the traced graph becomes an
ONNX function. Every layer is then a call of its kind's function on its own initializers, which keep
the checkpoint's Hugging Face names; export time and memory do not grow with the number of layers,
and no full model is ever instantiated.
"""

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from onnx import helper
from torch.func import functional_call

from gemma4_onnx.graphs.compose import BLOCK_DOMAIN
from gemma4_onnx.graphs.domain import export as export_with_functions


@dataclass(frozen=True)
class TracedBlock:
    """One traced block: its function, the custom-op functions it calls, and its signature."""

    function: onnx.FunctionProto
    functions: list[onnx.FunctionProto]
    activations: list[str]
    weights: list[str]  # parameter/buffer names relative to the traced module
    outputs: list[str]
    opset_imports: list[onnx.OperatorSetIdProto]


class _WeightsAsInputs(torch.nn.Module):
    def __init__(self, block: torch.nn.Module, weight_names: Sequence[str]) -> None:
        super().__init__()
        self.block = block
        self.weight_names = list(weight_names)

    def forward(self, activations: list[torch.Tensor], weights: list[torch.Tensor]) -> Any:
        return functional_call(self.block, dict(zip(self.weight_names, weights, strict=True)), tuple(activations))


def block_weights(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``block`` by name: the weights of its function."""
    named: dict[str, torch.Tensor] = dict(block.named_parameters())
    named.update({n: b for n, b in block.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(block)})
    return named


def _non_persistent(block: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for module in block.modules():
        names.update(getattr(module, "_non_persistent_buffers_set", set()))
    return names


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.onnx prints progress and warns about optional packages (torchvision) on every export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trace_block(block: torch.nn.Module, name: str, activations: Sequence[torch.Tensor],
                activation_names: Sequence[str], output_names: Sequence[str],
                dynamic: Sequence[dict[int, str]], weights: dict[str, torch.Tensor] | None = None) -> TracedBlock:
    """Trace ``block`` on example ``activations`` (dims named in ``dynamic`` stay symbolic). ``weights``
    (real tensors by name) stand in for the block's own, which may live on the meta device."""
    weights = weights if weights is not None else block_weights(block)
    wrapper = _WeightsAsInputs(block, list(weights)).eval()
    example = (list(activations), [w.detach() for w in weights.values()])
    dynamic_shapes = ([{axis: torch.export.Dim.DYNAMIC for axis in dims} for dims in dynamic], [None] * len(weights))
    with _quiet_export(), torch.no_grad():
        program = export_with_functions(wrapper, example, optimize=True, verbose=False,
                                        dynamic_shapes=dynamic_shapes, report=False)
    assert program is not None
    model = program.model_proto
    graph_inputs = [i.name for i in model.graph.input]
    graph_outputs = [o.name for o in model.graph.output]
    if len(graph_inputs) != len(activations) + len(weights) or len(graph_outputs) != len(output_names):
        raise RuntimeError(f"{name}: traced signature {graph_inputs} → {graph_outputs} does not match the block")
    rename = dict(zip(graph_inputs, [*activation_names, *weights], strict=True))
    rename.update(zip(graph_outputs, output_names, strict=True))
    nodes = [helper.make_node("Constant", [], [rename.get(init.name, init.name)], value=init)
             for init in model.graph.initializer]  # a constant may be an output (the audio position table)
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.ClearField("metadata_props")  # the exporter's stack traces: kilobytes per node
        copy.doc_string = ""
        copy.input[:] = [rename.get(v, v) for v in node.input]
        copy.output[:] = [rename.get(v, v) for v in node.output]
        nodes.append(copy)
    # An output that is directly an input (e.g. a cache passed through) needs a node of its own.
    for out in output_names:
        if out in activation_names:
            raise RuntimeError(f"{name}: output {out} is an unchanged input")
    function = helper.make_function(BLOCK_DOMAIN, name, [*activation_names, *weights], list(output_names), nodes,
                                    opset_imports=list(model.opset_import))
    return TracedBlock(function, list(model.functions), list(activation_names), list(weights),
                       list(output_names), list(model.opset_import))
