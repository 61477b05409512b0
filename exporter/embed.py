"""The ``embed`` block: token ids → scaled token embeddings and, on E-models, the per-layer inputs.

Gemma 4 differs from earlier Gemma models here twice. The embedding scale √H is cast to the weight
dtype before multiplying (bf16 gives 39.25 for E2B). And E2B/E4B add Per-Layer Embeddings: a second
table [262144, L·256] looked up by the same ids (×√256), plus a projection of the main embedding
(×H^-½, RMS-normed per layer), combined ×2^-½ (architecture doc §3.1, §3.2). Multimodal placeholder
ids are replaced by pad before both lookups, as the reference does (§3.11).

    input_ids ─► where(placeholder, pad) ─► Gather(embed_tokens)·√H ───────────────► inputs_embeds
                                   └──► Gather(PLE)·√P ─► reshape [B,S,L,P] ──┐
                 inputs_embeds ─► MatMul(projection)·H^-½ ─► reshape ─► norm ─┴► (+)·2^-½ ─► per_layer_inputs

The block holds transformers' own embedding submodules (taken from a text model built on the meta
device, so no decoder layer is ever allocated) and calls the reference's own PLE methods.
"""

from typing import Any

import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel, Gemma4TextScaledWordEmbedding

from gemma4_onnx.exporter.hf_model import hf_config, quiet_transformers

TRACE_VOCAB = 64  # the vocabulary size is not part of the traced graph: trace with small tables
PLE_PARTS = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")
PLE_SCALES = ("per_layer_model_projection_scale", "per_layer_input_scale")


class EmbedBlock(nn.Module):
    def __init__(self, config: dict[str, Any], vocab_size: int = TRACE_VOCAB) -> None:
        super().__init__()
        text_config = {**config["text_config"], "vocab_size": vocab_size, "vocab_size_per_layer_input": vocab_size}
        with quiet_transformers(), torch.device("meta"):
            text = Gemma4TextModel(hf_config({**config, "text_config": text_config}).get_text_config())  # type: ignore[arg-type]
        self.config = text.config
        self.hidden_size_per_layer_input = text.hidden_size_per_layer_input
        self.pad_token_id = text.padding_idx
        self.embed_tokens = text.embed_tokens
        if self.hidden_size_per_layer_input:
            for name in PLE_PARTS:
                setattr(self, name, getattr(text, name))
            for name in PLE_SCALES:
                setattr(self, name, getattr(text, name))
        placeholders = [config.get(k) for k in ("image_token_id", "audio_token_id", "video_token_id")]
        self.register_buffer("placeholder_ids", torch.tensor([p for p in placeholders if p is not None]),
                             persistent=False)
        self.to_empty(device="cpu")  # weights arrive as function inputs; restore the computed buffers
        for module in self.modules():
            if isinstance(module, Gemma4TextScaledWordEmbedding):
                module.embed_scale = torch.tensor(module.scalar_embed_scale)  # type: ignore[assignment]
        self.placeholder_ids = torch.tensor([p for p in placeholders if p is not None])

    @property
    def output_names(self) -> list[str]:
        return ["inputs_embeds", "per_layer_inputs"] if self.hidden_size_per_layer_input else ["inputs_embeds"]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        is_placeholder = (input_ids.unsqueeze(-1) == self.placeholder_ids).any(-1)
        llm_ids = torch.where(is_placeholder, torch.full_like(input_ids, self.pad_token_id or 0), input_ids)
        inputs_embeds = self.embed_tokens(llm_ids)
        if not self.hidden_size_per_layer_input:
            return (inputs_embeds,)
        token_part = Gemma4TextModel.get_per_layer_inputs(self, llm_ids)  # type: ignore[arg-type]
        per_layer_inputs = Gemma4TextModel.project_per_layer_inputs(self, inputs_embeds, token_part)  # type: ignore[arg-type]
        return inputs_embeds, per_layer_inputs
