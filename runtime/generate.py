"""``gemma4-onnx generate``: a prompt through the exported package, streamed token by token."""

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.multimodal import DEFAULT_IMAGE_BUDGET, MultimodalModel, media_prompt
from gemma4_onnx.runtime.text_model import Cache, TextModel


def prompt_ids(tokenizer: Tokenizer, directory: Path, prompt: str) -> list[int]:
    """The prompt's ids, with BOS first when the checkpoint's tokenizer config asks for it."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=False).ids)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("add_bos_token", True) and config.get("bos_token"):
        bos = tokenizer.token_to_id(config["bos_token"])
        if bos is not None:
            ids.insert(0, bos)
    return ids


def generate(directory: Path, prompt: str, max_new_tokens: int, stream: bool = True, images: Sequence[Path] = (),
             audio: Sequence[Path] = (), image_budget: int = DEFAULT_IMAGE_BUDGET) -> str:
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be ≥ 0, got {max_new_tokens}")
    if not (directory / "tokenizer.json").is_file():
        raise UsageError(f"{directory}: no tokenizer.json in the package")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if images or audio:
        model, cache, logits = _media_prefill(directory, tokenizer, prompt, list(images), list(audio), image_budget)
    else:
        model = TextModel(directory)
        ids = prompt_ids(tokenizer, directory, prompt)
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


def _media_prefill(directory: Path, tokenizer: Tokenizer, prompt: str, images: list[Path], audio: list[Path],
                   budget: int) -> tuple[TextModel, Cache, np.ndarray]:
    """The prompt with its images and audio merged in, run through the decoder once."""
    model = MultimodalModel(directory)
    bos = prompt_ids(tokenizer, directory, "")
    media = media_prompt(model, lambda text: list(tokenizer.encode(text, add_special_tokens=False).ids), bos,
                         prompt, images, audio, budget)
    for note in media.notes:
        sys.stderr.write(f"note: {note}\n")
    cache = model.text.empty_cache(1)
    logits = model.text.forward_embedded(model.embedded(media.prompt, media.images, media.audios), cache)
    return model.text, cache, logits
