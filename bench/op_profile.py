"""Where a decode step's time goes: onnxruntime's own profiler over a package's embed and decoder sessions,
kernel time summed per op type over decode steps (the prefill that builds the cache is left out)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from bench_decode import decode_token

MEMORY_BOUND_SHARE = 0.8  # a kernel streaming its weights at this share of the read bandwidth is memory-bound


@dataclass
class OpProfile:
    """Kernel milliseconds per decoded token by op type, and the wall milliseconds of the sessions' runs."""

    steps: int
    kernel_ms: dict[str, float]
    run_ms: float

    @property
    def kernel_total_ms(self) -> float:
        return sum(self.kernel_ms.values())

    def top(self, count: int = 3) -> list[tuple[str, float]]:
        return sorted(self.kernel_ms.items(), key=lambda item: -item[1])[:count]

    def describe(self) -> str:
        shares = ", ".join(f"{op} {ms:.1f} ms ({ms / self.kernel_total_ms:.0%})" for op, ms in self.top())
        return (f"onnxruntime profiler, {self.steps} decode steps: {self.run_ms:.1f} ms/token in session runs, "
                f"kernels {self.kernel_total_ms:.1f} ms/token, most in {shares}")

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "kernel_ms_per_token": self.kernel_ms, "run_ms_per_token": self.run_ms}


def decode_op_profile(package: Path, prompt: list[int], steps: int) -> OpProfile:
    """Prefill ``prompt``, then profile ``steps`` decode steps of ``package`` (one runner at a time: a
    profiled session is slower, so it is never timed beside others)."""
    from gemma4_onnx.runtime.text_model import TextModel

    with tempfile.TemporaryDirectory(prefix="gemma4-profile-") as directory:
        model = TextModel(package, profile_prefix=str(Path(directory) / "run-"))
        cache = model.empty_cache(1)
        model.forward(np.array([prompt]), cache)
        for step in range(steps):
            model.forward(np.array([[decode_token(step)]]), cache)
        files = model.end_profiling()
        del model
        return profile_from_files(files, steps)


def profile_from_files(files: list[str], steps: int) -> OpProfile:
    """Sum onnxruntime profile files whose sessions each ran once for the prefill, then ``steps`` times."""
    kernel_us: dict[str, float] = {}
    run_us = 0.0
    for file in files:
        events = json.loads(Path(file).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        prefill_end = runs[0]["ts"] + runs[0]["dur"]
        run_us += sum(e["dur"] for e in runs[1:])
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= prefill_end:
                op = event["args"]["op_name"]
                kernel_us[op] = kernel_us.get(op, 0.0) + event["dur"]
    return OpProfile(steps, {op: us / steps / 1e3 for op, us in kernel_us.items()}, run_us / steps / 1e3)


def matmul_nbits_finding(name: str, profile: OpProfile, weight_bytes: int, bandwidth_gbs: float) -> str:
    """How fast MatMulNBits streams its weights against the machine's read bandwidth: the bottleneck test."""
    ms = profile.kernel_ms.get("MatMulNBits", 0.0)
    rate = weight_bytes / (ms * 1e-3) / 1e9 if ms else 0.0
    return (f"{name}, profiled ({profile.describe()}). MatMulNBits reads its {weight_bytes / 1e6:.0f} MB of weights "
            f"per token in {ms:.1f} ms = {rate:.1f} GB/s, {rate / bandwidth_gbs:.0%} of the {bandwidth_gbs:.1f} GB/s "
            "read bandwidth: " + ("memory bounds it." if rate >= MEMORY_BOUND_SHARE * bandwidth_gbs else
                                  "the kernel's unpacking and multiply work, not memory, bounds it."))


def matmul_nbits(model: Path) -> list[dict[str, Any]]:
    """The attributes of each MatMulNBits node of the graph."""
    return [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in onnx.load(model, load_external_data=False).graph.node if node.op_type == "MatMulNBits"]


def matmul_weight_bytes(model: Path) -> int:
    """Bytes the graph's MatMulNBits weights take at run time: packed codes and fp32 scales (per token, each
    is read once)."""
    return sum(a["N"] * a["K"] * a["bits"] // 8 + a["N"] * -(-a["K"] // a["block_size"]) * 4
               for a in matmul_nbits(model))
