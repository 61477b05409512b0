"""How far a parity run is from each quality gate it is held to: the value, the threshold, the distance
between them (``margin``, positive when the gate is met) and the share of the gate still left (``left``),
so that a release engineer sees a thin margin before shipping.

An fp32 package is held to the text-export gates; a quantized one to the gates of its kind
(``tolerances.QUANT_GATES``): int8 when its recipe is ``int8`` or it stores 8 bits or more per linear
weight, int4 otherwise (int4-mobile, auto and recipe files too).
"""

from typing import Any

from gemma4_onnx import tolerances

THIN = 0.25  # a gate with less than a quarter of its room left is flagged "thin" (a display mark, not a gate)


def gate_kind(result: dict[str, Any]) -> str | None:
    """"fp32", "int8", "int4", or None for a run no gate applies to (blocks only)."""
    if not isinstance(result.get("text"), dict):
        return None
    if result.get("precision") == "float32":
        return "fp32"
    quantization = result.get("quantization")
    if not isinstance(quantization, dict):
        return None
    bits = _bits(result)
    return "int8" if quantization.get("recipe") == "int8" or (bits is not None and bits >= 8) else "int4"


def _bits(result: dict[str, Any]) -> float | None:
    """Stored bits per linear weight, where the run states a number."""
    bits: Any = (result.get("size") or {}).get("avg_bits_per_linear_weight")
    return float(bits) if _number(bits) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def margin(gate: str, value: float, threshold: float, at_most: bool, room: float,
           measured: bool = True) -> dict[str, Any]:
    """One gate: ``at_most`` (value ≤ threshold) or at least. ``left`` is the margin over the ``room`` the
    gate gives (for an upper bound on an error, the threshold itself; for top-1 or a cosine, 1 − threshold).
    A size is chosen, not ``measured``: a budget spends up to its gate on purpose, so it is never "thin"."""
    distance = threshold - value if at_most else value - threshold
    return {"gate": gate, "value": value, "threshold": threshold, "direction": "<=" if at_most else ">=",
            "margin": distance, "left": distance / room if room > 0 else 0.0, "passed": distance >= 0,
            "measured": measured}


def gate_margins(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every gate the run is held to, with its margin; empty where none applies."""
    kind = gate_kind(result)
    if kind is None:
        return []
    text = result["text"]
    if kind == "fp32":
        kl = tolerances.TEXT_FP32_KL_MEAN
        out = [margin("text.kl_mean", text["kl_mean"], kl, True, kl)]
        if _number(text.get("max_abs_logit_diff")):
            diff = tolerances.TEXT_FP32_MAX_ABS_LOGIT_DIFF
            out.append(margin("text.max_abs_logit_diff", text["max_abs_logit_diff"], diff, True, diff))
        if result.get("blocks"):
            worst = min(float(b["cosine"]) for b in result["blocks"])
            cosine = tolerances.BLOCK_FP32_MIN_COSINE
            out.append(margin("blocks.min_cosine", worst, cosine, False, 1 - cosine))
        return out
    gates = tolerances.QUANT_GATES[kind]
    out = [margin("text.kl_mean", text["kl_mean"], gates["kl_mean"], True, gates["kl_mean"]),
           margin("text.top1_agreement", text["top1_agreement"], gates["top1_agreement"], False,
                  1 - gates["top1_agreement"])]
    if "bits_per_byte_increase" in gates and text["bits_per_byte_reference"] > 0:
        increase = text["bits_per_byte_onnx"] / text["bits_per_byte_reference"] - 1
        gate = gates["bits_per_byte_increase"]
        out.append(margin("text.bits_per_byte_increase", increase, gate, True, gate))
    bits = _bits(result)
    if "avg_bits_per_linear_weight" in gates and bits is not None:
        limit = gates["avg_bits_per_linear_weight"]
        out.append(margin("size.avg_bits_per_linear_weight", bits, limit, True, limit, measured=False))
    return out


def status(entry: dict[str, Any]) -> str:
    if not entry["passed"]:
        return "FAILED"
    return "thin" if entry["measured"] and entry["left"] < THIN else "met"
