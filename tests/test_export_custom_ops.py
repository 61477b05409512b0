"""The real exporter's packages carry the ai.gemma4 custom ops with their functions, and onnxruntime
runs them: tiny-e2b (K≠V, KV sharing: KEqVAttention kv/reuse, PRoPE nested inside) and tiny-26b-a4b
(K=V full layers with one cache tensor, routed experts: KEqVAttention kv/keqv, PRoPE, TopKMoE).

Each variant is exported once for the module from random weights (``export_package(name, dir)``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from gemma4_onnx.exporter.package import export_package
from gemma4_onnx.graphs import domain
from gemma4_onnx.runtime.text_model import TextModel

# variant → the ai.gemma4 op types its decoder must use (anywhere: graph or nested in functions)
EXPECTED_OPS = {
    "tiny-e2b": {"KEqVAttention", "PRoPE"},
    "tiny-26b-a4b": {"KEqVAttention", "PRoPE", "TopKMoE"},
}
PROMPT = [[2, 3, 4, 5, 6]]


@dataclass(frozen=True)
class Package:
    variant: str
    directory: Path
    text_config: dict[str, Any]

    def load(self, relative: str) -> onnx.ModelProto:
        return onnx.load(self.directory / relative, load_external_data=False)

    def graph_files(self) -> list[str]:
        return sorted(p.relative_to(self.directory).as_posix() for p in self.directory.rglob("*.onnx"))


@pytest.fixture(scope="module", params=sorted(EXPECTED_OPS))
def package(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Package:
    variant: str = request.param
    directory = export_package(variant, tmp_path_factory.mktemp("custom-ops") / variant)
    text_config = json.loads((directory / "manifest.json").read_text())["text_config"]
    return Package(variant, directory, text_config)


def _nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """``nodes`` and the nodes of their subgraphs (If/Loop/Scan bodies), recursively."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.HasField("g") else []
            for subgraph in [*subgraphs, *attribute.graphs]:
                yield from _nodes(subgraph.node)


def gemma4_calls(model: onnx.ModelProto) -> dict[tuple[str, str, str], str]:
    """Every ai.gemma4 op the model uses → where it was first seen ("graph", or the op type of the
    function whose body calls it), following calls from the graph into the functions, recursively."""
    functions = {(f.domain, f.name, f.overload): f for f in model.functions}
    found: dict[tuple[str, str, str], str] = {}
    pending: list[tuple[str, Iterator[onnx.NodeProto]]] = [("graph", _nodes(model.graph.node))]
    while pending:
        where, nodes = pending.pop()
        for node in nodes:
            identifier = (node.domain, node.op_type, node.overload)
            if node.domain != domain.DOMAIN or identifier in found:
                continue
            found[identifier] = where
            if identifier in functions:
                pending.append((node.op_type, _nodes(functions[identifier].node)))
    return found


def test_every_custom_op_used_has_its_function(package: Package) -> None:
    """In every graph of the package: each ai.gemma4 op used in the graph or inside a function body
    (nested calls included) has its FunctionProto in model.functions, whose body holds only standard
    ops and ai.gemma4 calls; and every function the model carries is used."""
    for relative in package.graph_files():
        model = package.load(relative)
        calls = gemma4_calls(model)
        functions = {(f.domain, f.name, f.overload): f for f in model.functions}
        missing = sorted(set(calls) - set(functions))
        assert not missing, f"{relative}: ai.gemma4 ops without a function: {missing}"
        assert set(functions) == set(calls), f"{relative}: functions nothing calls: {set(functions) - set(calls)}"
        for identifier, function in functions.items():
            domains = {node.domain for node in _nodes(function.node)}
            assert domains <= {"", domain.DOMAIN}, f"{relative}: {identifier} body uses {domains}"
        if calls:
            assert {o.domain: o.version for o in model.opset_import}.get(domain.DOMAIN) == domain.VERSION


def test_decoder_uses_the_expected_ops(package: Package) -> None:
    """KEqVAttention (and TopKMoE on 26B-A4B) are nodes of the decoder graph; PRoPE is called inside
    every KEqVAttention overload the decoder uses."""
    model = package.load("decoder.onnx")
    calls = gemma4_calls(model)
    assert {op_type for _, op_type, _ in calls} == EXPECTED_OPS[package.variant]
    graph_ops = {op_type for (_, op_type, _), where in calls.items() if where == "graph"}
    assert graph_ops == EXPECTED_OPS[package.variant] - {"PRoPE"}
    attention = {f.overload: f for f in model.functions if f.name == "KEqVAttention"}
    for overload, function in attention.items():
        nested = [(n.op_type, n.overload) for n in function.node if n.domain == domain.DOMAIN]
        assert nested and set(nested) == {("PRoPE", "")}, f"KEqVAttention:{overload} calls {nested}"
    overloads = {"tiny-e2b": {"kv", "reuse"}, "tiny-26b-a4b": {"kv_image_blocks", "keqv"}}[package.variant]
    assert set(attention) == overloads


def test_k_eq_v_layers_have_one_cache_tensor(package: Package) -> None:
    """A K=V (full-attention) layer of 26B-A4B has one past/present tensor, ``past.N.key_value``;
    other cache-owning layers have ``past.N.key`` and ``past.N.value``; E2B has no K=V layer."""
    model = package.load("decoder.onnx")
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    config = package.text_config
    layer_types = config["layer_types"]
    owners = len(layer_types) - int(config.get("num_kv_shared_layers") or 0)
    k_eq_v = [i for i, t in enumerate(layer_types[:owners]) if config.get("attention_k_eq_v") and t == "full_attention"]
    assert bool(k_eq_v) == (package.variant == "tiny-26b-a4b")
    for index in range(owners):
        if index in k_eq_v:
            assert f"past.{index}.key_value" in inputs and f"present.{index}.key_value" in outputs
            assert not {f"past.{index}.key", f"past.{index}.value"} & inputs
        else:
            assert {f"past.{index}.key", f"past.{index}.value"} <= inputs
            assert f"past.{index}.key_value" not in inputs
    cache_inputs = {name for name in inputs if name.startswith("past.")}
    assert len(cache_inputs) == 2 * owners - len(k_eq_v)


def test_onnxruntime_runs_a_prefill_and_a_decode_step(package: Package) -> None:
    """onnxruntime CPU sessions for embed.onnx and decoder.onnx (functions inlined, nested PRoPE
    included): a 5-token prefill and one decode step give finite logits; the K=V caches grow by one."""
    model = TextModel(package.directory, threads=1)
    assert model.embed.get_providers() == ["CPUExecutionProvider"]
    assert model.decoder.get_providers() == ["CPUExecutionProvider"]
    cache = model.empty_cache(1)
    logits = model.forward(PROMPT, cache)
    assert logits.shape == (1, len(PROMPT[0]), model.vocab_size)
    assert np.isfinite(logits).all()
    token = int(np.argmax(logits[0, -1]))
    step = model.forward([[token]], cache)
    assert step.shape == (1, 1, model.vocab_size) and np.isfinite(step).all()
    for name, tensor in cache.tensors.items():
        if name.endswith(".key_value"):
            assert tensor.shape[2] == len(PROMPT[0]) + 1, name
