"""The ``audio_encoder`` block (E2B, E4B): log-mel frames → soft tokens in the text embedding space.

Gemma 4's audio tower is a conformer (architecture doc §3.13): two stride-2 3×3 convolutions over
(time, mel), then layers of half-step feed-forward, chunked local attention (blocks of C queries see
the C keys of their block and ``context_left − 2`` before it, relative-position logits, soft cap 50,
masked *after* the cap), a causal depthwise light convolution and a second half-step feed-forward;
then ``output_proj`` (the only biased linear) and ``embed_audio``.

    input_features [N,T,128], input_features_mask [N,T] ─► subsample ×2 (mask[:, ::2] twice)
        ─► blocked local mask [N,1,T'/C,C,ctx] ─► L × conformer layer ─► output_proj ─► embed_audio
        ─► soft_tokens [N, T/4, H_text], soft_token_mask [N, T/4]

T must be a multiple of 4 (the host pads with masked zero frames, which leaves valid outputs unchanged).
transformers builds the attention mask with its mask utilities and a gather; the same mask is built
here from aranges, which trace to a handful of ONNX ops.

The block is traced in ``stages()``: the front (subsampling, position table), one conformer layer
(traced once, called once per layer with that layer's weights) and the back (projections). Traced
whole, torch.export's symbolic-shape reasoning over the chunked frame length grows with every layer
(1 layer 20 s, 4 layers 84 s, 6 layers 336 s: the full-size tower's 12 never finished); per layer it
stays flat. Each layer rebuilds the blocked mask from the frame mask, so only the frame count is
symbolic at a stage boundary.
"""

from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4MultimodalEmbedder

from gemma4_onnx.exporter.hf_model import hf_config, quiet_transformers

FLOAT = onnx.TensorProto.FLOAT
BOOL = onnx.TensorProto.BOOL
MEL_BINS = 128
FRAME_MULTIPLE = 4  # two stride-2 halvings


class AudioEncoderBlock(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        hf: Any = hf_config(config)
        audio = hf.audio_config
        audio._attn_implementation = "eager"
        with quiet_transformers(), torch.device("meta"):
            self.audio_tower = Gemma4AudioModel(audio)
            self.embed_audio = Gemma4MultimodalEmbedder(audio, hf.text_config)
        self.to_empty(device="cpu")  # weights arrive as function inputs; restore the computed buffers
        rel: Any = self.audio_tower.rel_pos_enc
        increment = torch.log(torch.tensor(10000.0)) / max(rel.hidden_size // 2 - 1, 1)
        rel.inv_timescales = torch.exp(torch.arange(rel.hidden_size // 2) * -increment)[None, None]
        layers: Any = self.audio_tower.layers
        for layer in layers:
            layer.self_attn.softcap = torch.tensor(float(audio.attention_logit_cap))
        self.chunk = int(audio.attention_chunk_size)
        self.past = int(audio.attention_context_left) - 1
        self.future = int(audio.attention_context_right)
        self.text_hidden = int(hf.text_config.hidden_size)

    activation_names = ("input_features", "input_features_mask")
    output_names = ("soft_tokens", "soft_token_mask")
    dynamic_axes = ({0: "clips", 1: "frames"}, {0: "clips", 1: "frames"})

    def input_infos(self) -> list[tuple[str, int, list[Any]]]:
        return [("input_features", FLOAT, ["clips", "frames", MEL_BINS]),
                ("input_features_mask", BOOL, ["clips", "frames"])]

    def output_infos(self) -> list[tuple[str, int, list[Any]]]:
        return [("soft_tokens", FLOAT, ["clips", "audio_slots", self.text_hidden]),
                ("soft_token_mask", BOOL, ["clips", "audio_slots"])]

    def example_activations(self, frames: int = 64) -> list[torch.Tensor]:
        mask = torch.ones(2, frames, dtype=torch.bool)
        mask[1, frames // 2 + 3:] = False
        return [torch.randn(2, frames, MEL_BINS), mask]

    def stages(self) -> list["Stage"]:
        """The front, one stage per conformer layer, the back: graph values flow between them by name.
        The block is only ever run through these (it has no ``forward`` of its own)."""
        tower: Any = self.audio_tower
        frames = {0: "clips", 1: "audio_frames"}
        front = Stage(_Front(self), "audio_encoder_front", "", list(self.activation_names),
                      ["audio_hidden.0", "soft_token_mask", "audio_position_embeddings"],
                      list(self.dynamic_axes))
        layers = [Stage(_Layer(self, layer), "audio_encoder_layer", f"audio_tower.layers.{i}.",
                        [f"audio_hidden.{i}", "soft_token_mask", "audio_position_embeddings"],
                        [f"audio_hidden.{i + 1}"], [frames, frames, {}], shared_prefix="layer.")
                  for i, layer in enumerate(tower.layers)]
        back = Stage(_Back(self), "audio_encoder_back", "", [f"audio_hidden.{len(layers)}"], ["soft_tokens"], [frames])
        return [front, *layers, back]

    def blocked_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """[N, 1, blocks, C, ctx], nonzero = masked: transformers' 4-D local mask cut into its blocked layout.
        Query q = b·C + i sees key k = b·C − past + j iff k is a valid frame and 0 ≤ q − k < past
        (or 0 < k − q < future)."""
        length = valid.shape[1]
        blocks = (length + self.chunk - 1) // self.chunk
        context = self.chunk + self.past + self.future
        starts = torch.arange(blocks) * self.chunk
        query = starts[:, None] + torch.arange(self.chunk)[None, :]  # [blocks, C]
        key = starts[:, None] - self.past + torch.arange(context)[None, :]  # [blocks, ctx]
        distance = query[:, :, None] - key[:, None, :]
        window = ((distance >= 0) & (distance < self.past)) | ((distance < 0) & (-distance < self.future))
        in_range = (key >= 0) & (key < length)
        keep = window & in_range[:, None, :] & (query < length)[:, :, None]
        key_valid = valid[:, key.clamp(0, length - 1)]  # [N, blocks, ctx]
        keep = keep[None] & key_valid[:, :, None, :]
        return torch.logical_not(keep).float().unsqueeze(1)


@dataclass(frozen=True)
class Stage:
    """One traced piece of a block. Its weights are named like the block's: ``prefix`` + the name after
    ``shared_prefix`` (layer stages share one trace whose weights are named ``layer.*``)."""

    module: nn.Module
    function: str
    prefix: str
    inputs: list[str]
    outputs: list[str]
    dynamic: list[dict[int, str]]
    shared_prefix: str = ""

    def block_name(self, weight: str) -> str:
        return self.prefix + weight[len(self.shared_prefix):]


def _holder(**children: nn.Module) -> nn.Module:
    """A module holding ``children`` under their names, so a stage's weights keep the block's names."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


class _Front(nn.Module):
    def __init__(self, encoder: AudioEncoderBlock) -> None:
        super().__init__()
        tower: Any = encoder.audio_tower
        self.audio_tower = _holder(subsample_conv_projection=tower.subsample_conv_projection,
                                   rel_pos_enc=tower.rel_pos_enc)

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower: Any = self.audio_tower
        hidden, mask = tower.subsample_conv_projection(input_features, input_features_mask)
        return hidden, mask, tower.rel_pos_enc(hidden)


class _Layer(nn.Module):
    def __init__(self, encoder: AudioEncoderBlock, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.encoder = [encoder]  # a list: not a submodule, its weights are not this stage's

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        blocked = self.encoder[0].blocked_mask(mask)
        return self.layer(hidden, attention_mask=blocked, position_embeddings=position_embeddings)


class _Back(nn.Module):
    def __init__(self, encoder: AudioEncoderBlock) -> None:
        super().__init__()
        tower: Any = encoder.audio_tower
        self.audio_tower = _holder(output_proj=tower.output_proj)
        self.embed_audio = encoder.embed_audio

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tower: Any = self.audio_tower
        return self.embed_audio(tower.output_proj(hidden))
