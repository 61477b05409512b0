"""``gemma4-onnx parity --blocks``: each exported decoder block against the same transformers layer loaded
alone, one layer in memory at a time, so it runs at any variant size (``exporter.layer_reference``).

The source is the package's checkpoint directory or, for a package exported from a variant name, that
name (its random weights are generated again, layer by layer). Every block sees seeded activations one
window plus a few tokens long, so sliding layers run past their window.
"""

from pathlib import Path
from typing import Any

from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.parity_run import block_check, check_same_model, checkpoint_config, package_size
from gemma4_onnx.progress import progress
from gemma4_onnx.runtime.blocks import run_block
from gemma4_onnx.runtime.package_files import check_package, has_weights
from gemma4_onnx.runtime.parity import block_parity

PAST_WINDOW = 8


MAX_SEQUENCE = 1 << 16  # tokens per block run: the reference layer holds [sequence, sequence] attention

def run_block_parity(model_dir: Path, source: str, layers: list[int] | None = None,
                     sequence: int | None = None) -> dict[str, Any]:
    from gemma4_onnx.exporter.layer_reference import LayerReference
    from gemma4_onnx.exporter.weights import open_source

    manifest = read_manifest(model_dir)
    if Path(source).is_dir():  # its config alone, before any file of the package or weight is read
        check_same_model(model_dir, manifest, source, checkpoint_config(Path(source)))
    check_package(model_dir, manifest)
    if not has_weights(manifest):
        raise UsageError(f"{model_dir} is a structure-only package: it has no weights to compare")
    weights = open_source(source)
    check_same_model(model_dir, manifest, source, weights.config)
    specs = list(weights.geometry.layers)
    if layers is not None:
        unknown = sorted(set(layers) - {s.index for s in specs})
        if unknown:
            raise UsageError(f"--layers {unknown} not in 0..{len(specs) - 1}")
        specs = [s for s in specs if s.index in layers]
    if sequence is None:
        sequence = weights.geometry.sliding_window + PAST_WINDOW
    if not 1 <= sequence <= MAX_SEQUENCE:
        raise UsageError(f"--sequence must be in [1, {MAX_SEQUENCE}], got {sequence}")
    reference = LayerReference(weights, sequence)
    blocks = []
    for spec in progress(specs, desc="blocks", unit="block"):
        feeds, expected = reference.run(spec)
        out = run_block(model_dir, manifest, spec.index, feeds)
        blocks.append({"layer": spec.index, **block_parity(f"decoder_layer.{spec.index}", expected,
                                                           out["hidden_states_out"])})
    result: dict[str, Any] = {
        "model_dir": str(model_dir.resolve()),
        "checkpoint": source,
        "precision": manifest.get("precision"),
        "mode": "blocks",
        "sequence": sequence,
        "blocks": blocks,
        "size": package_size(manifest),
        "quantization": manifest.get("quantization"),
    }
    result["checks"] = [block_check(blocks)] if result["precision"] == "float32" else []
    result["passed"] = all(c["passed"] for c in result["checks"])
    return result
