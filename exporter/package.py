"""``gemma4-onnx export``: a checkpoint (or a variant's random weights) → an ONNX package.

    embed.onnx     token ids → inputs_embeds (+ per_layer_inputs on E-models)
    ple.data       the per-layer embedding table, alone and page-aligned (E-models)
    embed.data     token embedding (shared with the tied LM head) and the PLE projection
    decoder.onnx   all layers, final norm, tied head, soft cap; KV caches only for cache-owning layers
    decoder.data   the final norm
    blocks/        each decoder layer as its own graph; blocks/layer_NN.data holds that layer's weights
                   and decoder.onnx points into the same files (nothing is stored twice)
    manifest.json  files + sha256, graph signatures, cache layout, source, versions (written last)

Weights stream: each tensor is read from the source when its block is written, a chunk of rows at a
time (the PLE table is 9.4 GB in fp32), and dropped after.
Each distinct layer kind is traced once (see ``trace``); every other layer reuses its function.
"""

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from gemma4_onnx import __version__
from gemma4_onnx.atomic import publish_dir
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.checkpoint import open_contained
from gemma4_onnx.exporter.decoder_layer import DecoderLayerBlock, layer_kind
from gemma4_onnx.exporter.embed import EmbedBlock
from gemma4_onnx.exporter.geometry import LayerSpec, TextGeometry
from gemma4_onnx.exporter.head import HeadBlock
from gemma4_onnx.exporter.hf_model import STATE_PREFIX, expected_tensors
from gemma4_onnx.exporter.towers import export_towers
from gemma4_onnx.exporter.trace import TracedBlock, block_weights, trace_block
from gemma4_onnx.exporter.weights import CheckpointWeights, WeightSource, example_weights, open_source
from gemma4_onnx.graphs.compose import build_model, call, tensor_info
from gemma4_onnx.graphs.external_data import LoaderEntry, PackageWriter
from gemma4_onnx.graphs.lower_ort import lower_to_ort
from gemma4_onnx.graphs.manifest import IMAGE_BLOCKS, graph_signature, write_manifest
from gemma4_onnx.progress import progress
from gemma4_onnx.runtime.package_files import SIDE_FILES

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
PLE_TABLE = STATE_PREFIX + "embed_tokens_per_layer.weight"
EMBED_TABLE = STATE_PREFIX + "embed_tokens.weight"


def block_file(index: int) -> str:
    return f"blocks/layer_{index:02d}"


def cache_names(spec: LayerSpec, prefix: str) -> list[str]:
    return [f"{prefix}.{spec.index}.{part}" for part in spec.cache_parts]


def cache_layout(geometry: TextGeometry) -> list[dict[str, Any]]:
    """What the runtime must feed back: per cache-owning layer, its tensors and how long they grow."""
    return [{
        "layer": spec.index,
        "attention": spec.attention,
        "past": cache_names(spec, "past"),
        "present": cache_names(spec, "present"),
        "shape": ["batch", spec.num_kv_heads, "past_sequence", spec.head_dim],
        "max_length": geometry.sliding_window - 1 if spec.attention == "sliding" else None,
        "k_eq_v": spec.k_eq_v,
    } for spec in geometry.cache_layers]


class _Writer(PackageWriter):
    """The package writer, reading each weight from the export's source when it is first written."""

    def __init__(self, root: Path, structure_only: bool, target: str, deferred: bool = False) -> None:
        """``deferred``: no data is written, like ``structure_only``, but blocks are traced with their real
        weights and every tensor's loader is kept for the quantizer (``export --recipe``)."""
        super().__init__(root, structure_only or deferred)
        self.target = target
        self.zero_examples = structure_only
        self.lowering: dict[str, Any] = {}

    def tensor(self, weights: WeightSource, name: str, location: str) -> onnx.TensorProto:
        return self.add(name, location, lambda: weights.chunks(name), weights.shape(name))


TARGETS = ("portable", "ort")
# A layer kind's trace depends on the configuration only (weights are its inputs): one per process, like
# the towers' (``towers._TRACES``); the test suite and ``make report`` export the same variants again.
_LAYER_TRACES: dict[str, TracedBlock] = {}


def export_package(source: str, out_dir: Path, force: bool = False, structure_only: bool = False,
                   target: str = "portable") -> Path:
    """Export ``source``. ``target`` "portable" keeps the ai.gemma4 functions (any runtime); "ort" swaps in
    onnxruntime's fused kernels where they fit (``graphs.lower_ort``). With ``structure_only`` the graphs,
    signatures and cache layout are written but no weight data (full-size variants whose fp32 weights
    would not fit the disk): such a package documents and checks the structure, it cannot run.
    ``export --recipe`` is ``gemma4_onnx.pipeline``."""
    check_target_name(target)
    weights = open_source(source)
    with publish_dir(Path(out_dir), force=force, needed_bytes=None if structure_only else fp32_bytes(weights)) \
            as staging:
        _write_package(weights, _Writer(staging, structure_only, target), structure_only)
    return Path(out_dir)


def check_target_name(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")


def trace_graphs(weights: WeightSource, scratch: Path, target: str) -> dict[str, LoaderEntry]:
    """The float package's graphs and manifest in ``scratch`` with no weight data; each tensor's loader
    by name, for a quantizer that reads the weights from the source when it needs them."""
    writer = _Writer(scratch, False, target, deferred=True)
    _write_package(weights, writer, False)
    return writer.loaders


def source_key(weights: WeightSource) -> dict[str, Any]:
    """What identifies the weights an interrupted export was reading: a checkpoint's files by size and
    modification time, random weights by variant, seed and dtype."""
    key = weights.describe()
    if isinstance(weights, CheckpointWeights):
        key["files"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                        for p in sorted(weights.checkpoint.directory.iterdir()) if p.is_file()}
    return key


def _write_package(weights: WeightSource, writer: "_Writer", structure_only: bool) -> None:
    """Graphs, side files and manifest of ``weights``' model into ``writer.root``."""
    root = writer.root
    try:
        graphs = _export_graphs(weights, root, writer)
        graphs.update(export_towers(weights, root, writer))
    finally:
        writer.close()
    _copy_side_files(weights, root)
    write_manifest(root, {
        "tool": {"name": "gemma4-onnx", "version": __version__},
        "libraries": _library_versions(),
        "source": weights.describe(),
        "precision": "float32",
        "target": writer.target,
        "lowering": writer.lowering or None,
        "weights": "none: structure only" if structure_only else "complete",
        "text_config": weights.config["text_config"],
        "token_ids": {k: v for k, v in weights.config.items() if k.endswith(("_token_id", "_token_index"))},
        "graphs": graphs,
        "cache": cache_layout(weights.geometry),
        "ple": {"file": "ple.data", "tensor": PLE_TABLE} if weights.geometry.ple_dim else None,
    })


def fp32_bytes(weights: WeightSource) -> int:
    """About what a float export writes: every tensor of the model in fp32 (checked against the free space
    before anything is written)."""
    return sum(math.prod(shape) * 4 for shape, _ in expected_tensors(weights.config).values())


def _export_graphs(weights: WeightSource, root: Path, writer: _Writer) -> dict[str, Any]:
    geometry = weights.geometry
    graphs: dict[str, Any] = {}

    embed = EmbedBlock(weights.config)
    traced_embed = trace_block(embed, "embed", [torch.tensor([[2, 3, 4]])], ["input_ids"], embed.output_names,
                               [{0: "batch", 1: "sequence"}])
    embed_inputs = [tensor_info("input_ids", INT64, ["batch", "sequence"])]
    embed_outputs = _embedding_infos(geometry)
    names = [STATE_PREFIX + w for w in traced_embed.weights]
    inits = [writer.tensor(weights, n, "ple.data" if n == PLE_TABLE else "embed.data") for n in names]
    graphs["embed"] = _save(root, "embed.onnx", build_model(
        "embed", embed_inputs, embed_outputs, [call(traced_embed.function, ["input_ids", *names],
                                                    traced_embed.outputs, "embed")],
        inits, [traced_embed.function, *traced_embed.functions]))

    kinds: dict[tuple[Any, ...], TracedBlock] = {}
    decoder_nodes: list[onnx.NodeProto] = []
    decoder_functions: list[onnx.FunctionProto] = []
    decoder_inits: dict[str, onnx.TensorProto] = {}
    published: dict[int, list[str]] = {}
    hidden = "inputs_embeds"
    blocks = []
    for spec in progress(geometry.layers, desc="exporting layers", unit="layer"):
        block = DecoderLayerBlock(weights.config, spec)
        prefix = f"{STATE_PREFIX}layers.{spec.index}."
        kind = layer_kind(spec)
        if kind not in kinds:
            key = json.dumps([weights.config, repr(kind), len(kinds)], sort_keys=True)
            if key not in _LAYER_TRACES:
                example = example_weights(weights, {w: prefix + w for w in block_weights(block)},
                                          writer.zero_examples)
                _LAYER_TRACES[key] = trace_block(block, f"decoder_layer_{len(kinds)}", block.example_activations(),
                                                 block.activation_names, block.output_names, block.dynamic_axes,
                                                 example)
            kinds[kind] = _LAYER_TRACES[key]
        traced = kinds[kind]
        location = block_file(spec.index) + ".data"
        names = [prefix + w for w in traced.weights]
        for n in names:
            decoder_inits[n] = writer.tensor(weights, n, location)
        blocks.append(_save_block(root, spec, traced, block, names, writer))
        decoder_functions += [traced.function, *traced.functions]

        inputs = [hidden]
        if geometry.ple_dim:
            ple = f"per_layer_inputs.{spec.index}"
            decoder_nodes.append(onnx.helper.make_node("Gather", ["per_layer_inputs", f"layer_index.{spec.index}"],
                                                       [ple], axis=2, name=f"per_layer_input_{spec.index}"))
            decoder_inits[f"layer_index.{spec.index}"] = onnx.numpy_helper.from_array(
                np.array(spec.index, dtype=np.int64), f"layer_index.{spec.index}")
            inputs.append(ple)
        inputs.append("position_ids")
        if spec.image_blocks:
            inputs.append(IMAGE_BLOCKS)
        if spec.owns_cache:
            inputs += cache_names(spec, "past")
        else:
            assert spec.kv_producer is not None
            inputs += published[spec.kv_producer]
        hidden = f"hidden_states.{spec.index + 1}"
        outputs = [hidden]
        if spec.owns_cache:
            outputs += cache_names(spec, "present")
        if spec.kv_mode == "store":
            published[spec.index] = [f"shared.{spec.index}.key", f"shared.{spec.index}.value"]
            outputs += published[spec.index]
        decoder_nodes.append(call(traced.function, [*inputs, *names], outputs, f"layer_{spec.index}"))

    head = HeadBlock(weights.config)
    traced_head = trace_block(head, "head", [torch.zeros(1, 3, geometry.hidden_size)], ["hidden_states"],
                              ["logits"], [{0: "batch", 1: "sequence"}])
    head_names = [STATE_PREFIX + w for w in traced_head.weights]
    for n in head_names:
        decoder_inits[n] = writer.tensor(weights, n, "embed.data" if n == EMBED_TABLE else "decoder.data")
    decoder_nodes.append(call(traced_head.function, [hidden, *head_names], ["logits"], "head"))
    decoder_functions += [traced_head.function, *traced_head.functions]

    decoder_inputs = [*_embedding_infos(geometry), tensor_info("position_ids", INT64, ["batch", "sequence"])]
    if geometry.image_blocks:
        decoder_inputs.append(tensor_info(IMAGE_BLOCKS, INT64, ["batch", "sequence"]))
        decoder_inits[IMAGE_BLOCKS] = no_image_blocks()
    decoder_outputs = [tensor_info("logits", FLOAT, ["batch", "sequence", geometry.vocab_size])]
    for spec in geometry.cache_layers:
        past_len = "past_sequence" if spec.attention == "full" else f"past_sliding_{spec.index}"
        for name in cache_names(spec, "past"):
            decoder_inputs.append(tensor_info(name, FLOAT, ["batch", spec.num_kv_heads, past_len, spec.head_dim]))
        for name in cache_names(spec, "present"):
            decoder_outputs.append(tensor_info(name, FLOAT, ["batch", spec.num_kv_heads, None, spec.head_dim]))
    decoder = build_model("decoder", decoder_inputs, decoder_outputs, decoder_nodes, list(decoder_inits.values()),
                          decoder_functions)
    if writer.target == "ort":
        decoder = _lower(decoder, writer)
    graphs["decoder"] = _save(root, "decoder.onnx", decoder)
    graphs["blocks"] = blocks
    return graphs


def _embedding_infos(geometry: TextGeometry) -> list[onnx.ValueInfoProto]:
    """What embed.onnx hands the decoder: inputs_embeds, and per_layer_inputs on E-models."""
    infos = [tensor_info("inputs_embeds", FLOAT, ["batch", "sequence", geometry.hidden_size])]
    if geometry.ple_dim:
        infos.append(tensor_info("per_layer_inputs", FLOAT,
                                 ["batch", "sequence", geometry.num_layers, geometry.ple_dim]))
    return infos


def no_image_blocks() -> onnx.TensorProto:
    """The default of the ``image_blocks`` input, [[-1]]: no image tokens, so text-only callers need not feed
    it (the mask broadcasts it over [B, S])."""
    return onnx.numpy_helper.from_array(np.full((1, 1), -1, np.int64), IMAGE_BLOCKS)


def _max_position(weights: WeightSource) -> int:
    return int(weights.config["text_config"].get("max_position_embeddings", 8192))


def _save_block(root: Path, spec: LayerSpec, traced: TracedBlock, block: DecoderLayerBlock, names: list[str],
                writer: _Writer) -> dict[str, Any]:
    inputs = [tensor_info(n, t, s) for n, t, s in block.activation_infos()]
    outputs = [tensor_info(n, t, s) for n, t, s in block.output_infos()]
    inits = [writer.relocated(n, "blocks") for n in names] + ([no_image_blocks()] if spec.image_blocks else [])
    model = build_model(f"layer_{spec.index}", inputs, outputs,
                        [call(traced.function, [*block.activation_names, *names], traced.outputs, "layer")],
                        inits, [traced.function, *traced.functions])
    if writer.target == "ort":
        model = _lower(model, writer)
    return {"layer": spec.index, **_save(root, block_file(spec.index) + ".onnx", model)}


def _lower(model: onnx.ModelProto, writer: _Writer) -> onnx.ModelProto:
    """``--target ort``: fused onnxruntime kernels where they fit."""
    ir_model = ir.serde.deserialize_model(model)
    lowering = lower_to_ort(ir_model)
    writer.lowering[model.graph.name] = {"lowered": dict(lowering.lowered),
                                         "kept_as_functions": sorted({reason for _, reason in lowering.skipped})}
    return ir.serde.serialize_model(ir_model)


def _save(root: Path, relative: str, model: onnx.ModelProto) -> dict[str, Any]:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path)
    return {"file": relative, **graph_signature(model)}


def _copy_side_files(weights: WeightSource, staging: Path) -> None:
    if isinstance(weights, CheckpointWeights):
        checkpoint_dir = weights.checkpoint.directory
        for name in SIDE_FILES:
            if os.path.lexists(checkpoint_dir / name):
                with open_contained(checkpoint_dir, name, name) as source, (staging / name).open("wb") as target:
                    shutil.copyfileobj(source, target)
        return
    from gemma4_onnx.exporter.tokenizer import write_tokenizer

    (staging / "config.json").write_text(json.dumps(weights.config, indent=2) + "\n")
    write_tokenizer(staging, _max_position(weights))


def _library_versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__}

