"""One transformers decoder layer, loaded alone with its own weights, and the feeds of its exported block.

Per-block parity at any size holds one layer in memory at a time: ``Gemma4TextDecoderLayer`` is built on
the meta device, given the checkpoint's (or the variant's random) weights of that layer only, and called
the way ``Gemma4TextModel.forward`` calls it (rotary embeddings and masks from transformers' own
helpers; a KV-shared layer reads its producer's K/V from the same ``KVSharingDict``). The exported
block gets the same activations, so both sides see identical inputs.
"""

from typing import Any

import numpy as np
import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4TextDecoderLayer,
    Gemma4TextRotaryEmbedding,
    KVSharingDict,
)

from gemma4_onnx.exporter.geometry import LayerSpec
from gemma4_onnx.exporter.hf_model import STATE_PREFIX, hf_config, quiet_transformers
from gemma4_onnx.exporter.weights import WeightSource

ACTIVATION_SEED = 1234


class LayerReference:
    def __init__(self, weights: WeightSource, sequence: int) -> None:
        self.weights = weights
        self.text = hf_config(weights.config).get_text_config()
        self.text._experts_implementation = "eager"  # what a full model dispatches to; unset, a standalone layer warns
        self.rotary = Gemma4TextRotaryEmbedding(self.text)  # type: ignore[arg-type]
        self.sequence = sequence

    def run(self, spec: LayerSpec) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(feeds of the exported block, transformers' output) for layer ``spec`` on seeded activations."""
        geometry = self.weights.geometry
        layer_type = self.text.layer_types[spec.index]
        generator = torch.Generator().manual_seed(ACTIVATION_SEED + spec.index)
        hidden = torch.randn(1, self.sequence, geometry.hidden_size, generator=generator)
        position_ids = torch.arange(self.sequence).unsqueeze(0)
        feeds: dict[str, torch.Tensor] = {"hidden_states": hidden, "position_ids": position_ids}
        per_layer_input = None
        if geometry.ple_dim:
            per_layer_input = torch.randn(1, self.sequence, geometry.ple_dim, generator=generator)
            feeds["per_layer_input"] = per_layer_input
        shared = KVSharingDict()
        if spec.owns_cache:
            for part in spec.cache_parts:
                feeds[f"past_{part}"] = torch.zeros(1, spec.num_kv_heads, 0, spec.head_dim)
        else:
            shape = (1, spec.num_kv_heads, self.sequence, spec.head_dim)
            kv = (torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator))
            shared = KVSharingDict({layer_type: kv})
            feeds["shared_key"], feeds["shared_value"] = kv
        layer = self._layer(spec)
        mask_kwargs: dict[str, Any] = {"config": self.text, "inputs_embeds": hidden, "attention_mask": None,
                                       "past_key_values": None, "position_ids": position_ids}
        mask = (create_sliding_window_causal_mask if spec.attention == "sliding" else create_causal_mask)(**mask_kwargs)
        with torch.no_grad():
            output = layer(hidden, per_layer_input, shared_kv_states=shared,
                           position_embeddings=self.rotary(hidden, position_ids, layer_type),
                           attention_mask=mask, position_ids=position_ids, past_key_values=None)
        return {k: v.numpy() for k, v in feeds.items()}, output.numpy()

    def _layer(self, spec: LayerSpec) -> Gemma4TextDecoderLayer:
        with quiet_transformers(), torch.device("meta"):
            layer = Gemma4TextDecoderLayer(self.text, spec.index)  # type: ignore[arg-type]
        prefix = f"{STATE_PREFIX}layers.{spec.index}."
        state = {n: self.weights.tensor(prefix + n, torch.float32) for n in layer.state_dict()}
        layer.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"layer {spec.index}: {', '.join(left)} not loaded")
        return layer.eval()
