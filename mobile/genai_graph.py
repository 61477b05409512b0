"""Graph surgery: our embed.onnx + decoder.onnx as the one decoder onnxruntime-genai runs.

genai's default KV cache (past_present_share_buffer off) wants, for every numbered layer ``i``, inputs
``past_key_values.i.key``/``.value`` [batch, kv_heads, past, head_dim] and outputs ``present.i.key``/``.value``
holding past + new tokens; per-layer kv_heads and head_dim are read from the graph's input shapes. Ours differs
three ways, and the adapter bridges each without re-export:

- only cache-owning layers have caches: genai's layer ``i`` is our ``i``-th cache-owning layer;
- sliding layers keep W−1 tokens: the adapter hands our decoder the last W−1 of genai's full-length past and
  appends the new tokens' K/V (zeros in front for prefill tokens older than the window, which are never read)
  to it, so genai's cache grows to the full length on those layers;
- full K=V layers keep one tensor: genai's key is ours, its value a copy of it (its past value is unused).

The embedding graph is merged in, so ``input_ids`` go in and ``per_layer_inputs`` never leave the graph.
"""

from typing import Any

import onnx
from onnx import TensorProto, helper

from gemma4_onnx.errors import UsageError

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
END = 1 << 62
OURS = "gemma4/"


def genai_cache_names(count: int) -> list[tuple[str, str, str, str]]:
    """(past key, past value, present key, present value) for genai's layers 0..count-1."""
    return [(PAST.format(i, "key"), PAST.format(i, "value"), PRESENT.format(i, "key"), PRESENT.format(i, "value"))
            for i in range(count)]


def merged_decoder(embed: onnx.ModelProto, decoder: onnx.ModelProto, cache: list[dict[str, Any]]) -> onnx.ModelProto:
    """One model: input_ids + position_ids + genai's caches in, logits + genai's caches out."""
    graph = helper.make_graph([], "gemma4_genai_decoder", [], [])
    handed = {o.name for o in embed.graph.output}
    cache = [{**layer, "past": [OURS + n for n in layer["past"]], "present": [OURS + n for n in layer["present"]]}
             for layer in cache]
    decoder = _renamed(decoder, {n.removeprefix(OURS): n for layer in cache for n in layer["past"] + layer["present"]})
    _take_graphs(graph, embed, decoder, handed)
    adapter, inputs, outputs = _cache_adapter(cache)
    graph.node.extend(adapter)
    ours_past = {name for layer in cache for name in layer["past"]}
    ours_present = {name for layer in cache for name in layer["present"]}
    kept_inputs = [i for i in decoder.graph.input if i.name not in handed and i.name not in ours_past]
    graph.input.extend([*embed.graph.input, *kept_inputs, *inputs])
    graph.output.extend([*[o for o in decoder.graph.output if o.name not in ours_present], *outputs])
    opsets: dict[str, int] = {}
    for model in (embed, decoder):
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                               producer_name="gemma4-onnx genai adapter")
    merged.ir_version = max(embed.ir_version, decoder.ir_version)
    functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
    for model in (embed, decoder):
        for f in model.functions:
            key = (f.domain, f.name, f.overload)
            if key in functions and functions[key].SerializeToString() != f.SerializeToString():
                raise UsageError(f"embed and decoder graphs define function {f.name!r} differently")
            functions.setdefault(key, f)
    merged.functions.extend(functions.values())
    return merged


def _renamed(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """``model`` with its top-level tensors renamed (our cache names overlap genai's: present.0.key)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        value.name = names.get(value.name, value.name)
    return model


def _take_graphs(graph: onnx.GraphProto, embed: onnx.ModelProto, decoder: onnx.ModelProto, handed: set[str]) -> None:
    """Both graphs' nodes and weights in one graph; the only names they may share are the handed-over
    embeddings and identical weights (the tied embedding table)."""
    # The two graphs were exported apart, so their internal tensor names repeat (val_2__1): prefix the embed's.
    embed = _renamed(embed, {o: f"embed/{o}" for n in embed.graph.node for o in n.output if o not in handed})
    for node in embed.graph.node:
        node.name = f"embed/{node.name}" if node.name else ""
    weights: dict[str, onnx.TensorProto] = {}
    for model in (embed, decoder):
        for init in model.graph.initializer:
            if init.name in weights and weights[init.name].SerializeToString() != init.SerializeToString():
                raise UsageError(f"embed and decoder graphs hold different weights named {init.name!r}")
            weights.setdefault(init.name, init)
    graph.initializer.extend(weights.values())
    graph.node.extend([*embed.graph.node, *decoder.graph.node])
    graph.value_info.extend([*embed.graph.value_info, *decoder.graph.value_info])


def _cache_adapter(cache: list[dict[str, Any]]) -> tuple[list[onnx.NodeProto], list[Any], list[Any]]:
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["genai/sequence"], start=1, end=2),
        helper.make_node("Neg", ["genai/sequence"], ["genai/minus_sequence"]),
        _const("genai/end", [END]),
        _const("genai/axis2", [2]),
        _const("genai/zeros2", [0, 0]),
        _const("genai/zeros5", [0] * 5),
    ]
    inputs, outputs = [], []
    for i, (layer, names) in enumerate(zip(cache, genai_cache_names(len(cache)), strict=True)):
        past_key, past_value, present_key, present_value = names
        _, heads, _, dim = layer["shape"]
        for name in (past_key, past_value):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                        ["batch_size", heads, "past_sequence_length", dim]))
        for name in (present_key, present_value):
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                         ["batch_size", heads, "total_sequence_length", dim]))
        ours = list(zip(layer["past"], layer["present"], strict=True))
        if len(ours) == 1:  # K=V: one tensor; genai's value is a copy of its key and its past value goes unused
            nodes += _part(i, "key", past_key, *ours[0], present_key, layer["max_length"])
            nodes.append(helper.make_node("Identity", [present_key], [present_value], name=f"genai/{i}/kv_copy"))
        else:
            nodes += _part(i, "key", past_key, *ours[0], present_key, layer["max_length"])
            nodes += _part(i, "value", past_value, *ours[1], present_value, layer["max_length"])
    return nodes, inputs, outputs


def _part(i: int, part: str, genai_past: str, our_past: str, our_present: str, genai_present: str,
          keep: int | None) -> list[onnx.NodeProto]:
    p = f"genai/{i}/{part}"
    if keep is None:  # full attention: the same growing cache
        return [helper.make_node("Identity", [genai_past], [our_past], name=f"{p}/past"),
                helper.make_node("Identity", [our_present], [genai_present], name=f"{p}/present")]
    return [
        _const(f"{p}/keep", [-keep]),
        helper.make_node("Slice", [genai_past, f"{p}/keep", "genai/end", "genai/axis2"], [our_past],
                         name=f"{p}/window"),
        helper.make_node("Slice", [our_present, "genai/minus_sequence", "genai/end", "genai/axis2"], [f"{p}/new"],
                         name=f"{p}/new"),
        helper.make_node("Shape", [f"{p}/new"], [f"{p}/new_length"], start=2, end=3),
        helper.make_node("Sub", ["genai/sequence", f"{p}/new_length"], [f"{p}/evicted"]),
        helper.make_node("Concat", ["genai/zeros2", f"{p}/evicted", "genai/zeros5"], [f"{p}/pads"], axis=0),
        helper.make_node("Pad", [f"{p}/new", f"{p}/pads"], [f"{p}/padded"], name=f"{p}/pad"),
        helper.make_node("Concat", [genai_past, f"{p}/padded"], [genai_present], axis=2, name=f"{p}/append"),
    ]


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                                            values))
