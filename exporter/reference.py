"""transformers' Gemma 4 model loaded from a checkpoint: the PyTorch source of truth for parity."""

import torch
from transformers import Gemma4ForConditionalGeneration

from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.hf_model import expected_tensors, hf_config, quiet_transformers


def load_reference_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> Gemma4ForConditionalGeneration:
    """The whole reference model in ``dtype`` with the checkpoint's weights (small models: tests,
    fixtures, parity). Full-size parity loads one layer at a time instead."""
    with quiet_transformers():
        model = Gemma4ForConditionalGeneration(hf_config(checkpoint.config))
    model = model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' decorated .to confuses mypy
    state = {name: checkpoint.tensor(name, dtype) for name in expected_tensors(checkpoint.config)}
    result = model.load_state_dict(state, strict=False)
    missing = [n for n in result.missing_keys if n != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"reference load mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    return model.eval()
