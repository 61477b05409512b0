"""ONNX graphs → ORT format, through onnxruntime's own conversion tool.

The package's graphs are first made self-contained for ORT format: local functions (``ai.gemma4``) are
inlined, the PLE gathers leave the embed graph (``ple_rows``), and the data files are linked into a work
directory beside the rewritten graphs. ``convert_onnx_models_to_ort`` then optimizes each graph for the
target (fixed style: the optimizations are baked in, so a minimal build needs no optimizer) and writes
the reduced-operator configuration for all graphs together, with the types each operator needs.
"""

import contextlib
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
import onnxruntime as ort

from gemma4_onnx.errors import UsageError
from gemma4_onnx.mobile.ple_rows import RowTable, split_ple
from gemma4_onnx.runtime.checked_session import checked_graph

CONFIG = "required_operators_and_types.config"
PLATFORMS = ("arm", "amd64")


@dataclass
class Prepared:
    onnx_files: dict[str, Path]  # graph name → inlined ONNX file in the work directory
    tables: list[RowTable]


def deployed_graphs(manifest: dict[str, Any]) -> dict[str, str]:
    """Graph name → file of every graph an app runs. The per-layer blocks are left out: they are a bisection
    aid whose weights the decoder already holds, and ORT format would store them a second time."""
    return {name: entry["file"] for name, entry in manifest["graphs"].items() if name != "blocks"}


def prepare(source: Path, manifest: dict[str, Any], work: Path) -> Prepared:
    ple_file = (manifest.get("ple") or {}).get("file")
    for name in manifest["files"]:
        if name.endswith(".onnx") or name == ple_file:
            continue
        copy_file(source / name, work / name)  # onnxruntime refuses data reached through a symlink
    files: dict[str, Path] = {}
    tables: list[RowTable] = []
    for graph, file in deployed_graphs(manifest).items():
        model = onnx.inliner.inline_local_functions(checked_graph(source, manifest, file))
        if ple_file:
            model, found = split_ple(model, ple_file)
            tables += found
        if any(n.domain == "ai.gemma4" for n in model.graph.node):
            raise UsageError(f"{file}: ai.gemma4 nodes remain after inlining its functions")
        path = work / file
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, path)
        files[graph] = path
    return Prepared(files, tables)


def convert(work: Path, out: Path, target_platform: str, verbose: bool = False) -> tuple[list[Path], Path]:
    """``.ort`` files in ``out`` for every ``.onnx`` in ``work``, and the reduced-operator config."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    if target_platform not in PLATFORMS:
        raise UsageError(f"--target-platform must be one of {', '.join(PLATFORMS)}, got {target_platform!r}")
    ort.set_default_logger_severity(3)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        convert_onnx_models_to_ort(work, output_dir=out, optimization_styles=[OptimizationStyle.Fixed],
                                   target_platform=target_platform, enable_type_reduction=True)
    converted = sorted(out.rglob("*.ort"))
    config = out / CONFIG
    if not config.is_file():
        raise UsageError(f"onnxruntime's converter wrote no {CONFIG}")
    return converted, config


def copy_file(source: Path, target: Path) -> None:
    """A copy, never a link: packages hold plain files with one link each (``runtime.package_files``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
