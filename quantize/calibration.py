"""Calibration statistics for GPTQ: H = Σ xᵀx of the input x of every linear layer, collected by running
the float package through onnxruntime on calibration text (the MatMul inputs are exposed as extra
outputs of an in-memory copy of decoder.onnx; the package on disk is not touched).

MoE experts get one H per expert, over the tokens routed to it, each token weighted by the square of
its routing weight (the factor the expert's output error reaches the layer output with): the
TopKMoE inputs are exposed, routed again by the op's reference, and the down projection's inputs
recomputed from the float gate/up weights.

The whole decoder is loaded into memory for this, which suits the trained fixtures and tiny variants;
full-size calibration (one layer at a time) is not built yet.
"""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from gemma4_onnx.quantize.experts import DOWN, GATE_UP, is_topk_moe
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
    moe = [ExpertStatistics(node, decoder) for node in decoder.graph.node
           if is_topk_moe(node) and {node.input[GATE_UP], node.input[DOWN]} & weights]
    activations = sorted(set(inputs.values()) | {name for layer in moe for name in layer.inputs})
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
        values = dict(zip(activations, session.run(activations, feeds), strict=True))
        for name in set(inputs.values()):
            x = values[name].reshape(-1, values[name].shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
        for layer in moe:
            layer.add(*(values[name] for name in layer.inputs))
    hessians = {weight: sums[activation] for weight, activation in inputs.items()}
    for layer in moe:
        hessians.update(layer.hessians())
    return hessians


class ExpertStatistics:
    """Per-expert Σ w²·xᵀx of one TopKMoE node's gate/up input z and down input gelu(g)·u."""

    def __init__(self, node: onnx.NodeProto, decoder: onnx.ModelProto) -> None:
        import torch

        arrays = {t.name: t for t in decoder.graph.initializer if t.name in node.input}
        self.inputs = (node.input[0], node.input[1])
        self.names = (node.input[GATE_UP], node.input[DOWN])
        scale, proj, per_expert_scale = (torch.from_numpy(onnx.numpy_helper.to_array(arrays[name]).astype(np.float32))
                                         for name in node.input[2:GATE_UP])
        self.router = (scale, proj, per_expert_scale)
        self.gate_up = onnx.numpy_helper.to_array(arrays[self.names[0]]).astype(np.float64)
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.top_k, self.eps = int(attributes["top_k"]), float(attributes["eps"])
        experts, rows, hidden = self.gate_up.shape
        self.sums = (np.zeros((experts, hidden, hidden)), np.zeros((experts, rows // 2, rows // 2)))

    def add(self, hidden_states: np.ndarray, experts_input: np.ndarray) -> None:
        import torch

        from gemma4_onnx.graphs.topk_moe import route

        hidden = experts_input.shape[-1]
        r = torch.from_numpy(hidden_states.reshape(-1, hidden).astype(np.float32))
        z = experts_input.reshape(-1, hidden).astype(np.float64)
        weights, index = (t.numpy() for t in route(r, *self.router, self.top_k, self.eps))
        for expert in np.unique(index):
            token, slot = np.nonzero(index == expert)
            w = weights[token, slot, None].astype(np.float64)
            x = z[token]
            gate, up = np.split(x @ self.gate_up[expert].T, 2, axis=-1)
            activated = gelu_tanh(gate) * up
            self.sums[0][expert] += (w * x).T @ (w * x)
            self.sums[1][expert] += (w * activated).T @ (w * activated)

    def hessians(self) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.sums, strict=True))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
