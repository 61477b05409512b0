"""Decode ms/token and prefill tokens/s at 128 and 1024 tokens of context, fp32 / int8 / int4 packages of
both trained fixtures, side by side with transformers eager (the PyTorch source) on the same weights,
and the memory-bandwidth roofline: this machine's measured read bandwidth, the bytes of weights one
decoded token reads (every decoder weight file; PLE rows and towers excluded), and the decode speed
as a fraction of bandwidth / bytes.

All runs of one fixture are measured round-robin (``measure.interleaved_ms``) so a change of machine
load hits them alike. Packages are written to a temporary directory and removed at the end.
``--quick`` uses tiny-e2b with shorter contexts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from measure import Section, interleaved_ms

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
RECIPES = ("int8", "int4")
CONTEXTS = (128, 1024)
DECODE_STEPS = 16


def read_bandwidth_gbs(megabytes: int = 1024, runs: int = 5) -> list[float]:
    """GB/s of summing a 4-byte-float buffer larger than the caches on every core torch uses: a read-only
    stream, like decoding weights, which onnxruntime and transformers read from all cores. (numpy's float64 sum
    on one thread measured 19 GB/s here, its summation and not memory the limit: torch's sum reached 38 GB/s
    on one thread and 44–50 GB/s on two.)"""
    import torch

    data = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        data.sum()
        samples.append(data.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return samples


def weight_bytes_per_token(package: Path) -> int:
    """Bytes of the decoder's weights: every data file the decoder graph reads, without the PLE table."""
    manifest = json.loads((package / "manifest.json").read_text())
    ple = (manifest.get("ple") or {}).get("file")
    files = manifest["files"]
    decoder_files = [name for name in files if name.endswith(".data") and name != ple
                     and (name.startswith("blocks/") or name in ("embed.data", "decoder.data"))]
    return sum(files[name]["bytes"] for name in decoder_files)


class OnnxRunner:
    """Prefill and decode through a package's plain onnxruntime sessions."""

    def __init__(self, package: Path) -> None:
        from gemma4_onnx.runtime.text_model import TextModel

        self.model = TextModel(package)

    def prefill(self, ids: list[int]) -> Any:
        cache = self.model.empty_cache(1)
        self.model.forward(np.array([ids]), cache)
        return cache

    def step(self, cache: Any, token: int) -> None:
        self.model.forward(np.array([[token]]), cache)


class EagerRunner:
    """Prefill and decode through transformers eager: the whole model in fp32 (fixtures), or with ``lean``
    the text model alone in the checkpoint's bf16 (full size, where fp32 would not fit beside the packages)."""

    def __init__(self, checkpoint: Path, lean: bool = False) -> None:
        from gemma4_onnx.exporter.checkpoint import Checkpoint
        from gemma4_onnx.exporter.reference import load_reference_model, load_reference_text_model

        opened = Checkpoint.open(str(checkpoint))
        self.model = load_reference_text_model(opened) if lean else load_reference_model(opened)

    def weight_bytes_per_token(self) -> int:
        """Bytes of the text model's weights a decoded token reads: all but the PLE table, whose rows are
        gathered; the tied embedding counted once, as the LM head reads it whole."""
        text = self.model.model.language_model
        return sum(p.numel() * p.element_size() for name, p in text.named_parameters()
                   if not name.startswith("embed_tokens_per_layer."))

    def prefill(self, ids: list[int]) -> Any:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.get_text_config())
        with torch.no_grad():
            self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        return cache

    def step(self, cache: Any, token: int) -> None:
        import torch

        with torch.no_grad():
            self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)


def _prefill(runner: Any, prompt: list[int]) -> Any:
    return lambda _: runner.prefill(prompt)


def decode_token(index: int) -> int:
    """The token fed at the ``index``-th decode step: varied, always in every vocabulary."""
    return 7 + index % 5


def decode_call(runner: Any, cache: Any) -> Callable[[int], Any]:
    """One decode step after ``cache`` per call, the token varied by the round number."""
    return lambda round_index: runner.step(cache, decode_token(round_index))


Speeds = dict[tuple[str, int], dict[str, list[float]]]  # (runner, context) → prefill_ms / decode_ms samples


def measure_runners(runners: dict[str, Any], ids: list[int], contexts: tuple[int, ...], runs: int) -> Speeds:
    """Per runner and context: prefill ms (whole prompt) and decode ms/token after that prompt."""
    out: Speeds = {}
    for context in contexts:
        prompt = ids[:context]
        prefill = interleaved_ms({name: _prefill(r, prompt) for name, r in runners.items()}, runs, 1)
        caches = {name: r.prefill(prompt) for name, r in runners.items()}
        steps = interleaved_ms({name: decode_call(r, caches[name]) for name, r in runners.items()},
                               DECODE_STEPS if runs > 2 else 4, 2)
        for name in runners:
            out[(name, context)] = {"prefill_ms": prefill[name], "decode_ms": steps[name]}
    return out


def section(quick: bool) -> Section:
    from gemma4_onnx.exporter.init_checkpoint import init_checkpoint
    from gemma4_onnx.exporter.package import export_package
    from gemma4_onnx.pipeline import export
    from gemma4_onnx.progress import set_quiet
    from gemma4_onnx.quantize.job import quantize_package

    set_quiet(True)
    sources = {"tiny-e2b": None} if quick else {name: FIXTURES / name for name in ("e2b-mini", "moe-mini")}
    contexts = (16, 64) if quick else CONTEXTS
    runs = 2 if quick else 5
    bandwidth = read_bandwidth_gbs(256 if quick else 1024)
    title = ("Decode and prefill: fp32 / int8 / int4 packages (portable and --target ort) vs transformers eager, "
             "and the roofline")
    section = Section("decode", title, {
        "threads": f"onnxruntime default, torch {os.cpu_count()}", "decode steps per point": DECODE_STEPS,
        "contexts": list(contexts), "read bandwidth GB/s (median)": f"{np.median(bandwidth):.1f}"})
    bw = section.figure("read bandwidth", "GB/s", bandwidth)
    section.columns = ["package", "context", "runner", "prefill tok/s", "decode ms/token", "vs eager",
                       "weights read/token", "roofline ms", "of roofline"]
    root = Path(tempfile.mkdtemp(prefix="gemma4-bench-decode-", dir=os.environ.get("GEMMA4_BENCH_TMP")))
    try:
        for name, checkpoint in sources.items():
            if checkpoint is None:
                checkpoint = init_checkpoint(name, root / f"{name}-checkpoint", dtype="float32")
            elif not checkpoint.is_dir():
                section.findings.append(f"{name}: fixture not found at {checkpoint}; skipped")
                continue
            fp32 = export_package(str(checkpoint), root / f"{name}-fp32")
            packages = {"fp32": fp32}
            for recipe in RECIPES:
                packages[recipe] = quantize_package(fp32, root / f"{name}-{recipe}", recipe)
            # --target ort (GroupQueryAttention, RotaryEmbedding where they fit) beside the portable graphs
            packages["fp32 ort"] = export_package(str(checkpoint), root / f"{name}-fp32-ort", target="ort")
            packages["int4 ort"] = export(str(checkpoint), root / f"{name}-int4-ort", target="ort", recipe="int4")
            runners: dict[str, Any] = {"eager": EagerRunner(checkpoint),
                                       **{k: OnnxRunner(p) for k, p in packages.items()}}
            tokens = list(np.random.default_rng(0).integers(10, 200, size=max(contexts)))
            results = measure_runners(runners, [int(t) for t in tokens], contexts, runs)
            for context in contexts:
                eager = results[("eager", context)]
                eager_decode = section.figure(f"{name} eager decode ms @{context}", "ms", eager["decode_ms"])
                for runner in runners:
                    r = results[(runner, context)]
                    prefill = section.figure(f"{name} {runner} prefill ms @{context}", "ms", r["prefill_ms"])
                    decode = eager_decode if runner == "eager" else section.figure(
                        f"{name} {runner} decode ms @{context}", "ms", r["decode_ms"])
                    row = [name, str(context), runner, f"{context / prefill.median * 1e3:.0f}", f"{decode.median:.2f}"]
                    if runner == "eager":
                        row += ["1.00×", "-", "-", "-"]
                    else:
                        speedup = section.ratio(f"{name} {runner} eager/onnx decode @{context}", eager_decode, decode)
                        weights = weight_bytes_per_token(packages[runner])
                        roofline_ms = weights / (bw.median * 1e9) * 1e3
                        row += [f"{speedup.value:.2f}×", f"{weights / 1e6:.1f} MB", f"{roofline_ms:.3f}",
                                f"{roofline_ms / decode.median:.0%}"]
                    section.rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    section.findings.append("'vs eager' is transformers eager decode time / this runner's (higher is faster); "
                            "'of roofline' is (weight bytes per token / read bandwidth) / measured decode time.")
    return section
