"""Parameter counts of a variant, from its config alone (meta device, nothing allocated).

Gemma 4's headline numbers use three different definitions: E-models quote "effective" parameters
(everything but the token and per-layer embedding tables), 31B and 26B-A4B quote the language model
alone, and 26B-A4B also quotes parameters active per token (8 of 128 experts). All are derived here
from one walk over the meta model's parameters (architecture doc §2).
"""

from dataclasses import asdict, dataclass
from typing import Any

from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.hf_model import STATE_PREFIX, meta_model


@dataclass(frozen=True)
class ParamCounts:
    total: int
    language_model: int
    embedding: int
    ple: int
    ple_projection: int
    vision: int
    audio: int
    multimodal_embedders: int
    routed_experts: int
    # E-models: total − (token embedding + the PLE system: table, projection and its norm). The PLE
    # projection counts with the PLE here: the cards' "2.3B effective" for E2B is then met to 1.7%
    # (2.339B), while counting it as effective gives 2.353B, 2.3% off.
    effective: int | None
    active: int | None  # MoE: language model with only top-k experts per layer

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


def count_parameters(config: dict[str, Any]) -> ParamCounts:
    model = meta_model(config)
    buckets = dict.fromkeys(("embedding", "ple", "ple_projection", "vision", "audio", "mm", "experts"), 0)
    total = 0
    for name, param in model.named_parameters():  # tied lm_head is listed once
        n = param.numel()
        total += n
        if name == f"{STATE_PREFIX}embed_tokens.weight":
            buckets["embedding"] += n
        elif name == f"{STATE_PREFIX}embed_tokens_per_layer.weight":
            buckets["ple"] += n
        elif name.startswith((f"{STATE_PREFIX}per_layer_model_projection", f"{STATE_PREFIX}per_layer_projection_norm")):
            buckets["ple_projection"] += n
        elif name.startswith("model.vision_tower."):
            buckets["vision"] += n
        elif name.startswith("model.audio_tower."):
            buckets["audio"] += n
        elif name.startswith(("model.embed_vision.", "model.embed_audio.")):
            buckets["mm"] += n
        elif ".experts." in name:
            buckets["experts"] += n
    language_model = total - buckets["vision"] - buckets["audio"] - buckets["mm"]
    geometry = text_geometry(config)
    active = None
    if geometry.num_experts:
        per_expert = buckets["experts"] // (geometry.num_layers * geometry.num_experts)
        active = language_model - buckets["experts"] + geometry.num_layers * geometry.top_k_experts * per_expert
    return ParamCounts(
        total=total,
        language_model=language_model,
        embedding=buckets["embedding"],
        ple=buckets["ple"],
        ple_projection=buckets["ple_projection"],
        vision=buckets["vision"],
        audio=buckets["audio"],
        multimodal_embedders=buckets["mm"],
        routed_experts=buckets["experts"],
        effective=(total - buckets["embedding"] - buckets["ple"] - buckets["ple_projection"]
                   if geometry.ple_dim else None),
        active=active,
    )
