"""Tensor sensitivity: the error at its block's output when only that tensor is quantized.

For every candidate the plan would quantize at 4 bits, its decoder block is run on calibration text with
that tensor alone replaced by its round-to-nearest int4 copy (quantized, then dequantized); the energy of
the change of the block's output relative to the output's own energy, Σ‖h_q − h‖² / Σ‖h‖², is that
tensor's sensitivity. Every block writes into the same residual stream, so these are comparable across
layers. Round-to-nearest stands in for the plan's algorithm: it ranks tensors the same way at a fraction
of GPTQ's cost. Blocks run one at a time on their float inputs (``calibration.BlockWalk``), so this needs
one layer's weights in memory at any variant size, and an export in progress measures exactly what a
float package would.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_onnx.progress import progress
from gemma4_onnx.quantize.blockwise import blockwise
from gemma4_onnx.quantize.calibration import BlockWalk, calibration_tokens
from gemma4_onnx.quantize.experts import dequantize
from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.quantize.plan import Entry

TOKENS = 512


def fake_quantized(weight: np.ndarray, entry: Entry) -> np.ndarray:
    """``weight`` rounded to the entry's grid at 4 bits (each expert of a stack on its own), as float."""
    decision = replace(entry.decision, bits=4, algorithm="rtn")
    out = np.empty(weight.shape, weight.dtype)  # written expert by expert: 26B-A4B's gate/up stack is 2 GB
    for matrix, rounded in zip(weight.reshape(-1, *weight.shape[-2:]), out.reshape(-1, *weight.shape[-2:]),
                               strict=True):
        rounded[...] = dequantize(*blockwise(matrix, decision), bits=4, k=matrix.shape[1])
    return out


def sensitivities(root: Path, manifest: dict[str, Any], tensors: FloatTensors, entries: list[Entry],
                  text: str) -> dict[str, float]:
    """Tensor name → Σ‖Δh‖² / Σ‖h‖² at its block's output with only that tensor at int4."""
    wanted = {e.candidate.name: e for e in entries}
    walk = BlockWalk(root, manifest, tensors, calibration_tokens(root, text)[:TOKENS])
    out: dict[str, float] = {}
    for spec in progress(walk.geometry.layers, desc="sensitivity", unit="block"):
        block = walk.block(spec)
        outputs = [block.run_all(walk.feeds(spec, window)) for window in walk.windows()]
        energy = sum(float(np.sum(np.square(o["hidden_states_out"], dtype=np.float64))) for o in outputs)
        for name in sorted(set(block.weights) & set(wanted)):
            replaced = {name: fake_quantized(block.weights[name], wanted[name])}
            change = 0.0
            for window, reference in zip(walk.windows(), outputs, strict=True):
                (hidden,) = block.run(["hidden_states_out"], walk.feeds(spec, window), replaced)
                change += float(np.sum(np.square(hidden - reference["hidden_states_out"], dtype=np.float64)))
            out[name] = change / energy
            del replaced  # before the next tensor's copy is made
        walk.advance(spec, outputs)
    return out
