"""``gemma4-onnx parity``: onnxruntime against transformers on the same weights → ``parity.json``.

Teacher-forced: the first 4096 tokens of the text in windows of 512 (sequences run past the sliding
window). Greedy: ``steps`` tokens from a 128-token prompt, through the decode path on both sides.
Blocks: every exported decoder layer fed the reference's own inputs to that layer.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_onnx import tolerances
from gemma4_onnx.atomic import write_file
from gemma4_onnx.builtin_text import BUILTIN_TEXT
from gemma4_onnx.errors import CheckpointError, UsageError
from gemma4_onnx.exporter.config_schema import shown, shown_value
from gemma4_onnx.graphs.manifest import MANIFEST, read_manifest
from gemma4_onnx.multimodal_parity import multimodal_checks, multimodal_parity
from gemma4_onnx.progress import progress
from gemma4_onnx.runtime.blocks import run_block
from gemma4_onnx.runtime.generate import prompt_ids
from gemma4_onnx.runtime.margins import gate_margins
from gemma4_onnx.runtime.parity import LogitStats, block_parity, greedy_match_steps, windows
from gemma4_onnx.runtime.text_model import TextModel
from gemma4_onnx.runtime.tokenizer import decode, encode, read_tokenizer

EVAL_TOKENS = 4096
WINDOW = 512
PROMPT_TOKENS = 128



def checkpoint_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json, contained and schema-checked, without reading any weight."""
    from gemma4_onnx.exporter.checkpoint import read_config

    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint} does not exist")
    return read_config(checkpoint)


def check_same_model(model_dir: Path, manifest: dict[str, Any], source: str, source_config: dict[str, Any]) -> None:
    """Refuse a source of another model before any reference run: its text config must give the layer
    geometry of the package's (the manifest keeps the exporting checkpoint's text_config)."""
    from gemma4_onnx.exporter.geometry import text_geometry

    package_text = manifest.get("text_config") or {}
    source_text = source_config.get("text_config", source_config)
    package_geometry = text_geometry(package_text, f"{model_dir / MANIFEST}")
    if text_geometry(source_text) == package_geometry:
        return
    differing = [k for k in sorted({*package_text, *source_text}) if package_text.get(k) != source_text.get(k)]
    detail = (f"text_config.{shown(differing[0])} is {shown_value(source_text.get(differing[0]), 60)} there, "
              f"{shown_value(package_text.get(differing[0]), 60)} in the package" if differing
              else "their layer geometries differ")
    raise UsageError(f"{source} is not the source of {model_dir} (a checkpoint of another model?): {detail}")


def run_parity(model_dir: Path, checkpoint: Path, text_file: Path | None, steps: int) -> dict[str, Any]:
    from gemma4_onnx.exporter.reference_outputs import Reference

    if steps < 0:
        raise UsageError(f"--steps must be ≥ 0, got {steps}")
    check_same_model(model_dir, read_manifest(model_dir), str(checkpoint), checkpoint_config(checkpoint))
    model = TextModel(model_dir)
    reference = Reference(str(checkpoint))
    tokenizer = read_tokenizer(model_dir, read_manifest(model_dir))
    if text_file is not None:
        from gemma4_onnx.quantize.calibration import text_prefix

        text = text_prefix(text_file, tokenizer, EVAL_TOKENS, "--text")
    else:
        text = BUILTIN_TEXT
    tokens = encode(tokenizer, text)
    if len(tokens) < 2:
        raise UsageError("the evaluation text has fewer than 2 tokens")

    stats = LogitStats()
    cuts = windows(tokens, WINDOW, EVAL_TOKENS)
    for window in progress(cuts, desc="teacher-forced windows", unit="window"):
        cache = model.empty_cache(1)
        onnx_logits = model.forward([window], cache)[0]
        reference_logits = reference.logits(window)
        target_bytes = len(decode(tokenizer, window[1:], skip_special_tokens=False).encode("utf-8"))
        stats.add(reference_logits[:-1], onnx_logits[:-1], np.array(window[1:]), target_bytes)

    prompt = tokens[:PROMPT_TOKENS]
    reference_tokens = reference.greedy(prompt, steps) if steps else []
    onnx_tokens = model.greedy(prompt, steps) if steps else []

    blocks = []
    records = reference.block_io(cuts[0])
    for spec, record in progress(list(zip(reference.geometry.layers, records, strict=True)),
                                 desc="blocks", unit="block"):
        out = run_block(model_dir, model.manifest, spec.index, record["feeds"])
        blocks.append({"layer": spec.index, **block_parity(f"decoder_layer.{spec.index}", record["output"],
                                                           out["hidden_states_out"])})

    result: dict[str, Any] = {
        "model_dir": str(model_dir.resolve()),
        "checkpoint": str(checkpoint.resolve()),
        "precision": model.manifest.get("precision"),
        "text": {
            **stats.as_dict(),
            "windows": len(cuts),
            "window_tokens": WINDOW,
            "greedy_steps": steps,
            "greedy_match_steps": greedy_match_steps(reference_tokens, onnx_tokens),
            "greedy_reference": reference_tokens,
            "greedy_onnx": onnx_tokens,
            "prompt_tokens": len(prompt),
            "text_source": str(text_file) if text_file else "built-in",
        },
        "blocks": blocks,
        "size": package_size(model.manifest),
        "quantization": model.manifest.get("quantization"),
    }
    media_steps = min(steps, tolerances.MULTIMODAL_GREEDY_STEPS)
    result.update(multimodal_parity(model_dir, checkpoint, lambda text: encode(tokenizer, text),
                                    prompt_ids(tokenizer, model_dir, ""), media_steps))
    result["checks"] = fp32_checks(result) + multimodal_checks(result) if result["precision"] == "float32" else []
    result["passed"] = all(c["passed"] for c in result["checks"])
    result["margins"] = gate_margins(result)  # each gate's value, threshold and distance to it
    return result


def package_size(manifest: dict[str, Any]) -> dict[str, Any]:
    """Bytes per file, the PLE file apart, and stored bits per decoder linear weight."""
    files = manifest["files"]
    ple = (manifest.get("ple") or {}).get("file")
    quantization = manifest.get("quantization") or {}
    return {
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "ple_bytes": files[ple]["bytes"] if ple in files else 0,
        "by_file": {name: f["bytes"] for name, f in files.items()},
        "avg_bits_per_linear_weight": quantization.get("avg_bits_per_linear_weight", 32.0),
    }


def fp32_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    text = result["text"]
    checks = [
        ("text.greedy_match_steps == text.greedy_steps", text["greedy_match_steps"] == text["greedy_steps"]),
        (f"text.max_abs_logit_diff <= {tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF}",
         text["max_abs_logit_diff"] <= tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF),
        (f"text.kl_mean <= {tolerances.TEXT_FP32_KL_MEAN}", text["kl_mean"] <= tolerances.TEXT_FP32_KL_MEAN),
    ]
    return [{"check": name, "passed": bool(ok)} for name, ok in checks] + [block_check(result["blocks"])]


def block_check(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The fp32 gate on per-block parity, shared by ``parity`` and ``parity --blocks``."""
    worst = min((float(b["cosine"]) for b in blocks), default=1.0)
    return {"check": f"blocks[*].cosine >= {tolerances.BLOCK_FP32_MIN_COSINE}",
            "passed": worst >= tolerances.BLOCK_FP32_MIN_COSINE}


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir``/parity.json, replaced whole (``atomic.write_file``)."""
    return write_file(out_dir / "parity.json", json.dumps(result, indent=1) + "\n")


def summary(result: dict[str, Any]) -> str:
    worst = min(result["blocks"], key=lambda b: b["cosine"]) if result["blocks"] else None
    lines = []
    if t := result.get("text"):
        lines += [
            f"max |Δlogit| {t['max_abs_logit_diff']:.3g}   KL {t['kl_mean']:.3g} nats   "
            f"top-1 {t['top1_agreement']:.4f}",
            f"bits/byte reference {t['bits_per_byte_reference']:.4f}   onnx {t['bits_per_byte_onnx']:.4f}",
            f"greedy {t['greedy_match_steps']}/{t['greedy_steps']} steps identical",
        ]
    if worst:
        lines.append(f"blocks: {len(result['blocks'])}, lowest cosine {worst['cosine']:.8f} ({worst['name']})")
    for check in result["checks"]:
        lines.append(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}")
    return "\n".join(lines)
