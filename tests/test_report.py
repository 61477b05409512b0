"""The parity report: several runs side by side, Markdown and self-contained HTML."""

from pathlib import Path

import pytest

from gemma4_onnx.errors import UsageError
from gemma4_onnx.parity_run import run_parity, write_report
from gemma4_onnx.quantize.job import quantize_package
from gemma4_onnx.runtime.report import write_report as render


@pytest.mark.long
def test_report_renders_runs_side_by_side_without_network(exported, tmp_path: Path) -> None:
    checkpoint, fp32 = exported("tiny-e2b")
    int8 = quantize_package(fp32, tmp_path / "int8", "int8")
    dirs = []
    for label, package in (("fp32", fp32), ("int8", int8)):
        dirs.append(write_report(run_parity(package, checkpoint, None, steps=4), tmp_path / label).parent)
    out = render(dirs, tmp_path / "report")
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert "| float32 |" in md and "| int8 |" in md and "decoder_layer.9" in md
    assert page.count("<svg") == 5 and "<polyline" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    assert "src=" not in page and "<script" not in page


def test_report_refuses_a_directory_without_parity_json(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no parity\.json"):
        render([tmp_path], tmp_path / "out")
