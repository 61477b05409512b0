"""``gemma4-onnx mobile``: an exported (usually quantized) package → an ONNX Runtime Mobile package.

    embed.ort, decoder.ort    every graph an app runs, inlined and optimized for the target, ORT format
    ple.data                  the per-layer-embedding row file (E-models), never inside a model file
    required_operators_and_types.config   operators + types of all graphs together, for a minimal build
    build.md                  the build command lines that use it
    usability.json / .md      NNAPI / CoreML / XNNPACK partitions per graph; ai.gemma4 functions inlined
    example.py                the generation loop against onnxruntime's plain API
    tokenizer.json, config.json, ...      copied
    manifest.json             files + sha256, graph I/O, cache layout, PLE row tables, tokenizer, recipe
"""

import shutil
import tempfile
from pathlib import Path
from typing import Any

from gemma4_onnx import __version__
from gemma4_onnx.atomic import check_target, publish_dir
from gemma4_onnx.graphs.manifest import graph_signature, read_manifest, write_manifest
from gemma4_onnx.mobile.convert import CONFIG, convert, copy_file, deployed_graphs, prepare
from gemma4_onnx.mobile.operators import build_commands, check_coverage, operator_table
from gemma4_onnx.mobile.usability import function_expansions, graph_usability, write_report
from gemma4_onnx.progress import say
from gemma4_onnx.runtime.package_files import SIDE_FILES, read_side_file
from gemma4_onnx.runtime.text_model import check_files_present

PLACEHOLDER_KEYS = ("image_token_id", "audio_token_id", "video_token_id")
EXAMPLE = "example.py"


def mobile_package(model_dir: Path, out_dir: Path, force: bool = False, target_platform: str = "arm",
                   verbose: bool = False) -> Path:
    source = Path(model_dir)
    manifest = read_manifest(source)
    check_files_present(source, manifest)
    check_target(Path(out_dir), force)
    with publish_dir(Path(out_dir), force=force) as staging, \
            tempfile.TemporaryDirectory(prefix=".mobile-work-", dir=staging.parent) as work_dir:
        work = Path(work_dir)
        prepared = prepare(source, manifest, work)
        say("converting to ORT format")
        ort_files, config = convert(work, staging, target_platform, verbose)
        config.write_text(config.read_text().replace(f"{staging}/", ""))
        check_coverage(config, ort_files)
        say("checking mobile usability")
        usability = {
            "graphs": {graph: {"providers": graph_usability(path),
                               "ort_operators": operator_table([staging / f"{graph}.ort"])[f"{graph}.ort"]}
                       for graph, path in prepared.onnx_files.items()},
            "functions": {graph: function_expansions(source / file)
                          for graph, file in deployed_graphs(manifest).items()},
        }
        json_report, md_report = write_report(staging, usability)
        commands = build_commands(CONFIG)
        (staging / "build.md").write_text(_build_doc(commands))
        ple = manifest.get("ple")
        if ple and prepared.tables:
            copy_file(source / ple["file"], staging / ple["file"])
        for name in SIDE_FILES:
            if (data := read_side_file(source, manifest, name)) is not None:
                (staging / name).write_bytes(data)
        shutil.copyfile(Path(__file__).parent / "example.py", staging / EXAMPLE)
        graphs = {graph: {"file": f"{graph}.ort", **graph_signature(_load_signature(path))}
                  for graph, path in prepared.onnx_files.items()}
        quantization = manifest.get("quantization") or {}
        write_manifest(staging, {
            "tool": {"name": "gemma4-onnx", "version": __version__},
            "libraries": {"onnxruntime": _ort_version()},
            "kind": "mobile",
            "source": {"package": str(source.resolve()), "source": manifest.get("source")},
            "precision": manifest.get("precision"),
            "recipe": quantization.get("recipe"),
            "target": {"format": "ort", "platform": target_platform, "optimization": "all, fixed style"},
            "text_config": manifest["text_config"],
            "token_ids": manifest.get("token_ids", {}),
            "graphs": graphs,
            "cache": manifest["cache"],
            "ple": _ple_entry(manifest, prepared.tables) if prepared.tables else None,
            "tokenizer": {"files": [n for n in SIDE_FILES if (staging / n).is_file() and n.startswith("tokenizer")]},
            "operators": {"config": CONFIG, "build": commands},
            "usability": {"json": json_report.name, "markdown": md_report.name},
            "example": EXAMPLE,
        })
    return Path(out_dir)


def _load_signature(path: Path) -> Any:
    import onnx

    return onnx.load(path, load_external_data=False)


def _ple_entry(manifest: dict[str, Any], tables: list[Any]) -> dict[str, Any]:
    token_ids = manifest.get("token_ids", {})
    return {
        "file": manifest["ple"]["file"],
        "layout": "each table contiguous and row-major at its offset; row r of a table starts at "
                  "offset + r * row_bytes. Feed table[ids] as the graph input named by the table.",
        "remap": {"ids": sorted({int(token_ids[k]) for k in PLACEHOLDER_KEYS if token_ids.get(k) is not None}),
                  "to": int(manifest["text_config"].get("pad_token_id") or 0)},
        "tables": [t.as_dict() for t in tables],
    }


def _build_doc(commands: dict[str, str]) -> str:
    lines = ["# A minimal onnxruntime for this package", "",
             f"`{CONFIG}` lists every operator, and the element types each keeps, that the `.ort` graphs of this "
             "package run. Run from an onnxruntime source checkout of the same version (copy the config there):", ""]
    for platform, command in commands.items():
        lines += [f"{platform}:", "", "```", command, "```", ""]
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
