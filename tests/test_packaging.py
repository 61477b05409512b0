"""One import root, nothing generic in site-packages, and a deployment side free of torch."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from support import REPO

SUBPACKAGES = ["exporter", "graphs", "quantize", "runtime"]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_subpackages_import_under_the_root_from_any_directory(cwd: str, tmp_path: Path) -> None:
    where = REPO if cwd == "repo" else tmp_path
    code = "; ".join(f"import gemma4_onnx.{p}" for p in SUBPACKAGES)
    result = run_python(code + "; import gemma4_onnx.cli", where)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_bare_top_level_names_are_not_importable_outside_the_repo(name: str, tmp_path: Path) -> None:
    result = run_python(f"import {name}", tmp_path)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_no_module_has_a_second_name_even_in_the_repo_root(name: str) -> None:
    result = run_python(f"import {name}", REPO)
    assert result.returncode != 0
    assert f"import gemma4_onnx.{name}, not {name}" in result.stderr


def test_deployment_side_does_not_import_torch_or_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, gemma4_onnx.cli, gemma4_onnx.runtime, gemma4_onnx.quantize\n"
        "gemma4_onnx.cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr


def test_wheel_holds_only_the_gemma4_onnx_root(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("gemma4_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # The one file outside the root is optimum-cli's documented plug-in point: optimum discovers commands in the
    # PEP 420 namespace optimum.commands.register (as optimum-onnx and optimum-intel do), so `optimum-cli export
    # gemma4` needs exactly this one-import module there, and never an __init__.py that would shadow the namespace.
    register = "optimum/commands/register/gemma4_onnx.py"
    assert register in names
    assert not [n for n in names if n.startswith("optimum/") and n != register]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info") and n != register}
    assert roots == {"gemma4_onnx"}
    for p in SUBPACKAGES:
        assert f"gemma4_onnx/{p}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gemma4-onnx = gemma4_onnx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
