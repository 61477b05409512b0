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
import onnx

from gemma4_onnx.exporter.geometry import LayerSpec
from gemma4_onnx.progress import progress
from gemma4_onnx.quantize.blockwise import rounded_to_nearest
from gemma4_onnx.quantize.calibration import BlockWalk, calibration_tokens
from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.quantize.graph_session import WeightFedSession, subgraph
from gemma4_onnx.quantize.plan import Entry
from gemma4_onnx.runtime.parity import kl_sum

TOKENS = 512
MEASURE_AT = "block"  # or "output": see ``measure_at`` (docs/quantization.md)
OUTPUT_MAX_BYTES = 1 << 30
OTHER_BLOCKS: tuple[int, ...] = ()  # e.g. (16, 64): int4 block sizes also measured, for the budget to choose


def other_block_key(name: str, block: int) -> str:
    """The sensitivity entry of tensor ``name`` rounded at int4 with ``block`` instead of its planned block."""
    return f"{name} block {block}"


def other_blocks(entry: Entry) -> list[int]:
    """The other int4 block sizes measured for a tensor: those dividing its K (none pads)."""
    k = entry.candidate.shape[-1]
    return [b for b in OTHER_BLOCKS if b != entry.decision.block_size and k % b == 0]


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
    """Tensor name → its sensitivity (``measure_at``): at its block's output, Σ‖Δh‖² / Σ‖h‖² with only that
    tensor at int4; at the model's output, the mean KL(float ‖ that tensor at int4) of the next-token
    distributions. Under ``other_block_key``, the same at the other int4 block sizes (``other_blocks``)."""
    wanted = {e.candidate.name: e for e in entries}
    walk = BlockWalk(root, manifest, tensors, calibration_tokens(root, text)[:TOKENS])
    if measure_at(entries) == "output":
        return _output_sensitivities(walk, wanted)
    out: dict[str, float] = {}
    for spec in progress(walk.geometry.layers, desc="sensitivity", unit="block"):
        out.update(_block_sensitivities(walk, spec, wanted))
    return out


def measure_at(entries: list[Entry]) -> str:
    """"output" where every candidate's float weights fit ``OUTPUT_MAX_BYTES`` (all blocks are held, to
    carry each trial to the logits), else "block"; ``MEASURE_AT`` = "block" always measures at blocks."""
    if MEASURE_AT == "block" or sum(e.candidate.size for e in entries) * 4 > OUTPUT_MAX_BYTES:
        return "block"
    return "output"


def _trials(name: str, entry: Entry) -> list[tuple[str, Entry]]:
    """(sensitivity key, the entry to round by) for the planned block and the other block sizes."""
    return [(name, entry)] + [
        (other_block_key(name, b), Entry(entry.candidate, replace(entry.decision, block_size=b), entry.rule))
        for b in other_blocks(entry)]


def _output_sensitivities(walk: BlockWalk, wanted: dict[str, Entry]) -> dict[str, float]:
    """Each trial run from its block to the logits, the later blocks on float weights, the K/V a changed
    producer publishes handed to the layers that reuse it."""
    layers = walk.geometry.layers
    blocks, feeds = [], []
    for spec in progress(layers, desc="sensitivity (float run)", unit="block"):
        blocks.append(walk.block(spec))
        feeds.append([walk.feeds(spec, w) for w in walk.windows()])
        walk.advance(spec, [blocks[-1].run_all(f) for f in feeds[-1]])
    head = _head(walk)
    reference = [head.run(["logits"], {head.model.graph.input[0].name: h})[0] for h in walk.hidden]

    def logits(start: int, window: int, replaced: dict[str, np.ndarray]) -> np.ndarray:
        published: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        hidden: np.ndarray | None = None
        for spec in layers[start:]:
            run_feeds = dict(feeds[spec.index][window])
            if hidden is not None:
                run_feeds["hidden_states"] = hidden
            if spec.kv_producer in published:
                run_feeds["shared_key"], run_feeds["shared_value"] = published[spec.kv_producer]
            out = blocks[spec.index].run_all(run_feeds, replaced if spec.index == start else None)
            hidden = out["hidden_states_out"]
            if spec.kv_mode == "store":
                published[spec.index] = (out["published_key"], out["published_value"])
        assert hidden is not None  # ``layers[start:]`` holds the block whose tensor was rounded
        return head.run(["logits"], {head.model.graph.input[0].name: hidden})[0]

    out: dict[str, float] = {}
    for spec in progress(layers, desc="sensitivity", unit="block"):
        block = blocks[spec.index]
        for name in sorted(set(block.weights) & set(wanted)):
            for key, trial in _trials(name, wanted[name]):
                replaced = {name: fake_quantized(block.weights[name], trial)}
                total = positions = 0.0
                for window in walk.windows():
                    ours = logits(spec.index, window, replaced)
                    total += kl_sum(reference[window], ours)
                    positions += ours.size // ours.shape[-1]
                out[key] = total / positions
    return out


def _head(walk: BlockWalk) -> WeightFedSession:
    """The decoder's head (final norm, tied LM head, soft cap): the last block's output → logits."""
    decoder = onnx.load(walk.root / walk.manifest["graphs"]["decoder"]["file"], load_external_data=False)
    last = f"hidden_states.{walk.geometry.num_layers}"
    return WeightFedSession(subgraph(decoder, [last], ["logits"]), walk.tensors, "")


def _block_sensitivities(walk: BlockWalk, spec: LayerSpec, wanted: dict[str, Entry]) -> dict[str, float]:
    """One block's candidates; its weights go when it returns, before the next block's are read (held
    across the loop, two 26B-A4B layers were in memory at once: 3.1 GB each)."""
    block = walk.block(spec)
    outputs = [block.run_all(walk.feeds(spec, window)) for window in walk.windows()]
    energy = sum(float(np.sum(np.square(o["hidden_states_out"], dtype=np.float64))) for o in outputs)
    out: dict[str, float] = {}
    for name in sorted(set(block.weights) & set(wanted)):
        for key, trial in _trials(name, wanted[name]):
            replaced = {name: fake_quantized(block.weights[name], trial)}
            change = 0.0
            for window, reference in zip(walk.windows(), outputs, strict=True):
                (hidden,) = block.run(["hidden_states_out"], walk.feeds(spec, window), replaced)
                change += float(np.sum(np.square(hidden - reference["hidden_states_out"], dtype=np.float64)))
            out[key] = change / energy
            del replaced  # before the next tensor's copy is made
    walk.advance(spec, outputs)
    return out
