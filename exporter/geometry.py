"""Per-layer geometry of a Gemma 4 text decoder, read from config.json alone (no torch).

Unlike earlier Gemma models, Gemma 4 layers are not alike: full-attention layers have a larger head
(512 vs 256), may share one projection for keys and values with fewer KV heads (K=V), and the last
``num_kv_shared_layers`` layers own no cache at all but attend with the K/V published by the last
earlier layer of their type. Both spellings of the released configs are accepted: the shipped
``global_head_dim`` / ``num_global_key_value_heads`` and the ``per_layer_config`` that transformers
writes when it re-saves a config (architecture doc §3.3, §4.1).
"""

from dataclasses import dataclass
from typing import Any, Literal

from gemma4_onnx.errors import ConfigError
from gemma4_onnx.exporter.config_schema import validate_text_config
from gemma4_onnx.exporter.variants import FULL, SLIDING

KvMode = Literal["own", "store", "reuse"]


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attention: Literal["sliding", "full"]
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # one projection serves as keys and values; there is no v_proj
    kv_mode: KvMode  # own: has a cache; store: has a cache and publishes K/V; reuse: no cache
    kv_producer: int | None  # for reuse layers, the layer whose K/V they attend with
    mlp_width: int
    moe: bool
    rope_theta: float
    rope_fraction: float  # share of frequency pairs that rotate (p-RoPE on full layers)
    image_blocks: bool = False  # sliding layer of a use_bidirectional_attention "vision" model (§3.7)

    @property
    def owns_cache(self) -> bool:
        return self.kv_mode != "reuse"

    @property
    def cache_parts(self) -> list[str]:
        """The cache tensors of a cache-owning layer: one on K=V layers, keys and values otherwise."""
        return ["key_value"] if self.k_eq_v else ["key", "value"]


@dataclass(frozen=True)
class TextGeometry:
    hidden_size: int
    vocab_size: int
    num_heads: int
    sliding_window: int
    ple_dim: int  # hidden_size_per_layer_input; 0 without per-layer embeddings
    ple_vocab_size: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    final_logit_softcapping: float | None
    rms_norm_eps: float
    layers: tuple[LayerSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def image_blocks(self) -> bool:
        """The decoder takes an ``image_blocks`` input (bidirectional image attention on sliding layers)."""
        return any(spec.image_blocks for spec in self.layers)

    @property
    def cache_layers(self) -> list[LayerSpec]:
        return [spec for spec in self.layers if spec.owns_cache]


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The text part of a top-level Gemma 4 config (or the config itself if it is a text config)."""
    text = config.get("text_config", config)
    if not isinstance(text, dict):
        raise ConfigError("config.json: 'text_config' must be an object")
    return text


def _kv_modes(layer_types: list[str], num_shared: int) -> tuple[list[KvMode], list[int | None]]:
    """transformers' KV-sharing rule: the last non-shared layer of each type stores its K/V."""
    n = len(layer_types)
    first_shared = n - num_shared
    modes: list[KvMode] = ["reuse" if i >= first_shared else "own" for i in range(n)]
    producers: list[int | None] = [None] * n
    if num_shared == 0:
        return modes, producers
    last_of_type = {t: i for i, t in enumerate(layer_types[:first_shared])}
    missing = set(layer_types[first_shared:]) - set(last_of_type)
    if missing:
        raise ConfigError(f"config.json: KV-shared layers of type {sorted(missing)} have no earlier producer")
    for i in last_of_type.values():
        modes[i] = "store"
    for i in range(first_shared, n):
        producers[i] = last_of_type[layer_types[i]]
    return modes, producers


def text_geometry(config: dict[str, Any], source: str = "config.json") -> TextGeometry:
    """Every per-layer number the exporter needs, from a top-level or text config dict (checked against
    ``config_schema`` first; ``source`` names the file in errors)."""
    text = text_config_of(config)
    validate_text_config(text, source)
    n = text["num_hidden_layers"]
    layer_types: list[str] = text.get("layer_types") or [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n)]
    if len(layer_types) != n:
        raise ConfigError(f"config.json: layer_types has {len(layer_types)} entries for {n} layers")
    if bad := sorted(set(layer_types) - {SLIDING, FULL}):
        raise ConfigError(f"config.json: unknown layer type(s) {bad}")
    layer_types = [*layer_types[:-1], FULL]  # transformers forces the last layer to full attention

    num_shared = text.get("num_kv_shared_layers") or 0
    if not 0 <= num_shared < n:
        raise ConfigError(f"config.json: num_kv_shared_layers={num_shared} must be in [0, {n})")
    modes, producers = _kv_modes(layer_types, num_shared)

    k_eq_v = bool(text.get("attention_k_eq_v", False))
    per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
    global_head_dim = text.get("global_head_dim", 512)
    global_kv = text.get("num_global_key_value_heads")
    moe = bool(text.get("enable_moe_block", False))
    rope = text.get("rope_parameters") or {}
    bidirectional = text.get("use_bidirectional_attention")
    if bidirectional not in (None, "vision"):
        raise ConfigError(f"config.json: use_bidirectional_attention={bidirectional!r} is not supported (null or "
                          "'vision', as the released models)")

    layers = []
    for i, layer_type in enumerate(layer_types):
        full = layer_type == FULL
        override = per_layer.get(i, {})
        if full and not override and "per_layer_config" not in text:
            override = {"head_dim": global_head_dim}
            if k_eq_v and global_kv is not None:
                override["num_key_value_heads"] = global_kv
        double = bool(text.get("use_double_wide_mlp")) and modes[i] == "reuse"
        rope_params = rope.get(layer_type, {})
        layers.append(LayerSpec(
            index=i,
            attention="full" if full else "sliding",
            head_dim=int(override.get("head_dim", text["head_dim"])),
            num_kv_heads=int(override.get("num_key_value_heads", text["num_key_value_heads"])),
            k_eq_v=k_eq_v and full,
            kv_mode=modes[i],
            kv_producer=producers[i],
            mlp_width=text["intermediate_size"] * (2 if double else 1),
            moe=moe,
            rope_theta=float(rope_params.get("rope_theta", 1e6 if full else 1e4)),
            rope_fraction=float(rope_params.get("partial_rotary_factor", 1.0)),
            image_blocks=bidirectional == "vision" and not full,
        ))
        if layers[-1].image_blocks and (modes[i] == "reuse" or layers[-1].k_eq_v):
            raise ConfigError(f"config.json: layer {i}: bidirectional image blocks on a KV-shared or K=V sliding "
                              "layer are not supported")
        if text["num_attention_heads"] % layers[-1].num_kv_heads:
            raise ConfigError(f"config.json: layer {i}: {text['num_attention_heads']} query heads are not a "
                              f"multiple of {layers[-1].num_kv_heads} KV heads")

    return TextGeometry(
        hidden_size=text["hidden_size"],
        vocab_size=text["vocab_size"],
        num_heads=text["num_attention_heads"],
        sliding_window=text["sliding_window"],
        ple_dim=text.get("hidden_size_per_layer_input") or 0,
        ple_vocab_size=text.get("vocab_size_per_layer_input") or text["vocab_size"],
        num_experts=text.get("num_experts") or 0 if moe else 0,
        top_k_experts=text.get("top_k_experts") or 0 if moe else 0,
        moe_intermediate_size=text.get("moe_intermediate_size") or 0 if moe else 0,
        final_logit_softcapping=text.get("final_logit_softcapping"),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        layers=tuple(layers),
    )


def layer_pattern_string(geometry: TextGeometry) -> str:
    """``SSSSF SSSSF …``: one letter per layer, a space after each full layer; shared layers lowercase."""
    letters = []
    for spec in geometry.layers:
        letter = "F" if spec.attention == "full" else "S"
        letters.append((letter.lower() if spec.kv_mode == "reuse" else letter) + (" " if letter == "F" else ""))
    return "".join(letters).strip()
