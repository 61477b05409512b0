"""GPTQ: blockwise quantization that corrects each column's rounding error on the columns not yet
quantized, weighted by the layer's input statistics H = Σ xᵀx over calibration text (Frantar et al.,
2022). onnxruntime ships a GPTQ (``neural_compressor.weight_only.gptq``) but it returns only the
fake-quantized weights, not the integer codes, scales and zero points MatMulNBits stores: this one
returns those, and follows the same algorithm (damping 1 % of the mean diagonal, lazy batches)."""

import numpy as np

LAZY_BATCH = 128
DAMPING = 0.01


def _group_params(columns: np.ndarray, top: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row for one group of columns [N, g]."""
    low = np.minimum(columns.min(axis=1), 0)
    high = np.maximum(columns.max(axis=1), 0)
    if symmetric:
        high = np.maximum(np.abs(low), high)
        scale = 2 * high / top
        zero = np.full_like(scale, (top + 1) // 2)
    else:
        scale = (high - low) / top
        zero = np.round(-low / np.where(scale == 0, 1, scale))
    return np.where(scale == 0, 1.0, scale), zero


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block: int,
         symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [N, K] (rows are outputs), H [K, K] → codes [N, K'], scales and zero points [N, K'/block], with K
    padded to K' (a multiple of ``block``) by zero columns, as MatMulNBits pads."""
    pad = -weight.shape[1] % block
    w = np.pad(weight.astype(np.float64), ((0, 0), (0, pad)))
    h = np.pad(hessian.astype(np.float64), ((0, pad), (0, pad)))
    n, k = w.shape
    top = (1 << bits) - 1
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices(k)] += DAMPING * np.mean(np.diag(h))
    h_inv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H⁻¹
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block))
    zeros = np.zeros((n, k // block))
    batch = max(LAZY_BATCH, block)
    for start in range(0, k, batch):
        end = min(start + batch, k)
        w1 = w[:, start:end].copy()
        errors = np.zeros_like(w1)
        h1 = h_inv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block == 0:
                group = np.concatenate([w1[:, i:], w[:, end:]], axis=1)[:, :block]
                scale, zero = _group_params(group, top, symmetric)
                scales[:, column // block], zeros[:, column // block] = scale, zero
            q = np.clip(np.round(w1[:, i] / scale) + zero, 0, top)
            codes[:, column] = q
            error = (w1[:, i] - (q - zero) * scale) / h1[i, i]
            w1[:, i:] -= np.outer(error, h1[i, i:])
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes, scales, zeros
