"""``make report``: float and every built-in recipe, side by side, for tiny-e2b (random weights) and, when
present, both trained fixtures: export → quantize → parity → report, one report per source."""

import sys
from pathlib import Path

from gemma4_onnx.errors import Gemma4OnnxError
from gemma4_onnx.exporter.init_checkpoint import init_checkpoint
from gemma4_onnx.exporter.package import export_package
from gemma4_onnx.parity_run import run_parity, write_report
from gemma4_onnx.progress import say, set_quiet
from gemma4_onnx.quantize.job import quantize_package
from gemma4_onnx.quantize.recipe import BUILTIN
from gemma4_onnx.runtime.report import write_report as render

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
AUTO_BUDGET = 4.9  # the int4 gate's limit
TINY_AUTO_BUDGET = 6.0  # tiny-e2b's int8 K/V projections alone exceed 4.9 bits per linear weight


def sources(root: Path) -> list[tuple[str, Path, Path | None]]:
    out: list[tuple[str, Path, Path | None]] = [
        ("tiny-e2b", init_checkpoint("tiny-e2b", root / "checkpoints" / "tiny-e2b", dtype="float32", force=True),
         None)]
    for name in ("e2b-mini", "moe-mini"):
        if (FIXTURES / name / "config.json").is_file():
            out.append((name, FIXTURES / name, FIXTURES / name / "eval.txt"))
    return out


def main(root: Path) -> int:
    set_quiet(True)
    for name, checkpoint, text in sources(root):
        fp32 = export_package(str(checkpoint), root / "packages" / name, force=True)
        packages = {"float32": fp32}
        for recipe in BUILTIN:
            budget = (AUTO_BUDGET if text else TINY_AUTO_BUDGET) if recipe == "auto" else None
            label = f"auto-{budget:g}" if budget else recipe
            packages[label] = quantize_package(fp32, root / "packages" / f"{name}-{label}", recipe, force=True,
                                               budget_bits=budget)
        runs = []
        for label, package in packages.items():
            runs.append(write_report(run_parity(package, checkpoint, text, steps=64), root / "parity" / name / label))
        out = render([r.parent for r in runs], root / name, force=True)
        print(f"report: {out / 'report.html'}")
    say("done")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/reports")))
    except Gemma4OnnxError as exc:
        print(f"make report: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
