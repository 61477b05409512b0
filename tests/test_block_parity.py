"""``parity --blocks``: each exported block against the same transformers layer loaded alone."""

import json
from pathlib import Path

import pytest

from gemma4_onnx import tolerances
from gemma4_onnx.block_parity import run_block_parity
from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.exporter.geometry import text_geometry
from gemma4_onnx.exporter.init_checkpoint import init_checkpoint
from gemma4_onnx.exporter.variants import TINY

from support import TRAINED_FIXTURES


@pytest.mark.parametrize("source", TINY + TRAINED_FIXTURES)
def test_every_block_matches_its_transformers_layer(source: str, exported) -> None:
    checkpoint, package = exported(source)
    result = run_block_parity(package, str(checkpoint))
    geometry = text_geometry(json.loads((checkpoint / "config.json").read_text()))
    assert [b["layer"] for b in result["blocks"]] == list(range(geometry.num_layers))
    assert result["sequence"] > geometry.sliding_window  # sliding layers run past their window
    assert min(b["cosine"] for b in result["blocks"]) >= tolerances.BLOCK_FP32_MIN_COSINE
    assert result["passed"] and result["checks"]


def test_blocks_of_other_weights_fail(exported, tmp_path: Path) -> None:
    _, package = exported("tiny-e2b")
    other = init_checkpoint("tiny-e2b", tmp_path / "seed1", seed=1, dtype="float32")
    result = run_block_parity(package, str(other), layers=[0, 6])
    assert [b["layer"] for b in result["blocks"]] == [0, 6]
    assert max(b["cosine"] for b in result["blocks"]) < 0.9
    assert not result["passed"]


def test_cli_blocks_from_a_variant_name_and_report(tmp_path: Path, capsys) -> None:
    package, out = tmp_path / "pkg", tmp_path / "parity"
    assert main(["export", "tiny-26b-a4b", str(package), "--quiet"]) == 0
    assert main(["parity", str(package), "--checkpoint", "tiny-26b-a4b", "--blocks", "--out", str(out),
                 "--quiet"]) == 0
    result = json.loads((out / "parity.json").read_text())
    assert result["mode"] == "blocks" and "text" not in result and result["passed"]
    assert main(["report", str(out), "--out", str(tmp_path / "report"), "--quiet"]) == 0
    assert "blocks only" in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(UsageError, match="not the source"):
        run_block_parity(package, "tiny-31b")
    with pytest.raises(UsageError, match="--layers"):
        run_block_parity(package, "tiny-26b-a4b", layers=[99])
