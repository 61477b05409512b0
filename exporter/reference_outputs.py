"""What transformers computes for parity: teacher-forced logits, greedy tokens through its own cache,
and every decoder layer's inputs and output (captured with hooks, for per-block parity)."""

from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from gemma4_onnx.exporter.checkpoint import Checkpoint
from gemma4_onnx.exporter.geometry import LayerSpec
from gemma4_onnx.exporter.reference import load_reference_model


def index(layer: torch.nn.Module) -> int:
    return int(layer.layer_idx)  # type: ignore[arg-type]


class Reference:
    def __init__(self, checkpoint_dir: str) -> None:
        self.checkpoint = Checkpoint.open(checkpoint_dir)
        self.geometry = self.checkpoint.geometry
        self.model = load_reference_model(self.checkpoint)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(input_ids=torch.tensor([ids])).logits[0].numpy()

    @torch.no_grad()
    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """Prefill, then one token at a time through transformers' own cache (its decode path)."""
        cache = DynamicCache(config=self.model.config.get_text_config())
        out = self.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        tokens: list[int] = []
        while True:
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if len(tokens) == steps:
                return tokens
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    @torch.no_grad()
    def block_io(self, ids: list[int]) -> list[dict[str, Any]]:
        """Per layer: the feeds its exported block takes (reference values) and the reference output."""
        layers = self.model.model.language_model.layers
        records: list[dict[str, Any]] = [{} for _ in layers]

        def before(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            spec: LayerSpec = self.geometry.layers[index(module)]
            feeds = {"hidden_states": args[0].numpy().copy(), "position_ids": kwargs["position_ids"].numpy().copy()}
            per_layer_input = args[1] if len(args) > 1 else kwargs.get("per_layer_input")
            if per_layer_input is not None:
                feeds["per_layer_input"] = per_layer_input.numpy().copy()
            if spec.owns_cache:
                for part in spec.cache_parts:
                    feeds[f"past_{part}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            else:
                key, value = kwargs["shared_kv_states"][self.model.config.get_text_config().layer_types[spec.index]]
                feeds["shared_key"], feeds["shared_value"] = key.numpy().copy(), value.numpy().copy()
            records[index(module)]["feeds"] = feeds

        def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            records[index(module)]["output"] = hidden.numpy().copy()

        handles = [h for layer in layers for h in (layer.register_forward_pre_hook(before, with_kwargs=True),
                                                    layer.register_forward_hook(after, with_kwargs=True))]
        try:
            self.model(input_ids=torch.tensor([ids]))
        finally:
            for handle in handles:
                handle.remove()
        return records
