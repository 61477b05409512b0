"""Which nodes NNAPI, CoreML and XNNPACK would take, per graph, and what the ai.gemma4 functions become.

onnxruntime's usability checker (``onnxruntime.tools.mobile_helpers.usability_checker``) works per
operator type: a node is "supported" when its operator is in the execution provider's list (and, with
shapes required, its inputs have fixed sizes); consecutive supported nodes form one partition, and each
partition boundary costs a copy between the accelerator and the CPU. Gemma 4's decoder takes dynamic
sequence and cache lengths, so the report gives both views: as exported, and if the shapes were fixed.
"""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

EPS = {"NNAPI": "nnapi", "CoreML (ML Program)": "coreml", "XNNPACK": "xnnpack"}
PARTITIONS_SHOWN = 12


def _check(model: onnx.ModelProto, ep: str, fixed_shapes: bool) -> Any:
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    require_fixed = not fixed_shapes
    if ep == "nnapi":
        return checker.check_nnapi_partitions(model, require_fixed)
    if ep == "coreml":
        return checker.check_coreml_partitions(model, require_fixed, "coreml_supported_mlprogram_ops.md")
    return checker._check_ep_partitioning(model, Path(__file__).parent / "xnnpack_supported_ops.md", require_fixed)


def _summary(info: Any) -> dict[str, Any]:
    groups = [list(g) for g in info.supported_groups]
    return {
        "nodes": info.num_nodes,
        "supported_nodes": info.num_supported_nodes,
        "partitions": info.num_partitions,
        "suitability": info.suitability().name,
        "unsupported_operators": sorted(info.unsupported_ops),
        "nodes_unsupported_for_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
        "caveats": info.supported_ops_checker.get_caveats(),
        "partition_list": [{"nodes": len(g), "first": g[0].name or g[0].op_type, "last": g[-1].name or g[-1].op_type,
                            "operators": dict(Counter(n.op_type for n in g).most_common())} for g in groups],
    }


def graph_usability(inlined_onnx: Path) -> dict[str, Any]:
    """The checker's view of one graph after onnxruntime's basic optimizations (constant folding), as its
    own command line does it."""
    from onnxruntime.tools.onnx_model_utils import optimize_model

    optimized = inlined_onnx.with_suffix(".basic.onnx")
    optimize_model(inlined_onnx, optimized, use_external_initializers=True)
    model = onnx.load(optimized, load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return {label: {"as_exported": _summary(_check(model, ep, fixed_shapes=False)),
                    "fixed_shapes": _summary(_check(model, ep, fixed_shapes=True))}
            for label, ep in EPS.items()}


def function_expansions(source_onnx: Path) -> dict[str, Any]:
    """Each ai.gemma4 function of the exported graph: how often it is called and the standard operators it
    becomes once inlined (nested functions expanded)."""
    model = onnx.load(source_onnx, load_external_data=False)
    functions = {(f.domain, f.name): f for f in model.functions}

    def expand(nodes: Any) -> Counter[str]:
        counts: Counter[str] = Counter()
        for node in nodes:
            inner = functions.get((node.domain, node.op_type))
            if inner is not None:
                counts.update(expand(inner.node))
            else:
                counts[f"{node.domain or 'ai.onnx'}:{node.op_type}"] += 1
        return counts

    calls: Counter[tuple[str, str]] = Counter()

    def count_calls(nodes: Any) -> None:
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in functions:
                calls[key] += 1
                count_calls(functions[key].node)

    count_calls(model.graph.node)
    return {f"{domain}:{name}": {"calls": calls[(domain, name)], "inlined_nodes": sum(expand(f.node).values()),
                                 "operators": dict(expand(f.node).most_common())}
            for (domain, name), f in sorted(functions.items()) if domain == "ai.gemma4"}


def write_report(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    json_path, md_path = out / "usability.json", out / "usability.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Mobile usability", "",
             "Per graph and execution provider, from onnxruntime's usability checker (operator lists; "
             "\"fixed shapes\" assumes every dynamic dimension were made static).", ""]
    for graph, entry in report["graphs"].items():
        lines += [f"## {graph}", "", "| provider | shapes | supported / nodes | partitions | suitability | "
                  "unsupported operators |", "|---|---|---|---|---|---|"]
        for ep, views in entry["providers"].items():
            for view, s in views.items():
                unsupported = ", ".join(s["unsupported_operators"]) or "—"
                lines.append(f"| {ep} | {view.replace('_', ' ')} | {s['supported_nodes']} / {s['nodes']} | "
                             f"{s['partitions']} | {s['suitability']} | {unsupported} |")
        for ep, views in entry["providers"].items():
            parts = views["fixed_shapes"]["partition_list"]
            if not parts:
                continue
            lines += ["", f"{ep}, fixed shapes: where partitions start and end "
                      f"(first {min(len(parts), PARTITIONS_SHOWN)} of {len(parts)})", ""]
            lines += [f"- {p['nodes']} nodes, `{p['first']}` … `{p['last']}`" for p in parts[:PARTITIONS_SHOWN]]
        lines += ["", "Operators the `.ort` graph runs (after inlining and optimization):", "",
                  ", ".join(f"{k.split(';')[2]}×{v}" for k, v in entry["ort_operators"].items()), ""]
    lines += ["## ai.gemma4 functions after inlining", "", "| function | graph | calls | nodes each | operators |",
              "|---|---|---|---|---|"]
    for graph, functions in report["functions"].items():
        for name, f in functions.items():
            ops = ", ".join(f"{k.split(':')[1]}×{v}" for k, v in f["operators"].items())
            lines.append(f"| {name} | {graph} | {f['calls']} | {f['inlined_nodes']} | {ops} |")
    return "\n".join(lines) + "\n"
