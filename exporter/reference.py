"""transformers' Gemma 4 model loaded from a checkpoint: the PyTorch source of truth for parity."""

import torch
from transformers import Gemma4ForConditionalGeneration
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding, Gemma4TextScaledWordEmbedding

from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.hf_model import STATE_PREFIX, expected_tensors, hf_config, meta_model, quiet_transformers


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


def load_reference_text_model(checkpoint: Checkpoint,
                              dtype: torch.dtype = torch.bfloat16) -> Gemma4ForConditionalGeneration:
    """The text model alone, built on the meta device and given the checkpoint's tensors as they are read:
    no initialisation pass and no second copy, so full-size E2B in bf16 takes its 10 GB of weights in RAM
    (built on the CPU first, as ``load_reference_model`` does, it would need four times that). The towers
    are left unloaded: text inputs only."""
    model = meta_model(checkpoint.config)
    names = [name for name in expected_tensors(checkpoint.config) if name.startswith(STATE_PREFIX)]
    model.load_state_dict({name: checkpoint.tensor(name, dtype) for name in names}, strict=False, assign=True)
    text = model.model.language_model
    text.rotary_emb = Gemma4TextRotaryEmbedding(text.config)  # computed buffers: not in a checkpoint
    for module in text.modules():
        if isinstance(module, Gemma4TextScaledWordEmbedding):
            module.embed_scale = torch.nn.Buffer(torch.tensor(module.scalar_embed_scale), persistent=False)
    model.tie_weights()
    left = [name for name, t in [*text.named_parameters(), *text.named_buffers(), *model.lm_head.named_parameters()]
            if t.is_meta]
    if left:
        raise RuntimeError(f"text model: {', '.join(left)} not loaded")
    return model.eval()
