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

from gemma4_onnx.exporter import layer_ops
from gemma4_onnx.exporter.geometry import LayerSpec, text_geometry
from gemma4_onnx.exporter.hf_model import hf_config, quiet_transformers

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
EXAMPLE_PAST = 5
EXAMPLE_SEQUENCE = 3


def layer_kind(spec: LayerSpec) -> tuple[Any, ...]:
    """Layers of one kind share a traced function: everything but the index and the weights."""
    return (spec.attention, spec.head_dim, spec.num_kv_heads, spec.k_eq_v, spec.kv_mode, spec.mlp_width,
            spec.moe, spec.rope_theta, spec.rope_fraction)


class DecoderLayerBlock(nn.Module):
    def __init__(self, config: dict[str, Any], spec: LayerSpec) -> None:
        super().__init__()
        text = hf_config(config).get_text_config()
        geometry = text_geometry(config)
        with quiet_transformers(), torch.device("meta"):
            layer = Gemma4TextDecoderLayer(text, spec.index)
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
    def cache_parts(self) -> list[str]:
        return ["key_value"] if self.spec.k_eq_v else ["key", "value"]

    @property
    def activation_names(self) -> list[str]:
        names = ["hidden_states", *(["per_layer_input"] if self.ple_dim else []), "position_ids"]
        if self.spec.owns_cache:
            return names + [f"past_{p}" for p in self.cache_parts]
        return [*names, "shared_key", "shared_value"]

    @property
    def output_names(self) -> list[str]:
        names = ["hidden_states_out"]
        if self.spec.owns_cache:
            names += [f"present_{p}" for p in self.cache_parts]
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
            **{f"past_{p}": (FLOAT, cache) for p in self.cache_parts},
            "shared_key": (FLOAT, kv), "shared_value": (FLOAT, kv),
            "hidden_states_out": (FLOAT, ["batch", "sequence", self.hidden_size]),
            **{f"present_{p}": (FLOAT, ["batch", s.num_kv_heads, "present_sequence", s.head_dim])
               for p in self.cache_parts},
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
                "position_ids": {0: "batch", 1: "sequence"}}
        return [axes.get(n, {0: "batch", 2: "past_sequence"}) for n in self.activation_names]

    def example_activations(self) -> list[torch.Tensor]:
        s, b, n = self.spec, 1, EXAMPLE_SEQUENCE
        past = EXAMPLE_PAST if s.owns_cache else EXAMPLE_PAST + n
        example = [torch.randn(b, n, self.hidden_size)]
        if self.ple_dim:
            example.append(torch.randn(b, n, self.ple_dim))
        example.append(torch.arange(EXAMPLE_PAST, EXAMPLE_PAST + n).unsqueeze(0))
        parts = len(self.cache_parts) if s.owns_cache else 2
        example += [torch.randn(b, s.num_kv_heads, past, s.head_dim) for _ in range(parts)]
        return example

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, *activations: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.activation_names, activations, strict=True))
        hidden = named["hidden_states"]
        residual = hidden
        attn = self.self_attn
        h = self.input_layernorm(hidden)
        query = attn.q_proj(h)
        if self.spec.owns_cache:
            key = attn.k_proj(h)
            value = None if self.spec.k_eq_v else attn.v_proj(h)
            past = [named[f"past_{p}"] for p in self.cache_parts]
            out, presents, published = layer_ops.attend(
                query, key, value, attn.q_norm.weight, attn.k_norm.weight, named["position_ids"], past,
                num_heads=self.num_heads, spec=self.spec, sliding_window=self.sliding_window, eps=self.eps)
        else:
            out, presents, published = layer_ops.attend_shared(
                query, attn.q_norm.weight, named["position_ids"], named["shared_key"], named["shared_value"],
                num_heads=self.num_heads, spec=self.spec, sliding_window=self.sliding_window, eps=self.eps)
        hidden = residual + self.post_attention_layernorm(attn.o_proj(out))

        residual = hidden
        h = self.mlp(self.pre_feedforward_layernorm(hidden))
        if self.enable_moe_block:
            flat = residual.reshape(-1, residual.shape[-1])
            routed = layer_ops.route(flat, self.pre_feedforward_layernorm_2(flat), self.router, self.experts,
                                    top_k=self.top_k, eps=self.eps)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(routed.reshape(residual.shape))
        hidden = residual + self.post_feedforward_layernorm(h)

        if self.ple_dim:
            residual = hidden
            gate = self.act_fn(self.per_layer_input_gate(hidden)) * named["per_layer_input"]
            hidden = residual + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        hidden = hidden * self.layer_scalar

        outputs = [hidden, *presents] if self.spec.owns_cache else [hidden]
        if self.spec.kv_mode == "store":
            outputs += published
        return tuple(outputs)

