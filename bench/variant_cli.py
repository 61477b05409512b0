"""The ``gemma4-onnx`` command with one more variant registered: a built-in variant's config with keys
replaced (a shallow stack of full-width layers, a dense stack the model builder can build). The bench
runs it as its own process, like the real command, so its wall time and peak RSS are the command's."""

from __future__ import annotations

import json
import sys
from typing import Any

from gemma4_onnx.exporter import variants

_REGISTER = """
import json, sys
from gemma4_onnx.cli import main
from gemma4_onnx.exporter import variants
base, name, text, top = sys.argv[1:5]
del sys.argv[1:5]
config = variants.variant_config(base)
config["text_config"].update(json.loads(text))
config.update(json.loads(top))
variants.REGISTRY[name] = variants.Variant(name, variants.get_variant(base).family, config)
sys.exit(main(sys.argv[1:]))
"""


def variant_cli(base: str, name: str, text: dict[str, Any], top: dict[str, Any] | None = None) -> list[str]:
    """The command line (before the verb) of the CLI knowing ``name``: ``base`` with ``text`` keys of its
    text config and ``top`` keys of its config replaced."""
    return [sys.executable, "-c", _REGISTER, base, name, json.dumps(text), json.dumps(top or {})]


def shallow(base: str, layers: int) -> dict[str, Any]:
    """Text-config keys cutting ``base`` to its first ``layers`` layers, KV sharing scaled down so that a
    KV producer of each layer type stays."""
    text = variants.variant_config(base)["text_config"]
    shared = round(text.get("num_kv_shared_layers", 0) * layers / text["num_hidden_layers"])
    if "full_attention" in text["layer_types"][:layers]:
        shared = min(shared, layers - text["layer_types"].index("full_attention") - 1)
    return {"num_hidden_layers": layers, "layer_types": text["layer_types"][:layers],
            "num_kv_shared_layers": max(shared, 0)}
