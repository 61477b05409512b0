"""A package's files checked before onnx or onnxruntime reads any of them.

Both libraries document their own external-data checks as best-effort, and onnx's external-data CVEs
(path traversal, symbolic and hard links out of the model directory) show what a hostile package can
do. So every file the manifest lists must be a regular file inside the package, reached without a
link, with one hard link, and with the manifest's size and sha256; every external-data reference in
every graph must name such a file and lie within it; no declared dimension may be absurd. Graphs are
parsed as protobuf only (``load_external_data=False``) to find those references.
"""

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import onnx
from onnx import AttributeProto, GraphProto, TensorProto

from gemma4_onnx.errors import PackageError
from gemma4_onnx.graphs.manifest import MANIFEST, graph_signature, sha256

PRODUCER = "gemma4-onnx"
TOKENIZER = "tokenizer.json"
# What a package carries of its checkpoint besides weights (the chat template only where the checkpoint has one)
SIDE_FILES = ("config.json", "generation_config.json", TOKENIZER, "tokenizer_config.json", "chat_template.jinja")
# Operator domains of every graph gemma4-onnx writes (model-local functions add their own).
OP_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft", "ai.gemma4"})
MAX_FUNCTIONS = 1024
MAX_NODES = 200_000  # nodes of one graph, its functions and subgraphs: an e2b decoder has a few thousand
# Ops whose work a graph can set by itself, not by its inputs' sizes, and that gemma4-onnx never writes
# (it writes Loop: the image-block masks of 26B-A4B/31B, so a Loop's trip count stays unbounded).
UNBOUNDED_OPS = frozenset({"Scan", "SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceAt",
                           "SplitToSequence", "ConcatFromSequence", "RandomNormal", "RandomUniform",
                           "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
TENSOR_TYPES = frozenset(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
MAX_NAME_BYTES = 255  # of one path component: Linux's NAME_MAX
MAX_DIMENSION = 1 << 31  # no Gemma 4 tensor or activation has an axis this long
MAX_GRAPH_BYTES = (1 << 31) - 1  # protobuf's limit: weights of larger graphs must be external
EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}
SUB_BYTE_BITS: dict[int, int] = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}


def _fail(directory: Path, message: str) -> PackageError:
    return PackageError(f"{directory}: {message}")


def check_manifest_shape(directory: Path, manifest: dict[str, Any]) -> None:
    """A runnable package's manifest has the embed and decoder graphs and a text config (types and ranges
    of every field are the schema's, checked when it was read)."""
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not all(isinstance(graphs.get(g), dict) for g in ("embed", "decoder")):
        raise _fail(directory, f"{MANIFEST} has no valid 'graphs' table (embed, decoder)")
    if not isinstance(manifest.get("text_config"), dict):
        raise _fail(directory, f"{MANIFEST} has no 'text_config'")
    layers = manifest["text_config"].get("num_hidden_layers")
    blocks = [block.get("layer") for block in graphs.get("blocks", [])]
    if "blocks" in graphs and blocks != list(range(layers if isinstance(layers, int) else -1)):
        raise _fail(directory, f"{MANIFEST}: graphs.blocks must hold layers 0 to {layers} - 1 in order, one block "
                               "graph each")


def named_files(manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(what, file) for every file the manifest names outside its files table: graphs, their weights files,
    the PLE file and its row tables."""
    for entry in graph_entries(manifest):
        yield "graph", entry["file"]
        if "weights_file" in entry:
            yield f"weights file of graph {entry['file']}", entry["weights_file"]
    ple = manifest.get("ple") or {}
    if "file" in ple:
        yield "per-layer embedding file", ple["file"]
    for table in ple.get("tables", []):
        yield "PLE row table file", table["file"]


def check_named_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names is listed in its files table (and so checked), never merely present;
    a structure-only package lists its graphs but not the data files it never wrote."""
    for what, name in named_files(manifest):
        safe_relative(directory, name, what)
        if name not in manifest["files"] and (what == "graph" or has_weights(manifest)):
            raise _fail(directory, f"{what} {name} is not among the manifest's files")


def graph_entries(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every graph entry of the manifest (embed, decoder, blocks, and any a later stage adds): every object
    under ``graphs`` that names a file."""
    def walk(value: Any) -> Iterator[dict[str, Any]]:
        if isinstance(value, dict):
            if isinstance(value.get("file"), str):
                yield value
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)

    yield from walk(manifest.get("graphs"))


def graph_files(manifest: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(entry["file"] for entry in graph_entries(manifest)))


def graph_dir(file: str) -> str:
    """The package subfolder a graph file lies in ("" at the root): its external data is relative to it."""
    return str(PurePosixPath(file).parent) if "/" in file else ""


def safe_relative(directory: Path, name: str, what: str) -> PurePosixPath:
    """``name`` as a path that cannot leave the package: relative, no ``..``, no backslashes."""
    path = PurePosixPath(name)
    if (not name or not path.parts or "\0" in name or "\\" in name or path.is_absolute() or ".." in path.parts
            or name.startswith("~")):
        raise _fail(directory, f"{what} {name!r} escapes the package directory")
    if any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in path.parts):
        raise _fail(directory, f"{what} {name[:60]!r}…: a name longer than {MAX_NAME_BYTES} bytes (no filesystem "
                               "holds it)")
    return path


def contained_file(directory: Path, relative: PurePosixPath, what: str) -> os.stat_result:
    """lstat of a regular file at ``relative`` inside ``directory``, reached through no symbolic link."""
    root = directory.resolve()
    current = root
    for i, part in enumerate(relative.parts):
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise _fail(directory, f"{what} is missing") from None
        if stat.S_ISLNK(info.st_mode):
            raise _fail(directory, f"{what}: {PurePosixPath(*relative.parts[:i + 1])} is a symbolic link "
                                   "(a package holds plain files only)")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(directory, f"{what} is not a regular file")
    if info.st_nlink > 1:
        raise _fail(directory, f"{what} has {info.st_nlink} hard links (one may lie outside the package)")
    if not current.resolve().is_relative_to(root):
        raise _fail(directory, f"{what} resolves outside the package directory")
    return info


def check_listed_file(directory: Path, name: str, entry: dict[str, Any], manifest: dict[str, Any],
                      checksum: bool = True) -> None:
    ple_file = (manifest.get("ple") or {}).get("file")
    what = f"package file {name}" + (" (the per-layer embedding table)" if name == ple_file else "")
    info = contained_file(directory, safe_relative(directory, name, "manifest entry"), what)
    if info.st_size != entry["bytes"]:
        raise _fail(directory, f"{what} has {info.st_size} bytes, the manifest says {entry['bytes']}")
    if checksum and sha256(directory / name) != entry["sha256"]:
        raise _fail(directory, f"{what}: sha256 differs from the manifest (the file was changed after export)")


def tensor_bytes(tensor: TensorProto) -> int:
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.data_type in SUB_BYTE_BITS:
        return -(-count * SUB_BYTE_BITS[tensor.data_type] // 8)
    if tensor.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return -1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _sparse(tensor: onnx.SparseTensorProto) -> Iterator[TensorProto]:
    yield tensor.values
    yield tensor.indices


def _tensors(graph: GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from _sparse(sparse)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[TensorProto]:
    for attribute in node.attribute:
        if attribute.type == AttributeProto.TENSOR:
            yield attribute.t
        elif attribute.type == AttributeProto.TENSORS:
            yield from attribute.tensors
        elif attribute.type == AttributeProto.SPARSE_TENSOR:
            yield from _sparse(attribute.sparse_tensor)
        elif attribute.type == AttributeProto.SPARSE_TENSORS:
            for sparse in attribute.sparse_tensors:
                yield from _sparse(sparse)
        elif attribute.type == AttributeProto.GRAPH:
            yield from _tensors(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            for g in attribute.graphs:
                yield from _tensors(g)


def model_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from _tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _check_dims(directory: Path, graph_file: str, what: str, dims: list[int]) -> None:
    if any(d < 0 or d > MAX_DIMENSION for d in dims):
        raise _fail(directory, f"{graph_file}: {what} declares dimensions {dims} (negative or above {MAX_DIMENSION})")


def has_weights(manifest: dict[str, Any]) -> bool:
    """False for ``export --structure-only`` packages, whose graphs point into data files never written."""
    return not str(manifest.get("weights", "complete")).startswith("none")


def check_external_tensor(directory: Path, graph_file: str, tensor: TensorProto, manifest: dict[str, Any]) -> None:
    """One external-data reference: a listed, contained file, and bytes within it that fit the tensor."""
    entries = {e.key: e.value for e in tensor.external_data}
    where = f"{graph_file}: tensor {tensor.name}"
    if len(entries) != len(tensor.external_data):
        raise _fail(directory, f"{where}: an external-data key is given twice")
    if unknown := sorted(set(entries) - EXTERNAL_KEYS):
        raise _fail(directory, f"{where}: unknown external-data key(s) {', '.join(unknown)}")
    location = safe_relative(directory, entries.get("location", ""), f"{where}: external-data location")
    relative = (PurePosixPath(graph_file).parent / location).as_posix()
    if not has_weights(manifest):
        return
    if relative not in manifest["files"]:
        raise _fail(directory, f"{where}: external-data file {relative} is not listed in the manifest")
    info = contained_file(directory, PurePosixPath(relative), f"{where}: external-data file {relative}")
    for key in ("offset", "length"):
        if key in entries and not re.fullmatch(r"\d{1,20}", entries[key]):
            raise _fail(directory, f"{where}: external-data {key} {entries[key]!r} is not a byte count")
    needed = tensor_bytes(tensor)
    if needed < 0:
        raise _fail(directory, f"{where}: element type {tensor.data_type} cannot be stored externally")
    offset = int(entries.get("offset", "0"))
    length = int(entries.get("length", str(needed)))
    if length != needed:
        raise _fail(directory, f"{where}: external-data length {length} does not match its shape {list(tensor.dims)} "
                               f"({needed} bytes)")
    if offset + length > info.st_size:
        raise _fail(directory, f"{where}: bytes {offset}..{offset + length} lie beyond the end of {relative} "
                               f"({info.st_size} bytes)")


def _nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """Every node, those of subgraphs (Loop and If bodies) included."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.type == AttributeProto.GRAPH else attribute.graphs:
                yield from _nodes(graph.node)


def call_problem(model: onnx.ModelProto) -> str | None:
    """A node of a domain no gemma4-onnx graph uses (onnxruntime would load no kernel for it, or a custom
    library), or a model-local function that calls itself: what is wrong, or None."""
    if len(model.functions) > MAX_FUNCTIONS:
        return f"{len(model.functions)} local functions (gemma4-onnx writes at most a few dozen)"
    functions = {(f.domain, f.name): f for f in model.functions}
    allowed = OP_DOMAINS | {domain for domain, _ in functions}
    for count, node in enumerate(_nodes([*model.graph.node, *(n for f in model.functions for n in f.node)])):
        if node.domain not in allowed:
            return f"node {node.name[:60]!r} is of domain {node.domain[:60]!r}, which gemma4-onnx never writes"
        if node.domain in ("", "ai.onnx") and node.op_type in UNBOUNDED_OPS:
            return f"node {node.name[:60]!r} is a {node.op_type}, which gemma4-onnx never writes"
        if count >= MAX_NODES:
            return f"more than {MAX_NODES} nodes (gemma4-onnx graphs have a few thousand)"
    calls = {key: {(n.domain, n.op_type) for n in _nodes(f.node)} & set(functions) for key, f in functions.items()}
    done: set[tuple[str, str]] = set()

    def cycle(key: tuple[str, str], path: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
        if key in path:
            return key
        if key in done:
            return None
        found = next((c for callee in calls[key] if (c := cycle(callee, (*path, key)))), None)
        done.add(key)
        return found

    for key in functions:
        if found := cycle(key, ()):
            return f"function {found[0]}::{found[1][:60]} calls itself"
    return None


def check_graph(directory: Path, graph_file: str, manifest: dict[str, Any]) -> onnx.ModelProto:
    """Parse one graph without its data and check every external reference, dimension and its origin."""
    path = directory / graph_file
    if graph_file not in manifest["files"]:
        raise _fail(directory, f"graph {graph_file} is not among the manifest's files")
    size = contained_file(directory, safe_relative(directory, graph_file, "graph"), f"graph {graph_file}").st_size
    if size > MAX_GRAPH_BYTES:
        raise _fail(directory, f"graph {graph_file} has {size} bytes, more than protobuf can hold")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: any of them means not an ONNX graph
        raise _fail(directory, f"graph {graph_file} is not a valid ONNX file ({type(exc).__name__})") from None
    if model.producer_name != PRODUCER:
        raise _fail(directory, f"graph {graph_file} was produced by {model.producer_name or 'an unnamed tool'!r}, "
                               f"not {PRODUCER}")
    if problem := call_problem(model):
        raise _fail(directory, f"graph {graph_file}: {problem}")
    if len(model.training_info):
        raise _fail(directory, f"graph {graph_file} carries training_info, which gemma4-onnx never writes (its "
                               "tensors are outside every check)")
    for tensor in model_tensors(model):
        if tensor.data_type not in TENSOR_TYPES:
            raise _fail(directory, f"{graph_file}: tensor {tensor.name[:120]!r} has data type {tensor.data_type}, "
                                   "which is not an ONNX tensor type")
        _check_dims(directory, graph_file, f"tensor {tensor.name}", list(tensor.dims))
        if tensor.data_location == TensorProto.EXTERNAL:
            check_external_tensor(directory, graph_file, tensor, manifest)
        elif tensor.raw_data and len(tensor.raw_data) != tensor_bytes(tensor):
            raise _fail(directory, f"{graph_file}: tensor {tensor.name} holds {len(tensor.raw_data)} bytes, its shape "
                                   f"{list(tensor.dims)} needs {tensor_bytes(tensor)}")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim if d.HasField("dim_value")]
        _check_dims(directory, graph_file, f"value {value.name}", dims)
    return model


def signature_problems(manifest: dict[str, Any], models: dict[str, onnx.ModelProto]) -> list[str]:
    """Where the graphs disagree with the manifest, with its text config, or with each other."""
    problems = []
    for entry in graph_entries(manifest):
        model = models.get(entry["file"])
        if model is not None and graph_signature(model) != {k: entry.get(k) for k in ("inputs", "outputs")}:
            problems.append(f"graph {entry['file']}: inputs/outputs differ from the manifest's")
    graphs = manifest["graphs"]
    embed, decoder = models.get(graphs["embed"]["file"]), models.get(graphs["decoder"]["file"])
    if embed is None or decoder is None:
        return problems
    embed_out = {v["name"]: v for v in graph_signature(embed)["outputs"]}
    decoder_sig = graph_signature(decoder)
    decoder_in = {v["name"]: v for v in decoder_sig["inputs"]}
    decoder_out = {v["name"]: v for v in decoder_sig["outputs"]}
    text = manifest.get("text_config") or {}
    hidden, vocab = text.get("hidden_size"), text.get("vocab_size")
    if "inputs_embeds" in embed_out and embed_out["inputs_embeds"]["shape"][-1] != hidden:
        problems.append(f"inputs_embeds width {embed_out['inputs_embeds']['shape'][-1]} is not the config's "
                        f"hidden_size {hidden} (a graph of another variant?)")
    if "logits" not in decoder_out or decoder_out["logits"]["shape"][-1] != vocab:
        problems.append(f"decoder logits are not [..., {vocab}] (the config's vocab_size)")
    for name, output in embed_out.items():
        if decoder_in.get(name) != output:
            problems.append(f"embed output {name} {output['shape']} is not a decoder input of that type and shape")
    for layer in manifest.get("cache") or []:
        _, heads, _, dim = layer["shape"]
        for names, table, kind in ((layer["past"], decoder_in, "input"), (layer["present"], decoder_out, "output")):
            for name in names:
                value: dict[str, Any] | None = table.get(name)
                if value is None or len(value["shape"]) != 4 or value["shape"][1::2] != [heads, dim]:
                    problems.append(f"cache tensor {name} of layer {layer['layer']} is not a decoder {kind} "
                                    f"[batch, {heads}, *, {dim}]")
    cached = {n for layer in manifest.get("cache") or [] for n in layer["past"]}
    for name in decoder_in:
        if name.startswith("past.") and name not in cached:
            problems.append(f"decoder input {name} is not in the manifest's cache layout")
    return problems


def tokenizer_problem(path: Path, vocab_size: int) -> str | None:
    """Why ``tokenizer.json`` cannot serve a model with ``vocab_size`` ids, or None (checkpoints too)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception for unreadable files
        return f"{path.name} is not a readable tokenizer ({str(exc).splitlines()[0] if str(exc) else exc!r})"
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        return f"{path.name} has token id {top}, beyond the model's vocab_size {vocab_size}"
    return None


def check_package(directory: Path, manifest: dict[str, Any], checksums: bool = True) -> dict[str, onnx.ModelProto]:
    """Everything above, stopping at the first problem; the parsed graphs (without data) by file. A graph
    entry, weights file or PLE file that the manifest does not list is refused."""
    directory = Path(directory)
    check_manifest_shape(directory, manifest)
    for name, entry in manifest["files"].items():
        check_listed_file(directory, name, entry, manifest, checksums)
    check_named_files(directory, manifest)
    models = {name: check_graph(directory, name, manifest) for name in graph_files(manifest)}
    if problems := signature_problems(manifest, models):
        raise _fail(directory, problems[0])
    vocab = (manifest.get("text_config") or {}).get("vocab_size")
    if TOKENIZER in manifest["files"] and isinstance(vocab, int) and (
            problem := tokenizer_problem(directory / TOKENIZER, vocab)):
        raise _fail(directory, problem)
    return models


def open_package(directory: Path) -> tuple[dict[str, Any], dict[str, onnx.ModelProto]]:
    """The one gate before any file of a package is opened: its manifest, and its graphs parsed without
    data, after every check above passed."""
    from gemma4_onnx.graphs.manifest import read_manifest

    directory = Path(directory)
    manifest = read_manifest(directory)
    return manifest, check_package(directory, manifest)


def open_listed_file(directory: Path, name: str, entry: dict[str, Any]) -> int:
    """A descriptor on the listed file ``name``, opened through no link: the regular file with one link and
    the listed size that ``contained_file`` saw at that name, or a one-line error (it changed meanwhile)."""
    info = contained_file(directory, safe_relative(directory, name, "manifest entry"), f"package file {name}")
    fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW)
    opened = os.fstat(fd)
    if ((opened.st_ino, opened.st_dev) != (info.st_ino, info.st_dev) or not stat.S_ISREG(opened.st_mode)
            or opened.st_nlink != 1 or opened.st_size != entry["bytes"]):
        os.close(fd)
        raise _fail(directory, f"package file {name} changed while it was read")
    return fd


def read_side_file(directory: Path, manifest: dict[str, Any], name: str) -> bytes | None:
    """A side file's bytes (tokenizer, its config, the chat template), or None where the package has none.
    Only a file the manifest lists is read, through no link, and only when it still has the listed sha256;
    a file of that name the manifest does not list is refused, never read."""
    directory = Path(directory)
    entry = manifest["files"].get(name)
    if entry is None:
        if os.path.lexists(directory / name):
            raise _fail(directory, f"file {name} is not listed in the manifest (refused: a package's files are "
                                   "listed with their sha256)")
        return None
    with os.fdopen(open_listed_file(directory, name, entry), "rb") as f:
        data = f.read(entry["bytes"] + 1)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _fail(directory, f"package file {name}: sha256 differs from the manifest (the file was changed after "
                               "export)")
    return data
