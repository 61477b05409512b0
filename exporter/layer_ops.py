"""Calls from the decoder-layer block into Gemma 4's attention and expert routing.

INTERIM: plain-torch arithmetic with the reference's op order, until the ``ai.gemma4`` custom ops
(``graphs/``) land; then these functions call ``torch.ops.gemma4.*`` and keep their signatures.
"""

import torch
from torch import nn

from gemma4_onnx.exporter.geometry import LayerSpec


def _inv_freq(spec: LayerSpec) -> torch.Tensor:
    half = spec.head_dim // 2
    rotated = int(spec.rope_fraction * spec.head_dim // 2)
    exponents = torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / spec.head_dim
    inv = 1.0 / (spec.rope_theta ** exponents)
    return torch.cat([inv, torch.zeros(half - rotated)])


def _rope(x: torch.Tensor, position_ids: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """x [B, S, N, D]; positions [B, S]."""
    freqs = position_ids[..., None].float() * _inv_freq(spec)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
               sliding_window: int) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, KVH, T, D] whose last S entries are the current queries' positions."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    total = k.shape[2]
    last = position_ids[:, -1:]
    k_pos = last - (total - 1) + torch.arange(total)  # [B, T]
    q_pos = position_ids
    keep = k_pos[:, None, :] <= q_pos[:, :, None]
    if sliding_window:
        keep = keep & (k_pos[:, None, :] > q_pos[:, :, None] - sliding_window)
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]
    weights = torch.softmax(torch.matmul(q, k.transpose(2, 3)) + mask, dim=-1, dtype=torch.float32)
    return torch.matmul(weights, v).transpose(1, 2)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, q_norm: torch.Tensor,
           k_norm: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor], *, num_heads: int,
           spec: LayerSpec, sliding_window: int,
           eps: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    b, s = query.shape[:2]
    d = spec.head_dim
    q = _rope(_rms(query.view(b, s, num_heads, d), eps) * q_norm, position_ids, spec).transpose(1, 2)
    raw = key.view(b, s, spec.num_kv_heads, d)
    v_new = _rms(raw if value is None else value.view(b, s, spec.num_kv_heads, d), eps).transpose(1, 2)
    if spec.k_eq_v:
        v_all = torch.cat([past[0], v_new], dim=2)
        total = v_all.shape[2]
        k_pos = position_ids[:, -1:] - (total - 1) + torch.arange(total)
        k_all = _rope((v_all * k_norm).transpose(1, 2), k_pos, spec).transpose(1, 2)
        cache = [v_all]
    else:
        k_new = _rope(_rms(raw, eps) * k_norm, position_ids, spec).transpose(1, 2)
        k_all = torch.cat([past[0], k_new], dim=2)
        v_all = torch.cat([past[1], v_new], dim=2)
        cache = [k_all, v_all]
    if sliding_window:
        cache = [c[:, :, -(sliding_window - 1):] for c in cache]
    out = _attention(q, k_all, v_all, position_ids, sliding_window)
    return out.reshape(b, s, num_heads * d), cache, [k_all, v_all]


def attend_shared(query: torch.Tensor, q_norm: torch.Tensor, position_ids: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, *, num_heads: int, spec: LayerSpec, sliding_window: int,
                  eps: float) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    b, s = query.shape[:2]
    q = _rope(_rms(query.view(b, s, num_heads, spec.head_dim), eps) * q_norm, position_ids, spec).transpose(1, 2)
    out = _attention(q, key, value, position_ids, sliding_window)
    return out.reshape(b, s, num_heads * spec.head_dim), [], []


def route(residual: torch.Tensor, expert_input: torch.Tensor, router: nn.Module, experts: nn.Module, *,
          top_k: int, eps: float) -> torch.Tensor:
    """Dense stand-in for TopKMoE (every expert computed, weights zero outside the top-k)."""
    u = _rms(residual, eps) * router.scale * router.scalar_root_size
    probs = torch.softmax(router.proj(u), dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, k=top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True) * router.per_expert_scale[top_i]
    dense_w = torch.zeros_like(probs).scatter(1, top_i, top_w)
    gate_up = torch.einsum("th,eoh->teo", expert_input, experts.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", experts.act_fn(gate) * up, experts.down_proj)
    return (y * dense_w[..., None]).sum(1)
