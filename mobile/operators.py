"""The reduced-operator configuration, and the check that it covers what every ``.ort`` graph runs.

onnxruntime's config format, one line per (domain, opset):  ``domain;opset;Op{"inputs": {"0": ["float"]}},Op2``
The JSON after an operator lists, per input/output index, the element types its kernels must keep; an
operator without one keeps all types. The check walks each ``.ort`` graph itself (after function
inlining and the target's optimizations, i.e. exactly the nodes a minimal build executes) and fails on
any node whose (domain, opset, operator) or typed input/output is missing from the config.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma4_onnx.errors import UsageError

Key = tuple[str, int, str]


@dataclass
class Config:
    operators: dict[Key, dict[str, dict[str, set[str]]]] = field(default_factory=dict)


def parse_config(text: str) -> Config:
    config = Config()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, rest = line.split(";", 2)
        for entry in _split_entries(rest):
            op, _, types = entry.partition("{")
            parsed = json.loads("{" + types) if types else {}
            config.operators[(domain, int(opset), op)] = {
                io: {index: set(names) for index, names in by_index.items()} for io, by_index in parsed.items()}
    return config


def _split_entries(text: str) -> list[str]:
    """``A{..., ...},B`` → [``A{..., ...}``, ``B``]: commas inside the type JSON do not separate entries."""
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    entries.append(text[start:])
    return [e for e in entries if e]


def _ort_model(ort_file: Path) -> Any:
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts the flatbuffer bindings on the path)
    from ort_flatbuffers_py import fbs

    buffer = bytearray(ort_file.read_bytes())
    if not fbs.InferenceSession.InferenceSession.InferenceSessionBufferHasIdentifier(buffer, 0):
        raise UsageError(f"{ort_file} is not an ORT-format model")
    return fbs.InferenceSession.InferenceSession.GetRootAsInferenceSession(buffer, 0).Model()


def initializer_names(ort_file: Path) -> list[str]:
    graph = _ort_model(ort_file).Graph()
    return [graph.Initializers(i).Name().decode() for i in range(graph.InitializersLength())]


def graph_nodes(ort_file: Path) -> list[dict[str, Any]]:
    """Every node of an ``.ort`` model (subgraphs included): domain, opset, operator, input/output types."""
    from onnxruntime.tools.ort_format_model.types import FbsTypeInfo

    model = _ort_model(ort_file)
    nodes: list[dict[str, Any]] = []

    def types(names: list[str], known: dict[str, Any]) -> dict[str, str]:
        return {str(i): FbsTypeInfo.typeinfo_to_str(known[n]) for i, n in enumerate(names) if n and n in known}

    def walk(graph: Any, outer: dict[str, Any]) -> None:
        known = dict(outer)
        for j in range(graph.NodeArgsLength()):
            arg = graph.NodeArgs(j)
            known[arg.Name().decode()] = arg.Type()
        for i in range(graph.NodesLength()):
            node = graph.Nodes(i)
            inputs = [node.Inputs(k).decode() for k in range(node.InputsLength())]
            outputs = [node.Outputs(k).decode() for k in range(node.OutputsLength())]
            nodes.append({"domain": node.Domain().decode() or "ai.onnx", "opset": node.SinceVersion(),
                          "op": node.OpType().decode(), "name": node.Name().decode(),
                          "inputs": types(inputs, known), "outputs": types(outputs, known)})
            for k in range(node.AttributesLength()):
                attribute = node.Attributes(k)
                if attribute.G() is not None:
                    walk(attribute.G(), known)
                for g in range(attribute.GraphsLength()):
                    walk(attribute.Graphs(g), known)

    walk(model.Graph(), {})
    return nodes


def uncovered(config: Config, ort_files: list[Path]) -> list[str]:
    """What the config misses, one line per (graph, operator, type); empty when it covers everything."""
    missing: set[str] = set()
    for path in ort_files:
        for node in graph_nodes(path):
            key = (node["domain"], node["opset"], node["op"])
            where = f"{path.name}: {node['domain']};{node['opset']};{node['op']}"
            if key not in config.operators:
                missing.add(f"{where} (operator)")
                continue
            for io, by_index in config.operators[key].items():
                for index, allowed in by_index.items():
                    used = node[io].get(index)
                    if used is not None and used not in allowed:
                        missing.add(f"{where} {io[:-1]} {index} type {used}")
    return sorted(missing)


def check_coverage(config_file: Path, ort_files: list[Path]) -> None:
    missing = uncovered(parse_config(config_file.read_text()), ort_files)
    if missing:
        raise UsageError(f"{config_file.name} does not cover {len(missing)} operator use(s), first: {missing[0]}")


def operator_table(ort_files: list[Path]) -> dict[str, dict[str, int]]:
    """Per graph file: ``domain;opset;operator`` → node count (for the usability report)."""
    table: dict[str, dict[str, int]] = {}
    for path in ort_files:
        counts: dict[str, int] = {}
        for node in graph_nodes(path):
            key = f"{node['domain']};{node['opset']};{node['op']}"
            counts[key] = counts.get(key, 0) + 1
        table[path.name] = dict(sorted(counts.items()))
    return table


def build_commands(config_name: str) -> dict[str, str]:
    """onnxruntime build lines for a minimal runtime with exactly the config's operators and types.
    ``extended`` minimal builds keep what NNAPI / CoreML / XNNPACK need to take over nodes at load time."""
    common = (f"--config MinSizeRel --minimal_build extended --include_ops_by_config {config_name} "
              "--enable_reduced_operator_type_support --disable_ml_ops --disable_exceptions --skip_tests --parallel")
    return {
        "android": "./build.sh --android --android_sdk_path $ANDROID_HOME --android_ndk_path $ANDROID_NDK_HOME "
                   f"--android_abi arm64-v8a --android_api 29 --use_nnapi --use_xnnpack --build_java {common}",
        "ios": "./build.sh --ios --use_xcode --apple_sysroot iphoneos --osx_arch arm64 --apple_deploy_target 15.1 "
               f"--use_coreml --use_xnnpack --build_apple_framework {common}",
        "linux": f"./build.sh --build_shared_lib {common}",
    }
