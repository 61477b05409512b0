"""``gemma4-onnx export``, with or without ``--recipe``: the one place where the exporter and the quantizer
meet (neither imports the other).

Without a recipe, ``exporter.package.export_package`` writes and publishes the float package. With one,
the graphs are traced into a scratch folder with no weight data, then quantized block by block, each
weight read from the source when the quantizer needs it (``StreamedTensors``): float weights are never
written, and at most one layer's are in memory. The steps and values are those of ``quantize`` on a
float export, so the package is the same, byte for byte; an interrupted run restarts from its last
completed block.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from gemma4_onnx.atomic import check_target
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.package import check_target_name, export_package, fp32_bytes, source_key, trace_graphs
from gemma4_onnx.exporter.weights import open_source
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.quantize.float_tensors import StreamedTensors
from gemma4_onnx.quantize.job import QuantizeJob, quantize_options


def export(source: str, out_dir: Path, force: bool = False, structure_only: bool = False, target: str = "portable",
           recipe: str | None = None, budget_bits: float | None = None, calibration: Path | None = None,
           calibration_tokens: int | None = None) -> Path:
    """``export_package``, or with ``recipe`` ``export_quantized``."""
    check_target_name(target)
    if recipe is not None:
        if structure_only:
            raise UsageError("--recipe quantizes weights: it cannot be combined with --structure-only")
        return export_quantized(source, Path(out_dir), recipe, force, target, budget_bits, calibration,
                                calibration_tokens)
    if budget_bits is not None or calibration is not None or calibration_tokens is not None:
        raise UsageError("--budget-bits, --calibration and --calibration-tokens need --recipe")
    return export_package(source, Path(out_dir), force=force, structure_only=structure_only, target=target)


def export_quantized(source: str, out_dir: Path, recipe: str, force: bool = False, target: str = "portable",
                     budget_bits: float | None = None, calibration: Path | None = None,
                     calibration_tokens: int | None = None) -> Path:
    weights = open_source(source)
    quantize_options(recipe, budget_bits, calibration, calibration_tokens)  # refused before minutes of tracing
    out = Path(out_dir).absolute()
    checked = check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-graphs-", dir=out.parent))
    try:
        tensors = StreamedTensors(trace_graphs(weights, scratch, target))
        job = QuantizeJob(scratch, read_manifest(scratch), tensors, recipe, budget_bits, calibration,
                          calibration_tokens)
        return job.publish(out, force, fp32_bytes(weights), {"source_package": None},
                           resume_key=json.dumps([source_key(weights), target], sort_keys=True), checked=checked)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
