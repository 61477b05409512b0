"""The variant registry: every Gemma 4 variant as the Hugging Face ``config.json`` it ships with.

Gemma 4 comes in four sizes that differ in more than width: E2B/E4B have per-layer embeddings (PLE),
KV sharing and an audio tower; 26B-A4B routes 8 of 128 experts; 26B-A4B and 31B share one projection
for keys and values on full-attention layers (K=V). Each number below comes from
``shared/docs/gemma4-architecture.md`` §1 and is written exactly once: shared pieces (vision towers,
audio tower, RoPE, special tokens) are composed, never retyped.

The ``tiny-*`` variants are test-sized members of each family (§5.1) that keep every mechanism of
their family switched on, so a test on them exercises every path of the real model.
"""

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any

from gemma4_onnx.errors import UnknownVariantError

SLIDING = "sliding_attention"
FULL = "full_attention"

ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}

# Special-token ids of the released checkpoints (§1.4).
TOKEN_IDS = {
    "boi_token_id": 255_999,
    "eoi_token_id": 258_882,
    "image_token_id": 258_880,
    "audio_token_id": 258_881,
    "boa_token_id": 256_000,
    "eoa_token_index": 258_883,
    "video_token_id": 258_884,
}

# The tiny variants keep a 320-id byte-level vocabulary, so the special tokens move into it (§5).
TINY_TOKEN_IDS = {
    "boi_token_id": 250,
    "eoi_token_id": 251,
    "image_token_id": 252,
    "audio_token_id": 253,
    "boa_token_id": 254,
    "eoa_token_index": 255,
    "video_token_id": 256,
}


def layer_pattern(period: int, repeats: int) -> list[str]:
    """``(S × (period-1), F) × repeats``: the last layer is always full attention."""
    return ([SLIDING] * (period - 1) + [FULL]) * repeats


def _text(**fields: Any) -> dict[str, Any]:
    """A ``text_config`` with the fields every Gemma 4 variant shares, then the variant's own."""
    base: dict[str, Any] = {
        "model_type": "gemma4_text",
        "vocab_size": 262_144,
        "vocab_size_per_layer_input": 262_144,
        "head_dim": 256,
        "global_head_dim": 512,
        "num_global_key_value_heads": None,
        "attention_k_eq_v": False,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
        "use_bidirectional_attention": None,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "rope_parameters": copy.deepcopy(ROPE),
    }
    base.update(fields)
    return base


def _vision(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "gemma4_vision",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 10_240,
        # The shipped configs say "default"; transformers treats the tower as axial RoPE regardless (§6.16).
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    }
    base.update(fields)
    return base


def _audio(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": "gemma4_audio",
        "hidden_act": "silu",
        "conv_kernel_size": 5,
        "residual_weight": 0.5,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "attention_invalid_logits_value": -1.0e9,
        "use_clipped_linears": True,
        "gradient_clipping": 1e10,
        "rms_norm_eps": 1e-6,
    }
    base.update(fields)
    return base


VISION_E = _vision(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
    num_key_value_heads=12, head_dim=64, use_clipped_linears=True, standardize=False,
)
VISION_LARGE = _vision(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, head_dim=72, use_clipped_linears=False, standardize=True,
)
AUDIO_E = _audio(
    hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, subsampling_conv_channels=[128, 32],
    attention_chunk_size=12, attention_context_left=13, output_proj_dims=1536,
)

# Test-sized towers (§5.1). Audio sub-sampling channels[0] must stay 128, the mel-bin count (§6.14).
TINY_VISION_E = _vision(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
    use_clipped_linears=True, standardize=False,
)
TINY_VISION_LARGE = {**TINY_VISION_E, "use_clipped_linears": False, "standardize": True}
TINY_AUDIO_E = _audio(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[128, 8],
    attention_chunk_size=4, attention_context_left=5, output_proj_dims=48,
)


def _model(text: dict[str, Any], vision: dict[str, Any] | None, audio: dict[str, Any] | None,
            token_ids: dict[str, int]) -> dict[str, Any]:
    """A complete top-level ``config.json`` in the released checkpoints' layout."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "dtype": "bfloat16",
        "tie_word_embeddings": True,
        "text_config": copy.deepcopy(text),
        "vision_config": copy.deepcopy(vision),
        "audio_config": copy.deepcopy(audio),
        **token_ids,
    }


@dataclass(frozen=True)
class Published:
    """Parameter figures from the model cards (§2), in parameters. ``None``: not published."""

    total: float | None = None
    effective: float | None = None
    language_model: float | None = None
    active: float | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # the full-size variant this one mirrors
    config: dict[str, Any]
    published: Published = field(default_factory=Published)

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith("tiny-")


_TINY_TEXT = dict(vocab_size=320, vocab_size_per_layer_input=320, hidden_size=64, num_attention_heads=4,
                  head_dim=16, global_head_dim=32, sliding_window=8, max_position_embeddings=4096)

REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("e2b", "e2b", _model(_text(
            num_hidden_layers=35, hidden_size=1536, intermediate_size=6144, use_double_wide_mlp=True,
            num_attention_heads=8, num_key_value_heads=1, sliding_window=512,
            layer_types=layer_pattern(5, 7), hidden_size_per_layer_input=256, num_kv_shared_layers=20,
            max_position_embeddings=131_072,
        ), VISION_E, AUDIO_E, TOKEN_IDS), Published(total=5.1e9, effective=2.3e9)),
        Variant("e4b", "e4b", _model(_text(
            num_hidden_layers=42, hidden_size=2560, intermediate_size=10_240, num_attention_heads=8,
            num_key_value_heads=2, sliding_window=512, layer_types=layer_pattern(6, 7),
            hidden_size_per_layer_input=256, num_kv_shared_layers=18, max_position_embeddings=131_072,
        ), VISION_E, AUDIO_E, TOKEN_IDS), Published(total=8.0e9, effective=4.5e9)),
        Variant("31b", "31b", _model(_text(
            num_hidden_layers=60, hidden_size=5376, intermediate_size=21_504, num_attention_heads=32,
            num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
            sliding_window=1024, layer_types=layer_pattern(6, 10), max_position_embeddings=262_144,
            use_bidirectional_attention="vision",
        ), VISION_LARGE, None, TOKEN_IDS), Published(language_model=30.7e9)),
        Variant("26b-a4b", "26b-a4b", _model(_text(
            num_hidden_layers=30, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
            num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True,
            sliding_window=1024, layer_types=layer_pattern(6, 5), enable_moe_block=True,
            num_experts=128, top_k_experts=8, moe_intermediate_size=704,
            max_position_embeddings=262_144, use_bidirectional_attention="vision",
        ), VISION_LARGE, None, TOKEN_IDS), Published(language_model=25.2e9, active=3.8e9)),
        Variant("tiny-e2b", "e2b", _model(_text(
            **_TINY_TEXT, num_hidden_layers=10, intermediate_size=128, use_double_wide_mlp=True,
            num_key_value_heads=1, layer_types=layer_pattern(5, 2), hidden_size_per_layer_input=8,
            num_kv_shared_layers=4,
        ), TINY_VISION_E, TINY_AUDIO_E, TINY_TOKEN_IDS)),
        Variant("tiny-e4b", "e4b", _model(_text(
            **_TINY_TEXT, num_hidden_layers=12, intermediate_size=128, num_key_value_heads=2,
            layer_types=layer_pattern(6, 2), hidden_size_per_layer_input=8, num_kv_shared_layers=4,
        ), TINY_VISION_E, TINY_AUDIO_E, TINY_TOKEN_IDS)),
        Variant("tiny-31b", "31b", _model(_text(
            **_TINY_TEXT, num_hidden_layers=6, intermediate_size=128, num_key_value_heads=2,
            num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=layer_pattern(6, 1),
            use_bidirectional_attention="vision",
        ), TINY_VISION_LARGE, None, TINY_TOKEN_IDS)),
        Variant("tiny-26b-a4b", "26b-a4b", _model(_text(
            **_TINY_TEXT, num_hidden_layers=6, intermediate_size=96, num_key_value_heads=2,
            num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=layer_pattern(3, 2),
            enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
            use_bidirectional_attention="vision",
        ), TINY_VISION_LARGE, None, TINY_TOKEN_IDS)),
    ]
}


def tiny_config(towers: bool = False, **text_fields: Any) -> dict[str, Any]:
    """A test-sized config.json of any geometry: tiny-e2b's text fields (its PLE, KV sharing and double-wide
    MLP off) with ``text_fields`` over them; text only unless ``towers`` (tiny-e2b's vision and audio)."""
    text = _text(**_TINY_TEXT, num_hidden_layers=2, intermediate_size=128, num_key_value_heads=1,
                 layer_types=layer_pattern(2, 1))
    text.update(text_fields)
    return _model(text, TINY_VISION_E if towers else None, TINY_AUDIO_E if towers else None, TINY_TOKEN_IDS)


FULL_SIZE = [name for name, v in REGISTRY.items() if not v.is_tiny]
TINY = [name for name, v in REGISTRY.items() if v.is_tiny]


def get_variant(name: str) -> Variant:
    """The registry entry for ``name``; an unknown name suggests the nearest ones."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        near = difflib.get_close_matches(name.lower(), REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(REGISTRY)}"
        raise UnknownVariantError(f"unknown variant '{name}'{hint}") from None


def variant_config(name: str) -> dict[str, Any]:
    """A fresh copy of the variant's ``config.json`` contents."""
    return copy.deepcopy(get_variant(name).config)
