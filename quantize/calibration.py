"""Calibration statistics for GPTQ: H = Σ xᵀx of the input x of every linear layer, collected by carrying
calibration text through the float model one decoder block at a time (``BlockWalk``), so only one layer's
weights are ever in memory and any variant size calibrates.

MoE experts get one H per expert, over the tokens routed to it, each token weighted by the square of
its routing weight (the factor the expert's output error reaches the layer output with): the
TopKMoE inputs are exposed, routed again by the op's reference, and the down projection's inputs
recomputed from the float gate/up weights.

The tied LM head's H comes from a last step through the decoder's head (final norm), after every block.
"""

import codecs
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tokenizers import Tokenizer

from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import LayerSpec, text_geometry
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.quantize.experts import DOWN, GATE_UP, is_topk_moe
from gemma4_onnx.quantize.float_tensors import FloatTensors
from gemma4_onnx.quantize.graph_session import WeightFedSession, subgraph
from gemma4_onnx.runtime.checked_session import checked_graph
from gemma4_onnx.runtime.package_files import graph_dir
from gemma4_onnx.runtime.tokenizer import encode, read_tokenizer
from gemma4_onnx.user_files import regular_file

WINDOW = 512
CARRIED = ("hidden_states_out", "published_key", "published_value")  # what a block hands on (``advance``)
MAX_TOKENS = 16384
MIN_ROUTED_PER_INPUT = 0.0  # an expert routed fewer tokens than this × its input width is rounded to nearest
SEQUENTIAL = False  # each block calibrated on the outputs of the blocks before it as quantized (docs/quantization.md)
FEW_ROUTED_DAMPING = 1.0  # an expert's H diagonal grows by this × K / (its routed tokens) (docs/quantization.md)
FEW_ROUTED_PRIOR = 0.0  # gate/up experts: H gains this × K tokens of the layer's whole input instead (0: off)
READ_CHUNK = 1 << 16  # bytes of calibration text read first (~16k tokens of code)
TOKENS_MARGIN = 64  # tokens read past the limit, so the last kept ones are those of the whole file
HEAD_WEIGHT = "model.language_model.embed_tokens.weight"
Hessians = dict[str, "np.ndarray | ExpertHessians"]  # weight name → H (an [E, K, K] stack for MoE experts)


def linear_inputs(model: onnx.ModelProto, weights: set[str]) -> dict[str, str]:
    """weight name → the activation its MatMul multiplies (through ``Transpose(weight)``)."""
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in weights}
    return {transposed[n.input[1]]: n.input[0] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in transposed}


def token_limit(asked: int | None) -> int:
    """``--calibration-tokens``: the default, or a positive count."""
    if asked is None:
        return MAX_TOKENS
    if asked < 1:
        raise UsageError(f"--calibration-tokens must be ≥ 1, got {asked}")
    return asked


def package_tokenizer(package: Path) -> Tokenizer:
    return read_tokenizer(package, read_manifest(package))


def calibration_tokens(package: Path, text: str, limit: int = MAX_TOKENS) -> list[int]:
    return encode(package_tokenizer(package), text, package)[:limit]


def check_calibration_file(path: Path, option: str = "--calibration") -> None:
    """A text file given as ``option``: an existing regular file (a directory or a pipe is refused before any
    work)."""
    regular_file(path, option)


def calibration_file_text(path: Path, package: Path, limit: int) -> str:
    """The start of the calibration file that gives ``limit`` tokens (and ``TOKENS_MARGIN`` more, so that
    the cut cannot change the first ``limit``), or all of it: read in growing chunks and tokenized as it
    grows, so a large file is neither read nor tokenized whole. The text must be UTF-8: a file in another
    encoding is refused with the offset of its first undecodable byte rather than calibrated on
    replacement characters."""
    return text_prefix(path, package_tokenizer(package), limit)


def text_prefix(path: Path, tokenizer: Tokenizer, limit: int, option: str = "--calibration") -> str:
    """``calibration_file_text`` with a loaded tokenizer, for any text file a verb takes as ``option``."""
    check_calibration_file(path, option)
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, offset, chunk = "", 0, READ_CHUNK
    try:
        with path.open("rb") as f:
            while data := f.read(chunk):
                text += _decoded(decoder, data, offset, path, option)
                offset += len(data)
                if len(encode(tokenizer, text, path)) >= limit + TOKENS_MARGIN:
                    return text
                chunk = max(chunk, offset)  # the text read doubles each time: tokenizing costs ≤ 2x the text kept
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be read ({exc.strerror})") from None
    return text + _decoded(decoder, b"", offset, path, option, final=True)


def _decoded(decoder: codecs.IncrementalDecoder, data: bytes, offset: int, path: Path, option: str,
             final: bool = False) -> str:
    """``data`` (at byte ``offset`` of the file) decoded after what the decoder holds of a split character."""
    pending = len(decoder.getstate()[0])
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path} is not UTF-8 text (undecodable byte at offset "
                         f"{offset - pending + exc.start}); convert it, e.g. with iconv") from None


class BlockWalk:
    """Calibration windows carried through the decoder one block at a time, in layer order. Each block runs
    on its float weights fed as inputs, so the graph and kernels are the same whichever source (a float
    package, or an export in progress) the weights come from."""

    def __init__(self, root: Path, manifest: dict[str, Any], tensors: FloatTensors, tokens: list[int]) -> None:
        self.root = root
        self.manifest = manifest
        self.tensors = tensors
        self.geometry = text_geometry(manifest["text_config"])
        if not tokens:
            raise UsageError("the calibration text gives no tokens")
        windows = [tokens[start:start + WINDOW] for start in range(0, len(tokens), WINDOW)]
        embedded = embedded_windows(root, manifest, tensors, windows)
        self.hidden = [e["inputs_embeds"] for e in embedded]
        self.per_layer = [e.get("per_layer_inputs") for e in embedded]
        self.published: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.next_layer = 0

    def block(self, spec: LayerSpec) -> WeightFedSession:
        entry = next(b for b in self.manifest["graphs"]["blocks"] if b["layer"] == spec.index)
        model = checked_graph(self.root, self.manifest, entry["file"])
        return WeightFedSession(model, self.tensors, graph_dir(entry["file"]))

    def feeds(self, spec: LayerSpec, window: int) -> dict[str, np.ndarray]:
        hidden = self.hidden[window]
        feeds = {"hidden_states": hidden, "position_ids": np.arange(hidden.shape[1], dtype=np.int64)[None]}
        per_layer = self.per_layer[window]
        if per_layer is not None:
            feeds["per_layer_input"] = np.ascontiguousarray(per_layer[:, :, spec.index])
        if spec.owns_cache:
            for part in spec.cache_parts:
                feeds[f"past_{part}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        else:
            assert spec.kv_producer is not None
            feeds["shared_key"], feeds["shared_value"] = self.published[spec.kv_producer][window]
        return feeds

    def advance(self, spec: LayerSpec, outputs: list[dict[str, np.ndarray]]) -> None:
        """The block's float outputs become the next block's inputs."""
        assert spec.index == self.next_layer, f"blocks are walked in order: {spec.index} after {self.next_layer - 1}"
        self.hidden = [o["hidden_states_out"] for o in outputs]
        if spec.kv_mode == "store":
            self.published[spec.index] = [(o["published_key"], o["published_value"]) for o in outputs]
        self.next_layer += 1

    def windows(self) -> range:
        return range(len(self.hidden))


def embedded_windows(root: Path, manifest: dict[str, Any], tensors: FloatTensors,
                     windows: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """embed.onnx's outputs for each window, computed with only the table rows the windows use (full-size
    E2B's token and PLE tables are 1.6 and 9.4 GB in fp32). Ids are renumbered densely for the cut tables,
    skipping the multimodal placeholder ids the graph would replace by pad (text never holds them: they
    are replaced here first, as the graph does)."""
    model = checked_graph(root, manifest, manifest["graphs"]["embed"]["file"])
    token_ids = manifest.get("token_ids") or {}
    placeholders = {int(v) for k, v in token_ids.items() if k in ("image_token_id", "audio_token_id",
                                                                  "video_token_id") and v is not None}
    pad = int(manifest["text_config"].get("pad_token_id") or 0)
    text_ids = [np.where(np.isin(w, list(placeholders)), pad, w) for w in map(np.array, windows)]
    used = np.unique(np.concatenate(text_ids))
    dense = []
    code = 0
    for _ in used:
        while code in placeholders:
            code += 1
        dense.append(code)
        code += 1
    renumber = dict(zip(used.tolist(), dense, strict=True))
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and _int_attribute(n, "axis", 0) == 0}
    session = WeightFedSession(model, tensors, "", cut_tables={t: (used, np.array(dense)) for t in tables})
    names = [o.name for o in model.graph.output]
    out = []
    for ids in text_ids:
        dense_ids = np.array([[renumber[int(i)] for i in ids]], dtype=np.int64)
        out.append(dict(zip(names, session.run(names, {"input_ids": dense_ids}), strict=True)))
    return out


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def walk_key(calibrated: set[str], tokens: int, plan: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a kept ``HessianWalk``'s statistics depend on: with ``SEQUENTIAL``, the whole plan too."""
    return frozenset(calibrated), tokens, json.dumps(plan, sort_keys=True) if SEQUENTIAL else None


class HessianWalk:
    """Σ xᵀx per linear weight, one block at a time (``layer`` in layer order, then ``head``). Without
    ``keep`` each H is the quantizer's to spend; with it, results stay, read-only, for a later recipe on the
    same package (small packages only: they are [K, K] float32)."""

    def __init__(self, root: Path, manifest: dict[str, Any], tensors: FloatTensors, weights: set[str],
                 text: str, tokens: int = MAX_TOKENS, keep: bool = False) -> None:
        self.weights = weights
        self.walk = BlockWalk(root, manifest, tensors, calibration_tokens(root, text, tokens))
        self.keep = keep
        self.done: dict[int | str, Hessians] = {}
        self.pending: tuple[LayerSpec, WeightFedSession, list[dict[str, np.ndarray]]] | None = None
        self.sequential = SEQUENTIAL

    def layer(self, spec: LayerSpec) -> Hessians:
        if spec.index in self.done:
            return self.done[spec.index]
        block = self.walk.block(spec)
        inputs = linear_inputs(block.model, self.weights)
        moe = [ExpertStatistics(node, block.weights) for node in block.model.graph.node
               if is_topk_moe(node) and {node.input[GATE_UP], node.input[DOWN]} & self.weights]
        activations = sorted(set(inputs.values()) | {name for layer in moe for name in layer.inputs})
        block.expose(activations)
        gram = GramSums()
        outputs = []
        for window in self.walk.windows():
            values = block.run_all(self.walk.feeds(spec, window))
            for name in set(inputs.values()):
                gram.add(name, values[name])
            for layer in moe:
                layer.add(*(values[name] for name in layer.inputs))
            outputs.append({k: v for k, v in values.items() if k in CARRIED})
        self.pending = (spec, block, outputs)
        if not self.sequential:
            self.advance({})
        sums = gram.result()
        readers = Counter(inputs.values())  # q/k/v and gate/up read one activation: their H is not spent
        _read_only({a: h for a, h in sums.items() if readers[a] > 1})
        hessians: Hessians = {weight: sums[activation] for weight, activation in inputs.items()}
        for layer in moe:
            hessians.update(layer.hessians())
        if self.keep:
            self.done[spec.index] = _read_only(hessians)
        return hessians

    def advance(self, quantized: dict[str, np.ndarray]) -> None:
        """The block whose H ``layer`` gave hands its outputs on, computed with ``quantized`` (weight name →
        its quantized values, dequantized) standing in for those float weights; with ``SEQUENTIAL`` the
        next block's statistics are then those of the inputs the quantized model gives it."""
        if self.pending is None:
            return
        spec, block, outputs = self.pending
        self.pending = None
        if quantized:
            outputs = [{k: v for k, v in block.run_all(self.walk.feeds(spec, window), quantized).items()
                        if k in CARRIED} for window in self.walk.windows()]
        self.walk.advance(spec, outputs)

    def head(self) -> Hessians:
        """H of the tied LM head: the decoder's head (final norm) run on the last block's outputs."""
        if "head" in self.done:
            return self.done["head"]
        if HEAD_WEIGHT not in self.weights:
            return {}
        assert self.walk.next_layer == self.walk.geometry.num_layers, "the head comes after every block"
        manifest = self.walk.manifest
        decoder = onnx.load(self.walk.root / manifest["graphs"]["decoder"]["file"], load_external_data=False)
        last = f"hidden_states.{self.walk.geometry.num_layers}"
        activation = linear_inputs(decoder, {HEAD_WEIGHT})[HEAD_WEIGHT]
        session = WeightFedSession(subgraph(decoder, [last], [activation]), self.walk.tensors, "")
        gram = GramSums()
        for hidden in self.walk.hidden:
            (x,) = session.run([activation], {last: hidden})
            gram.add(HEAD_WEIGHT, x)
        hessians: Hessians = dict(gram.result())
        if self.keep:
            self.done["head"] = _read_only(hessians)
        return hessians


def _read_only(hessians: Hessians) -> Hessians:
    """Kept H are not spent by GPTQ, which factorizes a writable H in its own memory."""
    for h in hessians.values():
        if isinstance(h, np.ndarray):
            h.flags.writeable = False
    return hessians


class GramSums:
    """Σ xᵀx per activation name over x's rows, in float32 and in place (GPTQ factorizes in float32; E2B's
    double-wide down_proj H alone is 12288² values, 0.6 GB: no temporary product of that size). Above
    ``2 · PANEL`` columns only the upper panels are multiplied (about half the products: E4B's down_proj
    input, 10240 wide, costs 2·T·K² = 0.9 TFLOP per layer at 4096 tokens when computed whole), and the
    lower triangle is copied from them in ``result``."""

    PANEL = 512

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        import torch

        rows = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32))
        k = rows.shape[1]
        if name not in self.sums:
            self.sums[name] = np.zeros((k, k), np.float32)
        h = torch.from_numpy(self.sums[name])
        if k <= 2 * self.PANEL:
            h.addmm_(rows.T, rows)
            return
        for start in range(0, k, self.PANEL):
            h[start:start + self.PANEL, start:].addmm_(rows[:, start:start + self.PANEL].T, rows[:, start:])

    def result(self) -> dict[str, np.ndarray]:
        for h in self.sums.values():
            if h.shape[0] > 2 * self.PANEL:
                for start in range(0, h.shape[0], self.PANEL):
                    end = start + self.PANEL
                    h[end:, start:end] = h[start:end, end:].T
        return self.sums


class ExpertHessians:
    """H per expert of one TopKMoE weight: Σ (w·x)ᵀ(w·x) over the (token, expert) pairs routed to it, with
    x = ``rows[pair_row]``. Built when asked, a few experts at a time (``quantize_experts``): the whole
    [E, K, K] stack of 26B-A4B's gate/up statistics would be 128 × 2816² floats, 4 GB per layer."""

    def __init__(self, rows: np.ndarray, pair_row: np.ndarray, expert: np.ndarray, weight: np.ndarray,
                 shared_rows: bool = False) -> None:
        """``shared_rows``: every expert reads the same ``rows`` (the gate/up input), whose statistics over all
        tokens then stand in for the directions an expert saw too few tokens of (``FEW_ROUTED_PRIOR``)."""
        self.rows, self.pair_row, self.expert, self.weight = rows, pair_row, expert, weight
        self.prior: np.ndarray | None = None
        if shared_rows and FEW_ROUTED_PRIOR:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
            self.prior = (x.T @ x).numpy() / max(len(rows), 1)
        self.routed = np.bincount(expert[weight != 0], minlength=int(expert.max(initial=0)) + 1)
        enough = MIN_ROUTED_PER_INPUT * rows.shape[-1]
        self.reached = [int(e) for e in np.nonzero(self.routed)[0] if self.routed[e] >= enough]

    def __getitem__(self, experts: list[int]) -> np.ndarray:
        import torch

        k = self.rows.shape[-1]
        out = np.empty((len(experts), k, k), np.float32)
        for i, expert in enumerate(experts):
            pairs = np.nonzero(self.expert == expert)[0]
            x = torch.from_numpy(self.rows[self.pair_row[pairs]] * self.weight[pairs, None])
            torch.mm(x.T, x, out=torch.from_numpy(out[i]))
            routed = max(int(self.routed[expert]), 1)
            if self.prior is not None:  # FEW_ROUTED_PRIOR × K tokens of the whole input, at this expert's weights
                out[i] += self.prior * (FEW_ROUTED_PRIOR * k * float(np.mean(self.weight[pairs] ** 2)))
            elif FEW_ROUTED_DAMPING:  # an expert that saw few tokens: its H leans toward its own diagonal
                h = out[i].reshape(-1)
                h[::k + 1] *= 1 + FEW_ROUTED_DAMPING * k / routed
        return out


class ExpertStatistics:
    """The routed inputs of one TopKMoE node: its gate/up input z and down input gelu(g)·u per (token,
    expert) pair, kept in float32 over the calibration windows; ``hessians`` turns them into per-expert H."""

    def __init__(self, node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> None:
        import torch

        self.inputs = (node.input[0], node.input[1])
        self.names = (node.input[GATE_UP], node.input[DOWN])
        scale, proj, per_expert_scale = (torch.from_numpy(arrays[name].astype(np.float32))
                                         for name in node.input[2:GATE_UP])
        self.router = (scale, proj, per_expert_scale)
        self.gate_up = arrays[self.names[0]]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.top_k, self.eps = int(attributes["top_k"]), float(attributes["eps"])
        self.z: list[np.ndarray] = []
        self.activated: list[np.ndarray] = []
        self.expert: list[np.ndarray] = []
        self.weight: list[np.ndarray] = []

    def add(self, hidden_states: np.ndarray, experts_input: np.ndarray) -> None:
        import torch

        from gemma4_onnx.graphs.topk_moe import route

        hidden = experts_input.shape[-1]
        r = torch.from_numpy(hidden_states.reshape(-1, hidden).astype(np.float32))
        z = np.ascontiguousarray(experts_input.reshape(-1, hidden), dtype=np.float32)
        weights, index = (t.numpy() for t in route(r, *self.router, self.top_k, self.eps))
        activated = np.empty((*index.shape, self.gate_up.shape[1] // 2), np.float32)
        for expert in np.unique(index):
            token, slot = np.nonzero(index == expert)
            projection = torch.from_numpy(z[token]) @ torch.from_numpy(np.asarray(self.gate_up[expert], np.float32)).T
            gate, up = projection.numpy().reshape(len(token), 2, -1).transpose(1, 0, 2)
            activated[token, slot] = gelu_tanh(gate) * up
        self.z.append(z)
        self.activated.append(activated.reshape(-1, activated.shape[-1]))
        self.expert.append(index.reshape(-1))
        self.weight.append(weights.reshape(-1).astype(np.float32))

    def hessians(self) -> dict[str, ExpertHessians]:
        expert, weight = np.concatenate(self.expert), np.concatenate(self.weight)
        token = np.arange(len(expert)) // self.top_k
        gate_up = ExpertHessians(np.concatenate(self.z), token, expert, weight, shared_rows=True)
        down = ExpertHessians(np.concatenate(self.activated), np.arange(len(expert)), expert, weight)
        return dict(zip(self.names, (gate_up, down), strict=True))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
