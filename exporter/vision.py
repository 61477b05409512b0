"""The ``vision_encoder`` block: patches of one or more images → soft tokens in the text embedding space.

Gemma 4's vision tower differs from SigLIP-style towers: pixels are mapped to [-1, 1] in the model,
positions are a learned 2-D table (x row + y row) plus axial 2-D RoPE inside attention, E-models clamp
every linear's input and output (ClippableLinear), 26B/31B standardise the pooled features, and the
soft tokens are 3×3 average pools of the patch grid scaled by √Hv (architecture doc §3.12).

    pixel_values [N,P,3p²] ─► patch_embedder(+ x/y position rows) ─► L × encoder layer (bidirectional,
    pixel_position_ids [N,P,2] ─┘                                      pad patches masked as keys)
        ─► zero pads ─► 3×3 pool (one-hot matmul, fp32) ·√Hv ─► [standardize] ─► embed_vision
        ─► soft_tokens [N, P/9, H_text], soft_token_mask [N, P/9]

One graph serves every budget: P (patches) is a dynamic dimension, and the pooled length P/9 follows
from it. transformers drops the invalid pooled slots with a boolean index (a data-dependent shape);
here the graph returns the fixed-length tensor and its validity mask, and the host compacts. Every
step after pooling is row-wise, so compacting before or after the projection gives the same rows.
"""

from typing import Any

import onnx
import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel

from gemma4_onnx.exporter.hf_model import hf_config, quiet_transformers

FLOAT = onnx.TensorProto.FLOAT
INT64 = onnx.TensorProto.INT64
BOOL = onnx.TensorProto.BOOL
WEIGHT_PREFIX = "model."  # the block's parameter names below this prefix are the checkpoint's names
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)


class VisionEncoderBlock(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hf: Any = hf_config(config)
        vision = hf.vision_config
        vision._attn_implementation = "eager"
        with quiet_transformers(), torch.device("meta"):
            self.vision_tower = Gemma4VisionModel(vision)
            self.embed_vision = Gemma4MultimodalEmbedder(vision, hf.text_config)
        self.to_empty(device="cpu")  # weights arrive as function inputs; restore the computed buffers
        rotary: Any = self.vision_tower.encoder.rotary_emb
        inv_freq, _ = rotary.compute_axial_rope_parameters(vision)
        rotary.inv_freq = inv_freq
        rotary.original_inv_freq = inv_freq.clone()
        self.pooling = int(vision.pooling_kernel_size)
        self.standardize = bool(vision.standardize)
        self.root_hidden = float(vision.hidden_size) ** 0.5
        self.patch_values = 3 * int(vision.patch_size) ** 2
        self.text_hidden = int(hf.text_config.hidden_size)

    activation_names = ("pixel_values", "pixel_position_ids")
    output_names = ("soft_tokens", "soft_token_mask")
    dynamic_axes = ({0: "images", 1: "patches"}, {0: "images", 1: "patches"})

    def input_infos(self) -> list[tuple[str, int, list[Any]]]:
        return [("pixel_values", FLOAT, ["images", "patches", self.patch_values]),
                ("pixel_position_ids", INT64, ["images", "patches", 2])]

    def output_infos(self) -> list[tuple[str, int, list[Any]]]:
        return [("soft_tokens", FLOAT, ["images", "soft_slots", self.text_hidden]),
                ("soft_token_mask", BOOL, ["images", "soft_slots"])]

    def example_activations(self, patches: int = 36) -> list[torch.Tensor]:
        """Two images: a full 6×6 grid and a 3×6 grid padded to 36 patches (pads exercise the mask)."""
        grid = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), dim=-1).reshape(36, 2)
        padded = torch.cat([grid[:18], torch.full((patches - 18, 2), -1)])
        positions = torch.stack([grid[:patches], padded])
        return [torch.rand(2, patches, self.patch_values), positions]

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower: Any = self.vision_tower
        padding = (pixel_position_ids == -1).all(dim=-1)
        hidden = tower.patch_embedder(pixel_values, pixel_position_ids, padding)
        # transformers' bidirectional mask, as a [N, 1, 1, P] additive row: pad patches are never keys.
        mask = torch.where(padding, torch.finfo(hidden.dtype).min, 0.0).to(hidden.dtype)[:, None, None, :]
        position_embeddings = tower.encoder.rotary_emb(hidden, pixel_position_ids)
        for layer in tower.encoder.layers:
            hidden = layer(hidden, position_embeddings=position_embeddings, attention_mask=mask,
                           position_ids=pixel_position_ids)
        pooled, valid = self._pool(hidden.masked_fill(padding.unsqueeze(-1), 0.0), pixel_position_ids)
        pooled = pooled * self.root_hidden
        if self.standardize:
            pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
        return self.embed_vision(pooled), valid

    def _pool(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' ``_avg_pool_by_positions`` with k fixed by the config instead of derived from P."""
        k = self.pooling
        length = hidden.shape[1] // (k * k)
        clamped = positions.clamp(min=0)
        max_x = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
        cell = torch.div(clamped, k, rounding_mode="floor")
        slot = cell[..., 0] + torch.div(max_x, k, rounding_mode="floor") * cell[..., 1]
        weights = (slot.unsqueeze(-1) == torch.arange(length)).float() / (k * k)
        pooled = weights.transpose(1, 2) @ hidden.float()
        valid = torch.logical_not((weights == 0).all(dim=1))
        return pooled, valid
