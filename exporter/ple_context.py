"""The ``ple_context`` block (E2B, E4B): per-layer inputs redone after soft tokens are merged.

The per-layer input is (context(e) + token(ids))·2^-½, where context(e) = RMSNorm(reshape(e·W·H^-½)) is
computed from the *merged* embeddings (§3.2, §3.11), while ``embed.onnx`` computes it from the text
embeddings, whose placeholder rows hold the pad embedding. This block corrects those rows:

    per_layer_inputs + (context(inputs_embeds) − context(text_embeds))·2^-½

which equals the reference's (context(merged) + token)·2^-½ up to rounding; the token part and
its pad rows never leave embed.onnx.
"""

from typing import Any

import onnx
import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

from gemma4_onnx.exporter.embed import EmbedBlock

FLOAT = onnx.TensorProto.FLOAT


class PleContextBlock(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        embed = EmbedBlock(config)
        self.config = embed.config
        self.hidden_size_per_layer_input = embed.hidden_size_per_layer_input
        self.per_layer_model_projection = embed.per_layer_model_projection
        self.per_layer_projection_norm = embed.per_layer_projection_norm
        self.per_layer_model_projection_scale = float(embed.per_layer_model_projection_scale)  # type: ignore[arg-type]
        self.per_layer_input_scale = float(embed.per_layer_input_scale)  # type: ignore[arg-type]
        self.hidden_size = int(embed.config.hidden_size)
        self.num_layers = int(embed.config.num_hidden_layers)

    activation_names = ("inputs_embeds", "text_embeds", "per_layer_inputs")
    output_names = ("merged_per_layer_inputs",)
    dynamic_axes = ({0: "batch", 1: "sequence"},) * 3

    def input_infos(self) -> list[tuple[str, int, list[Any]]]:
        embeds = ["batch", "sequence", self.hidden_size]
        return [("inputs_embeds", FLOAT, embeds), ("text_embeds", FLOAT, embeds),
                ("per_layer_inputs", FLOAT, ["batch", "sequence", self.num_layers, self.hidden_size_per_layer_input])]

    def output_infos(self) -> list[tuple[str, int, list[Any]]]:
        return [("merged_per_layer_inputs", FLOAT,
                 ["batch", "sequence", self.num_layers, self.hidden_size_per_layer_input])]

    def example_activations(self) -> list[torch.Tensor]:
        return [torch.randn(1, 3, self.hidden_size), torch.randn(1, 3, self.hidden_size),
                torch.randn(1, 3, self.num_layers, self.hidden_size_per_layer_input)]

    def forward(self, inputs_embeds: torch.Tensor, text_embeds: torch.Tensor,
                per_layer_inputs: torch.Tensor) -> torch.Tensor:
        merged = Gemma4TextModel.project_per_layer_inputs(self, inputs_embeds, None)  # type: ignore[arg-type]
        text = Gemma4TextModel.project_per_layer_inputs(self, text_embeds, None)  # type: ignore[arg-type]
        return per_layer_inputs + (merged - text) * self.per_layer_input_scale
