"""Quantization quality levers measured on the trained fixtures (docs/quantization.md).

    .venv/bin/python bench/quality_levers.py e2b-mini int4 [--budget 4.9] [--set gptq.ACT_ORDER=True] ...

Exports the fixture in fp32 once (kept under build/levers/), computes the float package's logits on the
parity windows once, then quantizes with the recipe and the module settings given by ``--set``
(``module.NAME=python literal``, modules under gemma4_onnx.quantize) and measures what ``gemma4-onnx
parity`` measures teacher-forced (the first 4096 tokens of eval.txt in windows of 512): KL, top-1 and bits
per byte against the float package, and the stored bits per linear weight. One JSON line per run is appended
to build/levers/results.jsonl and printed; the float package stands in for transformers (fp32 parity: KL
< 1e-12), so the figures equal the parity table's.
"""

import argparse
import ast
import importlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
WORK = ROOT / "build" / "levers"
EVAL_TOKENS, WINDOW = 4096, 512


def float_package(fixture: str) -> Path:
    from gemma4_onnx.exporter.package import export_package

    out = WORK / fixture / "fp32"
    if not (out / "manifest.json").is_file():
        export_package(str(FIXTURES / fixture), out, force=True)
    return out


def eval_windows(package: Path, fixture: str) -> tuple[list[list[int]], list[int]]:
    from gemma4_onnx.graphs.manifest import read_manifest
    from gemma4_onnx.runtime.parity import windows
    from gemma4_onnx.runtime.tokenizer import decode, encode, read_tokenizer

    tokenizer = read_tokenizer(package, read_manifest(package))
    text = (FIXTURES / fixture / "eval.txt").read_text(encoding="utf-8", errors="replace")
    cuts = windows(encode(tokenizer, text), WINDOW, EVAL_TOKENS)
    target_bytes = [len(decode(tokenizer, w[1:], skip_special_tokens=False).encode("utf-8")) for w in cuts]
    return cuts, target_bytes


def logits(package: Path, cuts: list[list[int]]) -> list[np.ndarray]:
    from gemma4_onnx.runtime.text_model import TextModel

    model = TextModel(package)
    return [model.forward([w], model.empty_cache(1))[0] for w in cuts]


def reference_logits(package: Path, fixture: str, cuts: list[list[int]]) -> list[np.ndarray]:
    cached = WORK / fixture / "fp32_logits.npz"
    if cached.is_file():
        with np.load(cached) as data:
            return [data[str(i)] for i in range(len(cuts))]
    out = logits(package, cuts)
    arrays: dict[str, Any] = {str(i): x for i, x in enumerate(out)}
    np.savez(cached, **arrays)
    return out


def apply_settings(settings: list[str]) -> dict[str, object]:
    applied: dict[str, object] = {}
    for setting in settings:
        target, value = setting.split("=", 1)
        module, name = target.rsplit(".", 1)
        mod = importlib.import_module(f"gemma4_onnx.quantize.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"--set {setting}: gemma4_onnx.quantize.{module} has no {name}")
        setattr(mod, name, ast.literal_eval(value))
        applied[target] = ast.literal_eval(value)
    return applied


def measure(fixture: str, recipe: str, budget: float | None, settings: list[str], label: str,
            calibration: Path | None = None) -> dict[str, object]:
    from gemma4_onnx.progress import set_quiet
    from gemma4_onnx.quantize.job import quantize_package
    from gemma4_onnx.runtime.parity import LogitStats

    set_quiet(True)
    applied = apply_settings(settings)
    fp32 = float_package(fixture)
    cuts, target_bytes = eval_windows(fp32, fixture)
    reference = reference_logits(fp32, fixture, cuts)
    out = WORK / fixture / f"q-{label}"
    started = time.perf_counter()
    quantize_package(fp32, out, recipe, force=True, budget_bits=budget, calibration=calibration)
    quantize_s = time.perf_counter() - started
    stats = LogitStats()
    for window, ref, ours, size in zip(cuts, reference, logits(out, cuts), target_bytes, strict=True):
        stats.add(ref[:-1], ours[:-1], np.array(window[1:]), size)
    text = stats.as_dict()
    quantization = json.loads((out / "manifest.json").read_text())["quantization"]
    moved = sorted(e["tensor"].removeprefix("model.language_model.") for e in quantization["plan"]
                   if e["rule"].startswith("budget"))
    result = {
        "fixture": fixture, "recipe": recipe, "budget": budget, "label": label, "settings": applied,
        "calibration": str(calibration) if calibration else "built-in",
        "kl_mean": text["kl_mean"], "top1": text["top1_agreement"],
        "bpb_float": text["bits_per_byte_reference"], "bpb": text["bits_per_byte_onnx"],
        "bpb_increase_pct": 100 * (text["bits_per_byte_onnx"] / text["bits_per_byte_reference"] - 1),
        "bits_per_linear_weight": quantization["avg_bits_per_linear_weight"], "budget_moved": moved,
        "quantize_s": round(quantize_s, 1), "measured_s": round(time.perf_counter() - started, 1),
    }
    shutil.rmtree(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", choices=["e2b-mini", "moe-mini"])
    parser.add_argument("recipe")
    parser.add_argument("--budget", type=float)
    parser.add_argument("--set", action="append", default=[], dest="settings")
    parser.add_argument("--label", default="run")
    parser.add_argument("--calibration", type=Path, help="calibration text (default: the built-in text)")
    args = parser.parse_args()
    result = measure(args.fixture, args.recipe, args.budget, args.settings, args.label, args.calibration)
    WORK.mkdir(parents=True, exist_ok=True)
    with (WORK / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
