"""GPTQ: blockwise quantization that corrects each column's rounding error on the columns not yet
quantized, weighted by the layer's input statistics H = Σ xᵀx over calibration text (Frantar et al.,
2022). onnxruntime ships a GPTQ (``neural_compressor.weight_only.gptq``) but it returns only the
fake-quantized weights, not the integer codes, scales and zero points MatMulNBits stores: this one
returns those, and follows the same algorithm (damping 1 % of the mean diagonal, lazy updates, float32).
Its cost is about K³ per weight (the factorization of H): ~11 s for K = 12288 on two cores."""

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LEAF_COLUMNS = 32  # columns updated one at a time (``gptq``): 32 was fastest of 32, 64 and 128
DAMPING = 0.01
SHRINK_GRID = np.linspace(1.0, 0.8, 21)
ERROR_NORM = 2.4
GRID_CHUNK_VALUES = 1 << 19  # trial values per step of the range search: 2 MB temporaries (gemma4_onnx.memory)


def _range_params(low: "torch.Tensor", high: "torch.Tensor", top: int,
                  symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    if symmetric:
        high = torch.maximum(low.abs(), high)
        scale = 2 * high / top
        zero = torch.full_like(scale, (top + 1) // 2)
    else:
        scale = (high - low) / top
        zero = torch.round(-low / torch.where(scale == 0, 1, scale))
    return torch.where(scale == 0, 1.0, scale), zero


def _group_params(columns: "torch.Tensor", top: int, symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scale and zero point per row for one group of columns [..., N, g]: the range [low, high] shrunk by
    the factor (1.0, 0.99, … 0.80) whose rounding error Σ|w − ŵ|^2.4 is least, per row (the GPTQ
    reference's ``mse`` grid: clipping a few outliers buys resolution for every other weight). Several
    factors are tried at once, on a leading axis of at most ``GRID_CHUNK_VALUES`` values."""
    import torch

    low = columns.amin(dim=-1).clamp(max=0)
    high = columns.amax(dim=-1).clamp(min=0)
    grid = torch.from_numpy(SHRINK_GRID.astype(np.float32)).reshape(-1, *[1] * low.dim())
    best_scale, best_zero, best_error = low, low, torch.full_like(low, torch.inf)
    for shrink in grid.split(max(1, GRID_CHUNK_VALUES // columns.numel())):
        scale, zero = _range_params(low * shrink, high * shrink, top, symmetric)
        q = torch.clamp(torch.round(columns / scale[..., None]) + zero[..., None], 0, top)
        error = ((q - zero[..., None]) * scale[..., None] - columns).abs_().pow_(ERROR_NORM).sum(dim=-1)
        least, at = error.min(dim=0)  # the first least, as a scan keeping strict improvements would
        better = least < best_error
        best_scale = torch.where(better, scale.gather(0, at[None])[0], best_scale)
        best_zero = torch.where(better, zero.gather(0, at[None])[0], best_zero)
        best_error = torch.minimum(least, best_error)
    return best_scale, best_zero


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block: int,
         symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [..., N, K] (rows are outputs), H [..., K, K] → codes [..., N, K'], scales and zero points
    [..., N, K'/block], with K padded to K' (a multiple of ``block``) by zero columns, as MatMulNBits pads.
    Leading axes are independent problems (the experts of a MoE layer), solved together.

    The lazy updates are blocked recursively: the first half of the columns is solved, its errors reach the
    second half in one matrix product, then the second half is solved, down to ``LEAF_COLUMNS`` columns
    updated one at a time. W is held transposed, so a column is a contiguous row. Against the reference's
    flat 128-column batches, E4B's down_proj (2560 × 10240) takes 3.6 s, was 8.6 s."""
    import torch

    pad = -weight.shape[-1] % block
    w_np = np.pad(weight.astype(np.float32), [(0, 0)] * (weight.ndim - 1) + [(0, pad)])
    top = (1 << bits) - 1
    diagonal = np.pad(np.diagonal(hessian, axis1=-2, axis2=-1), [(0, 0)] * (hessian.ndim - 2) + [(0, pad)])
    dead = diagonal == 0
    w_t = torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.where(dead[..., None, :], 0.0, w_np), -1, -2),
                                                dtype=np.float32))  # [..., K, N]
    h_inv = torch.from_numpy(_factor(hessian, diagonal, pad))
    solver = _Solver(w_t, h_inv, top, block, symmetric)
    solver.solve(0, w_t.shape[-2])
    return (solver.codes.transpose(-1, -2).numpy(), solver.scales.numpy().astype(np.float64),
            solver.zeros.numpy().astype(np.float64))


class _Solver:
    def __init__(self, w_t: "torch.Tensor", h_inv: "torch.Tensor", top: int, block: int, symmetric: bool) -> None:
        import torch

        self.w_t, self.h_inv, self.top, self.block, self.symmetric = w_t, h_inv, top, block, symmetric
        k, n = w_t.shape[-2:]
        self.leaf = max(LEAF_COLUMNS, block)
        self.codes = torch.zeros(w_t.shape, dtype=torch.uint8)
        self.scales = torch.zeros((*w_t.shape[:-2], n, k // block), dtype=torch.float32)
        self.zeros = torch.zeros_like(self.scales)
        self.errors = torch.empty_like(w_t)

    def solve(self, start: int, end: int) -> None:
        if end - start <= self.leaf:
            self._columns(start, end)
            return
        middle = start + ((end - start) // 2 + self.leaf - 1) // self.leaf * self.leaf
        self.solve(start, middle)
        rest, update = self.w_t[..., middle:end, :], self.h_inv[..., start:middle, middle:end].transpose(-1, -2)
        if rest.dim() == 2:
            rest.addmm_(update, self.errors[start:middle], alpha=-1)
        else:
            rest -= update @ self.errors[..., start:middle, :]
        self.solve(middle, end)

    def _columns(self, start: int, end: int) -> None:
        """Columns start…end one at a time (``start`` begins a group: leaves are whole groups)."""
        import torch

        w1, h1 = self.w_t[..., start:end, :], self.h_inv[..., start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % self.block == 0:
                group = self.w_t[..., column:column + self.block, :].transpose(-1, -2)
                scale, zero = _group_params(group, self.top, self.symmetric)
                self.scales[..., column // self.block], self.zeros[..., column // self.block] = scale, zero
            row = w1[..., i, :]
            q = torch.clamp(torch.round(row / scale) + zero, 0, self.top)
            self.codes[..., column, :] = q.to(torch.uint8)
            error = (row - (q - zero) * scale) / h1[..., i, i][..., None]
            if w1.dim() == 2:
                w1[i + 1:].addr_(h1[i, i + 1:], error, alpha=-1)
            else:
                w1[..., i + 1:, :] -= h1[..., i, i + 1:, None] * error[..., None, :]
            self.errors[..., column, :] = error


_reused: list[tuple[np.ndarray, int, np.ndarray]] | None = None  # inside ``reused_factors``: (H, pad, factor)


@contextlib.contextmanager
def reused_factors() -> Iterator[None]:
    """Within it, the factorization of an H is kept while the same H comes back: a tall weight quantized a
    chunk of rows at a time against one H (the tied LM head: 64 chunks of 4096 rows) factorizes it once."""
    global _reused
    _reused = []
    try:
        yield
    finally:
        _reused = None


def _factor(hessian: np.ndarray, diagonal: np.ndarray, pad: int) -> np.ndarray:
    """``_inverse_cholesky`` of the damped H (``diagonal``: H's, padded)."""
    if _reused and _reused[0][0] is hessian and _reused[0][1] == pad:
        return _reused[0][2]
    diagonal = np.where(diagonal == 0, 1.0, diagonal)
    diagonal += DAMPING * diagonal.mean(axis=-1, keepdims=True)
    if _reused is not None:
        _reused.clear()  # the previous factor goes before the next is made
    factor = _inverse_cholesky(hessian, diagonal, pad)
    if _reused is not None:
        _reused.append((hessian, pad, factor))
    return factor


def _inverse_cholesky(hessian: np.ndarray, diagonal: np.ndarray, pad: int) -> np.ndarray:
    """The upper Cholesky factor U of (H, padded, with ``diagonal``)⁻¹ in float32, without forming the inverse:
    with J the order-reversing permutation, J·H·J = L·Lᵀ gives H = R·Rᵀ with R = J·L·J upper triangular, so
    H⁻¹ = R⁻ᵀ·R⁻¹ and U = R⁻¹ (one Cholesky and one triangular inverse: ~11 s for K = 12288 on two cores,
    against 18 s for the GPTQ reference's Cholesky, cholesky_inverse and second Cholesky)."""
    import torch

    h = torch.from_numpy(hessian.astype(np.float32, copy=False))
    if pad:
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    flipped = h.flip(-2, -1)  # a copy: H itself is left as it was
    del h
    flipped.diagonal(dim1=-2, dim2=-1).copy_(torch.from_numpy(diagonal.astype(np.float32)).flip(-1))
    lower = torch.linalg.cholesky(flipped)
    del flipped
    upper = lower.flip(-2, -1)
    del lower
    return _upper_inverse(upper).numpy()


TRIANGULAR_LEAF = 512  # below this, a triangular solve


def _upper_inverse(r: "torch.Tensor") -> "torch.Tensor":
    """R⁻¹ of upper-triangular R [..., K, K], written over R, by halves: [[A, B], [0, C]]⁻¹ =
    [[A⁻¹, −A⁻¹·B·C⁻¹], [0, C⁻¹]]. Matrix products instead of a triangular solve against the identity
    (2K³/3 operations, not K³), and no second K×K buffer."""
    import torch

    k = r.shape[-1]
    if k <= TRIANGULAR_LEAF:
        return r.copy_(torch.linalg.solve_triangular(r, torch.eye(k, dtype=r.dtype).expand_as(r), upper=True))
    m = k // 2
    a_inverse, c_inverse = _upper_inverse(r[..., :m, :m]), _upper_inverse(r[..., m:, m:])
    r[..., :m, m:] = -((a_inverse @ r[..., :m, m:]) @ c_inverse)
    return r
