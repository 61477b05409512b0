"""``gemma4-onnx generate``: a prompt through the exported package, streamed token by token.

The package passes the gate first (``open_package``); its tokenizer, tokenizer config and chat template are
then read only as the manifest lists them (``read_side_file``), and the prompt is rendered before any
onnxruntime session is made. Generation
stops at the model's context (``max_position_embeddings``): a larger ``--max-new-tokens`` is capped with a
note, and a prompt that alone fills the context is refused."""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.chat_template import chat_template, render, special_token, tokenizer_config
from gemma4_onnx.runtime.multimodal import DEFAULT_IMAGE_BUDGET, MultimodalModel, media_prompt
from gemma4_onnx.runtime.package_files import open_package
from gemma4_onnx.runtime.text_model import Cache, TextModel
from gemma4_onnx.runtime.tokenizer import decode, encode, read_tokenizer


@dataclass(frozen=True)
class PackageText:
    """What turns a prompt into ids: the package's tokenizer, its checked config, and its chat template."""

    tokenizer: Tokenizer
    config: dict[str, Any]
    template: str | None

    @classmethod
    def read(cls, directory: Path, manifest: dict[str, Any]) -> "PackageText":
        """From a package that passed the gate (``open_package``)."""
        config = tokenizer_config(directory, manifest)
        return cls(read_tokenizer(directory, manifest), config, chat_template(directory, manifest, config))


def checked_prompt(prompt: str) -> str:
    """``prompt`` if it is text: an argument that was not UTF-8 reaches Python with lone surrogates."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(f"--prompt is not valid UTF-8 (undecodable byte at character {exc.start})") from None
    return prompt


def prompt_ids(tokenizer: Tokenizer, directory: Path, prompt: str) -> list[int]:
    """The prompt's ids, with BOS first when the package's tokenizer config asks for it (parity's prompts)."""
    from gemma4_onnx.graphs.manifest import read_manifest

    return _bos(tokenizer, tokenizer_config(directory, read_manifest(directory))) + encode(tokenizer, prompt)


def chat_prompt(text: PackageText, prompt: str, raw: bool = False) -> tuple[list[int], str]:
    """(BOS ids, text): the prompt in the checkpoint's chat template, which brings its own BOS (``raw``, or no
    template: the prompt as given, BOS as the tokenizer config says)."""
    if raw or not prompt or text.template is None:
        return _bos(text.tokenizer, text.config), prompt
    return [], render(text.template, text.config, prompt)


def _bos(tokenizer: Tokenizer, config: dict[str, Any]) -> list[int]:
    bos = tokenizer.token_to_id(special_token(config, "bos_token")) if config.get("add_bos_token", True) else None
    return [] if bos is None else [bos]


def context_length(model: TextModel) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), or None where the manifest has none."""
    value = model.manifest["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def new_token_budget(asked: int, prompt_tokens: int, context: int | None) -> int:
    """How many tokens to generate: ``asked``, at most what the context leaves after the prompt (with a note
    when that is fewer); a prompt that fills the context alone is refused."""
    if context is None:
        return asked
    if prompt_tokens >= context:
        raise UsageError(f"the prompt has {prompt_tokens} tokens, the model's context {context}: shorten it")
    room = context - prompt_tokens
    if asked > room:
        sys.stderr.write(f"note: --max-new-tokens {asked} capped at {room}: the model's context is {context} "
                         f"tokens and the prompt takes {prompt_tokens}\n")
        return room
    return asked


def generate(directory: Path, prompt: str, max_new_tokens: int, stream: bool = True, images: Sequence[Path] = (),
             audio: Sequence[Path] = (), image_budget: int = DEFAULT_IMAGE_BUDGET, raw: bool = False) -> str:
    """``raw``: the prompt as given, without the checkpoint's chat template (which brings its own BOS)."""
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be ≥ 0, got {max_new_tokens}")
    checked_prompt(prompt)
    directory = Path(directory)
    manifest, _ = open_package(directory)  # the gate, before any file of the package is read
    text = PackageText.read(directory, manifest)
    bos, prompt = chat_prompt(text, prompt, raw)
    multimodal = MultimodalModel(directory, checked_manifest=manifest) if images or audio else None
    model = multimodal.text if multimodal else TextModel(directory, checked_manifest=manifest)
    if multimodal:
        cache, logits, max_new_tokens = _media_prefill(multimodal, text.tokenizer, prompt, bos, list(images),
                                                       list(audio), image_budget, max_new_tokens)
    else:
        ids = bos + encode(text.tokenizer, prompt)
        if not ids:
            raise UsageError("the prompt is empty")
        max_new_tokens = new_token_budget(max_new_tokens, len(ids), context_length(model))
        cache = model.empty_cache(1)
        logits = model.forward([ids], cache)
    return _decode_loop(model, text.tokenizer, cache, logits, max_new_tokens, stream)


def _decode_loop(model: TextModel, tokenizer: Tokenizer, cache: Cache, logits: np.ndarray, steps: int,
                 stream: bool) -> str:
    generated: list[int] = []
    printed = ""
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        if token in model.eos_ids:
            break
        generated.append(token)
        text = decode(tokenizer, generated, skip_special_tokens=True)
        if stream and not text.endswith("\ufffd"):  # hold back half of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
        logits = model.forward([[token]], cache)
    text = decode(tokenizer, generated, skip_special_tokens=True)
    if stream:
        sys.stdout.write(text[len(printed):] + "\n")
    return text


def _media_prefill(model: MultimodalModel, tokenizer: Tokenizer, prompt: str, bos: list[int], images: list[Path],
                   audio: list[Path], budget: int, max_new_tokens: int) -> tuple[Cache, np.ndarray, int]:
    """The prompt with its images and audio merged in, run through the decoder once; and the tokens to
    generate after it (``new_token_budget``)."""
    media = media_prompt(model, lambda text: encode(tokenizer, text), bos, prompt, images, audio, budget)
    for note in media.notes:
        sys.stderr.write(f"note: {note}\n")
    steps = new_token_budget(max_new_tokens, len(media.prompt.ids), context_length(model.text))
    cache = model.text.empty_cache(1)
    return cache, model.prefill(media.prompt, media.images, media.audios, cache), steps
