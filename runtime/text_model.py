"""An exported text package run by onnxruntime: the embed and decoder sessions and their caches.

Gemma 4's cache is not one tensor per layer: only cache-owning layers have one (E2B: 15 of 35),
sliding layers keep at most W−1 tokens (the decoder trims them itself), full K=V layers keep a single
tensor. The manifest's cache layout says which; this module feeds each ``present`` back as ``past``.
No torch here: numpy and onnxruntime only.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gemma4_onnx.graphs.manifest import IMAGE_BLOCKS, read_manifest
from gemma4_onnx.runtime.checked_session import checked_session
from gemma4_onnx.runtime.package_files import check_package


def session_options(threads: int | None = None, profile_prefix: str | None = None) -> ort.SessionOptions:
    """``profile_prefix``: write onnxruntime's per-node profile (JSON) to files starting with it."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    # onnxruntime's own log lines would break the one-line error: its failures reach the user as exceptions
    options.log_severity_level = 4
    ort.set_default_logger_severity(4)
    return options


@dataclass
class Cache:
    """The past tensors of every cache-owning layer, by decoder input name."""

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0  # tokens seen so far (position of the next token)


class TextModel:
    def __init__(self, directory: str | Path, threads: int | None = None, profile_prefix: str | None = None,
                 checked_manifest: dict[str, Any] | None = None) -> None:
        """``checked_manifest``: the manifest ``open_package`` returned for ``directory`` (the package passed
        the gate already); without it the gate runs here."""
        self.directory = Path(directory)
        if checked_manifest is None:
            self.manifest = read_manifest(self.directory)
            check_files_present(self.directory, self.manifest)
        else:
            self.manifest = checked_manifest
        self.embed = checked_session(self.directory, self.manifest, self.manifest["graphs"]["embed"]["file"],
                                     session_options(threads, profile_prefix and profile_prefix + "embed"))
        self.decoder = checked_session(self.directory, self.manifest, self.manifest["graphs"]["decoder"]["file"],
                                       session_options(threads, profile_prefix and profile_prefix + "decoder"))
        self.cache_layout: list[dict[str, Any]] = self.manifest["cache"]
        self.vocab_size = int(self.manifest["text_config"]["vocab_size"])
        self.eos_ids = _as_list(self.manifest["text_config"].get("eos_token_id"))
        # 26B-A4B/31B: image tokens attend bidirectionally within their image on sliding layers
        self.takes_image_blocks = IMAGE_BLOCKS in {i.name for i in self.decoder.get_overridable_initializers()}

    def end_profiling(self) -> list[str]:
        """Stop profiling (``profile_prefix``) and return the profile files written, embed's then decoder's."""
        return [self.embed.end_profiling(), self.decoder.end_profiling()]

    def empty_cache(self, batch: int) -> Cache:
        tensors = {}
        for layer in self.cache_layout:
            _, heads, _, dim = layer["shape"]
            for name in layer["past"]:
                tensors[name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
        return Cache(tensors)

    def forward(self, input_ids: np.ndarray | list[list[int]], cache: Cache) -> np.ndarray:
        """Logits [B, S, V] for ``input_ids`` [B, S] after ``cache``; the cache advances in place."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        return self.forward_embedded(self.embedded(input_ids), cache)

    def embedded(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """embed.onnx's outputs by name: inputs_embeds, and per_layer_inputs on E-models."""
        names = [o.name for o in self.embed.get_outputs()]
        return dict(zip(names, self.embed.run(names, {"input_ids": input_ids}), strict=True))

    def forward_embedded(self, embedded: dict[str, np.ndarray], cache: Cache,
                         image_blocks: np.ndarray | None = None) -> np.ndarray:
        """``forward`` from embeddings (multimodal prompts merge soft tokens into them first). ``image_blocks``
        [B, S]: each token's image (0, 1, …; −1 for text), used where the decoder takes it."""
        batch, length = embedded["inputs_embeds"].shape[:2]
        feeds = dict(embedded)
        if image_blocks is not None and self.takes_image_blocks:
            feeds[IMAGE_BLOCKS] = np.asarray(image_blocks, dtype=np.int64)
        feeds["position_ids"] = np.broadcast_to(
            np.arange(cache.length, cache.length + length, dtype=np.int64), (batch, length)).copy()
        feeds.update(cache.tensors)
        names = [o.name for o in self.decoder.get_outputs()]
        outputs = dict(zip(names, self.decoder.run(names, feeds), strict=True))
        for layer in self.cache_layout:
            for past, present in zip(layer["past"], layer["present"], strict=True):
                cache.tensors[past] = outputs[present]
        cache.length += length
        return outputs["logits"]

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        """``steps`` greedy tokens after ``prompt``: one prefill, then one decode step per token."""
        cache = self.empty_cache(1)
        logits = self.forward(np.array([prompt]), cache)
        tokens: list[int] = []
        for _ in range(steps):
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            if len(tokens) == steps:
                break
            logits = self.forward(np.array([[token]]), cache)
        return tokens


def check_files_present(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there, whole and unchanged, and every graph's external data is safe
    to read (``package_files``), before onnxruntime reads any of them."""
    check_package(directory, manifest)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
