"""``gemma4-onnx mobile``: ORT-format packages that plain onnxruntime runs to the ONNX package's tokens, a
reduced-operator config that provably covers every graph, PLE rows read from storage, the usability report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gemma4_onnx.cli import main
from gemma4_onnx.errors import UsageError
from gemma4_onnx.mobile.convert import CONFIG
from gemma4_onnx.mobile.example import MobilePackage
from gemma4_onnx.mobile.operators import check_coverage, initializer_names, parse_config, uncovered
from gemma4_onnx.mobile.package import mobile_package
from gemma4_onnx.mobile.ple_rows import open_rows, split_ple, table_from_dict
from gemma4_onnx.runtime.text_model import TextModel

QUANTIZED = pytest.param("e2b-mini:int4", marks=pytest.mark.slow)  # GPTQ calibration: about a minute
PROMPT = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
STEPS = 12


@pytest.fixture(scope="module")
def mobile(exported, tmp_path_factory):
    """source name (or "name:recipe") → (ONNX package, mobile package), built once per module."""
    root = tmp_path_factory.mktemp("mobile")
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            source, _, recipe = name.partition(":")
            package = exported(source)[1]
            if recipe:
                from gemma4_onnx.quantize.job import quantize_package

                package = quantize_package(package, root / f"{source}-{recipe}", recipe)
            made[name] = package, mobile_package(package, root / f"{source}-{recipe or 'fp32'}-mobile")
        return made[name]

    return get


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-26b-a4b", "e2b-mini", "moe-mini", QUANTIZED])
def test_ort_package_generates_the_onnx_packages_tokens(mobile, name):
    package, out = mobile(name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {manifest["graphs"][g]["file"] for g in ("embed", "decoder")} == {"embed.ort", "decoder.ort"}
    assert not list(out.rglob("*.onnx")) and not (out / "blocks").exists()
    for name_ in ("usability.json", "usability.md", "build.md", CONFIG, "example.py", "tokenizer.json"):
        assert (out / name_).is_file(), name_
    assert all(entry["sha256"] for entry in manifest["files"].values())
    check_coverage(out / CONFIG, sorted(out.glob("*.ort")))
    expected = TextModel(package).greedy(PROMPT, STEPS)
    assert MobilePackage(out).greedy(PROMPT, STEPS) == expected


@pytest.mark.parametrize("name", ["e2b-mini", QUANTIZED])
def test_ple_table_stays_out_of_the_model_and_rows_give_identical_inputs(mobile, name, tmp_path):
    package, out = mobile(name)
    manifest = json.loads((out / "manifest.json").read_text())
    ple = manifest["ple"]
    stored = set(initializer_names(out / "embed.ort"))
    assert stored and not stored & {t["tensor"] for t in ple["tables"]}
    assert {i["name"] for i in manifest["graphs"]["embed"]["inputs"]} == {"input_ids", *(t["input"] for t in
                                                                                         ple["tables"])}
    ids = np.array([PROMPT, PROMPT[::-1]], dtype=np.int64)
    reference = ort.InferenceSession(str(package / "embed.onnx")).run(None, {"input_ids": ids})
    rows = {t["input"]: np.asarray(open_rows(out, table_from_dict(t))[ids]) for t in ple["tables"]}
    via_ort = ort.InferenceSession(str(out / "embed.ort")).run(None, {"input_ids": ids, **rows})
    split, _ = split_ple(onnx.inliner.inline_local_functions(onnx.load(package / "embed.onnx",
                                                                       load_external_data=False)), ple["file"])
    onnx.save_model(split, package / "embed.rows-test.onnx")
    try:
        via_onnx = ort.InferenceSession(str(package / "embed.rows-test.onnx")).run(None, {"input_ids": ids, **rows})
    finally:
        (package / "embed.rows-test.onnx").unlink()
    for ref, a, b in zip(reference, via_ort, via_onnx, strict=True):
        np.testing.assert_array_equal(ref, b)
        np.testing.assert_allclose(ref, a, rtol=0, atol=1e-6)
    assert np.array_equal(reference[1], via_onnx[1])


def test_config_covers_every_operator_and_fails_without_one_entry(mobile):
    _, out = mobile("e2b-mini")
    graphs = sorted(out.glob("*.ort"))
    config = parse_config((out / CONFIG).read_text())
    assert uncovered(config, graphs) == []
    for key in list(config.operators):
        reduced = parse_config((out / CONFIG).read_text())
        del reduced.operators[key]
        assert any(f"{key[0]};{key[1]};{key[2]} (operator)" in m for m in uncovered(reduced, graphs)), key
    key, types = next((k, t) for k, t in config.operators.items() if t.get("inputs"))
    index, allowed = next(iter(types["inputs"].items()))
    dropped = sorted(allowed)[0]
    allowed.discard(dropped)
    assert any(f"{key[2]} input {index} type {dropped}" in m for m in uncovered(config, graphs))
    broken = out.parent / "broken.config"
    broken.write_text("\n".join(line for line in (out / CONFIG).read_text().splitlines()
                                 if not line.startswith("ai.onnx;13;")))
    with pytest.raises(UsageError, match="does not cover"):
        check_coverage(broken, graphs)


def test_usability_report_and_inlined_functions(mobile):
    _, out = mobile("tiny-e2b")
    report = json.loads((out / "usability.json").read_text())
    for graph in ("embed", "decoder"):
        providers = report["graphs"][graph]["providers"]
        assert set(providers) == {"NNAPI", "CoreML (ML Program)", "XNNPACK"}
        for views in providers.values():
            assert views["fixed_shapes"]["nodes"] > 0
    functions = report["functions"]["decoder"]
    assert any(name.startswith("ai.gemma4:") for name in functions)
    assert all(f["calls"] > 0 and f["inlined_nodes"] > 0 for f in functions.values())
    assert "## decoder" in (out / "usability.md").read_text()


def test_example_script_runs_standalone(mobile):
    package, out = mobile("tiny-e2b")
    result = subprocess.run([sys.executable, str(out / "example.py"), str(out), "--ids",
                             ",".join(map(str, PROMPT)), "--steps", "4"], capture_output=True, text=True, check=True)
    expected = TextModel(package).greedy(PROMPT, 4)
    eos = json.loads((out / "manifest.json").read_text())["text_config"].get("eos_token_id")
    printed = [int(t) for t in result.stdout.strip().split(",") if t]
    assert printed == expected[:len(printed)] and (len(printed) == 4 or expected[len(printed)] in np.atleast_1d(eos))


def test_cli_mobile_refuses_a_non_empty_output(mobile, tmp_path, capsys):
    package, _ = mobile("tiny-e2b")
    (tmp_path / "keep").write_text("x")
    assert main(["mobile", str(package), str(tmp_path), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_verify_accepts_the_mobile_package_and_rejects_tampering(mobile, tmp_path) -> None:
    import shutil

    from gemma4_onnx.verify import verify_package

    _, out = mobile("tiny-e2b")
    report = verify_package(out)
    assert report["passed"] and {"embed.ort", "decoder.ort"} <= set(report["graphs"])
    assert next(c for c in report["checks"] if c["check"] == "sessions")["problems"] == []
    flipped = Path(shutil.copytree(out, tmp_path / "flipped"))
    data = bytearray((flipped / "decoder.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "decoder.ort").write_bytes(bytes(data))
    assert not verify_package(flipped)["passed"]
    moved = Path(shutil.copytree(out, tmp_path / "moved"))
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["ple"]["tables"][0]["offset"] = 1 << 40
    (moved / "manifest.json").write_text(json.dumps(manifest))
    checks = {c["check"]: c for c in verify_package(moved)["checks"]}
    assert not checks["external_data"]["passed"] and checks["sessions"]["passed"] is False
