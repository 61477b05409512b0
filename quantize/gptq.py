"""GPTQ: blockwise quantization that corrects each column's rounding error on the columns not yet
quantized, weighted by the layer's input statistics H = Σ xᵀx over calibration text (Frantar et al.,
2022). onnxruntime ships a GPTQ (``neural_compressor.weight_only.gptq``) but it returns only the
fake-quantized weights, not the integer codes, scales and zero points MatMulNBits stores: this one
returns those, and follows the same algorithm (damping 1 % of the mean diagonal, lazy updates, float32).
Its cost is about K³/3 per weight for the Cholesky factorization of H, and N·K² for the updates."""

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LEAF_COLUMNS = 32  # columns updated one at a time (``gptq``): 32 was fastest of 32, 64 and 128
DAMPING = 0.01
ACT_ORDER = False  # columns by decreasing H diagonal, ranges fixed per block beforehand (docs/quantization.md)
SHRINK_GRID = np.linspace(1.0, 0.8, 21)
REFIT_SCALES = False  # each row's scales refitted by least squares on GPTQ's codes (docs/quantization.md)
REFIT_ROWS = 64  # rows refitted together: [64, K, K/block] float32 temporaries
SEPARATE_SHRINK = False  # asymmetric ranges: low and high shrunk by factors searched apart (docs/quantization.md)
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

    columns = columns.contiguous()  # a group arrives as a transposed view; the reductions run along rows
    low = columns.amin(dim=-1).clamp(max=0)
    high = columns.amax(dim=-1).clamp(min=0)
    if SEPARATE_SHRINK and not symmetric:
        pairs = np.array([(a, b) for a in SHRINK_GRID for b in SHRINK_GRID], np.float32)
    else:
        pairs = np.stack([SHRINK_GRID, SHRINK_GRID], -1).astype(np.float32)
    grid = torch.from_numpy(pairs).reshape(-1, 2, *[1] * low.dim())
    best_scale, best_zero, best_error = low, low, torch.full_like(low, torch.inf)
    for shrink in grid.split(max(1, GRID_CHUNK_VALUES // columns.numel())):
        scale, zero = _range_params(low * shrink[:, 0], high * shrink[:, 1], top, symmetric)
        # ŵ − w = s·clamp(round(w/s), −z, top − z) − w, in place on one temporary
        error = torch.div(columns, scale[..., None]).round_()
        torch.maximum(error, -zero[..., None], out=error)
        torch.minimum(error, top - zero[..., None], out=error)
        error = error.mul_(scale[..., None]).sub_(columns).abs_().pow_(ERROR_NORM).sum(dim=-1)
        least, at = error.min(dim=0)  # the first least, as a scan keeping strict improvements would
        better = least < best_error
        best_scale = torch.where(better, scale.gather(0, at[None])[0], best_scale)
        best_zero = torch.where(better, zero.gather(0, at[None])[0], best_zero)
        best_error = torch.minimum(least, best_error)
    return best_scale, best_zero


def gptq(weight: np.ndarray, hessian: np.ndarray, bits: int, block: int, symmetric: bool,
         act_order: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [..., N, K] (rows are outputs), H [..., K, K] → codes [..., N, K'], scales and zero points
    [..., N, K'/block], with K padded to K' (a multiple of ``block``) by zero columns, as MatMulNBits pads.
    Leading axes are independent problems (the experts of a MoE layer), solved together.

    The reference updates the columns not yet quantized with U, the upper Cholesky factor of H⁻¹, which
    costs a triangular inversion (K³/3) after the Cholesky. With H = R·Rᵀ (R upper, U = R⁻¹) the same
    values follow from R alone: writing d = w − q for the rounding errors of a row, column j is rounded
    at w_j + (Σ_{i<j} d_i·R_ij) / R_jj, and a group's range, taken when its first column c comes, is that of
    w_g + s_g·U_gg with s = Σ_{i<c} d_i·R_i, where U_gg = R_gg⁻¹ is only ``block`` wide. The sums s are
    blocked recursively: the first half of the columns is solved, its errors reach the second half in one
    matrix product, then the second half is solved, down to ``LEAF_COLUMNS`` columns updated one at a
    time. W is held transposed, so a column is a contiguous row.

    With ``act_order`` (default ``ACT_ORDER``) the columns are solved in decreasing order of H's diagonal
    (the inputs of largest energy first, while the most columns are left to absorb their errors), and
    each block's range is chosen beforehand on the weights as given ("static groups"): MatMulNBits'
    blocks are contiguous in K, so a block's columns are no longer solved together."""
    import torch

    act_order = ACT_ORDER if act_order is None else act_order
    pad = -weight.shape[-1] % block
    w_np = weight.astype(np.float32, copy=False)
    if pad:
        w_np = np.pad(w_np, [(0, 0)] * (weight.ndim - 1) + [(0, pad)])
    top = (1 << bits) - 1
    factor, dead, order = _factor(hessian, pad, act_order)
    if dead.any():
        w_np = np.where(dead[..., None, :], 0.0, w_np)
    static = None
    if order is not None:
        groups = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float32))
        static = _group_params(groups.reshape(*groups.shape[:-1], -1, block), top, symmetric)  # [..., N, K/block]
        w_np = np.take_along_axis(w_np, order[..., None, :], axis=-1)
    w_t = torch.from_numpy(np.ascontiguousarray(np.swapaxes(w_np, -1, -2), dtype=np.float32))  # [..., K, N]
    solver = _Solver(w_t, torch.from_numpy(factor), top, block, symmetric)
    if static is not None and order is not None:
        solver.fix_ranges(static, torch.from_numpy(order // block))
    solver.solve(0, w_t.shape[-2])
    if REFIT_SCALES and order is None:
        _refit_scales(solver, torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float32)), torch.from_numpy(factor))
    codes = solver.codes.transpose(-1, -2).numpy()
    if order is not None:
        codes = np.take_along_axis(codes, np.argsort(order, axis=-1)[..., None, :], axis=-1)
    return codes, solver.scales.numpy().astype(np.float64), solver.zeros.numpy().astype(np.float64)


def _refit_scales(solver: "_Solver", weight: "torch.Tensor", r: "torch.Tensor") -> None:
    """Each row's block scales refitted with its codes and zero points fixed: the s minimizing
    (w − C·s) H (w − C·s)ᵀ, C the row's centered codes (code − zero) spread one block per column, with
    H = R·Rᵀ the damped statistics GPTQ solved against. GPTQ chose each scale before the block's codes
    and kept it; this is the least-squares scale for the codes it then chose, across blocks, so the
    H-weighted error of the row cannot grow. A refit that is not finite or not positive keeps the old."""
    import torch

    block = solver.block
    k, n = solver.codes.shape[-2:]
    blocks = k // block
    for index in np.ndindex(tuple(solver.codes.shape[:-2])):
        rt = r[index].T.contiguous()  # [K, K]: Rᵀ
        r_blocks = r[index].reshape(blocks, block, k)  # R's rows, by block of the input
        codes, scales, zeros = solver.codes[index], solver.scales[index], solver.zeros[index]
        for start in range(0, n, REFIT_ROWS):
            rows = slice(start, min(start + REFIT_ROWS, n))
            centered = codes[:, rows].T.float().reshape(-1, blocks, block) - zeros[rows][..., None]
            m = torch.einsum("bjk,rbj->rkb", r_blocks, centered)  # Rᵀ·C per row: [rows, K, blocks]
            target = weight[index][rows] @ rt.T  # Rᵀ·w per row: [rows, K]
            gram = m.transpose(1, 2) @ m
            gram.diagonal(dim1=1, dim2=2).add_(1e-12 * gram.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True) + 1e-30)
            refit = torch.linalg.solve(gram, (m.transpose(1, 2) @ target[..., None]))[..., 0]
            keep = ~torch.isfinite(refit) | (refit <= 0)
            scales[rows] = torch.where(keep, scales[rows], refit)


class _Solver:
    def __init__(self, w_t: "torch.Tensor", r: "torch.Tensor", top: int, block: int, symmetric: bool) -> None:
        import torch

        self.w_t, self.r, self.top, self.block, self.symmetric = w_t, r, top, block, symmetric
        k, n = w_t.shape[-2:]
        self.leaf = max(LEAF_COLUMNS, block)
        self.codes = torch.zeros(w_t.shape, dtype=torch.uint8)
        self.scales = torch.zeros((*w_t.shape[:-2], n, k // block), dtype=torch.float32)
        self.zeros = torch.zeros_like(self.scales)
        self.sums = torch.zeros_like(w_t)  # s: Σ d_i·R_ij over the columns i whose errors have reached j
        self.errors = torch.empty_like(w_t)  # d = w − q
        self.group_of: torch.Tensor | None = None  # with fixed ranges: the block of each (permuted) column

    def fix_ranges(self, ranges: tuple["torch.Tensor", "torch.Tensor"], group_of: "torch.Tensor") -> None:
        """Scales and zero points [..., N, K/block] chosen beforehand; ``group_of`` [..., K]: column → block."""
        self.scales[...], self.zeros[...] = ranges
        self.group_of = group_of

    def solve(self, start: int, end: int) -> None:
        if end - start <= self.leaf:
            self._columns(start, end)
            return
        middle = start + ((end - start) // 2 + self.leaf - 1) // self.leaf * self.leaf
        self.solve(start, middle)
        sums, reach = self.sums[..., middle:end, :], self.r[..., start:middle, middle:end].transpose(-1, -2)
        if sums.dim() == 2:
            sums.addmm_(reach, self.errors[start:middle])
        else:
            sums += reach @ self.errors[..., start:middle, :]
        self.solve(middle, end)

    def _columns(self, start: int, end: int) -> None:
        """Columns start…end one at a time (``start`` begins a group: leaves are whole groups)."""
        import torch

        w1, s1, r1 = self.w_t[..., start:end, :], self.sums[..., start:end, :], self.r[..., start:end, start:end]
        diagonal = r1.diagonal(dim1=-2, dim2=-1)
        for i in range(end - start):
            column = start + i
            if self.group_of is not None:
                index = self.group_of[..., column, None, None].expand(*self.scales.shape[:-1], 1)
                scale, zero = self.scales.gather(-1, index)[..., 0], self.zeros.gather(-1, index)[..., 0]
            elif column % self.block == 0:
                g = slice(i, i + self.block)
                # U_ggᵀ·s_g = R_ggᵀ⁻¹·s_g, by one lower-triangular solve
                group = w1[..., g, :] + torch.linalg.solve_triangular(r1[..., g, g].transpose(-1, -2), s1[..., g, :],
                                                                      upper=False)
                scale, zero = _group_params(group.transpose(-1, -2), self.top, self.symmetric)
                self.scales[..., column // self.block], self.zeros[..., column // self.block] = scale, zero
            row = w1[..., i, :] + s1[..., i, :] / diagonal[..., i, None]
            q = torch.clamp(torch.round(row / scale) + zero, 0, self.top)
            self.codes[..., column, :] = q.to(torch.uint8)
            error = torch.sub(w1[..., i, :], (q - zero) * scale, out=self.errors[..., column, :])
            if w1.dim() == 2:
                s1[i + 1:].addr_(r1[i, i + 1:], error)
            else:
                s1[..., i + 1:, :] += r1[..., i, i + 1:, None] * error[..., None, :]


_reused: list[tuple[np.ndarray, int, bool, np.ndarray, np.ndarray, np.ndarray | None]] | None = None
# in ``reused_factors``: (H, pad, act_order, R, dead, order)


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


def _factor(hessian: np.ndarray, pad: int,
            act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``_reversed_cholesky`` of the damped H, the columns no calibration row reached (zero diagonal), and
    with ``act_order`` the column order [..., K'] (by decreasing diagonal; R is then of the permuted H)."""
    if _reused and _reused[0][0] is hessian and _reused[0][1:3] == (pad, act_order):
        return _reused[0][3], _reused[0][4], _reused[0][5]
    diagonal = np.pad(np.diagonal(hessian, axis1=-2, axis2=-1), [(0, 0)] * (hessian.ndim - 2) + [(0, pad)])
    dead = diagonal == 0
    order = np.argsort(-diagonal, axis=-1, kind="stable") if act_order else None
    diagonal = np.where(dead, 1.0, diagonal)
    diagonal += DAMPING * diagonal.mean(axis=-1, keepdims=True)
    if _reused is not None:
        _reused.clear()  # the previous factor goes before the next is made
    if order is not None:
        diagonal = np.take_along_axis(diagonal, order, axis=-1)
        factor = _reversed_cholesky(_permuted(hessian, order, pad), diagonal, 0)
    else:
        factor = _reversed_cholesky(hessian, diagonal, pad)
    if _reused is not None:
        _reused.append((hessian, pad, act_order, factor, dead, order))
    return factor, dead, order


def _permuted(hessian: np.ndarray, order: np.ndarray, pad: int) -> np.ndarray:
    """H padded to K' and permuted, H[..., order, order], as a new writable float32 array."""
    k = hessian.shape[-1] + pad
    out = np.zeros((*hessian.shape[:-2], k, k), np.float32)
    out[..., :hessian.shape[-1], :hessian.shape[-1]] = hessian
    for index in np.ndindex(hessian.shape[:-2]):
        out[index] = out[index][order[index]][:, order[index]]
    return out


def _reversed_cholesky(hessian: np.ndarray, diagonal: np.ndarray, pad: int) -> np.ndarray:
    """Upper-triangular R with R·Rᵀ = H (padded, with ``diagonal``), in float32: with J the order-reversing
    permutation, J·H·J = L·Lᵀ gives R = J·L·J. One Cholesky, K³/3 operations (~6 s for K = 12288 on two
    cores); R⁻¹ is the upper Cholesky factor of H⁻¹ that the GPTQ reference computes, never formed here.

    A writable float32 H without padding is factorized in its own memory and is spent (31B's down_proj H
    is 21504², 1.85 GB: a copy and a factor beside it would pass the export's memory goal); callers that
    keep an H mark it read-only (``HessianWalk``), and any other H is copied once."""
    import torch

    k = hessian.shape[-1] + pad
    h = hessian
    if pad or hessian.dtype != np.float32 or not hessian.flags.writeable or not hessian.flags.c_contiguous:
        h = np.zeros((*hessian.shape[:-2], k, k), np.float32)
        h[..., :hessian.shape[-1], :hessian.shape[-1]] = hessian
    _reverse(h)
    h.reshape(*h.shape[:-2], k * k)[..., ::k + 1] = diagonal[..., ::-1]
    columns = torch.from_numpy(h).transpose(-1, -2)  # J·H·J is symmetric: its rows, read as columns
    torch.linalg.cholesky(columns, out=columns)  # in place: h now holds Lᵀ
    _reverse(h)
    return np.swapaxes(h, -1, -2)  # (J·Lᵀ·J)ᵀ = J·L·J


def _reverse(m: np.ndarray) -> None:
    """m[..., i, j] ← m[..., K−1−i, K−1−j] in place, two rows at a time."""
    k = m.shape[-1]
    for i in range(k // 2):
        first = m[..., i, ::-1].copy()
        m[..., i, :] = m[..., k - 1 - i, ::-1]
        m[..., k - 1 - i, :] = first
    if k % 2:
        m[..., k // 2, :] = m[..., k // 2, ::-1].copy()
