"""Blockwise weight quantization in onnxruntime's MatMulNBits layout: W [N, K] → packed codes, scales
and zero points per block of K, by onnxruntime's own kernels and quantizers (round-to-nearest, HQQ,
k-quant) or by GPTQ with the layer's input statistics."""

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

from gemma4_onnx.errors import NotBuiltYet, UsageError
from gemma4_onnx.quantize.gptq import gptq
from gemma4_onnx.quantize.plan import LINEAR_KINDS, Entry
from gemma4_onnx.quantize.recipe import BLOCK_SIZES, Decision

if TYPE_CHECKING:
    import torch


def blockwise(weight: np.ndarray, decision: Decision,
              hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [N, K] → (packed uint8 [N, K/block, block·bits/8], scales [N, K/block], zero points uint8),
    blocks along K, by onnxruntime's kernels. Zero points are always returned (8 / 128 if symmetric)."""
    if decision.algorithm == "gptq" and hessian is not None:
        assert decision.bits is not None
        codes, scales, zeros = gptq(weight, hessian, decision.bits, decision.block_size, decision.symmetric)
        return pack(codes, scales, zeros, decision)
    if decision.algorithm == "gptq":  # tensors no MatMul reads (the PLE table): round to nearest
        decision = replace(decision, algorithm="rtn")
    if decision.algorithm == "hqq":
        return _hqq(weight, decision)
    if decision.algorithm == "k-quant":
        return _k_quant(weight, decision)
    if decision.algorithm != "rtn":
        raise NotBuiltYet(f"quantization algorithm '{decision.algorithm}'")
    assert decision.bits is not None
    if decision.block_size not in BLOCK_SIZES:  # onnxruntime's quantizer takes 16 … 256 in powers of two only
        return _rtn_any_block(weight, decision)
    n, k = weight.shape
    block = decision.block_size
    blocks = -(-k // block)
    per_byte = 8 // decision.bits
    packed = np.zeros((n, blocks, block // per_byte), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks // per_byte)), dtype=np.uint8)
    kernel = quantize_matmul_4bits if decision.bits == 4 else quantize_matmul_8bits
    kernel(packed, np.ascontiguousarray(weight.T, dtype=np.float32), scales, zero_points, block, n, k,
           decision.symmetric)
    if decision.symmetric:  # the kernel leaves zero points unset when symmetric; the ops' default is the midpoint
        midpoint = 1 << (decision.bits - 1)
        zero_points[:] = midpoint | (midpoint << 4) if decision.bits == 4 else midpoint
    return packed, scales, zero_points


def _hqq(weight: np.ndarray, decision: Decision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-quadratic quantization by onnxruntime's HQQ quantizer (asymmetric, integer zero points)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    assert decision.bits is not None
    if decision.symmetric:
        raise UsageError("hqq is asymmetric: use symmetric = false with it")
    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=decision.block_size, bits=decision.bits))
    codes, scales, zeros = hqq.quantize_internal(torch.from_numpy(weight), bits=decision.bits,
                                                 group_size=decision.block_size, axis=1)
    return pack(codes.numpy(), scales.numpy(), zeros.numpy(), decision)


def _k_quant(weight: np.ndarray, decision: Decision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's k-quant search (weighted least squares over scale and minimum), as onnxruntime ships it."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    assert decision.bits is not None
    if decision.symmetric:
        raise UsageError("k-quant is asymmetric: use symmetric = false with it")
    n, k = weight.shape
    block = decision.block_size
    padded = np.pad(weight, ((0, 0), (0, -k % block)))
    codes, scales, zeros = quant_tensor_k_quant_cpu(padded, decision.bits, block)
    return pack(codes.reshape(n, -1), scales.reshape(n, -1), zeros.reshape(n, -1), decision)


def _rtn_any_block(weight: np.ndarray, decision: Decision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest for blocks onnxruntime's quantizer does not take (the PLE slices of 8 or 24 values:
    ``plan.fitted``), by the kernel's own rule (``rounded_to_nearest``), K padded with zeros to whole blocks
    as the kernel pads."""
    import torch

    assert decision.bits is not None
    n, k = weight.shape
    padded = np.pad(np.asarray(weight, dtype=np.float32), ((0, 0), (0, -k % decision.block_size)))
    blocks = torch.from_numpy(padded).reshape(n, -1, decision.block_size)
    codes, scales, zeros = rounded_to_nearest(blocks, decision.bits, decision.symmetric)
    return pack(codes.reshape(n, -1).numpy(), scales[..., 0].numpy(), zeros[..., 0].numpy(), decision)


def rounded_to_nearest(blocks: "torch.Tensor", bits: int,
                       symmetric: bool) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Blocks [..., block] → codes (float, same shape), scales and zero points [..., 1], as onnxruntime's
    blockwise kernels round: asymmetric ranges include 0 and their zero point is rounded; symmetric ones put
    the value of largest magnitude on code 0, with the zero point at the midpoint. Rounding is the kernel's
    roundf, half away from zero."""
    import torch

    top = (1 << bits) - 1
    if symmetric:
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        scale, zero = extreme / -((top + 1) // 2), torch.full_like(extreme, (top + 1) // 2)
    else:
        low = blocks.amin(-1, keepdim=True).clamp_(max=0)
        scale = (blocks.amax(-1, keepdim=True).clamp_(min=0) - low) / top
        zero = torch.div(-low, torch.where(scale == 0, 1, scale)).add_(0.5).floor_().clamp_(max=top)
    reciprocal = torch.where(scale == 0, 0, 1 / scale)
    codes = torch.mul(blocks, reciprocal).add_(zero + 0.5).floor_().clamp_(0, top)
    return codes, scale, zero


def pack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
          decision: Decision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes [N, K'] and per-block scales/zero points [N, K'/block] in MatMulNBits' layout."""
    assert decision.bits is not None
    bits, block = decision.bits, decision.block_size
    n, k_padded = codes.shape
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(n, k_padded // per_byte, per_byte)
    packed = np.zeros((n, k_padded // per_byte), dtype=np.uint8)
    for j in range(per_byte):  # element 2i in the low nibble, as MatMulNBits reads it
        packed |= grouped[:, :, j] << (bits * j)
    blocks = k_padded // block
    zero_codes: np.ndarray = np.clip(np.round(zeros.astype(np.float64)), 0, (1 << bits) - 1)
    zero_codes = zero_codes.astype(np.uint8).reshape(n, blocks)
    if bits == 4:
        zero_codes = np.pad(zero_codes, ((0, 0), (0, blocks % 2)))
        zero_codes = zero_codes[:, 0::2] | (zero_codes[:, 1::2] << 4)
    return packed.reshape(n, blocks, block // per_byte), scales.astype(np.float32).reshape(n, blocks), zero_codes


def bits_per_weight(decision: Decision, k: int | None = None) -> float:
    """Stored bits per weight, scales (fp16) and zero points counted; with the row width ``k``, the zeros
    that pad its last block (``plan.padding_notes``) counted too."""
    if decision.bits is None:
        return 32.0
    per_weight = decision.bits + (16 + decision.bits) / decision.block_size
    if k is None or k % decision.block_size == 0:
        return per_weight
    return per_weight * -(-k // decision.block_size) * decision.block_size / k


def average_bits(plan: list[Entry]) -> float:
    """Stored bits per decoder linear weight (linear layers, router, experts), scales and zeros counted."""
    total = weights = 0.0
    for entry in plan:
        if entry.candidate.kind in LINEAR_KINDS:
            total += entry.candidate.size * bits_per_weight(entry.decision, entry.candidate.shape[-1])
            weights += entry.candidate.size
    return total / weights if weights else 0.0
