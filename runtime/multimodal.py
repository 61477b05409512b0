"""Image and audio prompts through a package: placeholder tokens, soft tokens, the merge, generation.

Gemma 4 marks media in the token stream (§1.4, §3.11): an image is ``boi`` + N × ``image`` + ``eoi`` and a
clip is ``boa`` + N × ``audio`` + ``eoa``, N being that item's valid soft-token count. ``embed.onnx``
embeds placeholders as the pad token (its PLE token part too, as the reference does); the host writes the
encoders' soft tokens into those rows in order, then ``ple_context.onnx`` (E-models) recomputes the PLE
context part from the merged rows. The decoder then runs as for text.

Media go where the prompt says ``<|image|>`` / ``<|audio|>`` (in the order given), or, without such
markers, before the text: images first, then audio.

On 26B-A4B and 31B (``use_bidirectional_attention: "vision"``) the soft tokens of one image also attend to
each other on sliding layers: the prefill feeds the decoder ``image_blocks``, each token's image number
(−1 for text), as transformers derives it from ``mm_token_type_ids``. Decode steps leave it at its default.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gemma4_onnx.errors import UsageError
from gemma4_onnx.runtime.audio_features import AudioFeatures
from gemma4_onnx.runtime.checked_session import checked_session
from gemma4_onnx.runtime.image_processing import ImagePatches
from gemma4_onnx.runtime.text_model import Cache, TextModel, session_options

IMAGE_MARK = "<|image|>"
AUDIO_MARK = "<|audio|>"
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3  # transformers' mm_token_type_ids
DEFAULT_IMAGE_BUDGET = 280


@dataclass
class Prompt:
    ids: list[int] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    def add(self, ids: list[int], kind: int = TEXT) -> None:
        self.ids += ids
        self.types += [kind] * len(ids)


def build_prompt(encode: Any, bos: list[int], text: str, token_ids: dict[str, int], images: list[ImagePatches],
                 audios: list[AudioFeatures]) -> Prompt:
    """Token ids and type ids for ``text`` with ``images`` and ``audios`` placed at their markers."""
    pieces = _split(text, len(images), len(audios))
    prompt = Prompt()
    prompt.add(bos)
    image_iter, audio_iter = iter(images), iter(audios)
    for piece in pieces:
        if piece == IMAGE_MARK:
            image = next(image_iter)
            prompt.add([token_ids["boi_token_id"]])
            prompt.add([token_ids["image_token_id"]] * image.soft_tokens, IMAGE)
            prompt.add([token_ids["eoi_token_id"]])
        elif piece == AUDIO_MARK:
            clip = next(audio_iter)
            prompt.add([token_ids["boa_token_id"]])
            prompt.add([token_ids["audio_token_id"]] * clip.soft_tokens, AUDIO)
            prompt.add([token_ids.get("eoa_token_id", token_ids.get("eoa_token_index", 0))])
        elif piece:
            prompt.add(encode(piece))
    return prompt


def image_blocks(types: list[int]) -> np.ndarray:
    """[1, S]: the maximal runs of image (or video) soft tokens numbered 0, 1, …; −1 elsewhere (§3.7)."""
    visual = np.isin(np.asarray(types, dtype=np.int64), (IMAGE, VIDEO))
    starts = visual & ~np.concatenate([[False], visual[:-1]])
    return np.where(visual, np.cumsum(starts) - 1, -1)[None].astype(np.int64)


def _split(text: str, images: int, audios: int) -> list[str]:
    marked_images, marked_audio = text.count(IMAGE_MARK), text.count(AUDIO_MARK)
    if (marked_images, marked_audio) == (0, 0):
        return [IMAGE_MARK] * images + [AUDIO_MARK] * audios + [text]
    if (marked_images, marked_audio) != (images, audios):
        raise UsageError(f"the prompt marks {marked_images} {IMAGE_MARK} and {marked_audio} {AUDIO_MARK}, but "
                         f"{images} image(s) and {audios} audio file(s) were given")
    return re.split(f"({re.escape(IMAGE_MARK)}|{re.escape(AUDIO_MARK)})", text)


class Encoders:
    """A package's vision and audio encoders (and ple_context), each session opened on first use."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.graphs = manifest["graphs"]
        self.threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            entry = self.graphs.get(name)
            if entry is None or not (self.directory / entry["file"]).is_file():
                raise UsageError(f"{self.directory}: the package has no {name} graph (exported before multimodal "
                                 "support, or a model without that tower)")
            self._sessions[name] = checked_session(self.directory, self.manifest, entry["file"],
                                                   session_options(self.threads))
        return self._sessions[name]

    def image_soft_tokens(self, image: ImagePatches) -> np.ndarray:
        """[n, H_text]: the image's valid soft tokens, in order."""
        table = self.graphs["vision_encoder"].get("position_embedding_size")
        if table and int(image.positions.max()) >= table:
            raise UsageError(f"the image's patch grid ({image.size[0]}×{image.size[1]} px) is more than {table} "
                             "patches on a side, this model's position table: use a smaller --image-budget")
        soft, valid = self.session("vision_encoder").run(None, {
            "pixel_values": image.pixel_values[None], "pixel_position_ids": image.positions[None]})
        return soft[0][valid[0]]

    def audio_soft_tokens(self, clip: AudioFeatures) -> np.ndarray:
        soft, valid = self.session("audio_encoder").run(None, {
            "input_features": clip.features, "input_features_mask": clip.mask})
        return soft[0][valid[0]]


class MultimodalModel(Encoders):
    """A package's text model plus its encoders."""

    def __init__(self, directory: str | Path, threads: int | None = None,
                 checked_manifest: dict[str, Any] | None = None) -> None:
        self.text = TextModel(directory, threads, checked_manifest=checked_manifest)
        super().__init__(directory, self.text.manifest, threads)
        self.token_ids: dict[str, int] = self.text.manifest.get("token_ids") or {}

    def embedded(self, prompt: Prompt, images: list[np.ndarray], audios: list[np.ndarray]) -> dict[str, np.ndarray]:
        """embed.onnx's outputs for ``prompt`` with the soft tokens written into the placeholder rows."""
        ids = np.array([prompt.ids], dtype=np.int64)
        embedded = self.text.embedded(ids)
        text_embeds = embedded["inputs_embeds"]
        merged = text_embeds.copy()
        types = np.array(prompt.types)
        for kind, features, what in ((IMAGE, images, "image"), (AUDIO, audios, "audio")):
            rows = np.flatnonzero(types == kind)
            values = np.concatenate(features) if features else np.zeros((0, merged.shape[-1]), np.float32)
            if len(rows) != len(values):
                raise UsageError(f"{len(rows)} {what} placeholders but {len(values)} {what} soft tokens")
            merged[0, rows] = values
        embedded["inputs_embeds"] = merged
        if "per_layer_inputs" in embedded and (images or audios):
            (embedded["per_layer_inputs"],) = self.session("ple_context").run(None, {
                "inputs_embeds": merged, "text_embeds": text_embeds,
                "per_layer_inputs": embedded["per_layer_inputs"]})
        return embedded

    def prefill(self, prompt: Prompt, images: list[np.ndarray], audios: list[np.ndarray], cache: Cache) -> np.ndarray:
        """Logits of the prompt with the soft tokens merged in (and, on 26B-A4B/31B, its image blocks)."""
        return self.text.forward_embedded(self.embedded(prompt, images, audios), cache, image_blocks(prompt.types))

    def greedy(self, prompt: Prompt, images: list[np.ndarray], audios: list[np.ndarray], steps: int,
               stop: list[int] | None = None) -> list[int]:
        """Greedy tokens after a multimodal prompt (at most ``steps``; ends early on a ``stop`` id)."""
        cache = Cache(self.text.empty_cache(1).tensors)
        logits = self.prefill(prompt, images, audios, cache)
        tokens: list[int] = []
        while len(tokens) < steps:
            token = int(np.argmax(logits[0, -1]))
            if stop and token in stop:
                break
            tokens.append(token)
            if len(tokens) < steps:
                logits = self.text.forward([[token]], cache)
        return tokens


@dataclass
class MediaPrompt:
    prompt: Prompt
    images: list[np.ndarray]  # soft tokens per image
    audios: list[np.ndarray]  # soft tokens per clip
    notes: list[str]  # what the user should know (truncated audio)


def media_prompt(model: MultimodalModel, encode: Any, bos: list[int], text: str, image_files: list[Path],
                 audio_files: list[Path], budget: int = DEFAULT_IMAGE_BUDGET) -> MediaPrompt:
    """Read, preprocess and encode the media files, and build the prompt around them."""
    from gemma4_onnx.runtime.audio_features import audio_features
    from gemma4_onnx.runtime.image_processing import image_patches, load_image

    notes = []
    vision = model.graphs.get("vision_encoder") or {}
    if image_files and not vision:
        raise UsageError(f"{model.directory}: this package has no vision encoder")
    if audio_files and "audio_encoder" not in model.graphs:
        raise UsageError(f"{model.directory}: this model reads no audio (only E2B and E4B do)")
    images = [image_patches(load_image(f), budget, vision["patch_size"], vision["pooling_kernel_size"], pad=False)
              for f in image_files]
    clips = [audio_features(f) for f in audio_files]
    notes += [f"{f}: longer than 30 s, only the first 30 s are used" for f, c in zip(audio_files, clips, strict=True)
              if c.truncated]
    prompt = build_prompt(encode, bos, text, model.token_ids, images, clips)
    return MediaPrompt(prompt, [model.image_soft_tokens(i) for i in images],
                       [model.audio_soft_tokens(c) for c in clips], notes)
