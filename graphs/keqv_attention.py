"""KEqVAttention: Gemma 4 grouped-query attention with q/k/v norms, RoPE, its caches and KV sharing.

What Gemma 4 does differently (§3.5, §3.7, §3.8):

* scale 1.0: no 1/√D, the q and k RMSNorms take its place;
* q ← RoPE(RMSNorm(q)·w_q); k ← RoPE(RMSNorm(k_raw)·w_k); v ← RMSNorm_scale-less(v_in), no RoPE on v;
* K=V (full layers of 26B-A4B and 31B): there is no v_proj, v_in is the raw k projection itself;
* sliding layers mask keys outside (q_pos − W, q_pos] and keep a window-bounded cache (the last W−1
  tokens, transformers' DynamicSlidingWindowLayer) while attending with all of past + current;
* bidirectional image blocks (sliding layers of 26B-A4B and 31B, ``use_bidirectional_attention:
  "vision"``): the soft tokens of one image also see the later soft tokens of the same image;
* KV sharing (E2B, E4B): "reuse" layers have no k/v projections and no cache; they attend with the
  full K, V that the last cache-owning layer of their type attended with in the same forward pass.
* head_dim 256 (sliding) or 512 (full); softmax in fp32; GQA with contiguous grouping (query head j
  uses KV head ⌊j / (Hq/KVH)⌋).

Key positions are contiguous and end at the last query position: the T keys (past + current) sit at
positions last_q − T + 1 … last_q, per batch row. The mask keeps key k for query q iff
k_pos ≤ q_pos and, when sliding_window W > 0, k_pos > q_pos − W. No padding mask: batch rows are
aligned (their position_ids may differ).

With ``image_blocks`` [B, S] (int64: the image each current token belongs to, numbered 0, 1, … per
maximal run of soft tokens; −1 for text), key k is also kept for query q when both are current tokens
of the same block ≥ 0, still inside the window: keep = (k_pos ≤ q_pos OR same block) AND k_pos > q_pos − W
(transformers' mask for ``mm_token_type_ids``, §3.7). Only current keys can lie after a query, so the
blocks of past keys are never needed; an image's tokens must be in one call (the runtime prefills whole
prompts), and decode steps feed −1.

**The K=V cache is one tensor.** transformers caches k = RoPE(RMSNorm(raw)·w_k) and v = RMSNorm(raw)
for K=V layers: two tensors holding the same information. Since RMSNorm(raw)·w_k = (raw·r)·w_k = v·w_k
in fp32, this op caches only v (normalised, un-roped) and recomputes keys for the whole cache each
step as RoPE(v·w_k) at the key positions; in fp32 that equals transformers' cached keys bit for bit
(in 16-bit types v is rounded once more before ·w_k). Saved cache per token:
26B-A4B 5 full layers × 2 KV heads × 512 dims = 5,120 values (10 KiB in bf16);
31B 10 × 4 × 512 = 20,480 values (40 KiB in bf16). The price is a RoPE over the cache per step.

Layouts: query [B, S, Hq·D]; key/value projections [B, S, KVH·D]; caches and K/V states
[B, KVH, T, D] (transformers' DynamicCache layout); output [B, S, Hq·D] (before o_proj).

ONNX op ``ai.gemma4::KEqVAttention`` (version 1), one function per overload (the three signatures
cannot share a body: an ONNX function may not reference an absent input)::

    attributes (all overloads) num_heads, num_kv_heads, head_dim, sliding_window (0: none): int;
        eps: float; rope_theta, rope_fraction: float; rope_inv_freq: floats [D/2] (exact table, see prope)

    :kv     (query, key, value, q_norm_weight, k_norm_weight, position_ids, past_key, past_value)
              → (output, present_key, present_value, key_states, value_states)
    :keqv   (query, key, q_norm_weight, k_norm_weight, position_ids, past_value)
              → (output, present_value, key_states, value_states)      one cache: normalised v
    :reuse  (query, key, value, q_norm_weight, position_ids)            key/value: the producer's
              → (output)                                                 key_states/value_states
    :kv_image_blocks  (the eight inputs of :kv, image_blocks) → (the five outputs of :kv)

    query ─Reshape[B,S,Hq,D]─RMSNorm(w_q)─PRoPE(pos)─Transpose─► q [B,Hq,S,D]
    :kv    key ─Reshape─RMSNorm(w_k)─PRoPE─Transpose─┐      value ─Reshape─RMSNorm─Transpose─┐
           past_key ───────────────────Concat(axis 2)─► K       past_value ──────Concat──────► V
    :keqv  key ─Reshape─RMSNorm─Transpose─┐ past_value ─Concat─► V ─·w_k─PRoPE(key positions, head_axis 1)─► K
    :reuse K, V = key, value
    q ─Reshape[B,KVH,n_rep·S,D]─MatMul(Kᵀ)─Cast f32─Where(mask, ·, lowest)─Softmax─MatMul(V)─►
        ─Reshape[B,Hq,S,D]─Transpose─Reshape─► output [B,S,Hq·D]
    present = Slice(K or V, start = min(0, 1 − W), axis 2)          (the last W−1 tokens, or all)

Every PRoPE above is a nested ``ai.gemma4::PRoPE`` node inside the overload's body (attributes
theta/fraction/inv_freq referring to rope_theta/rope_fraction/rope_inv_freq), not inlined math: a
model with attention carries the PRoPE function too, and onnxruntime inlines both levels. q and the
new keys are roped in [B, S, N, D] (head_axis 2); the K=V keys in the cache layout [B, KVH, T, D]
(head_axis 1: no transposes of the whole cache).

Torch op (one op for all modes; absent tensors are None, absent outputs are empty tensors [0])::

    torch.ops.gemma4.keqv_attention(query, q_norm_weight, position_ids, key, value, k_norm_weight,
        past_key, past_value, mode: str, num_heads: int, num_kv_heads: int, head_dim: int,
        sliding_window: int, rope_theta: float, rope_fraction: float, eps: float, image_blocks=None)
        -> (output, present_key, present_value, key_states, value_states)

    mode "kv":    key, value, k_norm_weight, past_key, past_value given
    mode "keqv":  key, k_norm_weight, past_value (the one cache) given; present_key is empty
    mode "reuse": key, value = the producer's key_states, value_states; the other four outputs empty
    image_blocks: mode "kv" only (bidirectional images are a sliding-layer feature, and those layers
                  keep separate k and v); exported as the ``kv_image_blocks`` overload
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxscript
import torch
from onnxscript import FLOAT, opset18, opset20

from gemma4_onnx.graphs.domain import HELPER_OPSET, OPSET, RMSNorm, RMSNormNoScale, node_emitter, rms_norm_reference
from gemma4_onnx.graphs.prope import PRoPE, apply_rope, cos_sin, inv_freq, rope_attributes

# onnxscript bodies follow onnxscript's rules (list literals are tensors...), not Python typing's.
op: Any = opset20
std: Any = opset18  # emitted directly by the translation

OP_TYPE = "KEqVAttention"
MODES = ("kv", "keqv", "reuse")
_FLOAT32_LOWEST = float(np.finfo(np.float32).min)


# ---------------------------------------------------------------------------------------------
# PyTorch reference


def key_positions(position_ids: torch.Tensor, total: int) -> torch.Tensor:
    """[B, T] positions of T contiguous keys ending at each row's last query position."""
    return position_ids[:, -1:] - (total - 1) + torch.arange(total, device=position_ids.device)


def attend_reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position_ids: torch.Tensor,
    sliding_window: int,
    image_blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, S, D] (normed, roped) against keys/values [B, KVH, T, D] → [B, S, Hq·D]."""
    batch, num_heads, length, _ = q.shape
    total = keys.shape[2]
    n_rep = num_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, keys.transpose(2, 3))  # scale 1.0
    k_pos = key_positions(position_ids, total)[:, None, :]
    q_pos = position_ids[:, :, None]
    keep = k_pos <= q_pos
    if image_blocks is not None:
        past = torch.full((batch, total - length), -1, dtype=image_blocks.dtype)
        key_blocks = torch.cat([past, image_blocks], dim=1)[:, None, :]
        keep = keep | ((image_blocks[:, :, None] == key_blocks) & (image_blocks[:, :, None] >= 0))
    if sliding_window > 0:
        keep = keep & (k_pos > q_pos - sliding_window)
    mask = torch.zeros(keep.shape, dtype=scores.dtype).masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores + mask[:, None], dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).transpose(1, 2).reshape(batch, length, -1)


def window(states: torch.Tensor, sliding_window: int) -> torch.Tensor:
    """The cache kept after a step: the last W−1 tokens on sliding layers (all when W ≤ 1), else all."""
    return states[:, :, -sliding_window + 1 :] if sliding_window > 0 else states


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:2], -1, head_dim)


@torch.library.custom_op("gemma4::keqv_attention", mutates_args=())
def keqv_attention(
    query: torch.Tensor,
    q_norm_weight: torch.Tensor,
    position_ids: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    mode: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    rope_theta: float,
    rope_fraction: float,
    eps: float,
    image_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gemma 4 attention (before o_proj); see the module docstring for modes and layouts."""
    _check_mode(mode, key, value, k_norm_weight, past_key, past_value, image_blocks)
    freqs = inv_freq(rope_theta, rope_fraction, head_dim)
    cos, sin = cos_sin(position_ids, freqs, query.dtype)
    q = rms_norm_reference(_heads(query, head_dim), q_norm_weight, eps)
    q = apply_rope(q, cos, sin).transpose(1, 2)
    empty = query.new_empty(0)
    assert key is not None
    if mode == "reuse":
        assert value is not None
        output = attend_reference(q, key, value, position_ids, sliding_window)
        return output, empty, empty.clone(), empty.clone(), empty.clone()
    raw = _heads(key, head_dim)
    if mode == "kv":
        assert value is not None and past_key is not None and past_value is not None
        k_new = apply_rope(rms_norm_reference(raw, k_norm_weight, eps), cos, sin).transpose(1, 2)
        v_new = rms_norm_reference(_heads(value, head_dim), None, eps).transpose(1, 2)
        keys = torch.cat([past_key, k_new], dim=2)
        values = torch.cat([past_value, v_new], dim=2)
        present_key = window(keys, sliding_window).clone()
    else:  # keqv: one cache of v = RMSNorm(raw); keys recomputed as RoPE(v·w_k) over the whole cache
        assert past_value is not None and k_norm_weight is not None
        values = torch.cat([past_value, rms_norm_reference(raw, None, eps).transpose(1, 2)], dim=2)
        k_cos, k_sin = cos_sin(key_positions(position_ids, values.shape[2]), freqs, values.dtype)
        keys_unroped = (values.float() * k_norm_weight.float()).to(values.dtype)
        keys = apply_rope(keys_unroped.transpose(1, 2), k_cos, k_sin).transpose(1, 2).contiguous()
        present_key = empty
    output = attend_reference(q, keys, values, position_ids, sliding_window, image_blocks)
    return output, present_key, window(values, sliding_window).clone(), keys, values


@keqv_attention.register_fake
def _(
    query: torch.Tensor,
    q_norm_weight: torch.Tensor,
    position_ids: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    past_key: torch.Tensor | None,
    past_value: torch.Tensor | None,
    mode: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    rope_theta: float,
    rope_fraction: float,
    eps: float,
    image_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_mode(mode, key, value, k_norm_weight, past_key, past_value, image_blocks)
    output = torch.empty_like(query)
    empty = query.new_empty(0)
    if mode == "reuse":
        return output, empty, empty.clone(), empty.clone(), empty.clone()
    assert key is not None and past_value is not None
    batch, length = key.shape[0], key.shape[1]
    new = query.new_empty(batch, num_kv_heads, length, head_dim)
    values = torch.cat([past_value, new], dim=2)
    keys = torch.empty_like(values)
    present_key = window(keys, sliding_window).clone() if mode == "kv" else empty
    return output, present_key, window(values, sliding_window).clone(), keys, values


def _check_mode(mode: str, *tensors: torch.Tensor | None) -> None:
    """tensors: key, value, k_norm_weight, past_key, past_value, image_blocks."""
    if tensors[-1] is not None and mode != "kv":
        raise ValueError(f"keqv_attention: image_blocks is for mode 'kv' only, got mode {mode!r}")
    given = tuple(t is not None for t in tensors[:-1])
    expected = {
        "kv": (True, True, True, True, True),
        "keqv": (True, False, True, False, True),
        "reuse": (True, True, False, False, False),
    }
    if mode not in expected:
        raise ValueError(f"keqv_attention: mode must be one of {MODES}, got {mode!r}")
    if given != expected[mode]:
        names = ("key", "value", "k_norm_weight", "past_key", "past_value")
        want = [n for n, g in zip(names, expected[mode], strict=True) if g]
        raise ValueError(f"keqv_attention mode {mode!r} takes exactly these optional tensors: {want}")


# ---------------------------------------------------------------------------------------------
# ONNX functions (helpers in HELPER_OPSET are inlined into each overload's body; PRoPE stays a node)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def SplitHeads(x, head_dim: int):
    """[B, S, N·D] → [B, S, N, D]."""
    shape = op.Concat(op.Constant(value_ints=[0, 0, -1]), op.Unsqueeze(op.Constant(value_int=head_dim), [0]), axis=0)
    return op.Reshape(x, shape)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def Query(
    query,
    q_norm_weight,
    position_ids,
    head_dim: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """query [B, S, Hq·D] → PRoPE(RMSNorm(q)) as [B, Hq, S, D]."""
    normed = RMSNorm(SplitHeads(query, head_dim=head_dim), q_norm_weight, eps=eps)
    roped = PRoPE(normed, position_ids, theta=rope_theta, fraction=rope_fraction, inv_freq=rope_inv_freq, head_axis=2)
    return op.Transpose(roped, perm=[0, 2, 1, 3])


@onnxscript.script(HELPER_OPSET, default_opset=op)
def QueryKeysValues(
    query,
    key,
    value,
    q_norm_weight,
    k_norm_weight,
    position_ids,
    past_key,
    past_value,
    head_dim: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """``kv``'s q [B, Hq, S, D] (``Query``), and the keys (RoPE(RMSNorm(k)·w_k)) and values (RMSNorm(v)) it
    attends with: past + current, [B, KVH, T, D]."""
    q = Query(
        query,
        q_norm_weight,
        position_ids,
        head_dim=head_dim,
        eps=eps,
        rope_theta=rope_theta,
        rope_fraction=rope_fraction,
        rope_inv_freq=rope_inv_freq,
    )
    k_normed = RMSNorm(SplitHeads(key, head_dim=head_dim), k_norm_weight, eps=eps)
    k_new = PRoPE(k_normed, position_ids, theta=rope_theta, fraction=rope_fraction, inv_freq=rope_inv_freq, head_axis=2)
    v_new = RMSNormNoScale(SplitHeads(value, head_dim=head_dim), eps=eps)
    key_states = op.Concat(past_key, op.Transpose(k_new, perm=[0, 2, 1, 3]), axis=2)
    value_states = op.Concat(past_value, op.Transpose(v_new, perm=[0, 2, 1, 3]), axis=2)
    return q, key_states, value_states


@onnxscript.script(HELPER_OPSET, default_opset=op)
def KeyPositions(position_ids, states):
    """[B, T] positions of the T keys in states [B, KVH, T, D]: contiguous, ending at the last query."""
    total = op.Shape(states, start=2, end=3)
    last = op.Slice(position_ids, [-1], [9223372036854775807], [1])
    first = op.Sub(op.Add(last, 1), total)
    return op.Add(first, op.Range(0, op.Squeeze(total), 1))


@onnxscript.script(HELPER_OPSET, default_opset=op)
def InWindow(position_ids, keys, sliding_window: int):
    """[B, S, T] bool: key inside query's window (always, when W = 0)."""
    q_pos = op.Unsqueeze(position_ids, [-1])
    k_pos = op.Unsqueeze(KeyPositions(position_ids, keys), [1])
    width = op.Constant(value_int=sliding_window)
    return op.Or(op.Equal(width, 0), op.Greater(k_pos, op.Sub(q_pos, width)))


@onnxscript.script(HELPER_OPSET, default_opset=op)
def Causal(position_ids, keys):
    """[B, S, T] bool: key at or before the query."""
    q_pos = op.Unsqueeze(position_ids, [-1])
    k_pos = op.Unsqueeze(KeyPositions(position_ids, keys), [1])
    return op.LessOrEqual(k_pos, q_pos)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def SameImageBlock(image_blocks, keys):
    """[B, S, T] bool: query and key are current tokens of the same image block (≥ 0)."""
    batch = op.Shape(image_blocks, start=0, end=1)
    past = op.Sub(op.Shape(keys, start=2, end=3), op.Shape(image_blocks, start=1, end=2))
    past_blocks = op.Expand(op.CastLike(op.Constant(value_int=-1), image_blocks), op.Concat(batch, past, axis=0))
    key_blocks = op.Unsqueeze(op.Concat(past_blocks, image_blocks, axis=1), [1])
    query_blocks = op.Unsqueeze(image_blocks, [-1])
    return op.And(op.Equal(query_blocks, key_blocks), op.GreaterOrEqual(query_blocks, op.CastLike(0, image_blocks)))


@onnxscript.script(HELPER_OPSET, default_opset=op)
def AttendMasked(q, keys, values, keep, num_kv_heads: int):
    """q [B, Hq, S, D] against keys/values [B, KVH, T, D] where keep [B, S, T] → [B, S, Hq·D]; GQA without
    repeating K/V."""
    keep = op.Unsqueeze(keep, [1, 2])
    q_shape = op.Shape(q)
    batch = op.Slice(q_shape, [0], [1])
    kv_heads = op.Unsqueeze(op.Constant(value_int=num_kv_heads), [0])
    grouped = op.Reshape(q, op.Concat(batch, kv_heads, [-1], op.Slice(q_shape, [3], [4]), axis=0))
    scores = op.Cast(op.MatMul(grouped, op.Transpose(keys, perm=[0, 1, 3, 2])), to=FLOAT.dtype)
    total = op.Shape(keys, start=2, end=3)
    scores_5d = op.Reshape(scores, op.Concat(batch, kv_heads, [-1], op.Slice(q_shape, [2], [3]), total, axis=0))
    probs = op.Softmax(op.Where(keep, scores_5d, op.Constant(value_float=_FLOAT32_LOWEST)), axis=-1)
    probs = op.CastLike(op.Reshape(probs, op.Shape(scores)), q)
    attended = op.Reshape(op.MatMul(probs, values), q_shape)
    return op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), [0, 0, -1])


@onnxscript.script(HELPER_OPSET, default_opset=op)
def Attend(q, keys, values, position_ids, num_kv_heads: int, sliding_window: int):
    """Causal (and windowed) attention: AttendMasked with keep = causal AND in window."""
    keep = op.And(Causal(position_ids, keys), InWindow(position_ids, keys, sliding_window=sliding_window))
    return AttendMasked(q, keys, values, keep, num_kv_heads=num_kv_heads)


@onnxscript.script(HELPER_OPSET, default_opset=op)
def Window(states, sliding_window: int):
    """The cache kept after a step: Slice(states, start = min(0, 1 − W)) on the T axis."""
    start = op.Min([0], op.Sub([1], op.Unsqueeze(op.Constant(value_int=sliding_window), [0])))
    return op.Slice(states, start, [9223372036854775807], [2])


@onnxscript.script(HELPER_OPSET, default_opset=op)
def AttendAndWindow(q, key_states, value_states, keep, num_kv_heads: int, sliding_window: int):
    """``kv``'s output (AttendMasked with ``keep``) and the two caches it hands on (``Window``)."""
    output = AttendMasked(q, key_states, value_states, keep, num_kv_heads=num_kv_heads)
    present_key = Window(key_states, sliding_window=sliding_window)
    present_value = Window(value_states, sliding_window=sliding_window)
    return output, present_key, present_value


@onnxscript.script(OPSET, default_opset=op)
def KEqVAttentionKV(
    query,
    key,
    value,
    q_norm_weight,
    k_norm_weight,
    position_ids,
    past_key,
    past_value,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """Overload ``kv``: separate k and v projections, two caches (roped keys, normalised values)."""
    q, key_states, value_states = QueryKeysValues(
        query,
        key,
        value,
        q_norm_weight,
        k_norm_weight,
        position_ids,
        past_key,
        past_value,
        head_dim=head_dim,
        eps=eps,
        rope_theta=rope_theta,
        rope_fraction=rope_fraction,
        rope_inv_freq=rope_inv_freq,
    )
    keep = op.And(Causal(position_ids, key_states), InWindow(position_ids, key_states, sliding_window=sliding_window))
    output, present_key, present_value = AttendAndWindow(q, key_states, value_states, keep, num_kv_heads=num_kv_heads,
                                                         sliding_window=sliding_window)
    return output, present_key, present_value, key_states, value_states


@onnxscript.script(OPSET, default_opset=op)
def KEqVAttentionKVImageBlocks(
    query,
    key,
    value,
    q_norm_weight,
    k_norm_weight,
    position_ids,
    past_key,
    past_value,
    image_blocks,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """Overload ``kv_image_blocks``: ``kv`` whose mask also keeps later keys of the query's image block."""
    q, key_states, value_states = QueryKeysValues(
        query,
        key,
        value,
        q_norm_weight,
        k_norm_weight,
        position_ids,
        past_key,
        past_value,
        head_dim=head_dim,
        eps=eps,
        rope_theta=rope_theta,
        rope_fraction=rope_fraction,
        rope_inv_freq=rope_inv_freq,
    )
    seen = op.Or(Causal(position_ids, key_states), SameImageBlock(image_blocks, key_states))
    keep = op.And(seen, InWindow(position_ids, key_states, sliding_window=sliding_window))
    output, present_key, present_value = AttendAndWindow(q, key_states, value_states, keep, num_kv_heads=num_kv_heads,
                                                         sliding_window=sliding_window)
    return output, present_key, present_value, key_states, value_states


@onnxscript.script(OPSET, default_opset=op)
def KEqVAttentionKEqV(
    query,
    key,
    q_norm_weight,
    k_norm_weight,
    position_ids,
    past_value,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """Overload ``keqv``: v is the normalised raw k projection; one cache; keys = RoPE(v·w_k)."""
    q = Query(
        query,
        q_norm_weight,
        position_ids,
        head_dim=head_dim,
        eps=eps,
        rope_theta=rope_theta,
        rope_fraction=rope_fraction,
        rope_inv_freq=rope_inv_freq,
    )
    v_new = RMSNormNoScale(SplitHeads(key, head_dim=head_dim), eps=eps)
    value_states = op.Concat(past_value, op.Transpose(v_new, perm=[0, 2, 1, 3]), axis=2)
    scaled = op.Mul(op.Cast(value_states, to=FLOAT.dtype), op.Cast(k_norm_weight, to=FLOAT.dtype))
    unroped = op.CastLike(scaled, value_states)
    key_positions = KeyPositions(position_ids, value_states)
    key_states = PRoPE(
        unroped, key_positions, theta=rope_theta, fraction=rope_fraction, inv_freq=rope_inv_freq, head_axis=1
    )
    output = Attend(q, key_states, value_states, position_ids, num_kv_heads=num_kv_heads, sliding_window=sliding_window)
    present_value = Window(value_states, sliding_window=sliding_window)
    return output, present_value, key_states, value_states


@onnxscript.script(OPSET, default_opset=op)
def KEqVAttentionReuse(
    query,
    key,
    value,
    q_norm_weight,
    position_ids,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    eps: float,
    rope_theta: float,
    rope_fraction: float,
    rope_inv_freq: Sequence[float],
):
    """Overload ``reuse``: attend with the producer's key_states/value_states; no cache."""
    q = Query(
        query,
        q_norm_weight,
        position_ids,
        head_dim=head_dim,
        eps=eps,
        rope_theta=rope_theta,
        rope_fraction=rope_fraction,
        rope_inv_freq=rope_inv_freq,
    )
    output = Attend(q, key, value, position_ids, num_kv_heads=num_kv_heads, sliding_window=sliding_window)
    return output


FUNCTIONS: dict[str, onnxscript.OnnxFunction] = {
    "kv": KEqVAttentionKV,
    "kv_image_blocks": KEqVAttentionKVImageBlocks,
    "keqv": KEqVAttentionKEqV,
    "reuse": KEqVAttentionReuse,
}
_EMIT = {mode: node_emitter(function, OP_TYPE, mode) for mode, function in FUNCTIONS.items()}


def onnx_attributes(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    rope_theta: float,
    rope_fraction: float,
    eps: float,
) -> dict[str, Any]:
    """The ONNX attributes of a KEqVAttention node."""
    rope = rope_attributes(rope_theta, rope_fraction, head_dim)
    return {
        "num_heads": int(num_heads),
        "num_kv_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "sliding_window": int(sliding_window),
        "eps": float(eps),
        "rope_theta": rope["theta"],
        "rope_fraction": rope["fraction"],
        "rope_inv_freq": rope["inv_freq"],
    }


def _empty_like(x: Any) -> Any:
    """An empty [0] tensor of x's dtype for the torch op's outputs an overload does not have."""
    value: Any = ir.tensor(np.zeros(0, np.float32))  # the recorder takes IR tensors; the stubs say TensorProto
    empty: Any = std.Constant(value=value)
    return std.CastLike(empty, x)


def _translate(
    query: Any,
    q_norm_weight: Any,
    position_ids: Any,
    key: Any,
    value: Any,
    k_norm_weight: Any,
    past_key: Any,
    past_value: Any,
    mode: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    sliding_window: int,
    rope_theta: float,
    rope_fraction: float,
    eps: float,
    image_blocks: Any = None,
) -> tuple[Any, ...]:
    attributes = onnx_attributes(num_heads, num_kv_heads, head_dim, sliding_window, rope_theta, rope_fraction, eps)
    if mode == "kv":
        inputs = (query, key, value, q_norm_weight, k_norm_weight, position_ids, past_key, past_value)
        if image_blocks is not None:
            return tuple(_EMIT["kv_image_blocks"](*inputs, image_blocks, **attributes))
        return tuple(_EMIT["kv"](*inputs, **attributes))
    if mode == "keqv":
        output, present_value, keys, values = _EMIT["keqv"](
            query, key, q_norm_weight, k_norm_weight, position_ids, past_value, **attributes
        )
        return output, _empty_like(query), present_value, keys, values
    output = _EMIT["reuse"](query, key, value, q_norm_weight, position_ids, **attributes)
    return (output, *(_empty_like(query) for _ in range(4)))


TRANSLATIONS = {torch.ops.gemma4.keqv_attention.default: _translate}
