"""Gate margins: each gate's value, threshold and distance in parity.json, report.md and report.html."""

from pathlib import Path

import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.runtime.margins import gate_margins, status
from gemma4_onnx.runtime.report import html_report, markdown

INT4 = tolerances.QUANT_GATES["int4"]


def run(recipe: str | None, kl: float, top1: float, bpb: float, bits: float, precision: str = "quantized") -> dict:
    return {"label": recipe or "float32", "checkpoint": "ck", "precision": precision,
            "quantization": {"recipe": recipe} if recipe else None,
            "text": {"kl_mean": kl, "top1_agreement": top1, "bits_per_byte_reference": 1.0, "bits_per_byte_onnx": bpb,
                     "greedy_match_steps": 4, "greedy_steps": 4, "max_abs_logit_diff": 1e-5},
            "size": {"avg_bits_per_linear_weight": bits, "total_bytes": 1, "ple_bytes": 0},
            "blocks": [{"name": "decoder_layer.0", "cosine": 0.9999999}]}


def by_gate(result: dict) -> dict[str, dict]:
    return {m["gate"]: m for m in gate_margins(result)}


def test_int4_margins_are_distances_to_the_int4_gates() -> None:
    margins = by_gate(run("int4", kl=0.0042, top1=0.98, bpb=1.002, bits=4.85))
    kl = margins["text.kl_mean"]
    assert kl["threshold"] == INT4["kl_mean"] and kl["margin"] == pytest.approx(INT4["kl_mean"] - 0.0042)
    assert kl["left"] == pytest.approx((INT4["kl_mean"] - 0.0042) / INT4["kl_mean"]) and status(kl) == "thin"
    top1 = margins["text.top1_agreement"]
    assert top1["direction"] == ">=" and top1["margin"] == pytest.approx(0.98 - INT4["top1_agreement"])
    assert top1["left"] == pytest.approx((0.98 - INT4["top1_agreement"]) / (1 - INT4["top1_agreement"]))
    bpb = margins["text.bits_per_byte_increase"]
    assert bpb["value"] == pytest.approx(0.002) and status(bpb) == "met"  # half the gate left
    bits = margins["size.avg_bits_per_linear_weight"]
    assert bits["margin"] == pytest.approx(INT4["avg_bits_per_linear_weight"] - 4.85) and status(bits) == "met"


def test_a_missed_gate_is_failed_and_each_kind_has_its_gates() -> None:
    failed = by_gate(run("auto", kl=0.006, top1=0.99, bpb=1.001, bits=4.8))["text.kl_mean"]
    assert not failed["passed"] and failed["margin"] < 0 and status(failed) == "FAILED"
    int8 = by_gate(run("int8", kl=1e-4, top1=0.999, bpb=1.0, bits=9.5))
    assert set(int8) == {"text.kl_mean", "text.top1_agreement"}
    assert int8["text.kl_mean"]["threshold"] == tolerances.QUANT_GATES["int8"]["kl_mean"]
    assert by_gate(run("my-recipe", kl=1e-4, top1=0.999, bpb=1.0, bits=8.6))["text.kl_mean"]["threshold"] == \
        tolerances.QUANT_GATES["int8"]["kl_mean"]  # a recipe file at 8 bits is held to int8's gates
    fp32 = by_gate(run(None, kl=1e-12, top1=1.0, bpb=1.0, bits=32.0, precision="float32"))
    assert set(fp32) == {"text.kl_mean", "text.max_abs_logit_diff", "blocks.min_cosine"}
    assert fp32["blocks.min_cosine"]["threshold"] == tolerances.BLOCK_FP32_MIN_COSINE
    blocks_only = run("int4", 0, 1, 1, 4.8)
    blocks_only["text"] = None
    assert gate_margins(blocks_only) == []


def test_report_shows_each_gate_with_its_margin_and_flags_thin_ones() -> None:
    runs = [run(None, kl=1e-12, top1=1.0, bpb=1.0, bits=32.0, precision="float32"),
            run("int4", kl=0.0042, top1=0.98, bpb=1.002, bits=4.85)]
    md = markdown(runs)
    assert "## Gates and margins" in md
    assert "| int4 | text.kl_mean <= | 0.0042 | 0.005 | +0.0008 | 16 % | thin |" in md
    assert "| int4 | text.bits_per_byte_increase <= | 0.002 | 0.004 | +0.002 | 50 % | met |" in md
    assert "| float32 | blocks.min_cosine >= |" in md
    page = html_report(runs)
    assert "<tr class='thin'><td>int4</td><td>text.kl_mean &lt;=</td>" in page


def test_parity_json_keeps_its_keys_and_adds_margins(exported, tmp_path: Path) -> None:
    from gemma4_onnx.parity_run import run_parity

    checkpoint, fp32 = exported("tiny-e2b")
    result = run_parity(fp32, checkpoint, None, steps=2)
    assert {"text", "blocks", "size", "quantization", "checks", "passed"} <= set(result)
    assert [m["gate"] for m in result["margins"]] == ["text.kl_mean", "text.max_abs_logit_diff", "blocks.min_cosine"]
    assert all(m["passed"] and m["margin"] >= 0 for m in result["margins"])
