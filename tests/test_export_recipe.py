"""``export --recipe``: one streaming pass that equals exporting in float and then quantizing."""

import json
from pathlib import Path

import pytest

from gemma4_onnx.cli import main
from gemma4_onnx.exporter.package import export_package
from gemma4_onnx.quantize.apply import quantize_package


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# int4 calibrates (GPTQ), measures sensitivities and spends a bit budget; tiny-e2b has PLE and KV sharing,
# tiny-26b-a4b MoE experts and K=V.
@pytest.mark.parametrize("source", ["tiny-e2b", "tiny-26b-a4b"])
def test_streaming_export_equals_export_then_quantize(source: str, exported, tmp_path: Path) -> None:
    checkpoint, fp32 = exported(source)
    two_steps = quantize_package(fp32, tmp_path / "two-steps", "int4")
    streamed = export_package(str(checkpoint), tmp_path / "streamed", recipe="int4")
    a, b = _files(two_steps), _files(streamed)
    assert sorted(a) == sorted(b)
    assert [name for name in a if name != "manifest.json" and a[name] != b[name]] == []
    manifest_a, manifest_b = (json.loads(x["manifest.json"]) for x in (a, b))
    assert manifest_a["quantization"].pop("source_package") == str(fp32.resolve())
    assert manifest_b["quantization"].pop("source_package") is None
    assert manifest_a == manifest_b
    assert manifest_b["quantization"]["sensitivity"] and manifest_b["weights"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["streamed", "two-steps"]  # the scratch graphs are gone


def test_streaming_export_from_a_variant_name_runs(tmp_path: Path) -> None:
    from gemma4_onnx.runtime.text_model import TextModel

    package = export_package("tiny-31b", tmp_path / "q", recipe="int8")
    model = TextModel(package)
    assert model.forward([[2, 10, 11]], model.empty_cache(1)).shape == (1, 3, 320)
    assert json.loads((package / "manifest.json").read_text())["source"]["kind"] == "random"


@pytest.mark.parametrize(("extra", "message"), [
    (["--recipe", "int4", "--structure-only"], "cannot be combined with --structure-only"),
    (["--budget-bits", "5"], "need --recipe"),
    (["--recipe", "int5"], "int5"),
])
def test_bad_streaming_export_options_are_refused(extra: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "tiny-e2b", str(tmp_path / "out"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
