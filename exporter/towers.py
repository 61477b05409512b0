"""The multimodal graphs of a package: ``vision_encoder.onnx`` (all variants), ``audio_encoder.onnx`` and
``ple_context.onnx`` (E2B, E4B).

    vision_encoder.onnx + vision_encoder.data   model.vision_tower.*, model.embed_vision.*
    audio_encoder.onnx  + audio_encoder.data    model.audio_tower.*, model.embed_audio.*
    ple_context.onnx                            the PLE projection and norm, shared with embed.data

Each tower is traced once, with its weights as inputs (``trace``); the audio tower in stages, one
function per conformer layer (``audio.AudioEncoderBlock.stages``). Initializers keep their checkpoint
names: quantization recipes match them by name like the decoder's. Towers with the same configuration
(tiny-e2b and tiny-e4b, for instance) share one trace per process.
"""

import json
from pathlib import Path
from typing import Any, Protocol

import onnx
import torch

from gemma4_onnx.exporter.audio import FRAME_MULTIPLE, MEL_BINS, AudioEncoderBlock, Stage
from gemma4_onnx.exporter.hf_model import STATE_PREFIX
from gemma4_onnx.exporter.ple_context import PleContextBlock
from gemma4_onnx.exporter.trace import TracedBlock, block_weights, trace_block
from gemma4_onnx.exporter.vision import SOFT_TOKEN_BUDGETS, WEIGHT_PREFIX, VisionEncoderBlock
from gemma4_onnx.exporter.weights import WeightSource, example_weights
from gemma4_onnx.graphs.compose import build_model, call, tensor_info
from gemma4_onnx.graphs.manifest import graph_signature

_TRACES: dict[str, dict[str, TracedBlock]] = {}


class _Writer(Protocol):
    zero_examples: bool

    def tensor(self, weights: WeightSource, name: str, location: str) -> onnx.TensorProto: ...


def export_towers(weights: WeightSource, root: Path, writer: _Writer) -> dict[str, Any]:
    """Write the multimodal graphs of ``weights``' model into ``root``; their manifest entries by name."""
    config = weights.config
    graphs: dict[str, Any] = {}
    if config.get("vision_config"):
        vision = config["vision_config"]
        graphs["vision_encoder"] = {
            **_export(VisionEncoderBlock(config), "vision_encoder", WEIGHT_PREFIX, weights, root, writer,
                      [config["vision_config"], config["text_config"]["hidden_size"]]),
            "patch_size": vision["patch_size"],
            "pooling_kernel_size": vision["pooling_kernel_size"],
            "position_embedding_size": vision["position_embedding_size"],
            "soft_token_budgets": list(SOFT_TOKEN_BUDGETS),
        }
    if config.get("audio_config"):
        graphs["audio_encoder"] = {
            **_export(AudioEncoderBlock(config), "audio_encoder", WEIGHT_PREFIX, weights, root, writer,
                      [config["audio_config"], config["text_config"]["hidden_size"]]),
            "mel_bins": MEL_BINS,
            "frame_multiple": FRAME_MULTIPLE,
        }
    if config["text_config"].get("hidden_size_per_layer_input") and graphs:
        graphs["ple_context"] = _export(PleContextBlock(config), "ple_context", STATE_PREFIX, weights, root,
                                        writer, [config["text_config"]], data_file="embed.data")
    return graphs


def _export(block: Any, name: str, prefix: str, weights: WeightSource, root: Path, writer: _Writer,
            kind: list[Any], data_file: str | None = None) -> dict[str, Any]:
    stages = block.stages() if hasattr(block, "stages") else [
        Stage(block, name, "", list(block.activation_names), list(block.output_names), list(block.dynamic_axes))]
    key = json.dumps([name, *kind], sort_keys=True)
    if key not in _TRACES:
        _TRACES[key] = _trace_stages(block, stages, prefix, weights, writer.zero_examples)
    traced = _TRACES[key]
    location = data_file or f"{name}.data"
    nodes, names = [], []
    for index, stage in enumerate(stages):
        function = traced[stage.function]
        stage_names = [prefix + stage.block_name(w) for w in function.weights]
        nodes.append(call(function.function, [*stage.inputs, *stage_names], stage.outputs, f"{name}_{index}"))
        names += stage_names
    inits = [writer.tensor(weights, n, location) for n in names]
    model = build_model(name, [tensor_info(*i) for i in block.input_infos()],
                        [tensor_info(*i) for i in block.output_infos()], nodes, inits,
                        [f for t in traced.values() for f in (t.function, *t.functions)])
    onnx.save_model(model, root / f"{name}.onnx")
    return {"file": f"{name}.onnx", "weights_file": location, **graph_signature(model)}


def _trace_stages(block: Any, stages: list[Stage], prefix: str, weights: WeightSource,
                  zero_examples: bool) -> dict[str, TracedBlock]:
    """Each distinct stage function traced once, on example values that flow from the block's example
    activations through the stages traced before it (a repeated stage's outputs stand in for its repeats)."""
    values = dict(zip(block.activation_names, block.example_activations(), strict=True))
    traced: dict[str, TracedBlock] = {}
    produced: dict[str, list[torch.Tensor]] = {}
    for stage in stages:
        if stage.function not in traced:
            example = example_weights(weights, {w: prefix + stage.block_name(w) for w in block_weights(stage.module)},
                                      zero_examples)
            inputs = [values[n] for n in stage.inputs]
            traced[stage.function] = trace_block(stage.module, stage.function, inputs, stage.inputs, stage.outputs,
                                                 stage.dynamic, example)
            with torch.no_grad():
                out = torch.func.functional_call(stage.module, example, tuple(inputs))
            produced[stage.function] = list(out) if isinstance(out, tuple) else [out]
        values.update(zip(stage.outputs, produced[stage.function], strict=True))
    return traced
