"""Where modules meet: the exporter and the quantizer do not import each other in a cycle (the pipeline,
``gemma4_onnx/pipeline.py``, is where they meet). Imports inside functions count."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "quantize", "graphs", "runtime", "mobile")


def imported_packages(folder: str) -> set[str]:
    """The project packages that any module of ``folder`` imports, at any depth of its code."""
    found = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "gemma4_onnx" and parts[1] in PACKAGES:
                    found.add(parts[1])
    return found - {folder}


def test_the_package_imports_find_what_they_look_for() -> None:
    assert "graphs" in imported_packages("exporter")  # the walk sees real imports


def test_exporter_and_quantize_do_not_import_each_other_in_a_cycle() -> None:
    exporter, quantize = imported_packages("exporter"), imported_packages("quantize")
    assert not ("quantize" in exporter and "exporter" in quantize), (sorted(exporter), sorted(quantize))
    assert "quantize" not in exporter
