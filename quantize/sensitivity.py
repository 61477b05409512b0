"""Layer sensitivity: the error at the model output when only one tensor is quantized.

For every candidate the plan would quantize at 4 bits, the float decoder is run on calibration text
with that tensor alone replaced by its round-to-nearest int4 copy (quantized, then dequantized), and
the mean KL divergence of its next-token distribution from the float model's is that tensor's
sensitivity. Round-to-nearest stands in for the plan's algorithm: it ranks tensors the same way at a
fraction of GPTQ's cost. The candidate weights become graph inputs of one in-memory session, so each
measurement is one run, not one session.

The whole decoder is loaded into memory, which suits the trained fixtures and tiny variants.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gemma4_onnx.progress import progress
from gemma4_onnx.quantize.blockwise import blockwise
from gemma4_onnx.quantize.calibration import calibration_tokens
from gemma4_onnx.quantize.experts import dequantize
from gemma4_onnx.quantize.plan import Entry
from gemma4_onnx.runtime.parity import kl_sum
from gemma4_onnx.runtime.text_model import TextModel, session_options

TOKENS = 512


def fake_quantized(weight: np.ndarray, entry: Entry) -> np.ndarray:
    """``weight`` rounded to the entry's grid at 4 bits (each expert of a stack on its own), as float."""
    decision = replace(entry.decision, bits=4, algorithm="rtn")
    matrices = weight.reshape(-1, *weight.shape[-2:]).astype(np.float32)
    out = [dequantize(*blockwise(m, decision), bits=4, k=m.shape[1]) for m in matrices]
    return np.stack(out).reshape(weight.shape).astype(weight.dtype)


def sensitivities(package: Path, entries: list[Entry], text: str) -> dict[str, float]:
    """Tensor name → mean KL (nats per token) of the model with only that tensor at int4."""
    text_model = TextModel(package)
    decoder = onnx.load(package / text_model.manifest["graphs"]["decoder"]["file"])
    wanted = {e.candidate.name: e for e in entries}
    weights: dict[str, np.ndarray] = {}
    kept = []
    for tensor in decoder.graph.initializer:
        if tensor.name in wanted:
            weights[tensor.name] = onnx.numpy_helper.to_array(tensor)
            decoder.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    del decoder.graph.initializer[:]
    decoder.graph.initializer.extend(kept)
    session = ort.InferenceSession(decoder.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    tokens = calibration_tokens(package, text)[:TOKENS]
    embedded = text_model.embed.run(None, {"input_ids": np.array([tokens], dtype=np.int64)})
    feeds = {"inputs_embeds": embedded[0], "position_ids": np.arange(len(tokens), dtype=np.int64)[None],
             **text_model.empty_cache(1).tensors, **weights}
    if len(embedded) > 1:
        feeds["per_layer_inputs"] = embedded[1]
    (reference,) = session.run(["logits"], feeds)
    out = {}
    for name in progress(sorted(weights), desc="sensitivity", unit="tensor"):
        (logits,) = session.run(["logits"], {**feeds, name: fake_quantized(weights[name], wanted[name])})
        out[name] = kl_sum(reference[0], logits[0]) / len(tokens)
    return out
