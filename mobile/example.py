"""The generation loop an app runs on a gemma4-onnx mobile package, against onnxruntime's plain API.

This file is copied into every mobile package as ``example.py`` and needs only numpy and onnxruntime
(``tokenizers`` for ``--prompt``). What an app must do, in order:

1. Read ``manifest.json``: the graph files, the cache layout, the PLE row tables.
2. Embed: gather the per-layer-embedding rows of the ids from ``ple.data`` (memory-mapped: only the rows
   of the tokens in use are read) and feed them, with ``input_ids``, to ``embed.ort``.
3. Decode: feed ``inputs_embeds`` (+ ``per_layer_inputs``), explicit ``position_ids`` and every
   ``past.*`` tensor to ``decoder.ort``; it returns ``logits`` and ``present.*``.
4. Cache update: each ``present`` becomes the next step's ``past`` as it is. Only cache-owning layers
   have one; sliding layers come back trimmed to the window, K=V layers as one ``past.N.key_value``.

Prefill is step 2-4 on the whole prompt; each decode step is the same on one token.

    python example.py PACKAGE_DIR --ids 2,100,101 --steps 16
"""

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class MobilePackage:
    def __init__(self, directory: str | Path, threads: int = 0) -> None:
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = json.loads((self.directory / "manifest.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        graphs = self.manifest["graphs"]
        self.embed = ort.InferenceSession(str(self.directory / graphs["embed"]["file"]), options,
                                          providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(self.directory / graphs["decoder"]["file"]), options,
                                            providers=["CPUExecutionProvider"])
        ple = self.manifest.get("ple") or {}
        self.tables = {t["input"]: np.memmap(self.directory / t["file"], dtype=t["dtype"], mode="r",
                                             offset=t["offset"], shape=(t["rows"], *t["row_shape"]))
                       for t in ple.get("tables", [])}
        remap = ple.get("remap") or {}
        self.placeholders = np.array(remap.get("ids", []), dtype=np.int64)
        self.pad_id = int(remap.get("to") or 0)
        self.outputs = [o.name for o in self.decoder.get_outputs()]

    def ple_rows(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of each PLE table for ``input_ids`` [B, S]: placeholder ids read the pad row."""
        ids = np.where(np.isin(input_ids, self.placeholders), self.pad_id, input_ids)
        return {name: np.asarray(table[ids]) for name, table in self.tables.items()}

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        cache = {}
        for layer in self.manifest["cache"]:
            _, heads, _, dim = layer["shape"]
            for name in layer["past"]:
                cache[name] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
        return cache

    def step(self, input_ids: np.ndarray, cache: dict[str, np.ndarray], position: int) -> np.ndarray:
        """Logits [B, S, V] of ``input_ids`` [B, S] placed at ``position``; ``cache`` is updated in place."""
        embedded = self.embed.run(None, {"input_ids": input_ids, **self.ple_rows(input_ids)})
        batch, length = input_ids.shape
        feeds = {"inputs_embeds": embedded[0]}
        if len(embedded) > 1:
            feeds["per_layer_inputs"] = embedded[1]
        feeds["position_ids"] = np.tile(np.arange(position, position + length, dtype=np.int64), (batch, 1))
        outputs = dict(zip(self.outputs, self.decoder.run(self.outputs, {**feeds, **cache}), strict=True))
        for layer in self.manifest["cache"]:
            for past, present in zip(layer["past"], layer["present"], strict=True):
                cache[past] = outputs[present]
        return outputs["logits"]

    def greedy(self, prompt: list[int], steps: int, stop_at_eos: bool = False) -> list[int]:
        eos = self.manifest["text_config"].get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        cache = self.empty_cache()
        logits = self.step(np.array([prompt], dtype=np.int64), cache, 0)
        position = len(prompt)
        tokens: list[int] = []
        while len(tokens) < steps:
            token = int(np.argmax(logits[0, -1]))
            if stop_at_eos and token in eos_ids:
                break
            tokens.append(token)
            if len(tokens) < steps:
                logits = self.step(np.array([[token]], dtype=np.int64), cache, position)
                position += 1
        return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--ids", help="comma-separated prompt token ids")
    parser.add_argument("--prompt", help="prompt text (needs the tokenizers package)")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    package = MobilePackage(args.package)
    if args.prompt is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(args.package) / "tokenizer.json"))
        ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    else:
        tokenizer = None
        ids = [int(i) for i in (args.ids or "2").split(",")]
    tokens = package.greedy(ids, args.steps, stop_at_eos=True)
    print(tokenizer.decode(tokens) if tokenizer else ",".join(map(str, tokens)))


if __name__ == "__main__":
    main()
