"""`optimum-cli export gemma4` is registered through optimum's namespace plug-in point and reaches our exporter."""

import subprocess
import sys
from pathlib import Path

import pytest

OPTIMUM_CLI = Path(sys.executable).with_name("optimum-cli")

pytestmark = pytest.mark.skipif(not OPTIMUM_CLI.exists(), reason="optimum (the export extra) is not installed")


def optimum_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(OPTIMUM_CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_export_lists_the_gemma4_command(tmp_path: Path) -> None:
    result = optimum_cli("export", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "gemma4" in result.stdout


def test_gemma4_help_shows_our_options(tmp_path: Path) -> None:
    result = optimum_cli("export", "gemma4", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: optimum-cli export gemma4" in result.stdout
    for option in ("source", "out_dir", "--recipe", "--mobile", "--target"):
        assert option in result.stdout


def test_a_bad_source_fails_with_one_clear_line(tmp_path: Path) -> None:
    # Exporting even tiny-e2b takes minutes on a shared CPU, so the run path is proven by a source it must refuse.
    result = optimum_cli("export", "gemma4", "no-such-variant", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gemma4-onnx export: error: unknown variant 'no-such-variant'; known: ")
    assert "tiny-e2b" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
