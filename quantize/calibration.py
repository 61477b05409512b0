"""Calibration statistics for GPTQ: H = Σ xᵀx of the input x of every linear layer, collected by running
the float package through onnxruntime on calibration text (the MatMul inputs are exposed as extra
outputs of an in-memory copy of decoder.onnx; the package on disk is not touched).

The whole decoder is loaded into memory for this, which suits the trained fixtures and tiny variants;
full-size calibration (one layer at a time) is not built yet.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from gemma4_onnx.runtime.text_model import TextModel, session_options

WINDOW = 512
MAX_TOKENS = 16384


def linear_inputs(model: onnx.ModelProto, weights: set[str]) -> dict[str, str]:
    """weight name → the activation its MatMul multiplies (through ``Transpose(weight)``)."""
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in weights}
    return {transposed[n.input[1]]: n.input[0] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in transposed}


def calibration_tokens(package: Path, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    return list(tokenizer.encode(text, add_special_tokens=False).ids)[:MAX_TOKENS]


def input_hessians(package: Path, weights: set[str], text: str) -> dict[str, np.ndarray]:
    """Σ xᵀx (float64, [K, K]) of the input of each linear weight in ``weights`` over the text."""
    text_model = TextModel(package)
    decoder = onnx.load(package / text_model.manifest["graphs"]["decoder"]["file"])  # with its weights
    inputs = linear_inputs(decoder, weights)
    activations = sorted(set(inputs.values()))
    for name in activations:
        decoder.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(decoder.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    tokens = calibration_tokens(package, text)
    for start in range(0, len(tokens), WINDOW):
        window = tokens[start:start + WINDOW]
        cache = text_model.empty_cache(1)
        embedded = text_model.embed.run(None, {"input_ids": np.array([window], dtype=np.int64)})
        feeds = {"inputs_embeds": embedded[0], "position_ids": np.arange(len(window), dtype=np.int64)[None]}
        if len(embedded) > 1:
            feeds["per_layer_inputs"] = embedded[1]
        feeds.update(cache.tensors)
        values = session.run(activations, feeds)
        for name, value in zip(activations, values, strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
    return {weight: sums[activation] for weight, activation in inputs.items()}
