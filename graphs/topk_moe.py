"""TopKMoE: the 26B-A4B router and experts (transformers' Gemma4TextRouter + Gemma4TextExperts).

What Gemma 4 does differently (§3.9): the router reads the residual stream r itself through a
scale-less RMSNorm, a learned per-channel ``router.scale`` and H^(−½); it picks top-k of a full fp32
softmax, renormalises the k weights to sum 1 and multiplies them by ``per_expert_scale`` of the chosen
experts. The experts are GeGLU MLPs (gelu_tanh) with the gate and up rows concatenated, [gate ; up].

For tokens t (all leading axes flattened, T = B·S) with r = hidden_states, z = experts_input
(= pre_feedforward_layernorm_2(r), computed outside the op, like every ordinary RMSNorm of the layer):

    u        = RMSNorm_scale-less(r) · router_scale · H^(−½)
    p        = softmax_fp32(u · router_projᵀ)                      [T, E]
    (w, idx) = top-k of p;  w ← w / Σw;  w ← w · per_expert_scale[idx]
    [g ; v]  = z · gate_up_proj[e]ᵀ        (rows 0…I−1 gate, I…2I−1 up)
    y_e      = (gelu_tanh(g) ⊙ v) · down_proj[e]ᵀ
    output_t = Σ_j w_tj · y_{idx_tj}(z_t)       (summed in ascending expert id, in z's dtype)

The op returns that sum (before post_feedforward_layernorm_2). Only the experts some token picked
are touched, each once per call, and only for the tokens routed to it: a Loop over the distinct
experts hit (Unique of the top-k ids), no dense all-experts compute and no per-(token, k) copy of
expert matrices::

    r ─RMSNorm─·scale·H^-½─Gemm(router_projᵀ)─Cast f32─Softmax─TopK(k)─► w, idx ─÷Σw─·pes[idx]─► w
    experts = Unique(idx)                                      (sorted: ascending expert id)
    acc = 0 [T, H]
    Loop e over experts:
        (tok, j) = NonZero(idx == e)           the tokens routed to e and the slot they chose it in
        x  = Gather(z, tok)                      [N, H]
        gu = Gather(gate_up_proj, e)             [2I, H]    one expert's matrices, gathered once
        g, v = Split(Gemm(x, guᵀ))               [N, I] each
        y  = Gemm(Gelu_tanh(g) · v, down_proj[e]ᵀ) · w[tok, j]
        acc = ScatterND(acc, tok, y, reduction = add)
    output = Reshape(acc, shape(z))

Ties in top-k: ONNX TopK keeps the lower expert id among equal probabilities, and so does the
reference here (a stable descending sort). transformers uses torch.topk, whose choice among equal
values is unspecified and in practice depends on k and E (e.g. it can prefer the higher id). The
results differ only when equal probabilities straddle the k-th place, which needs exactly equal
router logits; the summation order (ascending expert id) is the same as transformers'.

ONNX op ``ai.gemma4::TopKMoE`` (version 1)::

    inputs     hidden_states [..., H] (router input r), experts_input [..., H] (z), router_scale [H],
               router_proj [E, H], per_expert_scale [E], gate_up_proj [E, 2I, H], down_proj [E, H, I]
    attributes top_k: int, eps: float
    output     [..., H] (shape and dtype of experts_input)

Torch op: ``torch.ops.gemma4.topk_moe(hidden_states, experts_input, router_scale, router_proj,
per_expert_scale, gate_up_proj, down_proj, top_k: int, eps: float) -> Tensor``.

Overload ``nbits`` (written by the quantizer, never by the exporter): the experts' weights are
blockwise-quantized in onnxruntime's MatMulNBits layout, one slice per expert, and the Loop body
gathers only the chosen expert's packed bytes and multiplies with ``com.microsoft::MatMulNBits``
(the op every quantized linear of the package already uses; the body is therefore onnxruntime's, not
portable ONNX). The gathered bytes are bits/32 of the float expert's, so quantization also cuts the
per-expert copy that dominates the float op's decode time::

    inputs     hidden_states, experts_input, router_scale, router_proj, per_expert_scale,
               gate_up_codes [E, 2I, H/b, b·bits/8] uint8, gate_up_scales [E, 2I, H/b] (fp16 or fp32),
               gate_up_zero_points [E, 2I, ⌈H/b·bits/8⌉] uint8, down_codes, down_scales, down_zero_points
               (the same for [E, H, I])
    attributes top_k, eps, hidden_size H, intermediate_size I, gate_up_bits, gate_up_block_size,
               down_bits, down_block_size
"""

from __future__ import annotations

from typing import Any

import onnxscript
import torch
from onnxscript import DOUBLE, FLOAT, opset20

from gemma4_onnx.graphs.domain import OPSET, ORT_CONTRIB_DOMAIN, RMSNormNoScale, node_emitter, rms_norm_reference

# onnxscript bodies follow onnxscript's rules (list literals are tensors...), not Python typing's.
op: Any = opset20

OP_TYPE = "TopKMoE"
NBITS = "nbits"
# onnxruntime's contrib domain: the quantized overload's body multiplies with its MatMulNBits.
ms: Any = onnxscript.values.Opset(ORT_CONTRIB_DOMAIN, 1)


# ---------------------------------------------------------------------------------------------
# PyTorch reference


def route(
    hidden_states: torch.Tensor,
    router_scale: torch.Tensor,
    router_proj: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k]) for r [T, H], as Gemma4TextRouter (ties: lower id)."""
    hidden = hidden_states.shape[-1]
    u = rms_norm_reference(hidden_states, None, eps) * router_scale * hidden**-0.5
    probs = torch.softmax(torch.nn.functional.linear(u, router_proj), dim=-1, dtype=torch.float32)
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, index = ordered[:, :top_k], order[:, :top_k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[index], index


@torch.library.custom_op("gemma4::topk_moe", mutates_args=())
def topk_moe(
    hidden_states: torch.Tensor,
    experts_input: torch.Tensor,
    router_scale: torch.Tensor,
    router_proj: torch.Tensor,
    per_expert_scale: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    eps: float,
) -> torch.Tensor:
    """Gemma 4 MoE: route r = hidden_states, run the chosen experts on z = experts_input, weighted sum."""
    hidden = experts_input.shape[-1]
    z = experts_input.reshape(-1, hidden)
    weights, index = route(hidden_states.reshape(-1, hidden), router_scale, router_proj, per_expert_scale, top_k, eps)
    output = torch.zeros_like(z)
    for expert in torch.unique(index).tolist():  # ascending ids, as transformers' expert_hit
        token, slot = torch.where(index == expert)
        gate, up = torch.nn.functional.linear(z[token], gate_up_proj[expert]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.gelu(gate, approximate="tanh") * up, down_proj[expert])
        output.index_add_(0, token, (y * weights[token, slot, None]).to(output.dtype))
    return output.reshape(experts_input.shape)


@topk_moe.register_fake
def _(
    hidden_states: torch.Tensor,
    experts_input: torch.Tensor,
    router_scale: torch.Tensor,
    router_proj: torch.Tensor,
    per_expert_scale: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
    eps: float,
) -> torch.Tensor:
    return torch.empty_like(experts_input)


# ---------------------------------------------------------------------------------------------
# ONNX function


@onnxscript.script(OPSET, default_opset=op)
def TopKMoE(
    hidden_states,
    experts_input,
    router_scale,
    router_proj,
    per_expert_scale,
    gate_up_proj,
    down_proj,
    top_k: int,
    eps: float,
):
    """Router + the chosen experts, one Loop iteration per distinct expert hit."""
    hidden = op.Shape(experts_input, start=-1)
    rows = op.Concat([-1], hidden, axis=0)
    r = op.Reshape(hidden_states, rows)
    z = op.Reshape(experts_input, rows)
    # H^(-1/2) as Python computes it (in double), then rounded once, like the float in transformers.
    root = op.CastLike(op.Pow(op.Cast(hidden, to=DOUBLE.dtype), op.Constant(value_float=-0.5)), r)
    u = op.Mul(op.Mul(RMSNormNoScale(r, eps=eps), op.CastLike(router_scale, r)), root)
    probs = op.Softmax(op.Cast(op.Gemm(u, router_proj, transB=1), to=FLOAT.dtype), axis=-1)
    k = op.Unsqueeze(op.Constant(value_int=top_k), [0])
    top_probs, index = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    weights = op.Div(top_probs, op.ReduceSum(top_probs, [-1], keepdims=1))
    weights = op.Mul(weights, op.Gather(op.Cast(per_expert_scale, to=FLOAT.dtype), index))
    experts, _unused_1, _unused_2, _unused_3 = op.Unique(op.Reshape(index, [-1]), sorted=1)
    acc = op.CastLike(op.ConstantOfShape(op.Shape(z)), z)
    for i in range(op.Size(experts)):
        expert = op.Gather(experts, i)
        hits = op.NonZero(op.Equal(index, expert))
        token = op.Gather(hits, 0, axis=0)
        weight = op.GatherND(weights, op.Transpose(hits, perm=[1, 0]))
        gate_up = op.Gemm(op.Gather(z, token, axis=0), op.Gather(gate_up_proj, expert, axis=0), transB=1)
        gate, up = op.Split(gate_up, num_outputs=2, axis=-1)
        activated = op.Mul(op.Gelu(gate, approximate="tanh"), up)
        y = op.Gemm(activated, op.Gather(down_proj, expert, axis=0), transB=1)
        weighted = op.CastLike(op.Mul(op.Cast(y, to=FLOAT.dtype), op.Unsqueeze(weight, [-1])), z)
        acc = op.ScatterND(acc, op.Unsqueeze(token, [-1]), weighted, reduction="add")
    output = op.Reshape(acc, op.Shape(experts_input))
    return output


@onnxscript.script(OPSET, default_opset=op)
def TopKMoENBits(
    hidden_states,
    experts_input,
    router_scale,
    router_proj,
    per_expert_scale,
    gate_up_codes,
    gate_up_scales,
    gate_up_zero_points,
    down_codes,
    down_scales,
    down_zero_points,
    top_k: int,
    eps: float,
    hidden_size: int,
    intermediate_size: int,
    gate_up_rows: int,
    gate_up_bits: int,
    gate_up_block_size: int,
    down_bits: int,
    down_block_size: int,
):
    """TopKMoE with MatMulNBits experts: the router is the float op's; each expert hit gathers its own
    packed codes, scales and zero points only."""
    hidden = op.Shape(experts_input, start=-1)
    rows = op.Concat([-1], hidden, axis=0)
    r = op.Reshape(hidden_states, rows)
    z = op.Reshape(experts_input, rows)
    root = op.CastLike(op.Pow(op.Cast(hidden, to=DOUBLE.dtype), op.Constant(value_float=-0.5)), r)
    u = op.Mul(op.Mul(RMSNormNoScale(r, eps=eps), op.CastLike(router_scale, r)), root)
    probs = op.Softmax(op.Cast(op.Gemm(u, router_proj, transB=1), to=FLOAT.dtype), axis=-1)
    k = op.Unsqueeze(op.Constant(value_int=top_k), [0])
    top_probs, index = op.TopK(probs, k, axis=-1, largest=1, sorted=1)
    weights = op.Div(top_probs, op.ReduceSum(top_probs, [-1], keepdims=1))
    weights = op.Mul(weights, op.Gather(op.Cast(per_expert_scale, to=FLOAT.dtype), index))
    experts, _unused_1, _unused_2, _unused_3 = op.Unique(op.Reshape(index, [-1]), sorted=1)
    acc = op.CastLike(op.ConstantOfShape(op.Shape(z)), z)
    for i in range(op.Size(experts)):
        expert = op.Gather(experts, i)
        hits = op.NonZero(op.Equal(index, expert))
        token = op.Gather(hits, 0, axis=0)
        weight = op.GatherND(weights, op.Transpose(hits, perm=[1, 0]))
        x = op.Cast(op.Gather(z, token, axis=0), to=FLOAT.dtype)
        gate_up = ms.MatMulNBits(
            x,
            op.Gather(gate_up_codes, expert, axis=0),
            op.Reshape(op.Cast(op.Gather(gate_up_scales, expert, axis=0), to=FLOAT.dtype), [-1]),
            op.Reshape(op.Gather(gate_up_zero_points, expert, axis=0), [-1]),
            K=hidden_size,
            N=gate_up_rows,
            bits=gate_up_bits,
            block_size=gate_up_block_size,
            accuracy_level=1,
        )
        gate, up = op.Split(gate_up, num_outputs=2, axis=-1)
        activated = op.Mul(op.Gelu(gate, approximate="tanh"), up)
        y = ms.MatMulNBits(
            activated,
            op.Gather(down_codes, expert, axis=0),
            op.Reshape(op.Cast(op.Gather(down_scales, expert, axis=0), to=FLOAT.dtype), [-1]),
            op.Reshape(op.Gather(down_zero_points, expert, axis=0), [-1]),
            K=intermediate_size,
            N=hidden_size,
            bits=down_bits,
            block_size=down_block_size,
            accuracy_level=1,
        )
        weighted = op.CastLike(op.Mul(y, op.Unsqueeze(weight, [-1])), z)
        acc = op.ScatterND(acc, op.Unsqueeze(token, [-1]), weighted, reduction="add")
    output = op.Reshape(acc, op.Shape(experts_input))
    return output


FUNCTIONS = {"": TopKMoE, NBITS: TopKMoENBits}
_emit = node_emitter(TopKMoE, OP_TYPE)


def _translate(
    hidden_states: Any,
    experts_input: Any,
    router_scale: Any,
    router_proj: Any,
    per_expert_scale: Any,
    gate_up_proj: Any,
    down_proj: Any,
    top_k: int,
    eps: float,
) -> Any:
    return _emit(
        hidden_states,
        experts_input,
        router_scale,
        router_proj,
        per_expert_scale,
        gate_up_proj,
        down_proj,
        top_k=int(top_k),
        eps=float(eps),
    )


TRANSLATIONS = {torch.ops.gemma4.topk_moe.default: _translate}
