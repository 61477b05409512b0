"""``gemma4-onnx verify``: accepts what the other commands produce, reports every check as JSON, and
rejects incomplete or changed packages (the tampered variants are in test_bad_inputs.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_onnx.cli import main
from gemma4_onnx.graphs.manifest import MANIFEST
from gemma4_onnx.runtime.package_files import graph_entries
from gemma4_onnx.verify import REPORT_FORMAT, verify_package

RTN = '[default]\nbits = 4\nblock_size = 16\nalgorithm = "rtn"\n'
CHECKS = ["manifest", "files", "external_data", "onnx_checker", "sessions", "signatures", "tokenizer"]


def assert_verified(package: Path) -> dict:
    report = verify_package(package)
    assert report["passed"], json.dumps(report["checks"], indent=1)
    assert [c["check"] for c in report["checks"]] == CHECKS
    return report


def test_verify_accepts_an_export_and_reports_json(exported, tmp_path, capsys) -> None:
    _, fp32 = exported("tiny-e2b")
    report = assert_verified(fp32)
    assert report["format"] == REPORT_FORMAT and report["weights"] and len(report["graphs"]) >= 3
    assert main(["verify", str(fp32), "--json", "--out", str(tmp_path / "report.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "report.json").read_text())
    assert printed["passed"] is True


def test_verify_accepts_a_quantized_package(exported, tmp_path) -> None:
    from gemma4_onnx.quantize.job import quantize_package

    _, fp32 = exported("tiny-e2b")
    (tmp_path / "rtn.toml").write_text(RTN)
    quantized = quantize_package(fp32, tmp_path / "q", str(tmp_path / "rtn.toml"))
    manifest = json.loads((quantized / MANIFEST).read_text())
    assert all(g["file"] in manifest["files"] for g in graph_entries(manifest))  # towers included
    assert_verified(quantized)


def test_verify_accepts_inputs_with_a_default(exported) -> None:
    """26B/31B graphs take image_blocks with a default value, which onnxruntime lists among initializers."""
    _, fp32 = exported("tiny-26b-a4b")
    assert_verified(fp32)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"source": "tiny-26b-a4b"}, {"source": "tiny-31b", "target": "ort"},
                                     {"source": "tiny-e4b", "structure_only": True}], ids=str)
def test_verify_accepts_every_kind_of_export(options: dict, tmp_path) -> None:
    from gemma4_onnx.exporter.package import export_package

    report = assert_verified(export_package(options.pop("source"), tmp_path / "p", **options))
    assert report["weights"] is not options.get("structure_only", False)


def test_a_failed_verify_exits_1_with_a_json_report_and_runs_nothing_unsafe(exported, tmp_path, capsys) -> None:
    _, fp32 = exported("tiny-e2b")
    package = Path(shutil.copytree(fp32, tmp_path / "p"))
    (package / "blocks" / "layer_03.data").write_bytes(b"")
    (package / "notes.txt").write_text("added after export")
    assert main(["verify", str(package), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] is False and checks["manifest"]["passed"]
    problems = " ".join(checks["files"]["problems"])
    assert "blocks/layer_03.data has 0 bytes" in problems and "notes.txt is not listed" in problems
    assert not checks["external_data"]["passed"]
    assert checks["sessions"]["note"].startswith("skipped") and checks["onnx_checker"]["note"].startswith("skipped")


def test_a_staging_directory_without_its_manifest_is_not_a_package(exported, tmp_path, capsys) -> None:
    _, fp32 = exported("tiny-e2b")
    partial = Path(shutil.copytree(fp32, tmp_path / ".p.tmp-1-x"))
    (partial / MANIFEST).unlink()
    report = verify_package(partial)
    assert not report["passed"] and "no manifest.json" in report["checks"][0]["problems"][0]
    assert main(["verify", str(partial)]) == 1
    assert main(["verify", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_verify_needs_no_torch(exported) -> None:
    _, fp32 = exported("tiny-e2b")
    code = (f"import sys; from gemma4_onnx.verify import verify_package; r = verify_package({str(fp32)!r}); "
            "assert r['passed'] and 'torch' not in sys.modules, ('torch' in sys.modules, r)")
    subprocess.run([sys.executable, "-c", code], check=True)
