"""PRoPE: Gemma 4 rotary position embedding, ordinary (sliding layers) and proportional (full layers).

What Gemma 4 does differently (§3.6): full-attention layers use *proportional* RoPE ("p-RoPE"). It is
split-half RoPE over the whole head (dim j pairs with j + D/2) whose frequency table is cut off:

    inv_freq_j = theta^(-2j / D)   for j < n_rot = floor(fraction·D/2)
    inv_freq_j = 0                 for n_rot ≤ j < D/2           (cos = 1, sin = 0: pass-through)

The exponent's denominator is the FULL head dim D, not the rotated width; the rotated dims are
[0, n_rot) and [D/2, D/2 + n_rot). Sliding layers are the special case fraction = 1 (θ = 1e4, D = 256);
full layers use fraction = 0.25, θ = 1e6, D = 512 (64 of 256 pairs rotate). This is not the usual
``partial_rotary_factor`` RoPE, which rotates a leading block with exponents over the rotated width.

Shapes: x [B, S, N, D] (the layout in which transformers applies RoPE with ``unsqueeze_dim=2``;
``head_axis`` 2) or x [B, N, S, D] (the cache layout, in which KEqVAttention re-ropes K=V keys;
``head_axis`` 1); position_ids [B, S] int64; output in x's shape and dtype.

Numerics: the angle θ_j = pos·inv_freq_j is formed in fp32 exactly as transformers does (a float32
product of the float32 position and the float32 inv_freq), then cat(freqs, freqs), cos, sin, cast to
x's dtype. At positions beyond 10^5 one ulp of inv_freq moves the angle by ~10^-2 rad, so inv_freq
must be bit-identical to transformers': onnxruntime's Pow differs from torch's by one ulp on a few
entries, so the table is NOT computed in the graph. The translation computes it with torch, exactly
as transformers does (``inv_freq``), and stores it in the float attribute ``inv_freq`` (FLOATS are
float32 in ONNX, so the values survive exactly); ``theta`` and ``fraction`` are kept as attributes for
readers and for ``lower_ort``.

ONNX op ``ai.gemma4::PRoPE`` (version 1)::

    inputs     X (float types): [B, S, N, D] (head_axis 2) or [B, N, S, D] (head_axis 1);
               position_ids [B, S] int64
    attributes theta: float, fraction: float, inv_freq: floats [D/2] (= inv_freq(theta, fraction, D)),
               head_axis: int (2 or 1, required)
    output     Y, shaped like X

    position_ids ─Cast(f32)─Unsqueeze(-1)─┐
    inv_freq (Constant) ──────────────────Mul─► freqs [B,S,D/2] ─Concat(freqs,freqs)─► emb [B,S,D]
    emb ─Cos─CastLike(X)─Unsqueeze(head_axis)─► cos [B,S,1,D] (head_axis 2) or [B,1,S,D] (head_axis 1)
    emb ─Sin─CastLike(X)─Unsqueeze(head_axis)─► sin
    X ─Split(2, axis -1)─► X1, X2 ─Concat(-X2, X1)─► rot
    Y = X·cos + rot·sin

KEqVAttention's function bodies call this op as nested ``ai.gemma4::PRoPE`` nodes (q and new keys
with head_axis 2, K=V keys over the whole cache with head_axis 1), so every model with attention
carries the PRoPE function and a runtime can match RoPE inside attention on its own.

Why an attribute and not two overloads for the two layouts: onnxruntime (1.32) resolves a node
nested inside a function body by domain and name only, ignoring its overload (a nested call of an
overload fails with "is not a registered function/op", or silently runs the "" overload when one
exists). Top-level overloads, as KEqVAttention uses, are resolved correctly.

Torch op: ``torch.ops.gemma4.prope(x, position_ids, theta: float, fraction: float, head_axis: int = 2)
-> Tensor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnxscript
import torch
from onnxscript import FLOAT, opset20

from gemma4_onnx.graphs.domain import HELPER_OPSET, OPSET, node_emitter

# onnxscript bodies follow onnxscript's rules (list literals are tensors...), not Python typing's.
op: Any = opset20

OP_TYPE = "PRoPE"


# ---------------------------------------------------------------------------------------------
# PyTorch reference


def inv_freq(theta: float, fraction: float, head_dim: int) -> torch.Tensor:
    """The float32 [D/2] frequency table, computed operation for operation as transformers'
    ``_compute_proportional_rope_parameters`` (its ``default`` RoPE gives the same values at fraction 1)."""
    n_rot = int(fraction * head_dim // 2)
    exponents = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    rotated = 1.0 / (theta**exponents)
    return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot, dtype=torch.float32)])


def cos_sin(position_ids: torch.Tensor, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, D] for positions [B, S] (transformers' Gemma4TextRotaryEmbedding.forward)."""
    angles = position_ids[..., None].float() * freqs.float()
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, N, D] rotated with cos/sin [B, S, D] (transformers' apply_rotary_pos_emb, unsqueeze_dim=2)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


HEAD_AXES = (2, 1)  # x [B, S, N, D], x [B, N, S, D]


def _check_head_axis(head_axis: int) -> None:
    if head_axis not in HEAD_AXES:
        raise ValueError(f"prope: head_axis must be 2 (x [B, S, N, D]) or 1 (x [B, N, S, D]), got {head_axis}")


@torch.library.custom_op("gemma4::prope", mutates_args=())
def prope(
    x: torch.Tensor, position_ids: torch.Tensor, theta: float, fraction: float, head_axis: int = 2
) -> torch.Tensor:
    """Gemma 4 (proportional) RoPE of x [B, S, N, D] (head_axis 1: [B, N, S, D]) at position_ids [B, S]."""
    _check_head_axis(head_axis)
    cos, sin = cos_sin(position_ids, inv_freq(theta, fraction, x.shape[-1]), x.dtype)
    if head_axis == 1:
        return apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2).contiguous()
    return apply_rope(x, cos, sin)


@prope.register_fake
def _(x: torch.Tensor, position_ids: torch.Tensor, theta: float, fraction: float, head_axis: int = 2) -> torch.Tensor:
    _check_head_axis(head_axis)
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------
# ONNX function (the Rope helper is inlined into its body)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def Rope(X, positions, inv_freq: Sequence[float], head_axis: int):
    """Split-half RoPE of X with its head axis at ``head_axis`` and its position axis just before or
    after it (``positions`` [B, L] broadcast over the heads)."""
    freqs = op.Constant(value_floats=inv_freq)
    angles = op.Mul(op.Unsqueeze(op.Cast(positions, to=FLOAT.dtype), [-1]), freqs)
    emb = op.Concat(angles, angles, axis=-1)
    axis = op.Unsqueeze(op.Constant(value_int=head_axis), [0])
    cos = op.Unsqueeze(op.CastLike(op.Cos(emb), X), axis)
    sin = op.Unsqueeze(op.CastLike(op.Sin(emb), X), axis)
    x1, x2 = op.Split(X, num_outputs=2, axis=-1)
    rotated = op.Concat(op.Neg(x2), x1, axis=-1)
    Y = op.Add(op.Mul(X, cos), op.Mul(rotated, sin))
    return Y


@onnxscript.script(OPSET, default_opset=op)
def PRoPE(X, position_ids, theta: float, fraction: float, inv_freq: Sequence[float], head_axis: int):
    """Split-half RoPE of X ([B, S, N, D] with head_axis 2, [B, N, S, D] with 1) with the table ``inv_freq``."""
    Y = Rope(X, position_ids, inv_freq=inv_freq, head_axis=head_axis)
    return Y


FUNCTIONS: dict[str, onnxscript.OnnxFunction] = {"": PRoPE}
_emit = node_emitter(PRoPE, OP_TYPE)


def rope_attributes(theta: float, fraction: float, head_dim: int) -> dict[str, Any]:
    """The ONNX attributes of a PRoPE (or of KEqVAttention's RoPE): theta, fraction, exact inv_freq."""
    return {
        "theta": float(theta),
        "fraction": float(fraction),
        "inv_freq": [float(v) for v in inv_freq(theta, fraction, head_dim).tolist()],
    }


def _translate(x: Any, position_ids: Any, theta: float, fraction: float, head_axis: int = 2) -> Any:
    _check_head_axis(head_axis)
    head_dim = x.shape[-1]
    if not isinstance(head_dim, int):
        raise ValueError("PRoPE: the head dim of x must be static")
    return _emit(x, position_ids, head_axis=int(head_axis), **rope_attributes(theta, fraction, head_dim))


TRANSLATIONS = {torch.ops.gemma4.prope.default: _translate}
