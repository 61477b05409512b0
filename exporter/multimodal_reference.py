"""What transformers computes for multimodal parity: soft tokens per image or clip, and greedy tokens
after a prompt with images and audio (its own merge, masks — bidirectional image blocks on 26B/31B when
``mm_token_type_ids`` is given — and cache)."""

import numpy as np
import torch
from transformers import DynamicCache, Gemma4ForConditionalGeneration


@torch.no_grad()
def image_soft_tokens(model: Gemma4ForConditionalGeneration, pixel_values: np.ndarray,
                      positions: np.ndarray) -> list[np.ndarray]:
    """Per image of a padded batch [N, P, 3p²] / [N, P, 2]: its valid soft tokens [n, H_text]."""
    out = model.model.get_image_features(torch.from_numpy(pixel_values), torch.from_numpy(positions),
                                         return_dict=True)
    return [t.numpy() for t in out.pooler_output]


@torch.no_grad()
def audio_soft_tokens(model: Gemma4ForConditionalGeneration, features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = model.model.get_audio_features(torch.from_numpy(features), torch.from_numpy(mask), return_dict=True)
    return out.pooler_output[out.attention_mask].numpy()


@torch.no_grad()
def greedy(model: Gemma4ForConditionalGeneration, ids: list[int], types: list[int], steps: int,
           pixel_values: np.ndarray | None = None, positions: np.ndarray | None = None,
           features: np.ndarray | None = None, mask: np.ndarray | None = None) -> list[int]:
    """``steps`` greedy tokens: a multimodal prefill, then one token at a time through transformers' cache."""
    cache = DynamicCache(config=model.config.get_text_config())
    media: dict[str, torch.Tensor] = {}
    if pixel_values is not None and positions is not None:
        media.update(pixel_values=torch.from_numpy(pixel_values), image_position_ids=torch.from_numpy(positions))
    if features is not None and mask is not None:
        media.update(input_features=torch.from_numpy(features), input_features_mask=torch.from_numpy(mask))
    out = model(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]), past_key_values=cache,
                use_cache=True, **media)
    tokens: list[int] = []
    while True:
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if len(tokens) == steps:
            return tokens
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
