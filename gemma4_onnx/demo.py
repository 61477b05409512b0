"""``make demo``: the main job end to end on a deterministic random tiny-e2b checkpoint.

checkpoint → export (fp32) → parity → quantize (int4) → parity → a few generated tokens. Each stage
runs through the real CLI; a stage that is not built yet is reported as such, stages that need its
output are skipped, and any other failure stops the demo.
"""

import sys
from pathlib import Path

from gemma4_onnx.cli import main as cli
from gemma4_onnx.errors import NotBuiltYet

Stage = tuple[str, list[str], Path | None, Path | None]  # name, argv, needs, produces


def stages(root: Path) -> list[Stage]:
    checkpoint, fp32, int4 = root / "checkpoint", root / "fp32", root / "int4"
    return [
        ("checkpoint", ["init-checkpoint", "tiny-e2b", str(checkpoint), "--dtype", "float32", "--force"],
         None, checkpoint),
        ("export", ["export", str(checkpoint), str(fp32), "--force"], checkpoint, fp32),
        ("parity fp32", ["parity", str(fp32), "--checkpoint", str(checkpoint), "--out", str(root / "parity-fp32")],
         fp32, root / "parity-fp32" / "parity.json"),
        ("quantize", ["quantize", str(fp32), str(int4), "--recipe", "int4", "--force"], fp32, int4),
        ("parity int4", ["parity", str(int4), "--checkpoint", str(checkpoint), "--out", str(root / "parity-int4")],
         int4, root / "parity-int4" / "parity.json"),
        ("generate", ["generate", str(fp32), "--prompt", "def read_config(path):", "--max-new-tokens", "16"],
         fp32, None),
    ]


def run(root: Path) -> int:
    made: set[Path] = set()
    missing: list[str] = []
    for name, argv, needs, produces in stages(root):
        print(f"== {name}: gemma4-onnx {' '.join(argv)}", flush=True)
        if needs is not None and needs not in made:
            print(f"   skipped: its input {needs} was not built")
            continue
        code = cli([*argv, "--quiet"] if name in ("checkpoint", "export", "quantize") else argv)
        if code == NotBuiltYet.exit_code:
            missing.append(name)
        elif code != 0:
            print(f"demo failed at {name} (exit {code})", file=sys.stderr)
            return code
        elif produces is not None:
            made.add(produces.parent if produces.suffix == ".json" else produces)
            print(f"   {name}: {produces}")
    print(f"demo done; not built yet: {', '.join(missing)}" if missing else "demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo")))
