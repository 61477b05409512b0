"""``gemma4-onnx generate``: a prompt through the exported package, streamed token by token."""

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.chat_template import chat_template, render, special_token, tokenizer_config
from gemma4_onnx.runtime.multimodal import DEFAULT_IMAGE_BUDGET, MultimodalModel, media_prompt
from gemma4_onnx.runtime.text_model import Cache, TextModel


def prompt_ids(tokenizer: Tokenizer, directory: Path, prompt: str) -> list[int]:
    """The prompt's ids, with BOS first when the checkpoint's tokenizer config asks for it."""
    return _bos(tokenizer, tokenizer_config(directory)) + _encode(tokenizer, prompt)


def chat_prompt(tokenizer: Tokenizer, directory: Path, prompt: str, raw: bool = False) -> tuple[list[int], str]:
    """(BOS ids, text): the prompt in the checkpoint's chat template, which brings its own BOS (``raw``, or no
    template: the prompt as given, BOS as the tokenizer config says)."""
    config = tokenizer_config(directory)
    template = None if raw or not prompt else chat_template(directory, config)
    if template is None:
        return _bos(tokenizer, config), prompt
    return [], render(template, config, prompt)


def _bos(tokenizer: Tokenizer, config: dict[str, Any]) -> list[int]:
    bos = tokenizer.token_to_id(special_token(config, "bos_token")) if config.get("add_bos_token", True) else None
    return [] if bos is None else [bos]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def generate(directory: Path, prompt: str, max_new_tokens: int, stream: bool = True, images: Sequence[Path] = (),
             audio: Sequence[Path] = (), image_budget: int = DEFAULT_IMAGE_BUDGET, raw: bool = False) -> str:
    """``raw``: the prompt as given, without the checkpoint's chat template (which brings its own BOS)."""
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be ≥ 0, got {max_new_tokens}")
    if not (directory / "tokenizer.json").is_file():
        raise UsageError(f"{directory}: no tokenizer.json in the package")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    bos, prompt = chat_prompt(tokenizer, directory, prompt, raw)
    if images or audio:
        model, cache, logits = _media_prefill(directory, tokenizer, prompt, bos, list(images), list(audio),
                                              image_budget)
    else:
        model = TextModel(directory)
        ids = bos + _encode(tokenizer, prompt)
        if not ids:
            raise UsageError("the prompt is empty")
        cache = model.empty_cache(1)
        logits = model.forward([ids], cache)
    generated: list[int] = []
    printed = ""
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in model.eos_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if stream and not text.endswith("\ufffd"):  # hold back half of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
        logits = model.forward([[token]], cache)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if stream:
        sys.stdout.write(text[len(printed):] + "\n")
    return text


def _media_prefill(directory: Path, tokenizer: Tokenizer, prompt: str, bos: list[int], images: list[Path],
                   audio: list[Path], budget: int) -> tuple[TextModel, Cache, np.ndarray]:
    """The prompt with its images and audio merged in, run through the decoder once."""
    model = MultimodalModel(directory)
    media = media_prompt(model, lambda text: _encode(tokenizer, text), bos, prompt, images, audio, budget)
    for note in media.notes:
        sys.stderr.write(f"note: {note}\n")
    cache = model.text.empty_cache(1)
    return model.text, cache, model.prefill(media.prompt, media.images, media.audios, cache)
