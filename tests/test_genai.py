"""onnxruntime-genai runs the exported text model (``mobile --genai``) and greedy-decodes what transformers does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_onnx.errors import UsageError
from gemma4_onnx.graphs.manifest import read_manifest
from gemma4_onnx.mobile.genai import CONFIG, MODEL, genai_package

from support import SHARED_FIXTURES

FIXTURES = ["e2b-mini", "moe-mini"]
WINDOW = 64  # both fixtures' sliding window


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # the fixtures' byte tokenizer, no BOS


def prompts() -> dict[str, list[int]]:
    source = (SHARED_FIXTURES / "e2b-mini" / "eval.txt").read_text() if SHARED_FIXTURES.is_dir() else ""
    return {
        "short": byte_ids("def read_config(path):\n    with open(path) as f:\n"),  # decode crosses the window
        "long": byte_ids(source[:100] if source else "import os\n" * 10),  # prefill longer than the window
    }


def genai_greedy(folder: Path, prompt: list[int], steps: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the mobile extra) is not installed")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


@pytest.fixture(scope="module")
def genai_folders(exported, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("genai")
    made = {}
    for name in FIXTURES:
        checkpoint, package = exported(name)
        made[name] = checkpoint, genai_package(package, root / name, context_length=512)
    return made


@pytest.mark.parametrize("prompt", ["short", "long"])
@pytest.mark.parametrize("name", FIXTURES)
def test_genai_greedy_tokens_equal_transformers(genai_folders, name: str, prompt: str) -> None:
    from gemma4_onnx.exporter.reference_outputs import Reference

    checkpoint, folder = genai_folders[name]
    ids = prompts()[prompt]
    steps = 32 if prompt == "short" else 16
    assert len(ids) + steps > WINDOW
    assert genai_greedy(folder, ids, steps) == Reference(str(checkpoint)).greedy(ids, steps)


@pytest.mark.parametrize("name", FIXTURES)
def test_folder_states_the_cache_memory_cost(genai_folders, name: str) -> None:
    _, folder = genai_folders[name]
    config = json.loads((folder / CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == MODEL
    assert config["search"]["past_present_share_buffer"] is False
    cost = read_manifest(folder)["genai_cache"]
    assert cost["context_length"] == config["model"]["context_length"] == 512
    assert cost["genai_bytes"] > cost["our_runtime_bytes"] > 0
    assert cost["extra_bytes"] == cost["genai_bytes"] - cost["our_runtime_bytes"]
    assert "Memory cost" in (folder / "README.md").read_text()


def test_moe_mini_cost_counts_the_kv_copy_and_the_full_length_sliding_caches(genai_folders) -> None:
    # moe-mini: 4 sliding layers (2 heads × 48) and 2 full K=V layers (1 head × 96), 4 bytes a float.
    cost = read_manifest(genai_folders["moe-mini"][1])["genai_cache"]
    sliding, full = 2 * 48 * 4, 1 * 96 * 4
    assert cost["our_runtime_bytes"] == 4 * 2 * sliding * (WINDOW - 1) + 2 * 1 * full * 512
    assert cost["genai_bytes"] == 4 * 2 * sliding * 512 + 2 * 2 * full * 512


def test_genai_refuses_an_existing_folder_and_a_non_package(genai_folders, tmp_path: Path) -> None:
    _, folder = genai_folders["moe-mini"]
    package = Path(read_manifest(folder)["source"]["path"])
    with pytest.raises(UsageError, match="not empty"):
        genai_package(package, folder)
    with pytest.raises(UsageError, match="not a gemma4-onnx package"):
        genai_package(tmp_path, tmp_path / "out")


def test_cli_mobile_genai_writes_the_folder(genai_folders, tmp_path: Path) -> None:
    package = Path(read_manifest(genai_folders["moe-mini"][1])["source"]["path"])
    out = tmp_path / "genai"
    result = subprocess.run([sys.executable, "-m", "gemma4_onnx.cli", "mobile", str(package), str(out), "--genai",
                             "--quiet"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / MODEL).is_file() and (out / CONFIG).is_file()
