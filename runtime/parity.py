"""The parity harness: how far onnxruntime's outputs are from the reference's, as numbers.

One set of metrics for tests, the CLI and the reports. Everything here takes arrays (the reference
side is computed elsewhere, with torch), so the harness itself runs on a deployment box.
"""

import math
from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_sum(reference: np.ndarray, other: np.ndarray) -> float:
    """Σ over positions of KL(softmax(reference) ‖ softmax(other)), logits [..., V]."""
    log_p, log_q = log_softmax(reference), log_softmax(other)
    return float((np.exp(log_p) * (log_p - log_q)).sum())


@dataclass
class LogitStats:
    """Accumulates teacher-forced comparisons window by window."""

    max_abs_logit_diff: float = 0.0
    kl_sum: float = 0.0
    top1_same: int = 0
    positions: int = 0
    nll_bits_reference: float = 0.0
    nll_bits_onnx: float = 0.0
    target_tokens: int = 0
    target_bytes: int = 0

    def add(self, reference: np.ndarray, onnx: np.ndarray, targets: np.ndarray, target_bytes: int) -> None:
        """``reference``/``onnx``: logits [S, V]; ``targets``: the next tokens [S-1] (positions 0..S-2)."""
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, float(np.abs(reference - onnx).max()))
        log_p, log_q = log_softmax(reference), log_softmax(onnx)
        self.kl_sum += kl_sum(reference, onnx)
        self.top1_same += int((reference.argmax(-1) == onnx.argmax(-1)).sum())
        self.positions += reference.shape[0]
        rows = np.arange(len(targets))
        self.nll_bits_reference -= float(log_p[rows, targets].sum()) / math.log(2)
        self.nll_bits_onnx -= float(log_q[rows, targets].sum()) / math.log(2)
        self.target_tokens += len(targets)
        self.target_bytes += target_bytes

    def as_dict(self) -> dict[str, float | int]:
        return {
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "kl_mean": self.kl_sum / max(self.positions, 1),
            "top1_agreement": self.top1_same / max(self.positions, 1),
            "bits_per_byte_reference": self.nll_bits_reference / max(self.target_bytes, 1),
            "bits_per_byte_onnx": self.nll_bits_onnx / max(self.target_bytes, 1),
            "positions": self.positions,
            "target_tokens": self.target_tokens,
            "target_bytes": self.target_bytes,
        }


def greedy_match_steps(reference: list[int], onnx: list[int]) -> int:
    """Steps until the first differing token (all of them when none differs)."""
    for step, (a, b) in enumerate(zip(reference, onnx, strict=False)):
        if a != b:
            return step
    return min(len(reference), len(onnx))


def block_parity(name: str, reference: np.ndarray, onnx: np.ndarray) -> dict[str, float | str]:
    a = reference.astype(np.float64).ravel()
    b = onnx.astype(np.float64).ravel()
    cosine = float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-300)
    return {"name": name, "max_abs_diff": float(np.abs(a - b).max()), "cosine": cosine}


def windows(tokens: list[int], size: int, limit: int) -> list[list[int]]:
    """The first ``limit`` tokens cut into consecutive windows of ``size`` (the last may be shorter)."""
    tokens = tokens[:limit]
    return [tokens[i:i + size] for i in range(0, len(tokens), size) if len(tokens[i:i + size]) > 1]
