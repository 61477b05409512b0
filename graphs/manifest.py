"""``manifest.json``: what a package directory holds, written last, read first.

Every file with its size and sha256, the I/O signature of each graph, the cache layout, where the
per-layer embedding table lives, the variant and source, and the versions of this tool and its
libraries. A directory without a readable manifest is not a package; a file whose checksum differs
from the manifest is not the file that was exported.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx

from gemma4_onnx.errors import UsageError

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


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UsageError(f"{directory} is not a gemma4-onnx package (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a {FORMAT} manifest")
    return manifest
