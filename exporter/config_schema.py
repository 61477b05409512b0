"""``config.json`` checked against an explicit schema, types and ranges, before any of it is used.

transformers' own checks (``@strict`` dataclasses) catch some type errors as exceptions of its own, and
accept values the exporter cannot use (``sliding_window: 0``, an odd ``head_dim`` that fails at the first
RoPE, ``vocab_size`` 10¹²). Every field the exporter, the reference or transformers' model builder reads is
listed here with its type and a range: upper bounds sit 4-16× above the largest released model, so no size
in a config can make anything allocate absurd memory, and a config that passes builds on the meta device.
Fields transformers' config classes name as methods or properties (``to_dict: 5``) are refused; other
unknown fields are allowed, as the released configs carry a few the model never reads.
"""

import dataclasses
import json
from typing import Any

from gemma4_onnx.errors import ConfigError
from gemma4_onnx.exporter.variants import FULL, SLIDING
from gemma4_onnx.schema import (
    Check,
    SchemaError,
    boolean,
    either,
    field,
    integer,
    list_of,
    mapping_of,
    nullable,
    number,
    record,
    string,
)

MAX_LAYERS = 512  # 31B: 60
MAX_HEADS = 1024  # 31B: 32
MAX_VOCAB = 1 << 22  # released: 262144
MAX_POSITIONS = 1 << 20  # released: 262144 (the ort target's RoPE tables grow with it)
MAX_WINDOW = 1 << 17  # released: 1024 (parity --blocks runs a window plus a few tokens)
MEL_BINS = 128  # the audio tower's first sub-sampling convolution reads 128 mel bins (audio.MEL_BINS)
SUPPORTED_ROPE = ("default", "proportional")  # what exporter.geometry and graphs.prope implement


def shown(text: str, limit: int = 120) -> str:
    """A name read from a file, fit for a one-line message: control characters escaped, length cut."""
    escaped = json.dumps(text, ensure_ascii=False)[1:-1]
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"


def printable(text: str) -> str:
    """``text`` with every character that could break a line (or the terminal) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown_value(value: Any, limit: int = 60) -> str:
    """Any value read from a file, as its one-line ``repr``, cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def even(low: int, high: int) -> Check:
    """A head dimension: RoPE rotates pairs, so transformers fails at the first forward on an odd one."""
    bounded = integer(low, high)

    def check(value: Any, where: str) -> None:
        bounded(value, where)
        if value % 2:
            raise SchemaError(where, f"must be even (RoPE rotates pairs of dimensions), got {value}")
    return check


def exactly(expected: bool, reason: str) -> Check:
    """A switch the exporter supports in one position only (the released models')."""
    def check(value: Any, where: str) -> None:
        boolean(value, where)
        if value is not expected:
            raise SchemaError(where, f"must be {str(expected).lower()} ({reason})")
    return check


POSITIVE = number(0, 1e12, low_open=True)
ROPE_THETA = number(1, 1e12)  # below 1 the frequencies grow with the dimension; 1e-300 gives NaN logits
SOFTCAP = number(1e-2, 1e6)  # tanh(x / cap) · cap: a cap of 1e-300 gives NaN logits
EPS = number(0, 1, low_open=True)
TOKEN = nullable(integer(0, MAX_VOCAB - 1))  # and below vocab_size, checked apart
LABELS = mapping_of(string(max_length=256), max_length=1024)

# Fields of transformers' PreTrainedConfig, which every section inherits.
COMMON: dict[str, Check] = {
    "architectures": nullable(list_of(string(max_length=256), max_length=16)),
    "transformers_version": nullable(string(max_length=64)),
    "dtype": nullable(string(choices=("bfloat16", "float16", "float32"))),
    "torch_dtype": nullable(string(choices=("bfloat16", "float16", "float32"))),
    "output_hidden_states": nullable(boolean),
    "output_attentions": boolean,
    "return_dict": nullable(boolean),
    "use_cache": boolean,
    "is_encoder_decoder": boolean,
    "chunk_size_feed_forward": integer(0, 0),
    "num_labels": integer(1, 1024),  # transformers builds an id2label table of this many entries
    "id2label": nullable(LABELS),
    "label2id": nullable(LABELS),
    "problem_type": nullable(string(max_length=64)),
    "initializer_range": nullable(number(0, 1)),
    "_name_or_path": string(max_length=4096),
}

ROPE_PARAMETERS = record({"rope_type": string(choices=SUPPORTED_ROPE), "rope_theta": ROPE_THETA},
                         {"partial_rotary_factor": number(0, 1, low_open=True)}, closed=True)

TEXT_REQUIRED: dict[str, Check] = {
    "hidden_size": integer(1, 1 << 16),
    "intermediate_size": integer(1, 1 << 18),
    "num_hidden_layers": integer(1, MAX_LAYERS),
    "num_attention_heads": integer(1, MAX_HEADS),
    "num_key_value_heads": integer(1, MAX_HEADS),
    "head_dim": even(2, 1 << 12),
    "vocab_size": integer(1, MAX_VOCAB),
    "sliding_window": integer(1, MAX_WINDOW),
}
TEXT_OPTIONAL: dict[str, Check] = {
    **COMMON,
    "model_type": string(choices=("gemma4_text",)),
    "vocab_size_per_layer_input": integer(1, MAX_VOCAB),
    "hidden_size_per_layer_input": integer(0, 1 << 12),
    "global_head_dim": even(2, 1 << 12),
    "num_global_key_value_heads": nullable(integer(1, MAX_HEADS)),
    "attention_k_eq_v": boolean,
    "num_kv_shared_layers": integer(0, MAX_LAYERS - 1),
    "use_double_wide_mlp": boolean,
    "enable_moe_block": boolean,
    "num_experts": nullable(integer(1, 1024)),
    "top_k_experts": nullable(integer(1, 1024)),
    "moe_intermediate_size": nullable(integer(1, 1 << 18)),
    "use_bidirectional_attention": nullable(string(choices=("vision",))),
    "final_logit_softcapping": nullable(SOFTCAP),
    "hidden_activation": string(choices=("gelu_pytorch_tanh",)),
    "rms_norm_eps": EPS,
    "attention_bias": exactly(False, "the decoder blocks carry no attention bias"),
    "attention_dropout": nullable(number(0, 0)),  # inference: the export has no dropout
    "tie_word_embeddings": exactly(True, "the exporter reads the LM head from the embedding table"),
    "pad_token_id": nullable(integer(-1, MAX_VOCAB - 1)),  # -1: "no padding", as several Hub configs say
    "bos_token_id": TOKEN,
    "eos_token_id": nullable(either(integer(0, MAX_VOCAB - 1), list_of(integer(0, MAX_VOCAB - 1), 1, 64))),
    "max_position_embeddings": integer(1, MAX_POSITIONS),
    "rope_parameters": nullable(record({SLIDING: ROPE_PARAMETERS, FULL: ROPE_PARAMETERS}, closed=True)),
    "layer_types": nullable(list_of(string(choices=(SLIDING, FULL)), 1, MAX_LAYERS)),
    "per_layer_config": mapping_of(record({}, {"head_dim": even(2, 1 << 12),
                                               "num_key_value_heads": integer(1, MAX_HEADS)}, closed=True),
                                   key_pattern=r"\d{1,4}", max_length=MAX_LAYERS),
}

VISION_REQUIRED: dict[str, Check] = {
    "hidden_size": integer(1, 1 << 14),
    "intermediate_size": integer(1, 1 << 16),
    "num_hidden_layers": integer(1, 256),
    "num_attention_heads": integer(1, 256),
    "num_key_value_heads": integer(1, 256),
    "head_dim": even(2, 1 << 10),
    "patch_size": integer(1, 64),
    "pooling_kernel_size": integer(1, 16),
    "position_embedding_size": integer(1, 1 << 16),
}
VISION_OPTIONAL: dict[str, Check] = {
    **COMMON,
    "model_type": string(choices=("gemma4_vision",)),
    "hidden_activation": string(choices=("gelu_pytorch_tanh",)),
    "rms_norm_eps": EPS,
    "max_position_embeddings": integer(1, MAX_POSITIONS),
    "attention_bias": nullable(boolean),
    "attention_dropout": nullable(number(0, 0)),
    "rope_parameters": nullable(record({"rope_theta": ROPE_THETA}, {"rope_type": string(choices=("default", "axial"))},
                                       closed=True)),
    "use_clipped_linears": boolean,
    "standardize": boolean,
}

AUDIO_REQUIRED: dict[str, Check] = {
    "hidden_size": integer(1, 1 << 14),
    "num_hidden_layers": integer(1, 256),
    "num_attention_heads": integer(1, 256),
    "subsampling_conv_channels": list_of(integer(1, 1 << 12), 2, 2),
    "attention_chunk_size": integer(1, 1 << 12),
    "attention_context_left": integer(1, 1 << 12),
    "output_proj_dims": integer(1, 1 << 16),
}
AUDIO_OPTIONAL: dict[str, Check] = {
    **COMMON,
    "model_type": string(choices=("gemma4_audio",)),
    "hidden_act": string(choices=("silu",)),
    "conv_kernel_size": integer(1, 64),
    "residual_weight": number(0, 1e6),
    "attention_context_right": integer(0, 1 << 12),
    "attention_logit_cap": SOFTCAP,
    "attention_invalid_logits_value": number(-1e38, 0),
    "use_clipped_linears": boolean,
    "gradient_clipping": POSITIVE,
    "rms_norm_eps": EPS,
}

# Ids a model without the tower never meets (the trained text-only fixtures keep the released, larger ids).
TOWER_TOKENS = {"vision_config": ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id"),
                "audio_config": ("boa_token_id", "eoa_token_index", "audio_token_id")}
MULTIMODAL_TOKENS = tuple(name for names in TOWER_TOKENS.values() for name in names)
TOP_REQUIRED: dict[str, Check] = {"text_config": lambda value, where: None}  # checked as its own section
TOP_OPTIONAL: dict[str, Check] = {
    **COMMON,
    "model_type": string(max_length=64),
    "vision_config": lambda value, where: None,
    "audio_config": lambda value, where: None,
    "tie_word_embeddings": boolean,
    **{name: TOKEN for name in MULTIMODAL_TOKENS},
}


def _no_shadowed_names(section: dict[str, Any], where: str, config_class: type, known: set[str]) -> None:
    """transformers sets every unknown field as an attribute: one named like a method or property of its
    config class (``to_dict``, ``get_text_config``) would replace it, and one starting with ``_`` reaches
    its internals (``_experts_implementation``)."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    for name in section:
        if not isinstance(name, str):
            continue
        if name in known or name in fields:
            continue
        if name.startswith("_") or hasattr(config_class, name):
            raise SchemaError(field(where, name), "is not a configuration field (it names an attribute of "
                                                  f"transformers' {config_class.__name__})")


def _check_text(text: dict[str, Any], where: str) -> None:
    """Types and ranges of a text config, then what one field implies for another (no transformers import:
    ``exporter.geometry`` runs this on manifests without torch)."""
    record(TEXT_REQUIRED, TEXT_OPTIONAL)(text, where)
    n = text["num_hidden_layers"]
    layer_types = text.get("layer_types")
    if layer_types is not None and len(layer_types) != n:
        raise SchemaError(field(where, "layer_types"), f"has {len(layer_types)} entries for {n} layers "
                                                       "(num_hidden_layers)")
    if text.get("num_kv_shared_layers", 0) >= n:
        raise SchemaError(field(where, "num_kv_shared_layers"), f"must be below num_hidden_layers ({n}), got "
                                                                f"{text['num_kv_shared_layers']}")
    for key in text.get("per_layer_config") or {}:
        if int(key) >= n:
            raise SchemaError(field(where, "per_layer_config"), f"names layer {key}, beyond the {n} layers")
    if text.get("num_kv_shared_layers", 0) and not text.get("hidden_size_per_layer_input", 256):
        raise SchemaError(field(where, "num_kv_shared_layers"), "must be 0 without per-layer embeddings "
                                                                "(transformers' forward fails on KV-shared layers "
                                                                "when hidden_size_per_layer_input is 0)")
    if text.get("hidden_size_per_layer_input", 256) and "vocab_size_per_layer_input" not in text:
        raise SchemaError(field(where, "vocab_size_per_layer_input"), "is missing (needed with per-layer "
                                                                      "embeddings, hidden_size_per_layer_input > 0)")
    if text.get("enable_moe_block"):
        for name in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if text.get(name) is None:
                raise SchemaError(field(where, name), "is missing (enable_moe_block is true)")
        if text["top_k_experts"] > text["num_experts"]:
            raise SchemaError(field(where, "top_k_experts"), f"{text['top_k_experts']} exceeds num_experts "
                                                             f"{text['num_experts']}")
    vocab = text["vocab_size"]
    for name in ("pad_token_id", "bos_token_id"):
        if isinstance(text.get(name), int) and text[name] >= vocab:
            raise SchemaError(field(where, name), f"{text[name]} is not below vocab_size {vocab}")
    eos = text.get("eos_token_id")
    if any(token >= vocab for token in ([eos] if isinstance(eos, int) else eos or [])):
        raise SchemaError(field(where, "eos_token_id"), f"{eos} is not below vocab_size {vocab}")


def _check_vision(vision: dict[str, Any], where: str) -> None:
    record(VISION_REQUIRED, VISION_OPTIONAL)(vision, where)
    if vision["num_attention_heads"] % vision["num_key_value_heads"]:
        raise SchemaError(field(where, "num_key_value_heads"), f"{vision['num_key_value_heads']} does not divide "
                                                               f"num_attention_heads {vision['num_attention_heads']}")


def _check_audio(audio: dict[str, Any], where: str) -> None:
    record(AUDIO_REQUIRED, AUDIO_OPTIONAL)(audio, where)
    if audio["subsampling_conv_channels"][0] != MEL_BINS:
        raise SchemaError(field(where, "subsampling_conv_channels"), f"must start with {MEL_BINS} (the mel bins "
                                                                     "the tower reads)")
    if audio["hidden_size"] % audio["num_attention_heads"]:
        raise SchemaError(field(where, "num_attention_heads"), f"{audio['num_attention_heads']} does not divide "
                                                               f"hidden_size {audio['hidden_size']}")


def _check_top(config: dict[str, Any]) -> None:
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    record(TOP_REQUIRED, TOP_OPTIONAL)(config, "")
    _no_shadowed_names(config, "", Gemma4Config, set(TOP_REQUIRED) | set(TOP_OPTIONAL))
    if not isinstance(config["text_config"], dict):
        raise SchemaError("text_config", f"must be an object, got {type(config['text_config']).__name__}")
    _check_text(config["text_config"], "text_config")
    _no_shadowed_names(config["text_config"], "text_config", Gemma4TextConfig, set(TEXT_REQUIRED) | set(TEXT_OPTIONAL))
    for name, check, config_class, known in (
            ("vision_config", _check_vision, Gemma4VisionConfig, {*VISION_REQUIRED, *VISION_OPTIONAL}),
            ("audio_config", _check_audio, Gemma4AudioConfig, {*AUDIO_REQUIRED, *AUDIO_OPTIONAL})):
        section = config.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise SchemaError(name, f"must be an object or null, got {type(section).__name__}")
        check(section, name)
        _no_shadowed_names(section, name, config_class, known)
    vocab = config["text_config"]["vocab_size"]
    for tower, names in TOWER_TOKENS.items():
        for name in names if config.get(tower) is not None else ():
            if isinstance(config.get(name), int) and config[name] >= vocab:
                raise SchemaError(name, f"{config[name]} is not below text_config.vocab_size {vocab} (the "
                                        f"{tower.split('_')[0]} tower's soft tokens are placed at it)")


def validate_config(config: Any, source: str = "config.json") -> None:
    """A top-level Gemma 4 ``config.json`` (text, vision and audio sections); ``ConfigError`` naming
    ``source``, the field and the problem."""
    try:
        if not isinstance(config, dict):
            raise SchemaError("", f"must be a JSON object, got {type(config).__name__}")
        _check_top(config)
    except SchemaError as exc:  # field names come from the file: escaped, so the message stays one line
        raise ConfigError(f"{source}: {printable(str(exc))}") from None


def validate_text_config(text: Any, source: str = "config.json", where: str = "text_config") -> None:
    """A text config alone (a manifest's ``text_config``, or a checkpoint's)."""
    try:
        if not isinstance(text, dict):
            raise SchemaError(where, f"must be an object, got {type(text).__name__}")
        _check_text(text, where)
    except SchemaError as exc:  # field names come from the file: escaped, so the message stays one line
        raise ConfigError(f"{source}: {printable(str(exc))}") from None
