"""The ``decoder_layer`` block: one Gemma 4 decoder layer as exported, with explicit caches.

Gemma 4 layers differ from one another: sliding layers (window W, ordinary RoPE, head 256) keep a
window-bounded cache of W−1 tokens; full layers (p-RoPE, head 512) keep everything, and on 26B-A4B/31B
use one projection for keys and values (K=V) and so keep ONE cache tensor; KV-shared layers of
E2B/E4B own no cache and attend with the K/V their producer published in the same pass; 26B-A4B adds
routed experts beside the dense MLP; E-models add the per-layer-input gate; every layer ends by
scaling the residual stream by its ``layer_scalar`` (architecture doc §3.4–3.9).

    hidden ─► input_norm ─► q/k/v proj ─► ai.gemma4::KEqVAttention ─► o_proj ─► post_attn_norm ─(+)─► r
    r ─► pre_ffw_norm ─► MLP ─────────────────────────────┐ (MoE: post_ffw_norm_1, + TopKMoE ─► norm_2)
                                                          └► post_ffw_norm ─(+ r)─► [PLE gate] ─► ×layer_scalar

The block holds transformers' own layer (built on the meta device: its weights arrive as function
inputs when traced) and calls its submodules in the reference's order; only attention and expert
routing go through the ``ai.gemma4`` ops.
"""

from typing import Any

import onnx
import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

from gemma4_onnx.exporter.geometry import LayerSpec, text_geometry
from gemma4_onnx.exporter.hf_model import hf_config, quiet_transformers
from gemma4_onnx.graphs import keqv_attention, topk_moe  # noqa: F401  (registers torch.ops.gemma4.*)

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
EXAMPLE_PAST = 5
EXAMPLE_SEQUENCE = 3


def layer_kind(spec: LayerSpec) -> tuple[Any, ...]:
    """Layers of one kind share a traced function: everything but the index and the weights."""
    return (spec.attention, spec.head_dim, spec.num_kv_heads, spec.k_eq_v, spec.kv_mode, spec.mlp_width,
            spec.moe, spec.rope_theta, spec.rope_fraction, spec.image_blocks)


class DecoderLayerBlock(nn.Module):
    def __init__(self, config: dict[str, Any], spec: LayerSpec) -> None:
        super().__init__()
        text = hf_config(config).get_text_config()
        geometry = text_geometry(config)
        with quiet_transformers(), torch.device("meta"):
            layer = Gemma4TextDecoderLayer(text, spec.index)  # type: ignore[arg-type]
        for name, child in layer.named_children():
            self.add_module(name, child)
        self.register_buffer("layer_scalar", layer.layer_scalar)
        self.spec = spec
        self.hidden_size = geometry.hidden_size
        self.num_heads = geometry.num_heads
        self.ple_dim = geometry.ple_dim
        self.sliding_window = geometry.sliding_window if spec.attention == "sliding" else 0
        self.eps = geometry.rms_norm_eps
        self.enable_moe_block = spec.moe
        self.top_k = geometry.top_k_experts

    # --- signature ------------------------------------------------------------------------------------
    @property
    def activation_names(self) -> list[str]:
        names = ["hidden_states", *(["per_layer_input"] if self.ple_dim else []), "position_ids",
                 *(["image_blocks"] if self.spec.image_blocks else [])]
        if self.spec.owns_cache:
            return names + [f"past_{p}" for p in self.spec.cache_parts]
        return [*names, "shared_key", "shared_value"]

    @property
    def output_names(self) -> list[str]:
        names = ["hidden_states_out"]
        if self.spec.owns_cache:
            names += [f"present_{p}" for p in self.spec.cache_parts]
        if self.spec.kv_mode == "store":
            names += ["published_key", "published_value"]
        return names

    def _shapes(self) -> dict[str, tuple[int, list[Any]]]:
        s = self.spec
        cache = ["batch", s.num_kv_heads, "past_sequence", s.head_dim]
        kv = ["batch", s.num_kv_heads, "kv_sequence", s.head_dim]
        return {
            "hidden_states": (FLOAT, ["batch", "sequence", self.hidden_size]),
            "per_layer_input": (FLOAT, ["batch", "sequence", self.ple_dim]),
            "position_ids": (INT64, ["batch", "sequence"]),
            "image_blocks": (INT64, ["batch", "sequence"]),
            **{f"past_{p}": (FLOAT, cache) for p in self.spec.cache_parts},
            "shared_key": (FLOAT, kv), "shared_value": (FLOAT, kv),
            "hidden_states_out": (FLOAT, ["batch", "sequence", self.hidden_size]),
            **{f"present_{p}": (FLOAT, ["batch", s.num_kv_heads, "present_sequence", s.head_dim])
               for p in self.spec.cache_parts},
            "published_key": (FLOAT, kv), "published_value": (FLOAT, kv),
        }

    def activation_infos(self) -> list[tuple[str, int, list[Any]]]:
        shapes = self._shapes()
        return [(n, *shapes[n]) for n in self.activation_names]

    def output_infos(self) -> list[tuple[str, int, list[Any]]]:
        shapes = self._shapes()
        return [(n, *shapes[n]) for n in self.output_names]

    @property
    def dynamic_axes(self) -> list[dict[int, str]]:
        axes = {"hidden_states": {0: "batch", 1: "sequence"}, "per_layer_input": {0: "batch", 1: "sequence"},
                "position_ids": {0: "batch", 1: "sequence"}, "image_blocks": {0: "batch", 1: "sequence"}}
        return [axes.get(n, {0: "batch", 2: "past_sequence"}) for n in self.activation_names]

    def example_activations(self) -> list[torch.Tensor]:
        s, b, n = self.spec, 1, EXAMPLE_SEQUENCE
        past = EXAMPLE_PAST if s.owns_cache else EXAMPLE_PAST + n
        example = [torch.randn(b, n, self.hidden_size)]
        if self.ple_dim:
            example.append(torch.randn(b, n, self.ple_dim))
        example.append(torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + n).unsqueeze(0))
        if s.image_blocks:
            example.append(torch.tensor([[-1, 0, 0]]))
        parts = len(self.spec.cache_parts) if s.owns_cache else 2
        example += [torch.randn(b, s.num_kv_heads, past, s.head_dim) for _ in range(parts)]
        return example

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, *activations: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.activation_names, activations, strict=True))
        layer: Any = self  # transformers' submodules, attached by name
        hidden = named["hidden_states"]
        residual = hidden
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        query = attn.q_proj(h)
        s = self.spec
        geometry = (self.num_heads, s.num_kv_heads, s.head_dim, self.sliding_window, s.rope_theta, s.rope_fraction,
                    self.eps)
        if not s.owns_cache:
            out, *_ = torch.ops.gemma4.keqv_attention(
                query, attn.q_norm.weight, named["position_ids"], named["shared_key"], named["shared_value"],
                None, None, None, "reuse", *geometry)
        elif s.k_eq_v:
            out, _, present_value, keys, values = torch.ops.gemma4.keqv_attention(
                query, attn.q_norm.weight, named["position_ids"], attn.k_proj(h), None, attn.k_norm.weight,
                None, named["past_key_value"], "keqv", *geometry)
            presents = [present_value]
        else:
            out, present_key, present_value, keys, values = torch.ops.gemma4.keqv_attention(
                query, attn.q_norm.weight, named["position_ids"], attn.k_proj(h), attn.v_proj(h),
                attn.k_norm.weight, named["past_key"], named["past_value"], "kv", *geometry,
                image_blocks=named.get("image_blocks"))
            presents = [present_key, present_value]
        hidden = residual + layer.post_attention_layernorm(attn.o_proj(out))

        residual = hidden
        h = layer.mlp(layer.pre_feedforward_layernorm(hidden))
        if self.enable_moe_block:
            flat = residual.reshape(-1, residual.shape[-1])
            router, experts = layer.router, layer.experts
            routed = torch.ops.gemma4.topk_moe(flat, layer.pre_feedforward_layernorm_2(flat), router.scale,
                                               router.proj.weight, router.per_expert_scale, experts.gate_up_proj,
                                               experts.down_proj, self.top_k, self.eps)
            routed = layer.post_feedforward_layernorm_2(routed.reshape(residual.shape))
            h = layer.post_feedforward_layernorm_1(h) + routed
        hidden = residual + layer.post_feedforward_layernorm(h)

        if self.ple_dim:
            residual = hidden
            gate = layer.act_fn(layer.per_layer_input_gate(hidden)) * named["per_layer_input"]
            hidden = residual + layer.post_per_layer_input_norm(layer.per_layer_projection(gate))
        hidden = hidden * layer.layer_scalar

        outputs = [hidden, *presents] if s.owns_cache else [hidden]
        if s.kv_mode == "store":
            outputs += [keys, values]
        return tuple(outputs)

