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

from pathlib import Path
from typing import Any

import numpy as np

from gemma4_onnx.exporter.geometry import LayerSpec
from gemma4_onnx.progress import progress
from gemma4_onnx.quantize.blockwise import rounded_to_nearest
from gemma4_onnx.quantize.calibration import BlockWalk, calibration_tokens
from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.quantize.plan import Entry

TOKENS = 512


def fake_quantized(weight: np.ndarray, entry: Entry) -> np.ndarray:
    """``weight`` [..., N, K] rounded to nearest on the entry's grid at 4 bits, blocks along K, as float:
    what onnxruntime's ``quantize_matmul_4bits`` then dequantization give, computed in torch a matrix at a time
    (26B-A4B's gate/up stack is 2 GB; a round trip through the kernel took 60 % of this step there)."""
    import torch

    block = entry.decision.block_size
    out = np.empty(weight.shape, np.float32)
    k = weight.shape[-1]
    for matrix, rounded in zip(weight.reshape(-1, *weight.shape[-2:]), out.reshape(-1, *weight.shape[-2:]),
                               strict=True):
        blocks = torch.nn.functional.pad(torch.from_numpy(matrix).float(), (0, -k % block))
        codes, scale, zero = rounded_to_nearest(blocks.reshape(matrix.shape[0], -1, block), 4,
                                                entry.decision.symmetric)
        rounded[...] = codes.sub_(zero).mul_(scale).reshape(matrix.shape[0], -1)[:, :k].numpy()
    return out


def sensitivities(root: Path, manifest: dict[str, Any], tensors: FloatTensors, entries: list[Entry],
                  text: str) -> dict[str, float]:
    """Tensor name → Σ‖Δh‖² / Σ‖h‖² at its block's output with only that tensor at int4."""
    wanted = {e.candidate.name: e for e in entries}
    walk = BlockWalk(root, manifest, tensors, calibration_tokens(root, text)[:TOKENS])
    out: dict[str, float] = {}
    for spec in progress(walk.geometry.layers, desc="sensitivity", unit="block"):
        out.update(_block_sensitivities(walk, spec, wanted))
    return out


def _block_sensitivities(walk: BlockWalk, spec: LayerSpec, wanted: dict[str, Entry]) -> dict[str, float]:
    """One block's candidates; its weights go when it returns, before the next block's are read (held
    across the loop, two 26B-A4B layers were in memory at once: 3.1 GB each)."""
    block = walk.block(spec)
    outputs = [block.run_all(walk.feeds(spec, window)) for window in walk.windows()]
    energy = sum(float(np.sum(np.square(o["hidden_states_out"], dtype=np.float64))) for o in outputs)
    out: dict[str, float] = {}
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
