"""``manifest.json``: what a package directory holds, written last, read first.

Every file with its size and sha256, the I/O signature of each graph, the cache layout, where the
per-layer embedding table lives, the variant and source, and the versions of this tool and its
libraries. A directory without a readable manifest is not a package; a file whose checksum differs
from the manifest is not the file that was exported.
"""

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import onnx

from gemma4_onnx.errors import PackageError, UsageError
from gemma4_onnx.schema import (
    SchemaError,
    boolean,
    either,
    integer,
    list_of,
    loads_json,
    mapping_of,
    nullable,
    record,
    string,
)

MANIFEST = "manifest.json"
FORMAT = "gemma4-onnx/1"
HASH_CHUNK = 1 << 24
# The decoder input of 26B-A4B/31B ([B, S] int64: each token's image block, −1 for text); it defaults to [[-1]].
IMAGE_BLOCKS = "image_blocks"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def graph_signature(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(values: Any) -> list[dict[str, Any]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value if (d.dim_param or d.HasField("dim_value")) else None
                    for d in tensor.shape.dim]
            out.append({"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def write_manifest(directory: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (checksums of everything already in ``directory``); call it last."""
    manifest = {"format": FORMAT, **content, "files": file_table(directory)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


MAX_MANIFEST_BYTES = 64 << 20  # a 60-layer package's manifest is ~0.5 MB
PATH = r"[^\x00\\]{1,1024}"
VALUE = record({"name": string(max_length=1024), "dtype": string(max_length=64),
                "shape": list_of(nullable(either(integer(0), string(max_length=256))), max_length=64)})
GRAPH = record({"file": string(PATH)}, {
    "inputs": list_of(VALUE, max_length=4096), "outputs": list_of(VALUE, max_length=4096),
    "weights_file": string(PATH), "layer": integer(0, 1 << 16),
    "patch_size": integer(1, 1 << 12), "pooling_kernel_size": integer(1, 1 << 12),
    "position_embedding_size": integer(1, 1 << 20), "soft_token_budgets": list_of(integer(1, 1 << 20), max_length=64),
    "mel_bins": integer(1, 1 << 12), "frame_multiple": integer(1, 1 << 12)})
BLOCKS = list_of(GRAPH, max_length=1 << 12)
TOKEN_ID = integer(0, (1 << 31) - 1)
SCHEMA = record({
    "format": string(choices=(FORMAT,)),
    "files": mapping_of(record({"bytes": integer(0, 1 << 50), "sha256": string(r"[0-9a-f]{64}")}),
                        key_pattern=PATH, max_length=1 << 17),
}, {
    "kind": string(max_length=64),
    "weights": string(max_length=256),
    "graphs": mapping_of(lambda value, where: (BLOCKS if where == "graphs.blocks" else GRAPH)(value, where),
                         max_length=64),
    "cache": list_of(record({"layer": integer(0, 1 << 16), "past": list_of(string(max_length=256), 1, 2),
                             "present": list_of(string(max_length=256), 1, 2),
                             "shape": list_of(nullable(either(integer(0), string(max_length=256))), 4, 4)},
                            {"max_length": nullable(integer(0)), "k_eq_v": boolean,
                             "attention": string(choices=("sliding", "full"))}), max_length=1 << 12),
    "text_config": record({"vocab_size": integer(1, 1 << 24), "hidden_size": integer(1, 1 << 20)}, {
        "eos_token_id": nullable(either(TOKEN_ID, list_of(TOKEN_ID, max_length=64))),
        "pad_token_id": nullable(TOKEN_ID), "bos_token_id": nullable(TOKEN_ID),
        "max_position_embeddings": integer(1, 1 << 24)}),
    "token_ids": mapping_of(nullable(TOKEN_ID), max_length=256),
    "ple": nullable(record({"file": string(PATH)}, {"tensor": string(max_length=1024), "tables": list_of(record(
        {"offset": integer(0, 1 << 50), "rows": integer(0, 1 << 32), "row_bytes": integer(0, 1 << 32),
         "file": string(PATH)}), max_length=1 << 12)})),
    "quantization": nullable(mapping_of(lambda value, where: None)),
    "precision": nullable(string(max_length=256)),
})


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest, read without following a link and checked against its schema (types and ranges)."""
    path = Path(directory) / MANIFEST
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise UsageError(f"{directory} is not a gemma4-onnx package (no {MANIFEST})") from None
    if stat.S_ISLNK(info.st_mode):
        raise PackageError(f"{directory}: {MANIFEST} is a symbolic link (a package holds plain files only)")
    if not stat.S_ISREG(info.st_mode):
        raise PackageError(f"{directory}: {MANIFEST} is not a regular file")
    if info.st_nlink > 1:
        raise PackageError(f"{directory}: {MANIFEST} has {info.st_nlink} hard links (one may lie outside the package)")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{directory}: {MANIFEST} has {info.st_size} bytes (at most {MAX_MANIFEST_BYTES})")
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        manifest = loads_json(raw)
    except ValueError as exc:
        raise UsageError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a {FORMAT} manifest")
    try:
        SCHEMA(manifest, "")
    except SchemaError as exc:
        raise PackageError(f"{path}: {exc}") from None
    return manifest
