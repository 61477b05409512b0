"""``gemma4-onnx mobile MODEL_DIR OUT_DIR --genai``: a folder onnxruntime-genai runs (its Android and iOS SDKs
share that runtime), made from an exported package by graph surgery (``genai_graph``), never re-export.

What genai's cache contract costs is written down, in bytes, in the folder's README.md and manifest.json:
sliding layers keep the full length instead of W−1 tokens, and full K=V layers keep a second copy of their one
tensor. Our own runtime (``gemma4_onnx.runtime``) and the default ``mobile`` package are unchanged.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
from onnx.external_data_helper import uses_external_data

from gemma4_onnx.atomic import check_target, publish_dir
from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.manifest import read_manifest, write_manifest
from gemma4_onnx.mobile.genai_graph import PAST, PRESENT, merged_decoder
from gemma4_onnx.runtime.checked_session import checked_graph
from gemma4_onnx.runtime.package_files import check_package

MODEL = "model.onnx"
CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FLOAT_BYTES = 4


def genai_package(model_dir: Path, out_dir: Path, *, force: bool = False, context_length: int | None = None) -> Path:
    """Write ``out_dir`` (model.onnx, the package's weight files, genai_config.json, tokenizer, README.md,
    manifest.json), published whole or not at all."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = read_manifest(model_dir)
    graphs = manifest.get("graphs", {})
    if "embed" not in graphs or "decoder" not in graphs:
        raise UsageError(f"{model_dir} has no embed and decoder graphs to run with onnxruntime-genai")
    check_package(model_dir, manifest)
    check_target(out_dir, force)
    text = manifest["text_config"]
    context = int(context_length or text.get("max_position_embeddings") or 8192)
    cache: list[dict[str, Any]] = manifest["cache"]
    cost = cache_cost(cache, context)

    # Weights stay in the package's own data files (copied beside model.onnx), so nothing large is loaded.
    embed = checked_graph(model_dir, manifest, graphs["embed"]["file"])
    decoder = checked_graph(model_dir, manifest, graphs["decoder"]["file"])
    merged = merged_decoder(embed, decoder, cache)
    with publish_dir(out_dir, force=force) as staging:
        for name in sorted({*data_files(merged), *(n for n in TOKENIZER_FILES if (model_dir / n).is_file())}):
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / name, staging / name)
        onnx.save(merged, str(staging / MODEL))
        (staging / CONFIG).write_text(json.dumps(genai_config(text, cache, context), indent=2) + "\n")
        (staging / "README.md").write_text(readme(cost))
        source = {"kind": "package", "path": str(model_dir.resolve()), "source": manifest.get("source")}
        write_manifest(staging, {"kind": "onnxruntime-genai", "source": source, "precision": manifest.get("precision"),
                                 "genai_cache": cost})
    return out_dir


def data_files(model: onnx.ModelProto) -> set[str]:
    """The external data files ``model``'s weights point at (relative names, checked by check_package)."""
    return {entry.value for init in model.graph.initializer if uses_external_data(init)
            for entry in init.external_data if entry.key == "location"}


def genai_config(text: dict[str, Any], cache: list[dict[str, Any]], context: int) -> dict[str, Any]:
    first = cache[0]["shape"]
    eos = text.get("eos_token_id")
    return {
        "model": {
            "type": "gemma",
            "bos_token_id": int(text.get("bos_token_id", 2)),
            "eos_token_id": eos if isinstance(eos, list) else [int(eos if eos is not None else 1)],
            "pad_token_id": int(text.get("pad_token_id") or 0),
            "context_length": context,
            "vocab_size": int(text["vocab_size"]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL,
                # genai reads each layer's own kv_heads and head_dim from the graph; these are layer 0's.
                "head_size": int(first[3]),
                "hidden_size": int(text["hidden_size"]),
                "num_attention_heads": int(text["num_attention_heads"]),
                "num_key_value_heads": int(first[1]),
                "num_hidden_layers": len(cache),
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": PAST.format("%d", "key"), "past_value_names": PAST.format("%d", "value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT.format("%d", "key"),
                            "present_value_names": PRESENT.format("%d", "value")},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True},
    }


def cache_cost(cache: list[dict[str, Any]], context: int) -> dict[str, Any]:
    """fp32 cache bytes per sequence at ``context`` tokens: genai's layout against our runtime's."""
    ours = genai = 0
    for layer in cache:
        _, heads, _, dim = layer["shape"]
        row = int(heads) * int(dim) * FLOAT_BYTES
        kept = context if layer["max_length"] is None else min(context, int(layer["max_length"]))
        ours += len(layer["past"]) * row * kept
        genai += 2 * row * context
    return {"context_length": context, "our_runtime_bytes": ours, "genai_bytes": genai, "extra_bytes": genai - ours,
            "why": "genai keeps every cache at the full length (ours keeps W-1 tokens on sliding layers) and a "
                   "key and a value per layer (ours keeps one tensor on full K=V layers)"}


def readme(cost: dict[str, Any]) -> str:
    mib = 1 << 20
    return (
        "# onnxruntime-genai folder\n\n"
        "Written by `gemma4-onnx mobile MODEL_DIR OUT_DIR --genai` from an exported package: its embed and decoder "
        "graphs merged into `model.onnx`, with an adapter to genai's cache contract. Run it with "
        "`onnxruntime_genai.Model(this_folder)`.\n\n"
        "## Memory cost of genai's cache contract\n\n"
        f"At {cost['context_length']} tokens per sequence, fp32: {cost['genai_bytes'] / mib:.2f} MiB of KV cache "
        f"under genai against {cost['our_runtime_bytes'] / mib:.2f} MiB under gemma4-onnx's own runtime "
        f"(+{cost['extra_bytes'] / mib:.2f} MiB). Why: {cost['why']}. Positions older than the window are "
        "kept (as zeros after a long prefill) but never read. genai grows the cache with the sequence, up to "
        "`search.max_length`, and (past_present_share_buffer off, as this adapter needs) holds past and present "
        "together during a step, so its peak is about twice the figure above.\n"
    )
