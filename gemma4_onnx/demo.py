"""``make demo``: the main job end to end on a deterministic random tiny-e2b checkpoint.

checkpoint → export (fp32) → quantize (int4) → parity report → a few generated tokens. Each stage
runs through the real CLI; a stage that is not built yet is reported as such and skipped, and any
other failure stops the demo.
"""

import sys
from pathlib import Path

from gemma4_onnx.cli import main as cli
from gemma4_onnx.errors import NotBuiltYet


def run(root: Path) -> int:
    checkpoint, fp32, int4, report = root / "checkpoint", root / "fp32", root / "int4", root / "parity"
    stages = [
        ("checkpoint", ["init-checkpoint", "tiny-e2b", str(checkpoint), "--dtype", "float32", "--force"],
         checkpoint),
        ("export", ["export", str(checkpoint), str(fp32), "--force"], fp32),
        ("quantize", ["quantize", str(fp32), str(int4), "--recipe", "int4", "--force"], int4),
        ("parity", ["parity", str(int4), "--checkpoint", str(checkpoint), "--out", str(report)],
         report / "parity.json"),
        ("generate", ["generate", str(int4), "--prompt", "def read_config(path):", "--max-new-tokens", "16"],
         None),
    ]
    missing: list[str] = []
    for name, argv, artifact in stages:
        print(f"== {name}: gemma4-onnx {' '.join(argv)}", flush=True)
        if missing:
            print(f"   skipped: needs {missing[0]}, which is not built yet")
            continue
        code = cli([*argv, "--quiet"])
        if code == NotBuiltYet.exit_code:
            missing.append(name)
            print(f"   not built yet: {name}")
        elif code != 0:
            print(f"demo failed at {name} (exit {code})", file=sys.stderr)
            return code
        elif artifact is not None:
            print(f"   {name}: {artifact}")
    if missing:
        print(f"demo ran every built stage; not built yet: {', '.join(missing)}")
    else:
        print("demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "build/demo")))
