"""``export --recipe``: one streaming pass that equals exporting in float and then quantizing."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma4_onnx.atomic import partial_dir
from gemma4_onnx.cli import main
from gemma4_onnx.pipeline import export
from gemma4_onnx.quantize.job import quantize_package
from gemma4_onnx.quantize.resume import ResumeState


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# int4 calibrates (GPTQ), measures sensitivities and spends a bit budget; tiny-e2b has PLE and KV sharing,
# tiny-26b-a4b MoE experts and K=V.
@pytest.mark.parametrize("source", ["tiny-e2b", "tiny-26b-a4b"])
def test_streaming_export_equals_export_then_quantize(source: str, exported, tmp_path: Path) -> None:
    checkpoint, fp32 = exported(source)
    two_steps = quantize_package(fp32, tmp_path / "two-steps", "int4")
    streamed = export(str(checkpoint), tmp_path / "streamed", recipe="int4")
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

    package = export("tiny-31b", tmp_path / "q", recipe="int8", calibration_tokens=1024)
    model = TextModel(package)
    assert model.forward([[2, 10, 11]], model.empty_cache(1)).shape == (1, 3, 320)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "random" and manifest["quantization"]["calibration_tokens"] == 1024


@pytest.mark.parametrize(("extra", "message"), [
    (["--recipe", "int4", "--structure-only"], "cannot be combined with --structure-only"),
    (["--budget-bits", "5"], "need --recipe"),
    (["--recipe", "int5"], "int5"),
    (["--recipe", "int8", "--calibration-tokens", "0"], "--calibration-tokens must be ≥ 1"),
    (["--recipe", "int8", "--calibration", "/no/such/text.txt"], "does not exist"),
    (["--recipe", "int8", "--calibration", "EMPTY"], "the calibration text gives no tokens"),
])
def test_bad_streaming_export_options_are_refused(extra: list[str], message: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    extra = [str(tmp_path / "empty.txt") if e == "EMPTY" else e for e in extra]
    assert main(["export", "tiny-e2b", str(tmp_path / "out"), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def _wait_for_block(partial: Path, layers: int, process: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if ResumeState(partial).layers_done() >= layers:
                return
        except OSError:  # the partial output is being created
            pass
        time.sleep(0.02)
    raise AssertionError(f"no block {layers} completed before the run ended or {limit} s")


@pytest.mark.long
def test_an_interrupted_streaming_export_resumes_from_its_last_completed_block(exported, tmp_path: Path) -> None:
    checkpoint, fp32 = exported("tiny-e2b")
    command = [sys.executable, "-m", "gemma4_onnx.cli", "export", str(checkpoint), str(tmp_path / "out"),
               "--recipe", "int4"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = partial_dir(tmp_path / "out")
    try:
        _wait_for_block(partial, 3, process)
    finally:
        process.kill()
        process.wait()
    assert not (tmp_path / "out").exists() and partial.is_dir()
    rerun = subprocess.run(command, capture_output=True, text=True, check=True)
    done = int(rerun.stdout.split("resuming: blocks 0-")[1].split()[0]) + 1
    assert done >= 3
    assert not partial.exists()
    complete = quantize_package(fp32, tmp_path / "complete", "int4")
    a, b = _files(complete), _files(tmp_path / "out")
    assert [name for name in a if name != "manifest.json" and a[name] != b[name]] == []


@pytest.mark.long
def test_a_partial_export_of_another_recipe_is_not_resumed(exported, tmp_path: Path) -> None:
    checkpoint, _ = exported("tiny-e2b")
    partial = partial_dir(tmp_path / "out")
    (partial / ".resume").mkdir(parents=True)
    (partial / ".resume" / "key").write_text("another export")
    (partial / "blocks").mkdir()
    (partial / "blocks" / "layer_00.data").write_bytes(b"stale")
    export(str(checkpoint), tmp_path / "out", recipe="int8")
    assert not partial.exists() and (tmp_path / "out" / "blocks" / "layer_00.data").read_bytes() != b"stale"
