"""The bridge to transformers' Gemma 4 modules, the PyTorch source of truth.

Models are built on the ``meta`` device first (no memory), then weights are assigned tensor by
tensor from a checkpoint, so nothing here needs the whole model in RAM before it is asked for.
"""

import contextlib
import logging
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import Gemma4Config, Gemma4ForConditionalGeneration
from transformers.utils import logging as hf_logging

from gemma4_onnx.errors import ConfigError

STATE_PREFIX = "model.language_model."


@contextlib.contextmanager
def quiet_transformers():
    """transformers warns about things this tool handles on purpose (e.g. forcing the last layer full)."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def one_line(exc: BaseException) -> str:
    """An exception from transformers as one line of a message (some span several)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def hf_config(config: dict[str, Any]) -> Gemma4Config:
    """transformers' config object for a config.json dict (either spelling of the global-head fields). The
    dict has passed ``config_schema``; what transformers still refuses is a ConfigError too."""
    try:
        with quiet_transformers():
            hf = Gemma4Config(**{k: v for k, v in config.items() if k not in ("architectures",)})
    except (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError) as exc:
        raise ConfigError(f"config.json is not a valid Gemma 4 config: {one_line(exc)}") from None
    hf._attn_implementation = "eager"
    hf.get_text_config()._attn_implementation = "eager"
    return hf


def meta_model(config: dict[str, Any]) -> Gemma4ForConditionalGeneration:
    """The full model with every parameter on the meta device: shapes and names, no storage."""
    hf = hf_config(config)
    try:
        with quiet_transformers(), torch.device("meta"):
            model = Gemma4ForConditionalGeneration(hf)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        raise ConfigError(f"config.json: transformers cannot build this model ({type(exc).__name__}: "
                          f"{one_line(exc)})") from None
    return model.eval()


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype at construction) of every tensor a checkpoint of this config stores."""
    model = meta_model(config)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items() if name != "lm_head.weight"}


def ignorable_tensors(config: dict[str, Any]) -> set[str]:
    """Tensors the reference drops on load: k/v projections and norms of KV-shared layers (§4.1)."""
    from gemma4_onnx.exporter.geometry import text_geometry

    names = set()
    for spec in text_geometry(config).layers:
        if spec.kv_mode == "reuse":
            for part in ("k_proj.weight", "v_proj.weight", "k_norm.weight", "v_norm.weight"):
                names.add(f"{STATE_PREFIX}layers.{spec.index}.self_attn.{part}")
    return names
