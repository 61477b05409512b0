"""The output head: final RMSNorm, the LM head tied to the token embedding (not scaled by √H), and
Gemma 4's final logit soft cap, c·tanh(x/c) with c = 30 (architecture doc §3.10)."""

from typing import Any

import torch
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from gemma4_onnx.exporter.embed import TRACE_VOCAB


class HeadBlock(nn.Module):
    def __init__(self, config: dict[str, Any], vocab_size: int = TRACE_VOCAB) -> None:
        super().__init__()
        text = config["text_config"]
        self.norm = Gemma4RMSNorm(text["hidden_size"], eps=text.get("rms_norm_eps", 1e-6))
        self.embed_tokens = nn.Embedding(vocab_size, text["hidden_size"])  # the tied LM head's weight
        self.final_logit_softcapping = text.get("final_logit_softcapping")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(self.norm(hidden_states), self.embed_tokens.weight)
        if self.final_logit_softcapping is not None:  # the reference's exact sequence of ops
            logits = logits / self.final_logit_softcapping
            logits = torch.tanh(logits)
            logits = logits * self.final_logit_softcapping
        return logits
