"""``gemma4-onnx verify MODEL_DIR``: is this directory a complete, unchanged, loadable package?

Checks, in order (a later check that would make onnx or onnxruntime read files runs only when the
safety checks before it passed):

    manifest        manifest.json is readable and has its tables
    files           every listed file: inside the package, no links, size and sha256 as listed;
                    no file that the manifest does not list
    external_data   every graph's external references: listed files, offsets and lengths in bounds,
                    no absurd dimensions, graphs made by gemma4-onnx
    onnx_checker    onnx.checker full check (with shape inference) of every graph
    sessions        onnxruntime creates a session for every graph, with the manifest's inputs and outputs
    signatures      graphs agree with the manifest, embed outputs feed the decoder, cache layout matches
    tokenizer       tokenizer.json (where the package has one) has no id beyond the vocabulary

No torch: this runs where the package is deployed.
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from gemma4_onnx.atomic import write_file
from gemma4_onnx.errors import Gemma4OnnxError, UsageError
from gemma4_onnx.graphs.manifest import MANIFEST, read_manifest
from gemma4_onnx.runtime.package_files import (
    TOKENIZER,
    check_graph,
    check_listed_file,
    check_manifest_shape,
    check_named_files,
    graph_entries,
    graph_files,
    has_weights,
    signature_problems,
    tokenizer_problem,
)

REPORT_FORMAT = "gemma4-onnx-verify/1"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _collect(problems: list[str], action: Callable[[], Any]) -> Any:
    try:
        return action()
    except Gemma4OnnxError as exc:
        problems.append(str(exc))
    return None


def unlisted_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    listed = set(manifest["files"]) | {MANIFEST}
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(directory).as_posix() not in listed)


def _check_files(directory: Path, manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name, entry in manifest["files"].items():
        _collect(problems, functools.partial(check_listed_file, directory, name, entry, manifest))
    _collect(problems, functools.partial(check_named_files, directory, manifest))
    problems += [f"{directory}: file {name} is not listed in the manifest" for name in unlisted_files(directory,
                                                                                                     manifest)]
    return problems


def _run_checker(directory: Path, files: list[str], models: dict[str, onnx.ModelProto], weights: bool) -> list[str]:
    problems = []
    for name in files:
        try:  # by path, so the checker also sees the external data; without weights, the parsed graph
            onnx.checker.check_model(str(directory / name) if weights else _weights_as_inputs(models[name]),
                                     full_check=True)
        except Exception as exc:  # the checker's ValidationError, shape inference errors: all are findings
            problems.append(f"{name}: {_one_line(exc)}")
    return problems


def _weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A structure-only graph for the checker: its external initializers, whose files the package does not
    have, as graph inputs of the same type and shape."""
    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    graph = checked.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inputs = {i.name for i in graph.input}
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in external if t.name not in inputs)
    kept = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return checked


def ort_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The graphs of a mobile package: ORT-format files (flatbuffers, not ONNX protobuf)."""
    return [e for e in manifest["graphs"].values() if isinstance(e, dict) and str(e.get("file", "")).endswith(".ort")]


def _run_sessions(directory: Path, manifest: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    from gemma4_onnx.runtime.checked_session import checked_session
    from gemma4_onnx.runtime.text_model import session_options

    problems = []
    for entry in entries:
        try:
            session = checked_session(directory, manifest, entry["file"], session_options())
        except Exception as exc:  # onnxruntime raises its own exception types for every load failure
            problems.append(f"{entry['file']}: onnxruntime cannot create a session ({_one_line(exc)})")
            continue
        # an input with a default value (26B/31B's image_blocks) is listed by onnxruntime as an initializer
        inputs = [*session.get_inputs(), *session.get_overridable_initializers()]
        for kind, values in (("inputs", inputs), ("outputs", session.get_outputs())):
            names = sorted(v.name for v in values)
            if names != sorted(v["name"] for v in entry.get(kind, [])):
                problems.append(f"{entry['file']}: onnxruntime's {kind} {names} differ from the manifest's")
        del session
    return problems


def verify_package(directory: str | Path) -> dict[str, Any]:
    """The report: each check with its problems; ``passed`` only when every check passed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    checks: list[dict[str, Any]] = []
    report: dict[str, Any] = {"format": REPORT_FORMAT, "model_dir": str(directory.resolve()), "checks": checks}

    def record(name: str, problems: list[str] | None, note: str | None = None) -> bool:
        checks.append({"check": name, "passed": problems == [], "problems": problems or [],
                       **({"note": note} if note else {})})
        return problems == []

    manifest: dict[str, Any] = {}
    problems: list[str] = []
    manifest = _collect(problems, lambda: read_manifest(directory)) or {}
    if manifest:
        _collect(problems, lambda: check_manifest_shape(directory, manifest))
    if not record("manifest", problems):
        for name in ("files", "external_data", "onnx_checker", "sessions", "signatures", "tokenizer"):
            record(name, None, "skipped: the manifest is unusable")
        report["passed"] = False
        return report

    files = graph_files(manifest)
    weights = has_weights(manifest)
    files_ok = record("files", _check_files(directory, manifest))
    if manifest.get("kind") == "mobile":
        return _verify_mobile(directory, manifest, report, record, files_ok)
    problems = []
    models = {name: model for name in files
              if (model := _collect(problems, functools.partial(check_graph, directory, name, manifest))) is not None}
    safe = record("external_data", problems) and files_ok
    unsafe = "skipped: onnx and onnxruntime are not run on a package that failed the file checks"
    if safe and manifest.get("target") == "ort":
        record("onnx_checker", [], "target ort: onnxruntime's own ops (SimplifiedLayerNormalization) sit in the "
                                   "default domain, which onnx's checker does not know; onnxruntime's loader "
                                   "validates them (sessions)")
    elif safe:
        record("onnx_checker", _run_checker(directory, files, models, weights))
    else:
        record("onnx_checker", None, unsafe)
    if not safe:
        record("sessions", None, unsafe)
    elif weights:
        record("sessions", _run_sessions(directory, manifest, list(graph_entries(manifest))))
    else:
        record("sessions", [], "structure-only package: no weights, no sessions")
    record("signatures", signature_problems(manifest, models))
    vocab = (manifest.get("text_config") or {}).get("vocab_size")
    if TOKENIZER in manifest["files"] and isinstance(vocab, int) and files_ok:
        record("tokenizer", [p] if (p := tokenizer_problem(directory / TOKENIZER, vocab)) else [])
    report.update({"passed": all(c["passed"] for c in checks), "graphs": files, "weights": weights,
                   "files": len(manifest["files"])})
    return report


def _verify_mobile(directory: Path, manifest: dict[str, Any], report: dict[str, Any],
                   record: Callable[..., bool], files_ok: bool) -> dict[str, Any]:
    """A mobile package: ORT-format graphs (no external data; the onnx checker does not read them, so
    onnxruntime's own loader is the check) and the PLE row tables inside their file."""
    entries = ort_entries(manifest)
    problems = [] if entries else [f"{directory}: a mobile manifest without .ort graphs"]
    for table in (manifest.get("ple") or {}).get("tables", []):
        size = manifest["files"].get(table.get("file"), {}).get("bytes", -1)
        try:
            end = int(table["offset"]) + int(table["rows"]) * int(table["row_bytes"])
            inside = int(table["offset"]) >= 0 and end <= size
        except (KeyError, TypeError, ValueError):
            inside = False
        if not inside:
            problems.append(f"PLE row table {table.get('tensor')} does not lie inside {table.get('file')}")
    record("external_data", problems, "ORT format: graphs carry their weights; PLE row tables checked")
    record("onnx_checker", [], "ORT format is not ONNX protobuf: onnxruntime's loader validates it (sessions)")
    if files_ok and not problems:
        record("sessions", _run_sessions(directory, manifest, entries))
    else:
        record("sessions", None, "skipped: onnxruntime is not run on a package that failed the file checks")
    vocab = (manifest.get("text_config") or {}).get("vocab_size")
    if TOKENIZER in manifest["files"] and isinstance(vocab, int) and files_ok:
        record("tokenizer", [p] if (p := tokenizer_problem(directory / TOKENIZER, vocab)) else [])
    report.update({"passed": all(c["passed"] for c in report["checks"]), "graphs": [e["file"] for e in entries],
                   "weights": True, "files": len(manifest["files"])})
    return report


def summary(report: dict[str, Any]) -> str:
    lines = []
    for check in report["checks"]:
        status = "PASS" if check["passed"] else ("SKIP" if check.get("note", "").startswith("skipped") else "FAIL")
        lines.append(f"{status}  {check['check']}" + (f"  ({check['note']})" if check.get("note") else ""))
        lines += [f"      {p}" for p in check["problems"][:5]]
        if len(check["problems"]) > 5:
            lines.append(f"      … and {len(check['problems']) - 5} more")
    lines.append(f"{report['model_dir']}: {'verified' if report['passed'] else 'NOT a valid package'}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> Path:
    """The JSON report at ``path``, replaced whole (``atomic.write_file``)."""
    return write_file(path, json.dumps(report, indent=1) + "\n")
